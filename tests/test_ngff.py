"""OME-Zarr labels written block by block with their resolution levels, and OME-Zarr images
(NGFF 0.4 / zarr v2 and NGFF 0.5 / zarr v3) opened lazily for inference."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

from panoptem import ngff
from panoptem.errors import Cancelled, PanoptemError
from panoptem.progress import CallbackProgress


def _labels(shape, seed=0) -> np.ndarray:
    """Random ids under a few boxes: every voxel differs from its neighbours, so any
    off-by-one in the downsampling shows."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 1000, size=shape, dtype=np.int32)
    labels[2:5, 3:20, 4:15] = 7
    labels[-3:, -10:, -9:] = 123456
    return labels


def _write_blockwise(array, labels, block) -> int:
    """Write ``labels`` into ``array`` one block at a time (as a run does); blocks written."""
    n = 0
    for z in range(0, labels.shape[0], block[0]):
        for y in range(0, labels.shape[1], block[1]):
            for x in range(0, labels.shape[2], block[2]):
                region = (slice(z, z + block[0]), slice(y, y + block[1]), slice(x, x + block[2]))
                array[region] = labels[region]
                n += 1
    return n


def _transforms(scale, translate):
    return [{"type": "scale", "scale": list(scale)},
            {"type": "translation", "translation": list(translate)}]


def test_anisotropic_round_trip_is_valid_ngff_04(tmp_path):
    path = tmp_path / "cells_seg.zarr"
    labels = _labels((20, 100, 90))
    root = ngff.create_labels_store(path, "cells")
    root.attrs["panoptem"] = {**root.attrs["panoptem"], "model": "MitoNet_v1"}
    array = ngff.create_label_image(root, "mito", labels.shape, np.int32, (4, 16, 16))
    assert isinstance(array, zarr.Array) and array.chunks == (4, 16, 16)
    assert _write_blockwise(array, labels, (4, 16, 16)) == 5 * 7 * 6
    steps = []
    paths = ngff.finish_label_image(root, "mito", scale=(30, 8, 8), translate=(90, 16, 0),
                                    unit="nanometer", min_size=8,
                                    progress=CallbackProgress(lambda *a: steps.append(a)))
    assert paths == ["0", "1", "2", "3"]

    # the layout and metadata on disk, read as plain JSON (what other tools read)
    def attrs(rel):
        return json.loads((path / rel / ".zattrs").read_text())

    assert (path / ".zgroup").exists() and (path / "labels" / ".zgroup").exists()
    assert attrs(".") == {"panoptem": {"image": "cells", "model": "MitoNet_v1"}}
    assert attrs("labels") == {"labels": ["mito"]}
    meta = attrs("labels/mito")
    assert meta["image-label"] == {"version": "0.4", "source": {"image": "../../"}}
    (ms,) = meta["multiscales"]
    assert ms["version"] == "0.4" and ms["name"] == "mito"
    assert ms["axes"] == [{"name": n, "type": "space", "unit": "nanometer"} for n in "zyx"]
    # y and x halve every level; z only once its voxel would not exceed the new y voxel
    scales = [[30, 8, 8], [30, 16, 16], [30, 32, 32], [60, 64, 64]]
    assert ms["datasets"] == [
        {"path": str(k), "coordinateTransformations": _transforms(s, [90, 16, 0])}
        for k, s in enumerate(scales)
    ]
    for k in range(4):
        zarray = json.loads((path / "labels" / "mito" / str(k) / ".zarray").read_text())
        assert zarray["zarr_format"] == 2 and zarray["dimension_separator"] == "/"
        assert zarray["dtype"] == "<i4" and zarray["fill_value"] == 0
    assert (path / "labels" / "mito" / "0" / "0" / "0" / "0").is_file()  # nested chunk keys

    back = zarr.open_group(str(path), mode="r")["labels/mito"]
    np.testing.assert_array_equal(back["0"][:], labels)
    np.testing.assert_array_equal(back["1"][:], labels[:, ::2, ::2])
    np.testing.assert_array_equal(back["2"][:], labels[:, ::4, ::4])
    np.testing.assert_array_equal(back["3"][:], labels[::2, ::8, ::8])
    assert back["3"].shape == (10, 13, 12)  # the next level (7, 6) would be below min_size
    # one progress step per chunk of levels 1..3: chunk-by-chunk, not the whole volume
    chunks = [int(np.prod([-(-s // c) for s, c in zip(back[str(k)].shape,
                                                        back[str(k)].chunks, strict=True)]))
              for k in (1, 2, 3)]
    assert back["1"].chunks == (4, 16, 16) and back["3"].chunks == (4, 13, 12)
    assert steps[0][0].startswith("Building the resolution levels") and steps[0][2] == sum(chunks)
    assert steps[-1][1] == sum(chunks)


