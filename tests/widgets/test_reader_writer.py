"""The zarr reader and the labels writer: round trips through napari on real results."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import zarr

from panoptem._reader import get_reader, read_zarr_output
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
