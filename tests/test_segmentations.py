"""Export Segmentations on real EM labels: 2D, 3D as slices, 3D as one file, with images,
appending without overwriting, refusals before any file, numpy / dask / zarr input."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import tifffile
import zarr
from scipy import ndimage

from panoptem.errors import Cancelled, PanoptemError
from panoptem.progress import Progress
from panoptem.segmentations import export_segmentations, slice_names
from testutils import EM_DATA, file_tree, read_png


@pytest.fixture(scope="module")
def em_2d(lucchi_image):
    """A real FIB-SEM image (768 x 1024 uint8) and its mitochondria as instances (int64)."""
    mask = read_png(EM_DATA / "lucchi_test_0000_mask.png")[..., 0] > 0
    return lucchi_image, ndimage.label(mask)[0].astype(np.int64)


@pytest.fixture(scope="module")
def em_3d(em_volume):
    """The first 12 slices of a real FIB-SEM volume and dark objects labelled in 3D."""
    volume = em_volume[:12]
    labels = ndimage.label(ndimage.binary_opening(volume < 110, iterations=2))[0]
    assert labels.max() > 3
    return volume, labels.astype(np.int64)


def test_2d_labels_and_image(tmp_path, em_2d):
    image, labels = em_2d
    written = export_segmentations(labels, tmp_path, "mito", "lucchi", image=image)
    assert written == [tmp_path / "mito" / "masks" / "lucchi.tiff"]
    mask = tifffile.imread(written[0])
    assert mask.dtype == np.uint8 and np.array_equal(mask, labels)  # < 256 objects
    img = tifffile.imread(tmp_path / "mito" / "images" / "lucchi.tiff")
    assert img.dtype == image.dtype and np.array_equal(img, image)


def test_2d_labels_only_and_wide_ids(tmp_path, em_2d):
    _, labels = em_2d
    big = np.where(labels > 0, labels + 70_000, 0)  # beyond uint16: int32
    (path,) = export_segmentations(big, tmp_path, "ds", "big ids")
    assert not (tmp_path / "ds" / "images").exists()
    back = tifffile.imread(path)
    assert back.dtype == np.int32 and np.array_equal(back, big)
    assert path.name == "big ids.tiff"


def test_3d_as_2d_images(tmp_path, em_3d):
    volume, labels = em_3d
    written = export_segmentations(labels, tmp_path, "vol", "lucchi", image=volume)
    assert [p.name for p in written] == [f"lucchi_{i:02d}.tiff" for i in range(12)]
    for i in (0, 11):
        mask = tifffile.imread(written[i])
        assert mask.dtype == np.uint8 and np.array_equal(mask, labels[i])
        img = tifffile.imread(tmp_path / "vol" / "images" / written[i].name)
        assert img.dtype == np.uint8 and np.array_equal(img, volume[i])


def test_slice_names_pad_to_the_last_index():
    assert slice_names("a", 10) == [f"a_{i}.tiff" for i in range(10)]
    assert slice_names("a", 11)[-1] == "a_10.tiff" and slice_names("a", 11)[0] == "a_00.tiff"
    assert slice_names("a", 1) == ["a_0.tiff"]
    assert slice_names("a/b", 2) == ["a_b_0.tiff", "a_b_1.tiff"]
    assert slice_names("x", 2, ["s1.png", "s2.tif"]) == ["s1.tiff", "s2.tiff"]
    with pytest.raises(PanoptemError, match="3 file names for 2 slices"):
        slice_names("x", 2, ["a", "b", "c"])


def test_3d_as_2d_images_with_source_file_names(tmp_path, em_3d):
    volume, labels = em_3d
    names = [f"section_{i}.png" for i in range(12)]
    written = export_segmentations(labels, tmp_path, "vol", "lucchi", file_names=names)
    assert [p.name for p in written] == [f"section_{i}.tiff" for i in range(12)]
    np.testing.assert_array_equal(tifffile.imread(written[5]), labels[5])


def test_3d_as_one_file(tmp_path, em_3d):
    volume, labels = em_3d
    wide = np.where(labels > 0, labels + 300, 0)  # uint16 ids
    written = export_segmentations(wide, tmp_path, "vol", "lucchi", image=volume, as_3d=True)
    assert written == [tmp_path / "vol" / "masks" / "lucchi.tiff"]
    mask = tifffile.imread(written[0])
    assert mask.shape == (12, 128, 128) and mask.dtype == np.uint16
    assert np.array_equal(mask, wide)
    img = tifffile.imread(tmp_path / "vol" / "images" / "lucchi.tiff")
    assert img.dtype == volume.dtype and np.array_equal(img, volume)


def test_appends_and_never_overwrites(tmp_path, em_3d):
    volume, labels = em_3d
    first = export_segmentations(labels, tmp_path, "ds", "lucchi", image=volume)
    kept = file_tree(tmp_path)
    second = export_segmentations(labels[:, ::-1], tmp_path, "ds", "lucchi", image=volume[:, ::-1])
    assert [p.name for p in second] == [f"lucchi_{i:02d}_1.tiff" for i in range(12)]
    assert {k: v for k, v in file_tree(tmp_path).items() if k in kept} == kept
    np.testing.assert_array_equal(tifffile.imread(first[3]), labels[3])
    np.testing.assert_array_equal(tifffile.imread(second[3]), labels[3, ::-1])
    np.testing.assert_array_equal(
        tifffile.imread(tmp_path / "ds" / "images" / second[3].name), volume[3, ::-1]
    )
    # names taken in images/ only (a mask-less image) are skipped too, so pairs stay pairs
    tifffile.imwrite(tmp_path / "ds" / "images" / "single.tiff", volume[0])
    (path,) = export_segmentations(labels[0], tmp_path, "ds", "single")
    assert path.name == "single_1.tiff"
    # and a 3D file beside them
    (path,) = export_segmentations(labels, tmp_path, "ds", "lucchi_00", as_3d=True)
    assert path.name == "lucchi_00_2.tiff"


def test_refused_before_any_file_is_written(tmp_path, em_3d, em_2d):
    volume, labels = em_3d
    image, labels2d = em_2d
    cases = [
        (dict(labels=labels, image=volume[:, :100]), "image has shape \\(12, 100, 128\\) but"),
        (dict(labels=labels[None]), "2D or 3D labels, not 4-dimensional"),
        (dict(labels=labels2d, image=np.stack([image] * 3, -1)), "RGB"),
        (dict(labels=labels, folder_name="  "), "folder name"),
        (dict(labels=labels, folder_name="a/b"), "folder name"),
        (dict(labels=labels, save_dir=""), "Save directory"),
        (dict(labels=labels, file_names=["a", "b"]), "2 file names for 12 slices"),
        (dict(labels=labels.astype(np.int64) * 2**40), "do not fit in 32 bits"),
    ]
    for kwargs, match in cases:
        kwargs = {"save_dir": tmp_path, "folder_name": "ds", "name": "n", **kwargs}
        labels_arg = kwargs.pop("labels")
        with pytest.raises(PanoptemError, match=match):
            export_segmentations(labels_arg, **kwargs)
        assert list(tmp_path.iterdir()) == []
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(PanoptemError, match="Save directory .*afile is a file, not a folder"):
        export_segmentations(labels, afile, "ds", "n")
    with pytest.raises(PanoptemError, match="dataset folder .*afile is a file, not a folder"):
        export_segmentations(labels, tmp_path, "afile", "n")
    assert [p.name for p in tmp_path.iterdir()] == ["afile"]


def test_dask_and_zarr_labels_and_images(tmp_path, em_3d):
    volume, labels = em_3d
    lazy_labels = da.from_array(labels, chunks=(1, 64, 64))
    lazy_image = da.from_array(volume, chunks=(1, 128, 128))
    written = export_segmentations(lazy_labels, tmp_path, "dask", "v", image=lazy_image)
    assert len(written) == 12
    np.testing.assert_array_equal(tifffile.imread(written[7]), labels[7])
    np.testing.assert_array_equal(
        tifffile.imread(tmp_path / "dask" / "images" / "v_07.tiff"), volume[7]
    )

    store = zarr.open_array(
        tmp_path / "labels.zarr",
        mode="w",
        shape=labels.shape,
        chunks=(1, 128, 128),
        dtype=np.uint32,
    )
    store[:] = labels
    (path,) = export_segmentations(store, tmp_path, "zarr", "v", as_3d=True)
    back = tifffile.imread(path)
    assert back.dtype == np.uint8 and np.array_equal(back, labels)
    slices = export_segmentations(store, tmp_path, "zarr", "v")
    np.testing.assert_array_equal(tifffile.imread(slices[11]), labels[11])
    (path,) = export_segmentations(store[4], tmp_path, "zarr2d", "v")  # a 2D slice of it
    np.testing.assert_array_equal(tifffile.imread(path), labels[4])


def test_cancel_keeps_complete_files(tmp_path, em_3d):
    volume, labels = em_3d

    class CancelAfterThree(Progress):
        def on_advance(self, done, total):
            if done == 3:
                self.cancel()

    with pytest.raises(Cancelled) as info:
        export_segmentations(labels, tmp_path, "ds", "v", image=volume, progress=CancelAfterThree())
    assert info.value.kept.startswith("3 of 12 files were written")
    assert sorted(p.name for p in (tmp_path / "ds" / "masks").iterdir()) == [
        "v_00.tiff",
        "v_01.tiff",
        "v_02.tiff",
    ]
    assert not [p for p in (tmp_path / "ds" / "images").iterdir() if p.name.startswith(".")]
