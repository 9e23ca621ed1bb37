"""3D inference end to end: stacks, ortho-plane, zarr output, errors, cancel."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import zarr

from panoptem.errors import Cancelled, PanoptemError
from panoptem.inference.engine import Params2D
from panoptem.inference.volume import Engine3D, Params3D
from panoptem.progress import CallbackProgress, Progress

P2 = Params2D(confidence_thr=0.5)


@pytest.fixture
def engine3d(small_config):
    return Engine3D(small_config)


@pytest.fixture
def small_vol(em_volume):
    return np.ascontiguousarray(em_volume[:10, :96, :112])


def test_stack_xy_ids_and_filters(engine3d, small_vol):
    res = engine3d.segment(small_vol, P2, Params3D(min_size=30, min_extent=2))
    mito = res.classes["mito"]
    assert mito.shape == small_vol.shape and mito.dtype == np.int32
    ids = np.unique(mito[mito > 0])
    assert len(ids) > 0 and (ids == np.arange(1, len(ids) + 1)).all()  # renumbered 1..N
    for i in ids:  # every kept object passes the filters
        zz, yy, xx = np.nonzero(mito == i)
        assert len(zz) >= 30
        assert min(np.ptp(zz), np.ptp(yy), np.ptp(xx)) + 1 >= 2
    # stricter filters keep a subset of the voxels
    strict = engine3d.segment(small_vol, P2, Params3D(min_size=300, min_extent=4)).classes["mito"]
    assert ((strict > 0) <= (mito > 0)).all() and (strict > 0).sum() < (mito > 0).sum()


def test_objects_span_slices(engine3d, small_vol):
    mito = engine3d.segment(small_vol, P2, Params3D(min_size=0, min_extent=0)).classes["mito"]
    spans = [np.ptp(np.nonzero(mito == i)[0]) + 1 for i in np.unique(mito[mito > 0])]
    assert max(spans) > 1  # matching links objects through the stack


def test_zarr_output_equals_memory(engine3d, small_vol, tmp_path):
    p3 = Params3D(min_size=30, return_stacks=True, chunk_size="4, 32, 64")
    mem = engine3d.segment(small_vol, P2, p3)
    disk = engine3d.segment(small_vol, P2, p3, zarr_path=tmp_path / "out.zarr")
    np.testing.assert_array_equal(disk.classes["mito"][:], mem.classes["mito"])
    np.testing.assert_array_equal(disk.stacks["xy"][:], mem.stacks["xy"])
    group = zarr.open_group(str(tmp_path / "out.zarr"), mode="r")
    assert sorted(group.array_keys()) == ["mito", "panoptic_xy"]
    assert group["mito"].chunks == (4, 32, 64)
    assert set(np.unique(mem.stacks["xy"][mem.stacks["xy"] > 0]) // 10000) == {1}


def test_zarr_input_is_read_lazily(engine3d, small_vol, tmp_path):
    src = zarr.create_array(
        store=str(tmp_path / "in.zarr"), shape=small_vol.shape, chunks=(1, 96, 112), dtype="uint8"
    )
    src[:] = small_vol
    a = engine3d.segment(src, P2, Params3D(min_size=30)).classes["mito"]
    b = engine3d.segment(small_vol, P2, Params3D(min_size=30)).classes["mito"]
    np.testing.assert_array_equal(a, b)


def test_short_volume_with_long_median(engine3d, small_vol):
    out = engine3d.segment(small_vol[:3], P2, Params3D(median_size=7, min_size=0, min_extent=0))
    assert out.classes["mito"].shape == (3, 96, 112)


@pytest.mark.parametrize("plane", ["xz", "yz"])
def test_anisotropic_volume_other_planes(engine3d, small_vol, plane):
    vol = small_vol[:6]
    out = engine3d.segment(
        vol, P2, Params3D(plane=plane, min_size=0, min_extent=0, return_stacks=True)
    )
    assert out.classes["mito"].shape == vol.shape
    assert out.stacks[plane].shape == vol.shape and out.classes["mito"].any()


def test_progress_stages_and_cancel_leave_no_complete_array(engine3d, small_vol, tmp_path):
    stages = []
    engine3d.segment(
        small_vol,
        P2,
        Params3D(min_size=30),
        progress=CallbackProgress(lambda s, d, t: stages.append(s)),
    )
    assert {"stack xy", "matching xy"} <= set(stages)

    from testutils import CancelAt

    path = tmp_path / "cancelled.zarr"
    with pytest.raises(Cancelled):
        engine3d.segment(
            small_vol, P2, Params3D(min_size=30), zarr_path=path, progress=CancelAt("stack xy", 4)
        )
    assert not [p.name for p in path.iterdir() if p.is_dir()]


@pytest.mark.parametrize(
    "shape,match",
    [
        ((64, 64), "3D inference takes a volume"),
        ((2, 3, 4, 5, 6), "3D inference takes a volume"),
        ((4, 32, 32, 3), "RGB"),
    ],
)
def test_bad_volumes(engine3d, shape, match):
    with pytest.raises(PanoptemError, match=match):
        engine3d.segment(np.zeros(shape, np.uint8))


@pytest.mark.parametrize(
    "params,match",
    [
        (Params3D(chunk_size="big"), "Chunk size"),
        (Params3D(chunk_size="1,2"), "Chunk size"),
        (Params3D(vote_thr=4), "Voxel Vote Thr"),
        (Params3D(median_size=4), "Median Filter Size"),
        (Params3D(plane="xx"), "Inference plane"),
        (Params3D(plane=["xy"]), "Inference plane"),
        (Params3D(min_size=float("inf")), "min_size must be a whole number from 0"),
        (Params3D(min_extent=2.5), "min_extent must be a whole number from 0"),
        (Params3D(erode=51), "erode must be a whole number from 0 to 50"),
        (Params3D(vote_thr=True), "Voxel Vote Thr"),
        (Params3D(vote_thr=2.5), "Voxel Vote Thr"),
        (Params3D(median_size="3"), "Median Filter Size"),
        (Params3D(max_objects=float("nan")), "Max objects per class in 3D must be 0"),
        (Params3D(max_objects=None), "Max objects per class in 3D must be 0"),
        (Params3D(max_objects="ten"), "Max objects per class in 3D must be 0"),
        (Params3D(max_objects=float("inf")), "Max objects per class in 3D must be 0"),
    ],
)
def test_bad_parameters(params, match):
    with pytest.raises(PanoptemError, match=match):
        params.validated()


def test_unwritable_zarr_folder(engine3d, small_vol, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "blocker").write_text("a file where a folder is needed")
    with pytest.raises(PanoptemError, match="Cannot write the zarr output"):
        engine3d.segment(small_vol, P2, zarr_path=locked / "blocker" / "out.zarr")


def test_ortho_plane_on_real_volume(engine3d, em_volume, tmp_path):
    vol = np.ascontiguousarray(em_volume[:16, :64, :64])
    p3 = Params3D(ortho_plane=True, min_size=20, min_extent=2, return_stacks=True)
    res = engine3d.segment(vol, P2, p3)
    mito = res.classes["mito"]
    assert mito.shape == vol.shape and mito.dtype == np.int32
    assert sorted(res.stacks) == ["xy", "xz", "yz"]
    ids = np.unique(mito[mito > 0])
    assert (ids == np.arange(1, len(ids) + 1)).all()
    # a voxel kept with vote 2 is foreground in at least two of the three filtered stacks
    fg = sum((res.stacks[ax] > 0).astype(int) for ax in ("xy", "xz", "yz"))
    assert (fg[mito > 0] >= 2).all()
    union = engine3d.segment(
        vol, P2, Params3D(ortho_plane=True, min_size=20, min_extent=2, vote_thr=1)
    )
    assert (union.classes["mito"] > 0).sum() >= (mito > 0).sum()
    disk = engine3d.segment(vol, P2, p3, zarr_path=tmp_path / "ortho.zarr")
    np.testing.assert_array_equal(disk.classes["mito"][:], mito)


def test_stuff_class_is_a_uint8_mask_in_stack_and_ortho(tmp_path, small_vol):
    from panoptem.demo import untrained_model
    from panoptem.models import export_torchscript
    from testutils import SMALL_ARCH, model_config

    path = tmp_path / "two_class.pth"
    export_torchscript(untrained_model(dict(SMALL_ARCH, num_classes=3)), path)
    cfg = model_config(path, class_names={1: "mito", 2: "er"}, labels=[1, 2], thing_list=[1])
    engine = Engine3D(cfg)
    vol = small_vol[:6, :48, :48]
    for ortho in (False, True):
        res = engine.segment(vol, P2, Params3D(ortho_plane=ortho, min_size=0, min_extent=0))
        assert sorted(res.classes) == ["er", "mito"]
        er = res.classes["er"]
        assert er.dtype == np.uint8 and set(np.unique(er)) <= {0, 1}


def test_max_objects_0_in_3d(engine3d, small_vol):
    """0 works in 3D as in 2D: the class volume is the same (numbered 1..N as always) and
    the panoptic stack's objects are numbered 1..N without the class offset."""
    p3 = dict(min_size=30, min_extent=2, return_stacks=True)
    ref = engine3d.segment(small_vol, P2, Params3D(**p3))
    out = engine3d.segment(small_vol, P2, Params3D(max_objects=0, **p3))
    np.testing.assert_array_equal(out.classes["mito"], ref.classes["mito"])
    stack, ref_stack = out.stacks["xy"], ref.stacks["xy"]
    ids = np.unique(ref_stack[ref_stack > 0])
    assert len(ids) > 1 and (ids // 10000 == 1).all()
    np.testing.assert_array_equal(np.unique(stack), np.arange(len(ids) + 1))
    np.testing.assert_array_equal(stack > 0, ref_stack > 0)


def test_zarr_output_records_image_name_scale_and_parameters(engine3d, small_vol, tmp_path):
    import zarr

    from panoptem.inference.zarr_store import StoreInfo

    p3 = Params3D(min_size=30)
    engine3d.segment(small_vol, P2, p3, zarr_path=tmp_path / "cell_Model.zarr")
    info = zarr.open_group(str(tmp_path / "cell_Model.zarr"), mode="r").attrs["panoptem"]
    assert info["image"] == "cell_Model" and info["scale"] == [1.0, 1.0, 1.0]  # no model name
    assert info["params3d"]["min_size"] == 30
    engine3d.segment(small_vol, P2, p3, zarr_path=tmp_path / "b.zarr",
                     store_info=StoreInfo("cell", (3, 2, 2), (1, 0, 0)))
    info = zarr.open_group(str(tmp_path / "b.zarr"), mode="r").attrs["panoptem"]
    assert (info["image"], info["scale"], info["translate"]) == ("cell", [3, 2, 2], [1, 0, 0])


@pytest.mark.parametrize("ortho", [False, True])
def test_memory_output_equals_zarr_output(engine3d, small_vol, tmp_path, ortho):
    from panoptem.inference.zarr_store import MemoryOutput, StoreInfo

    vol = small_vol[:8, :64, :80]
    p3 = Params3D(ortho_plane=ortho, min_size=20, min_extent=2, return_stacks=True,
                  chunk_size="3, 32, 48")
    memory = MemoryOutput()
    mem = engine3d.segment(vol, P2, p3, output=memory, store_info=StoreInfo("cell"))
    disk = engine3d.segment(vol, P2, p3, zarr_path=tmp_path / "out.zarr")
    assert mem.zarr_path is None and disk.zarr_path == str(tmp_path / "out.zarr")
    assert sorted(mem.classes) == sorted(disk.classes) == ["mito"]
    assert sorted(mem.stacks) == sorted(disk.stacks)
    for got, ref in [*zip(mem.classes.values(), disk.classes.values(), strict=True),
                     *zip(mem.stacks.values(), disk.stacks.values(), strict=True)]:
        assert isinstance(got, np.ndarray) and got.dtype == ref.dtype == np.int32
        np.testing.assert_array_equal(got, ref[:])
    assert mem.classes["mito"].any()
    # the output recorded what a zarr group records
    attrs = zarr.open_group(str(tmp_path / "out.zarr"), mode="r").attrs["panoptem"]
    assert memory.info == StoreInfo("cell")
    assert memory.run["params3d"] == attrs["params3d"] and memory.run["model"] == attrs["model"]
    # the default output is in memory too
    default = engine3d.segment(vol, P2, p3)
    np.testing.assert_array_equal(default.classes["mito"], mem.classes["mito"])


def test_zarr_output_object_equals_zarr_path(engine3d, small_vol, tmp_path):
    from panoptem.inference.zarr_store import ZarrOutput

    p3 = Params3D(min_size=30, chunk_size="4, 32, 64")
    by_path = engine3d.segment(small_vol, P2, p3, zarr_path=tmp_path / "a.zarr")
    by_output = engine3d.segment(small_vol, P2, Params3D(min_size=30),
                                 output=ZarrOutput(tmp_path / "b.zarr", "4, 32, 64"))
    assert by_output.zarr_path == str(tmp_path / "b.zarr")
    assert by_output.classes["mito"].chunks == by_path.classes["mito"].chunks == (4, 32, 64)
    np.testing.assert_array_equal(by_output.classes["mito"][:], by_path.classes["mito"][:])
    group = zarr.open_group(str(tmp_path / "b.zarr"), mode="r")
    assert sorted(p.name for p in (tmp_path / "b.zarr").iterdir() if p.is_dir()) == ["mito"]
    assert group.attrs["panoptem"]["image"] == "b"


def test_zarr_path_and_output_together_are_refused(engine3d, small_vol, tmp_path):
    from panoptem.inference.zarr_store import MemoryOutput

    with pytest.raises(PanoptemError, match="either zarr_path or output"):
        engine3d.segment(small_vol, P2, zarr_path=tmp_path / "out.zarr", output=MemoryOutput())
    assert not (tmp_path / "out.zarr").exists()


def test_memory_output_arrays_and_commit():
    from panoptem.inference.zarr_store import MemoryOutput

    out = MemoryOutput(slab=4)
    assert out.path is None and out.chunks_for((10, 20, 30)) == (4, 20, 30)
    assert MemoryOutput().chunks_for((10, 20, 30)) == (10, 20, 30)
    arr = out.create("mito", (10, 20, 30), "int32", chunks=(1, 20, 30))
    tmp = out.create(".view", (10, 20, 30), np.uint8)
    assert arr.dtype == np.int32 and tmp.dtype == np.uint8 and not arr.any()
    arr[2] = 5
    assert out.commit("mito") is arr
    for name in ("mito", ".view"):  # committed once; temporary arrays are never committed
        with pytest.raises(KeyError, match="No array"):
            out.commit(name)
    out.create("er", (2, 2, 2), np.uint8)
    out.cleanup()
    with pytest.raises(KeyError):
        out.commit("er")
    for bad in (0, 2.5, float("nan"), "a", True):
        with pytest.raises(PanoptemError, match="The slab depth must be a whole number from 1"):
            MemoryOutput(slab=bad)
    assert MemoryOutput(slab=16.0).slab == 16


@pytest.mark.parametrize("piece", [1, 50, 700, 10**6])
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_stores_are_written_in_pieces_of_their_own_slices_and_rows(em_volume, axis, piece,
                                                                  monkeypatch):
    """An in-memory output is written piece by piece from where the pieces lie in the store
    (several slices, or rows of slices where a slice is larger than a piece; at least 16 yz
    slices at once): whatever the piece size, the ZYX array mapped through the table."""
    from panoptem.inference import volume
    from panoptem.progress import Progress

    monkeypatch.setattr(volume, "WRITE_PIECE_VOXELS", piece)
    monkeypatch.setattr(volume, "WRITE_THREADS", 3)
    zyx = (em_volume[:9, :21, :34] // 16).astype(np.int32)  # ids 0..15
    store = np.ascontiguousarray(zyx.transpose([(0, 1, 2), (1, 0, 2), (2, 0, 1)][axis]))
    mapping = {3: 7, 5: 1, 9: 2, 15: 4}
    out = np.full(zyx.shape, -1, np.int32)
    stages = []

    class Stages(Progress):
        def on_stage(self, name, total):
            stages.append(total)

    volume._write_remapped(store, axis, mapping, out, np.int32, zyx.shape, Stages())
    want = np.vectorize(lambda v: mapping.get(v, 0))(zyx)
    np.testing.assert_array_equal(out, want)
    n, h, w = store.shape
    depth = max(1, piece // (h * w))
    depth = min(n, max(depth, 16)) if axis == 2 else depth
    assert stages == [-(-n // depth) * -(-h // max(1, piece // (depth * w)))]
    assert (stages[0] > 1) == (piece < zyx.size)


@pytest.mark.parametrize("dtype", [np.int32, np.uint8])
def test_id_map_by_table_and_by_search_agree(em_volume, dtype):
    """Final ids are written through a dense look-up table where ids are small, else by a
    search in the sorted keys: both map every id as the table says and others to 0."""
    import cc3d

    from panoptem.inference.volume import DENSE_LUT_IDS, _IdMap

    labels = cc3d.connected_components(em_volume[:8] < 90).astype(np.int64) + 10000 * (em_volume[:8] < 90)
    ids = np.unique(labels[labels > 0])
    labels[0, :4, :4] = -2  # a negative id and ids past the table's end map to 0 too
    labels[1, :4, :4] = 10**6
    keys = np.sort(np.random.default_rng(0).choice(ids, len(ids) // 2, replace=False))
    vals = np.arange(1, len(keys) + 1).astype(dtype)
    vals[::4], vals[-1] = 0, 7  # the last key's value is not 0
    table = dict(zip(keys.tolist(), vals.tolist(), strict=True))
    expected = np.vectorize(lambda i: table.get(i, 0), otypes=[dtype])(labels)
    dense = _IdMap(keys, vals)
    searched = _IdMap(np.append(keys, DENSE_LUT_IDS), np.append(vals, 1).astype(dtype))
    assert dense.lut is not None and searched.lut is None
    for mapped in (dense(labels), searched(labels)):
        assert mapped.dtype == dtype
        np.testing.assert_array_equal(mapped, expected)


def test_in_memory_arrays_are_written_in_pieces_side_by_side(engine3d, small_vol, monkeypatch):
    """In-memory results are written in pieces of a few of the store's slices, several at
    once: the same arrays as in one piece, for the xy, xz and yz stacks and the consensus
    alike."""
    import threading

    from panoptem.inference import volume

    p3 = Params3D(ortho_plane=True, min_size=30, return_stacks=True)
    whole = engine3d.segment(small_vol, P2, p3)
    monkeypatch.setattr(volume, "WRITE_PIECE_VOXELS", 3 * 96 * 112)  # 3 of the 10 slices
    monkeypatch.setattr(volume, "WRITE_THREADS", 3)
    readers, read = set(), volume._to_zyx

    def recorded(*args):
        readers.add(threading.current_thread().name)
        return read(*args)

    monkeypatch.setattr(volume, "_to_zyx", recorded)
    stages = []

    class Stages(Progress):
        def on_stage(self, name, total):
            stages.append((name, total))

    pieces = engine3d.segment(small_vol, P2, p3, progress=Stages())
    assert stages.count(("writing", 4)) == 6  # 3 views and 3 returned stacks, 4 pieces each
    assert readers and all(t.startswith("panoptem-write") for t in readers)
    assert whole.classes["mito"].max() > 0
    for name in whole.classes:
        np.testing.assert_array_equal(pieces.classes[name], whole.classes[name])
    for ax in ("xy", "xz", "yz"):
        np.testing.assert_array_equal(pieces.stacks[ax], whole.stacks[ax])


def test_ortho_plane_with_two_thing_classes_is_each_class_consensus(tmp_path, small_vol):
    """With several thing classes the stacks are kept and each class's inputs written in
    turn: each class is the consensus of its kept objects in the three stacks."""
    from panoptem.demo import untrained_model
    from panoptem.inference import stack as st
    from panoptem.inference.consensus import ortho_plane_consensus
    from panoptem.models import export_torchscript
    from testutils import SMALL_ARCH, model_config

    path = tmp_path / "two_things.pth"
    export_torchscript(untrained_model(dict(SMALL_ARCH, num_classes=3)), path)
    cfg = model_config(path, class_names={1: "mito", 2: "nucleus"}, labels=[1, 2],
                       thing_list=[1, 2])
    engine = Engine3D(cfg)
    vol = np.ascontiguousarray(small_vol[:6, :48, :48])
    p3 = Params3D(ortho_plane=True, min_size=4, min_extent=1)
    res = engine.segment(vol, P2, p3)
    assert sorted(res.classes) == ["mito", "nucleus"]
    p2 = replace(P2, max_objects=p3.max_objects, tile_size=0, fill_holes=False).validated()
    stacks = [st.segment_stack(engine.engine2d, vol, p2, axis=ax, median_size=p3.median_size)
              for ax in ("xy", "xz", "yz")]
    found = 0
    for c, name in ((1, "mito"), (2, "nucleus")):
        views = []
        for s in stacks:
            zyx = np.moveaxis(s.store, 0, st.AXES[s.axis])
            ids = s.kept_ids(c, p3.min_size, p3.min_extent)
            view = np.zeros(vol.shape, np.int32)
            for k, i in enumerate(ids, 1):
                view[zyx == i] = k
            views.append(view)
        want = ortho_plane_consensus(views, min_size=p3.min_size, min_extent=p3.min_extent)
        np.testing.assert_array_equal(res.classes[name], want)
        found += int(want.max() > 0)
    assert found == 2  # both classes have objects
    overlapped = engine.segment(vol, P2, p3, overlap=True)
    for name in ("mito", "nucleus"):
        np.testing.assert_array_equal(overlapped.classes[name], res.classes[name])


def test_whole_number_floats_are_taken_as_counts(engine3d, small_vol):
    """Whole-number floats pass as ints, also to the consensus (vote_thr 2.0 once passed the
    check and then failed there, after every stack's work)."""
    p3 = Params3D(min_size=30.0, min_extent=2.0, erode=1.0, dilate=1.0, max_objects=10000.0,
                  vote_thr=2.0, median_size=3.0)
    v = p3.validated()
    assert all(type(getattr(v, k)) is int
               for k in ("min_size", "min_extent", "erode", "dilate", "max_objects", "vote_thr",
                         "median_size"))
    vol = small_vol[:6, :48, :48]
    got = engine3d.segment(vol, P2, replace(p3, ortho_plane=True)).classes["mito"]
    want = engine3d.segment(vol, P2, Params3D(ortho_plane=True, min_size=30, min_extent=2,
                                              erode=1, dilate=1)).classes["mito"]
    np.testing.assert_array_equal(got, want)