def test_isotropic_data_halve_z_every_level_and_levels_are_replaced(tmp_path):
    labels = _labels((17, 40, 33), seed=1)
    root = ngff.create_labels_store(tmp_path / "iso.zarr", "iso")
    array = ngff.create_label_image(root, "nucleus", labels.shape, "uint32", 8)
    assert array.chunks == (8, 8, 8) and array.dtype == np.uint32
    _write_blockwise(array, labels.astype(np.uint32), (8, 8, 8))
    assert ngff.finish_label_image(root, "nucleus", scale=(8, 8, 8), unit=None,
                                   min_size=8) == ["0", "1", "2"]
    group = root["labels/nucleus"]
    (ms,) = group.attrs["multiscales"]
    assert ms["axes"] == [{"name": n, "type": "space"} for n in "zyx"]
    assert [d["coordinateTransformations"][0]["scale"] for d in ms["datasets"]] == [
        [8, 8, 8], [16, 16, 16], [32, 32, 32]]
    assert group["1"].shape == (9, 20, 17) and group["2"].shape == (5, 10, 9)
    np.testing.assert_array_equal(group["1"][:], labels[::2, ::2, ::2])
    np.testing.assert_array_equal(group["2"][:], labels[::4, ::4, ::4])
    # finishing again with a larger min_size removes the levels it no longer makes
    assert ngff.finish_label_image(root, "nucleus", scale=(8, 8, 8), min_size=20) == ["0", "1"]
    group = root["labels/nucleus"]
    assert sorted(group.array_keys()) == ["0", "1"]
    assert [d["path"] for d in group.attrs["multiscales"][0]["datasets"]] == ["0", "1"]
    # a finish that is stopped leaves the image unfinished, not pointing at stale levels
    progress = CallbackProgress(lambda *a: None)
    progress.cancel()
    with pytest.raises(Cancelled):
        ngff.finish_label_image(root, "nucleus", scale=(8, 8, 8), min_size=8, progress=progress)
    assert ngff.label_image_names(root) == []
    assert "multiscales" not in root["labels/nucleus"].attrs
    ngff.finish_label_image(root, "nucleus", scale=(8, 8, 8), min_size=20)
    assert ngff.label_image_names(root) == ["nucleus"]
    # a volume whose next level would be below min_size in y and x keeps one level
    small = ngff.create_label_image(root, "small", (3, 30, 30), np.uint8, 16)
    small[:] = 5
    assert ngff.finish_label_image(root, "small", min_size=16) == ["0"]
    assert ngff.label_image_names(root) == ["nucleus", "small"]


def test_reopening_a_store_returns_the_same_array(tmp_path):
    path = tmp_path / "run.zarr"
    labels = _labels((6, 20, 20), seed=2)
    root = ngff.create_labels_store(path, "cells")
    root.attrs["panoptem"] = {**root.attrs["panoptem"], "scale": [4, 2, 2]}
    first = ngff.create_label_image(root, "mito", labels.shape, "int32", 8)
    first[:3] = labels[:3]  # a run stopped half way
    again = ngff.create_labels_store(path, "cells")
    assert again.attrs["panoptem"] == {"image": "cells", "scale": [4, 2, 2]}
    array = ngff.create_label_image(again, "mito", labels.shape, np.int32, (2, 2, 2))
    assert array.chunks == (6, 8, 8)  # the existing array, not a new one
    np.testing.assert_array_equal(array[:3], labels[:3])
    assert not array[3:].any()
    assert again["labels"].attrs["labels"] == ["mito"]  # not listed twice
    # unfinished label images are not complete
    assert ngff.label_image_names(again) == []
    with pytest.raises(PanoptemError, match=r"already holds shape \(6, 20, 20\) and dtype int32, "
                                            r"not shape \(6, 20, 21\)"):
        ngff.create_label_image(again, "mito", (6, 20, 21), np.int32, 8)
    with pytest.raises(PanoptemError, match="dtype int32, not shape .* dtype uint16"):
        ngff.create_label_image(again, "mito", labels.shape, np.uint16, 8)
    # overwrite starts afresh
    fresh = ngff.create_labels_store(path, "other", overwrite=True)
    assert fresh.attrs["panoptem"] == {"image": "other"} and fresh["labels"].attrs["labels"] == []
    assert "mito" not in fresh["labels"]


