"""The zarr reader and the labels writer: round trips through napari on real results."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import zarr

from panoptem import ngff
from panoptem._reader import get_reader, read_ngff_labels, read_zarr_output
from panoptem._writer import write_labels
from panoptem.errors import PanoptemError
from panoptem.inference.engine import Params2D
from panoptem.inference.volume import Engine3D, Params3D


@pytest.fixture
def cli_store(registered_model, em_volume, tmp_path):
    """A zarr output written headless (as ``panoptem segment3d -o crop_<model>.zarr``):
    no attributes, so names come from the store name."""
    vol = np.ascontiguousarray(em_volume[:8, :64, :64])
    path = tmp_path / f"crop_{registered_model}.zarr"
    res = Engine3D(registered_model).segment(
        vol,
        Params2D(),
        Params3D(min_size=50, min_extent=2, return_stacks=True, chunk_size="4, 32, 32"),
        zarr_path=path,
    )
    return path, {
        name: np.asarray(arr[:])
        for name, arr in {
            **res.classes,
            **{f"panoptic_{a}": s for a, s in res.stacks.items()},
        }.items()
    }


def test_reader_gives_one_labels_layer_per_array(cli_store):
    path, arrays = cli_store
    reader = get_reader(str(path))
    assert reader is read_zarr_output
    layers = reader(str(path))
    names = [kw["name"] for _, kw, _ in layers]
    assert names == ["crop-panoptic-stack-xy", "crop-mito-prediction"]  # model suffix dropped
    assert [kind for *_, kind in layers] == ["labels", "labels"]
    data = dict(zip(names, (d for d, _, _ in layers), strict=True))
    assert isinstance(data["crop-mito-prediction"], zarr.Array)  # lazy, read from disk
    np.testing.assert_array_equal(data["crop-mito-prediction"][:], arrays["mito"])
    np.testing.assert_array_equal(data["crop-panoptic-stack-xy"][:], arrays["panoptic_xy"])
    assert arrays["mito"].any()
    assert [kw["visible"] for _, kw, _ in layers] == [False, True]
    assert get_reader([str(path)]) is read_zarr_output


def test_reader_in_napari(make_napari_viewer, cli_store):
    path, arrays = cli_store
    viewer = make_napari_viewer()
    viewer.open(str(path), plugin="panoptem")
    assert [lay.name for lay in viewer.layers] == ["crop-panoptic-stack-xy", "crop-mito-prediction"]
    assert all(type(lay).__name__ == "Labels" for lay in viewer.layers)
    mito = viewer.layers[-1]
    np.testing.assert_array_equal(np.asarray(mito.data), arrays["mito"])
    # painting (as proofreading does) writes into the store
    mito.brush_size = 1
    mito.paint((2, 5, 6), 77)
    assert zarr.open_array(str(path / "mito"), mode="r")[2, 5, 6] == 77


def test_reader_declines_what_it_cannot_read(tmp_path):
    assert get_reader(str(tmp_path / "image.tif")) is None
    assert get_reader(str(tmp_path / "missing.zarr")) is None
    assert get_reader([str(tmp_path / "a.zarr"), str(tmp_path / "b.zarr")]) is None
    floats = zarr.open_group(str(tmp_path / "floats.zarr"), mode="w")
    floats.create_array("raw", shape=(2, 8, 8), dtype="float32")
    assert get_reader(str(tmp_path / "floats.zarr")) is None
    ome = zarr.open_group(str(tmp_path / "ome.zarr"), mode="w")
    ome.attrs["multiscales"] = [{"datasets": [{"path": "0"}]}]
    ome.create_array("0", shape=(2, 8, 8), dtype="uint16")
    assert get_reader(str(tmp_path / "ome.zarr")) is None
    nested = zarr.open_group(str(tmp_path / "nested.zarr"), mode="w")
    nested.create_group("labels").create_array("mito", shape=(2, 8, 8), dtype="int32")
    assert get_reader(str(tmp_path / "nested.zarr")) is None
    mixed = zarr.open_group(str(tmp_path / "mixed.zarr"), mode="w")
    mixed.create_array("a", shape=(2, 8, 8), dtype="int32")
    mixed.create_array("b", shape=(2, 8, 9), dtype="int32")
    assert get_reader(str(tmp_path / "mixed.zarr")) is None
    zarr.create_array(store=str(tmp_path / "array.zarr"), shape=(2, 8, 8), dtype="int32")
    assert get_reader(str(tmp_path / "array.zarr")) is None
    with pytest.raises(PanoptemError, match="not a zarr output"):
        read_zarr_output(tmp_path / "floats.zarr")


def test_reader_skips_unfinished_arrays_and_uses_recorded_names(tmp_path):
    g = zarr.open_group(str(tmp_path / "x_y.zarr"), mode="w")
    g.create_array("nucleus", shape=(3, 4, 5), dtype="uint8")[:] = 1
    g.create_array("mito.partial", shape=(3, 4, 5), dtype="int32")
    g.create_array(".stack_xy", shape=(3, 4, 5), dtype="int32")
    g.attrs["panoptem"] = {
        "image": "cells",
        "model": "y",
        "scale": [4, 2, 2],
        "translate": [1, 0, 0],
    }
    layers = get_reader(str(tmp_path / "x_y.zarr"))(str(tmp_path / "x_y.zarr"))
    assert len(layers) == 1
    data, kw, kind = layers[0]
    assert kw["name"] == "cells-nucleus-prediction" and kind == "labels"
    assert kw["scale"] == (4.0, 2.0, 2.0) and kw["translate"] == (1.0, 0.0, 0.0)
    assert np.asarray(data).dtype == np.uint8


@pytest.mark.parametrize(
    "ids, dtype", [(200, np.uint8), (40_000, np.uint16), (10_000 * 7 + 3, np.int32)]
)
def test_writer_portable_dtype_and_no_singleton_axes(tmp_path, ids, dtype):
    labels = np.zeros((1, 6, 7, 1), dtype=np.int64)
    labels[0, 2:4, 3:6, 0] = ids
    labels[0, 5, 0, 0] = 1
    out = write_labels(str(tmp_path / "seg.tif"), labels, {"name": "seg"})
    assert out == [str(tmp_path / "seg.tif")]
    back = tifffile.imread(out[0])
    assert back.shape == (6, 7) and back.dtype == dtype
    np.testing.assert_array_equal(back, labels[0, :, :, 0])


def test_writer_suffix_multiscale_and_errors(tmp_path):
    vol = np.arange(2 * 3 * 4, dtype=np.uint32).reshape(2, 3, 4)
    out = write_labels(str(tmp_path / "noext"), [vol, vol[:, ::2, ::2]], {})
    assert out == [str(tmp_path / "noext.tif")]
    np.testing.assert_array_equal(tifffile.imread(out[0]), vol)
    assert tifffile.imread(out[0]).dtype == np.uint8
    with pytest.raises(PanoptemError, match=r"\.tif"):
        write_labels(str(tmp_path / "seg.png"), vol, {})
    with pytest.raises(PanoptemError, match="32 bits"):
        write_labels(str(tmp_path / "big.tif"), np.array([[0, 2**40]], dtype=np.int64), {})


def test_labels_round_trip_through_napari(make_napari_viewer, cli_store, tmp_path):
    """Open a result with the reader, save it with the writer, open the tif again."""
    path, arrays = cli_store
    viewer = make_napari_viewer()
    viewer.open(str(path), plugin="panoptem")
    target = tmp_path / "mito.tif"
    viewer.layers["crop-mito-prediction"].save(str(target), plugin="panoptem")
    back = tifffile.imread(target)
    assert back.dtype == np.uint8 and back.shape == arrays["mito"].shape
    np.testing.assert_array_equal(back, arrays["mito"])
    layers = viewer.open(str(target), layer_type="labels")
    np.testing.assert_array_equal(np.asarray(layers[0].data), arrays["mito"])


def test_reader_opens_an_empanada_style_zarr_v2_store(tmp_path):
    """The original writes ``<image>_<model>.zarr`` with class arrays and no attributes."""
    path = tmp_path / "cells_MitoNet_v1.zarr"
    g = zarr.open_group(str(path), mode="w", zarr_format=2)
    mito = np.zeros((4, 16, 16), np.int32)
    mito[1:3, 2:9, 4:12] = 7
    g.create_array("mito", shape=mito.shape, dtype="int32", chunks=(2, 16, 16))[:] = mito
    g.create_array("panoptic_yz", shape=mito.shape, dtype="int32")[:] = mito * 10
    layers = get_reader(str(path))(str(path))
    assert [kw["name"] for _, kw, _ in layers] == [
        "cells-panoptic-stack-yz",
        "cells-mito-prediction",
    ]
    np.testing.assert_array_equal(layers[1][0][:], mito)
    assert "scale" not in layers[1][1]


def _boxes(shape, boxes) -> np.ndarray:
    labels = np.zeros(shape, np.int32)
    for label, (z, y, x) in boxes.items():
        labels[z, y, x] = label
    return labels


@pytest.fixture
def ngff_store(tmp_path):
    """An OME-Zarr labels store as a run writes it: two label images filled block by block,
    'mito' with three resolution levels (z kept, y and x halved), 'nucleus' with one."""
    path = tmp_path / "run_out.zarr"
    root = ngff.create_labels_store(path, "cells")
    root.attrs["panoptem"] = {**root.attrs["panoptem"], "model": "MitoNet_v1",
                              "scale": [30.0, 8.0, 8.0]}
    mito = _boxes((6, 64, 48), {5: np.s_[1:4, 4:30, 2:20], 9: np.s_[2:6, 33:61, 31:47],
                                300: np.s_[0, 0:2, 0:2]})
    nucleus = _boxes((6, 64, 48), {1: np.s_[:, 10:50, 8:40]})
    for name, labels in (("mito", mito), ("nucleus", nucleus)):
        array = ngff.create_label_image(root, name, labels.shape, np.int32, (2, 16, 16))
        for z in range(0, 6, 2):
            array[z:z + 2] = labels[z:z + 2]
    ngff.finish_label_image(root, "mito", scale=(30, 8, 8), translate=(60, 0, 8), min_size=12)
    ngff.finish_label_image(root, "nucleus", scale=(30, 8, 8), translate=(60, 0, 8),
                            min_size=64)
    return path, {"mito": mito, "nucleus": nucleus}


def test_reader_gives_one_multiscale_layer_per_ngff_label_image(ngff_store):
    path, labels = ngff_store
    assert get_reader(str(path)) is read_ngff_labels
    layers = read_ngff_labels(str(path))
    assert [kw["name"] for _, kw, _ in layers] == ["cells-mito-prediction",
                                                   "cells-nucleus-prediction"]
    assert [kind for *_, kind in layers] == ["labels", "labels"]
    (mito, mkw, _), (nucleus, nkw, _) = layers
    assert mkw["multiscale"] is True and len(mito) == 3
    assert all(isinstance(a, zarr.Array) for a in mito)  # lazy, read from disk
    assert [a.shape for a in mito] == [(6, 64, 48), (6, 32, 24), (6, 16, 12)]
    np.testing.assert_array_equal(mito[0][:], labels["mito"])
    np.testing.assert_array_equal(mito[2][:], labels["mito"][:, ::4, ::4])
    assert nkw["multiscale"] is False and isinstance(nucleus, zarr.Array)
    assert mkw["scale"] == nkw["scale"] == (30.0, 8.0, 8.0)
    assert mkw["translate"] == (60.0, 0.0, 8.0)
    assert mkw["metadata"]["panoptem"] == {"image": "cells", "model": "MitoNet_v1",
                                           "scale": [30.0, 8.0, 8.0]}
    assert mkw["metadata"]["label_image"] == "mito"
    assert [kw["visible"] for _, kw, _ in layers] == [False, True]
    # without the panoptem attribute the store name names the layers
    zarr.open_group(str(path), mode="r+").attrs.put({})
    assert read_ngff_labels(path)[0][1]["name"] == "run_out-mito-prediction"


def test_ngff_labels_in_napari(make_napari_viewer, ngff_store):
    path, labels = ngff_store
    viewer = make_napari_viewer()
    viewer.open(str(path), plugin="panoptem")
    assert [lay.name for lay in viewer.layers] == ["cells-mito-prediction",
                                                   "cells-nucleus-prediction"]
    assert all(type(lay).__name__ == "Labels" for lay in viewer.layers)
    mito, nucleus = viewer.layers
    assert mito.multiscale and not nucleus.multiscale
    assert len(mito.data) == 3
    np.testing.assert_array_equal(mito.scale, [30, 8, 8])
    np.testing.assert_array_equal(nucleus.scale, [30, 8, 8])
    np.testing.assert_array_equal(mito.translate, [60, 0, 8])
    np.testing.assert_array_equal(np.asarray(mito.data[0]), labels["mito"])
    np.testing.assert_array_equal(np.asarray(mito.data[1]), labels["mito"][:, ::2, ::2])
    np.testing.assert_array_equal(np.asarray(nucleus.data), labels["nucleus"])
    assert mito.data[0][2, 40, 40] == 9 and nucleus.data[3, 20, 20] == 1
    # napari places the layer in world coordinates by its scale and translate
    np.testing.assert_allclose(nucleus.world_to_data((60 + 3 * 30, 20 * 8, 8 + 20 * 8)),
                               (3, 20, 20))


def test_reader_leaves_ome_zarr_images_and_unfinished_labels(tmp_path, ngff_store):
    path, _ = ngff_store
    # an OME-Zarr image with labels: other readers show the image and its labels
    image = zarr.open_group(str(path), mode="r+")
    image.attrs["multiscales"] = [{"version": "0.4", "datasets": [{"path": "raw"}]}]
    assert get_reader(str(path)) is None
    # a labels store whose label image was never finished
    root = ngff.create_labels_store(tmp_path / "stopped.zarr", "cells")
    ngff.create_label_image(root, "mito", (2, 8, 8), np.int32, 8)
    assert get_reader(str(tmp_path / "stopped.zarr")) is None
    with pytest.raises(PanoptemError, match="not an OME-Zarr labels store"):
        read_ngff_labels(tmp_path / "stopped.zarr")