def test_stores_and_arguments_that_are_refused(tmp_path):
    image = zarr.open_group(str(tmp_path / "image.zarr"), mode="w", zarr_format=2)
    image.attrs["multiscales"] = [{"version": "0.4", "datasets": [{"path": "0"}]}]
    image.create_array("0", shape=(2, 4, 4), dtype="uint8")
    with pytest.raises(PanoptemError, match="not a panoptem labels store"):
        ngff.create_labels_store(tmp_path / "image.zarr", "x")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "notes.txt").write_text("keep me")
    with pytest.raises(PanoptemError, match="other files"):
        ngff.create_labels_store(tmp_path / "folder", "x", overwrite=True)
    assert (tmp_path / "folder" / "notes.txt").read_text() == "keep me"
    (tmp_path / "empty.zarr").mkdir()
    root = ngff.create_labels_store(tmp_path / "empty.zarr", "x")
    with pytest.raises(PanoptemError, match="integer dtype"):
        ngff.create_label_image(root, "mito", (2, 4, 4), np.float32, 4)
    with pytest.raises(PanoptemError, match=r"\(z, y, x\) volume"):
        ngff.create_label_image(root, "mito", (4, 4), np.int32, 4)
    with pytest.raises(PanoptemError, match="cannot name a label image"):
        ngff.create_label_image(root, "a/b", (2, 4, 4), np.int32, 4)
    with pytest.raises(PanoptemError, match="no label image 'mito'"):
        ngff.finish_label_image(root, "mito")
    ngff.create_label_image(root, "mito", (2, 4, 4), np.int32, 4)
    with pytest.raises(PanoptemError, match="not an OME-NGFF space unit"):
        ngff.finish_label_image(root, "mito", unit="nm")
    with pytest.raises(PanoptemError, match="positive numbers"):
        ngff.finish_label_image(root, "mito", scale=(0, 1, 1))
    with pytest.raises(PanoptemError, match="min_size"):
        ngff.finish_label_image(root, "mito", min_size=0)


def _ngff04_image(path, levels):
    """An NGFF 0.4 image in zarr v2 as other tools write it: levels 's0', 's1', a dataset
    scale and translation per level and a multiscale-level scale after them."""
    g = zarr.open_group(str(path), mode="w", zarr_format=2)
    datasets = []
    for k, data in enumerate(levels):
        g.create_array(f"s{k}", shape=data.shape, dtype=data.dtype, chunks=(2, 8, 8),
                       chunk_key_encoding={"name": "v2", "separator": "/"})[:] = data
        datasets.append({"path": f"s{k}", "coordinateTransformations": _transforms(
            [5, 2 * 2**k, 2 * 2**k], [10, 1, 1])})
    g.attrs["multiscales"] = [{
        "version": "0.4", "name": "raw",
        "axes": [{"name": n, "type": "space", "unit": "nanometer"} for n in "zyx"],
        "datasets": datasets,
        "coordinateTransformations": [{"type": "scale", "scale": [2, 2, 2]}],
    }]
    return g


def test_open_image_ngff_04_zarr_v2_two_levels(tmp_path):
    raw = np.random.default_rng(3).integers(0, 255, size=(6, 24, 20), dtype=np.uint8)
    _ngff04_image(tmp_path / "raw.zarr", [raw, raw[:, ::2, ::2]])
    array, scale, translate = ngff.open_image(tmp_path / "raw.zarr")
    assert isinstance(array, zarr.Array)  # lazy: the zarr array, not a numpy copy
    np.testing.assert_array_equal(array[:], raw)
    # dataset transforms first (scale then translation), then the multiscale's scale
    assert scale == (10.0, 4.0, 4.0) and translate == (20.0, 2.0, 2.0)
    low, scale1, translate1 = ngff.open_image(str(tmp_path / "raw.zarr"), level=1)
    np.testing.assert_array_equal(low[:], raw[:, ::2, ::2])
    assert scale1 == (10.0, 8.0, 8.0) and translate1 == (20.0, 2.0, 2.0)
    with pytest.raises(PanoptemError, match=r"Level 2 is not in .*levels are 0 \('s0'\), "
                                            r"1 \('s1'\)"):
        ngff.open_image(tmp_path / "raw.zarr", level=2)


def test_open_image_ngff_05_zarr_v3(tmp_path):
    raw = np.arange(4 * 10 * 12, dtype=np.uint16).reshape(4, 10, 12)
    g = zarr.open_group(str(tmp_path / "raw5.zarr"), mode="w", zarr_format=3)
    g.create_array("0", shape=raw.shape, dtype=raw.dtype, chunks=(2, 5, 6))[:] = raw
    g.create_array("1", shape=(4, 5, 6), dtype=raw.dtype)[:] = raw[:, ::2, ::2]
    g.attrs["ome"] = {"version": "0.5", "multiscales": [{
        "axes": [{"name": n, "type": "space", "unit": "micrometer"} for n in "zyx"],
        "datasets": [{"path": "0", "coordinateTransformations": _transforms([0.05, 0.01, 0.01],
                                                                            [1, 2, 3])},
                     {"path": "1", "coordinateTransformations": _transforms([0.05, 0.02, 0.02],
                                                                            [1, 2, 3])}],
    }]}
    assert json.loads((tmp_path / "raw5.zarr" / "zarr.json").read_text())["zarr_format"] == 3
    array, scale, translate = ngff.open_image(tmp_path / "raw5.zarr")
    assert isinstance(array, zarr.Array) and array.metadata.zarr_format == 3
    np.testing.assert_array_equal(array[1:3, 2:7, 5:], raw[1:3, 2:7, 5:])
    assert scale == (0.05, 0.01, 0.01) and translate == (1.0, 2.0, 3.0)
    low, scale1, _ = ngff.open_image(tmp_path / "raw5.zarr", 1)
    np.testing.assert_array_equal(low[:], raw[:, ::2, ::2])
    assert scale1 == (0.05, 0.02, 0.02)
    with pytest.raises(PanoptemError, match=r"levels are 0 \('0'\), 1 \('1'\)"):
        ngff.open_image(tmp_path / "raw5.zarr", -1)


def _tczyx(path, shape):
    data = np.random.default_rng(4).integers(0, 60000, size=shape, dtype=np.uint16)
    g = zarr.open_group(str(path), mode="w", zarr_format=2)
    g.create_array("0", shape=shape, dtype=data.dtype, chunks=(1, 1, 2, 8, 8))[:] = data
    g.attrs["multiscales"] = [{
        "version": "0.4",
        "axes": [{"name": "t", "type": "time"}, {"name": "c", "type": "channel"},
                 *({"name": n, "type": "space"} for n in "zyx")],
        "datasets": [{"path": "0", "coordinateTransformations": _transforms(
            [1, 1, 40, 4, 4], [0, 0, 8, 0, 0])}],
    }]
    return data


def test_open_image_5d_with_one_time_point_and_channel(tmp_path):
    data = _tczyx(tmp_path / "tczyx.zarr", (1, 1, 5, 16, 12))
    view, scale, translate = ngff.open_image(tmp_path / "tczyx.zarr")
    assert isinstance(view, ngff.SpaceView) and isinstance(view.array, zarr.Array)
    assert view.shape == (5, 16, 12) and view.ndim == 3 and view.dtype == np.uint16
    assert view.chunks == (2, 8, 8) and len(view) == 5
    assert scale == (40.0, 4.0, 4.0) and translate == (8.0, 0.0, 0.0)
    vol = data[0, 0]
    np.testing.assert_array_equal(view[2], vol[2])
    np.testing.assert_array_equal(view[1:4, ::3, 5], vol[1:4, ::3, 5])
    np.testing.assert_array_equal(view[..., 7], vol[..., 7])
    np.testing.assert_array_equal(np.asarray(view), vol)
    with pytest.raises(IndexError):
        view[0, 0, 0, 0]


def test_open_image_refusals(tmp_path):
    _tczyx(tmp_path / "two_channels.zarr", (1, 2, 3, 8, 8))
    with pytest.raises(PanoptemError, match="2 entries along its axis 'c'.*Pick one"):
        ngff.open_image(tmp_path / "two_channels.zarr")
    flat = zarr.create_array(store=str(tmp_path / "flat.zarr"), shape=(3, 8, 8), dtype="uint8")
    flat[:] = 9
    array, scale, translate = ngff.open_image(tmp_path / "flat.zarr")
    assert isinstance(array, zarr.Array) and int(array[2, 7, 7]) == 9
    assert scale == (1.0, 1.0, 1.0) and translate == (0.0, 0.0, 0.0)
    with pytest.raises(PanoptemError, match="one level"):
        ngff.open_image(tmp_path / "flat.zarr", level=1)
    zarr.create_array(store=str(tmp_path / "plane.zarr"), shape=(8, 8), dtype="uint8")
    with pytest.raises(PanoptemError, match="2 space axes"):
        ngff.open_image(tmp_path / "plane.zarr")
    store = ngff.create_labels_store(tmp_path / "labels.zarr", "x")
    ngff.create_label_image(store, "mito", (2, 4, 4), np.int32, 4)
    with pytest.raises(PanoptemError, match="without OME-NGFF 'multiscales'.*It holds: labels"):
        ngff.open_image(tmp_path / "labels.zarr")
    array, *_ = ngff.open_image(tmp_path / "labels.zarr" / "labels" / "mito" / "0")
    assert array.shape == (2, 4, 4)
    with pytest.raises(PanoptemError, match="No zarr store"):
        ngff.open_image(tmp_path / "missing.zarr")
