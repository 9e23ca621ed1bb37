"""Block-wise 3D inference on dask.distributed: stitching, agreement, resume, failures."""

from __future__ import annotations

import json
import os
import signal

import cc3d
import numpy as np
import pytest
import zarr

from panoptem.errors import Cancelled, PanoptemError
from panoptem.evaluation import evaluate
from panoptem.inference import blockwise
from panoptem.inference.blockwise import BLOCKS_DIR, BlockGrid, Cluster, segment_blocks
from panoptem.inference.engine import Params2D
from panoptem.inference.volume import Engine3D, Params3D, Result3D
from panoptem.progress import CallbackProgress, Progress

THREADS = Cluster(workers=1, processes=False)  # in this process: fast, and monkeypatchable
P2 = Params2D(confidence_thr=0.5)


class Threshold:
    """A stand-in for the engine whose result is local (bright voxels, 26-connected
    components), so block-wise and whole-volume results must be identical."""

    calls: list = []

    def segment(self, region, p2, p3, value_range=None):
        Threshold.calls.append(region.shape)
        return Result3D(classes={"mito": cc3d.connected_components(np.asarray(region) > 127,
                                                                   connectivity=26).astype(np.int32)})


@pytest.fixture
def threshold_engine(monkeypatch):
    Threshold.calls = []
    monkeypatch.setattr(blockwise, "_engine", lambda *a: Threshold())
    return Threshold


def _same_objects(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to the ids: one-to-one correspondence of labels, voxel for voxel."""
    if not np.array_equal(a > 0, b > 0):
        return False
    pairs = np.unique(np.stack([a[a > 0], b[b > 0]]), axis=1)
    return len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]


def _ball(shape, centre, radius):
    zz, yy, xx = np.ogrid[tuple(slice(0, s) for s in shape)]
    return ((zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2) <= radius ** 2


# ---------------------------------------------------------------------- the grid
def test_grid_regions_and_neighbours():
    g = BlockGrid.make((40, 100, 100), (16, 50, 50), (4, 10, 10))
    assert g.counts == (3, 2, 2) and len(g.indices()) == 12
    assert g.core((2, 1, 1)) == (slice(32, 40), slice(50, 100), slice(50, 100))
    assert g.padded((1, 0, 1)) == (slice(12, 36), slice(0, 60), slice(40, 100))
    nb = g.neighbours((1, 0, 0))
    assert nb[0] == (1, 0, 0) and len(nb) == 12  # every block of the two layers around it
    assert set(g.neighbours((0, 0, 0))) == {(a, b, c) for a in (0, 1) for b in (0, 1) for c in (0, 1)}


def test_grid_refuses_bad_sizes():
    with pytest.raises(PanoptemError, match="larger than the block"):
        BlockGrid.make((40, 100, 100), (16, 50, 50), (4, 60, 10))
    with pytest.raises(PanoptemError, match="at least 1 voxel of overlap"):
        BlockGrid.make((40, 100, 100), (16, 50, 50), (4, 0, 10))
    with pytest.raises(PanoptemError, match="does not parse"):
        BlockGrid.make((40, 100, 100), "16,50", 4)
    # one block along an axis needs no overlap there; blocks are clipped to the volume
    g = BlockGrid.make((10, 100, 100), (64, 50, 50), (0, 5, 5))
    assert g.counts == (1, 2, 2) and g.block == (10, 50, 50)


def test_default_sizes_follow_the_model_and_filters():
    assert blockwise.default_overlap(Params3D(median_size=5), 16) == (4, 64, 64)
    assert blockwise.default_overlap(Params3D(erode=2, dilate=1), 128) == (6, 131, 131)
    assert blockwise.default_overlap(Params3D(), 512) == (3, 128, 128)
    assert blockwise.default_overlap(Params3D(ortho_plane=True), 16) == (64, 64, 64)
    assert blockwise.default_block_shape(Params3D()) == (32, 1024, 1024)
    assert blockwise.default_block_shape(Params3D(plane="xz")) == (192, 384, 384)


# ------------------------------------------------------------------- stitching
def test_objects_across_an_eight_block_corner_come_out_whole(threshold_engine, small_config, tmp_path):
    shape = (40, 60, 60)
    vol = np.zeros(shape, np.uint8)
    vol[_ball(shape, (20, 30, 30), 9)] = 200  # centred on the corner where 8 blocks meet
    vol[_ball(shape, (8, 10, 48), 5)] = 200  # inside one block
    vol[3:37, 44:47, 5:55] = 200  # a slab longer than a block and its margins
    vol[30:34, 5:9, 5:9] = 200  # a small one, removed by min_size
    ref = cc3d.connected_components(vol > 127, connectivity=26)
    out = segment_blocks(small_config, vol, P2, Params3D(min_size=100, min_extent=2),
                         output=tmp_path / "out.zarr", block_shape=(20, 30, 30), overlap=(3, 4, 4),
                         cluster=THREADS)
    mito = out.classes["mito"][:]
    big = np.isin(ref, [i for i in np.unique(ref[ref > 0]) if (ref == i).sum() >= 100]) * ref
    assert _same_objects(mito, big)
    assert sorted(np.unique(mito[mito > 0])) == [1, 2, 3]
    assert len(threshold_engine.calls) == 8
    # the blocks' records are gone once the run is complete; the parameters stay
    assert not (tmp_path / "out.zarr" / BLOCKS_DIR).exists()
    attrs = zarr.open_group(str(tmp_path / "out.zarr"), mode="r").attrs["panoptem"]
    assert attrs["complete"] is True and attrs["blocks"]["block"] == [20, 30, 30]
    assert attrs["params3d"]["min_size"] == 100


def test_mask_skips_empty_blocks(threshold_engine, small_config, tmp_path):
    shape = (32, 64, 64)
    vol = np.zeros(shape, np.uint8)
    vol[4:12, 4:12, 4:12] = 255
    mask = np.zeros((8, 16, 16), bool)  # a quarter of the resolution
    mask[1:3, 1:3, 1:3] = True  # covers the object, in block (0, 0, 0) only
    out = segment_blocks(small_config, vol, P2, Params3D(min_size=0, min_extent=0),
                         output=tmp_path / "m.zarr", block_shape=16, overlap=2, mask=mask,
                         cluster=THREADS)
    assert len(threshold_engine.calls) == 1
    assert zarr.open_group(str(tmp_path / "m.zarr"), mode="r").attrs["panoptem"]["blocks_skipped"] == 31
    np.testing.assert_array_equal(out.classes["mito"][:] > 0, vol > 0)


# ------------------------------------------------------------ the real model
@pytest.mark.parametrize("ortho", [False, True], ids=["stack", "ortho-plane"])
def test_blocks_agree_with_the_whole_volume(em_volume, tmp_path, ortho):
    """The bundled model on the real test volume against the whole-volume engine: 16 blocks
    (stack, the whole 64 x 128 x 128 volume) or 4 blocks (ortho-plane, a 16 x 64 x 64 part),
    with the default margins (clipped to the blocks)."""
    vol = em_volume if not ortho else np.ascontiguousarray(em_volume[:16, 64:, 64:])
    p3 = Params3D(min_size=200, min_extent=3, ortho_plane=ortho)
    whole = Engine3D("panoptem_mito_small").segment(vol, P2, p3).classes["mito"]
    blocks = segment_blocks("panoptem_mito_small", vol, P2, p3, output=tmp_path / "b.zarr",
                            block_shape=(8, 64, 32) if ortho else (16, 64, 64), cluster=THREADS)
    got = blocks.classes["mito"][:]
    m = evaluate(got, whole)
    assert m.n_gt >= 1 and whole.any()
    assert np.unique(got).tolist() == list(range(int(got.max()) + 1))  # numbered 1..N
    assert m.f1 >= 0.97 and m.fg_iou >= 0.99, m.summary()
    if not ortho:  # the pyramid, written by dask tasks: every second voxel (isotropic voxels)
        level1 = zarr.open_array(str(tmp_path / "b.zarr" / "labels" / "mito" / "1"), mode="r")
        np.testing.assert_array_equal(level1[:], got[::2, ::2, ::2])


# ------------------------------------------------------------- nothing lost
def test_cancelled_run_resumes_with_the_unfinished_blocks(threshold_engine, small_config, tmp_path):
    shape = (32, 32, 64)  # 2 x 2 x 4 blocks of 16
    rng = np.random.default_rng(0)
    vol = (ndimage_smooth(rng.random(shape)) > 0.55).astype(np.uint8) * 200
    p3 = Params3D(min_size=5, min_extent=0)
    ref = segment_blocks(small_config, vol, P2, p3, output=tmp_path / "ref.zarr", block_shape=16,
                         overlap=3, cluster=THREADS).classes["mito"][:]

    class StopAfter(Progress):
        def on_advance(self, done, total):
            if self.stage_name == "blocks" and done >= 5:
                self.cancel()

    threshold_engine.calls = []
    with pytest.raises(Cancelled):
        segment_blocks(small_config, vol, P2, p3, output=tmp_path / "r.zarr", block_shape=16,
                       overlap=3, cluster=THREADS, progress=StopAfter())
    done = len(list((tmp_path / "r.zarr" / BLOCKS_DIR / "done").glob("*.json")))
    assert 5 <= done < 16
    first = len(threshold_engine.calls)
    stages = []
    res = segment_blocks(small_config, vol, P2, p3, output=tmp_path / "r.zarr", block_shape=16,
                         overlap=3, cluster=THREADS,
                         progress=CallbackProgress(lambda s, d, t: stages.append((s, d, t))))
    assert len(threshold_engine.calls) - first == 16 - done  # only the unfinished blocks ran
    assert ("blocks", done, 16) in stages  # the bar starts at the finished blocks
    np.testing.assert_array_equal(res.classes["mito"][:], ref)
    # a finished store is not run again, nor an unfinished one with other parameters
    with pytest.raises(PanoptemError, match="exists"):
        segment_blocks(small_config, vol, P2, p3, output=tmp_path / "r.zarr", block_shape=16,
                       overlap=3, cluster=THREADS)


def ndimage_smooth(a):
    from scipy import ndimage

    return ndimage.gaussian_filter(a, 2)


def test_unfinished_run_with_other_parameters_is_refused(threshold_engine, small_config, tmp_path):
    vol = np.zeros((32, 32, 32), np.uint8)
    vol[2:30, 2:30, 2:30] = 200

    class StopAtOnce(Progress):
        def on_advance(self, done, total):
            self.cancel()

    with pytest.raises(Cancelled):
        segment_blocks(small_config, vol, P2, Params3D(), output=tmp_path / "u.zarr",
                       block_shape=16, overlap=2, cluster=THREADS, progress=StopAtOnce())
    before = sorted(p.name for p in (tmp_path / "u.zarr" / BLOCKS_DIR / "done").iterdir())
    with pytest.raises(PanoptemError, match="other parameters"):
        segment_blocks(small_config, vol, P2, Params3D(min_size=7), output=tmp_path / "u.zarr",
                       block_shape=16, overlap=2, cluster=THREADS)
    assert sorted(p.name for p in (tmp_path / "u.zarr" / BLOCKS_DIR / "done").iterdir()) == before
    # overwrite starts again
    out = segment_blocks(small_config, vol, P2, Params3D(min_size=7), output=tmp_path / "u.zarr",
                         block_shape=16, overlap=2, cluster=THREADS, overwrite=True)
    assert np.unique(out.classes["mito"][:]).tolist() == [0, 1]


def test_a_worker_that_dies_is_replaced(small_config, em_volume, tmp_path):
    """Two worker processes; one is killed after the first finished block: the run ends with
    the same labels as an undisturbed run."""
    from distributed import Client, LocalCluster

    vol = np.ascontiguousarray(em_volume[:16, 64:, 64:])
    p3 = Params3D(min_size=20, min_extent=2)
    ref = segment_blocks(small_config, vol, P2, p3, output=tmp_path / "ref.zarr",
                         block_shape=(8, 32, 32), overlap=(3, 16, 16), cluster=THREADS).classes["mito"][:]
    assert ref.any()
    killed = []
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      silence_logs=50) as cluster, Client(cluster) as client:
        pids = client.run(os.getpid)

        def kill_one(stage, done, total):
            if stage == "blocks" and done >= 1 and not killed:
                pid = next(iter(pids.values()))
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)

        out = segment_blocks(small_config, vol, P2, p3, output=tmp_path / "k.zarr",
                             block_shape=(8, 32, 32), overlap=(3, 16, 16), client=client,
                             progress=CallbackProgress(kill_one))
        assert killed and killed[0] not in client.run(os.getpid).values()
    np.testing.assert_array_equal(out.classes["mito"][:], ref)


# ------------------------------------------------------------------- input / errors
def test_zarr_arrays_are_opened_by_the_workers(threshold_engine, small_config, tmp_path, monkeypatch):
    """A zarr array on disk is not read here block by block but opened by each worker from
    its folder; a numpy volume is sent a few blocks at a time and gives the same result."""
    vol = np.zeros((16, 40, 40), np.uint8)
    vol[3:13, 5:35, 5:12] = 200
    arr = zarr.create_array(str(tmp_path / "v.zarr"), shape=vol.shape, dtype="uint8", chunks=(8, 20, 20))
    arr[:] = vol
    sent = []
    real = blockwise._region
    monkeypatch.setattr(blockwise, "_region", lambda v, r: sent.append(r) or real(v, r))
    a = segment_blocks(small_config, arr, P2, Params3D(min_size=0, min_extent=0),
                       output=tmp_path / "a.zarr", block_shape=(8, 20, 20), overlap=(2, 4, 4),
                       cluster=THREADS).classes["mito"][:]
    assert sent == []
    b = segment_blocks(small_config, vol, P2, Params3D(min_size=0, min_extent=0),
                       output=tmp_path / "b.zarr", block_shape=(8, 20, 20), overlap=(2, 4, 4),
                       cluster=THREADS).classes["mito"][:]
    assert len(sent) == 8
    np.testing.assert_array_equal(a, b)
    assert np.unique(a).tolist() == [0, 1]


def test_inputs_read_from_paths(threshold_engine, small_config, tmp_path):
    import tifffile

    vol = np.zeros((16, 40, 40), np.uint16)
    vol[4:12, 5:30, 5:30] = 3000
    vol[0, 0, 0] = 1  # the range 1..3000 maps the object to 255
    np.save(tmp_path / "v.npy", vol)
    tifffile.imwrite(tmp_path / "v.tif", vol)
    results = []
    for i, path in enumerate([tmp_path / "v.npy", tmp_path / "v.tif"]):
        out = segment_blocks(small_config, str(path), P2, Params3D(min_size=0, min_extent=0),
                             output=tmp_path / f"o{i}.zarr", block_shape=(8, 20, 20),
                             overlap=(2, 4, 4), cluster=THREADS)
        results.append(out.classes["mito"][:])
    np.testing.assert_array_equal(results[0], results[1])
    assert np.unique(results[0]).tolist() == [0, 1]


def test_errors_before_any_work(small_config, tmp_path):
    vol = np.zeros((8, 16, 16), np.uint8)
    with pytest.raises(PanoptemError, match="Return xy, xz, yz stacks"):
        segment_blocks(small_config, vol, P2, Params3D(return_stacks=True), output=tmp_path / "a.zarr")
    with pytest.raises(PanoptemError, match=r"ending in \.zarr"):
        segment_blocks(small_config, vol, P2, Params3D(), output=tmp_path / "a.tif")
    (tmp_path / "mine.zarr").mkdir()
    (tmp_path / "mine.zarr" / "notes.txt").write_text("keep")
    with pytest.raises(PanoptemError, match="exists"):
        segment_blocks(small_config, vol, P2, Params3D(), output=tmp_path / "mine.zarr")
    assert (tmp_path / "mine.zarr" / "notes.txt").read_text() == "keep"
    with pytest.raises(PanoptemError):  # overwrite replaces zarr stores only, never a folder of files
        segment_blocks(small_config, vol, P2, Params3D(), output=tmp_path / "mine.zarr",
                       overwrite=True, cluster=THREADS)
    assert (tmp_path / "mine.zarr" / "notes.txt").read_text() == "keep"
    with pytest.raises(PanoptemError, match="3D"):
        segment_blocks(small_config, np.zeros((16, 16), np.uint8), P2, Params3D(), output=tmp_path / "b.zarr")
    assert not (tmp_path / "a.zarr").exists() and not (tmp_path / "b.zarr").exists()


def test_unreachable_scheduler(small_config, tmp_path):
    with pytest.raises(PanoptemError, match="Cannot reach the dask scheduler"):
        segment_blocks(small_config, np.zeros((8, 16, 16), np.uint8), P2, Params3D(),
                       output=tmp_path / "s.zarr", cluster=Cluster(scheduler="tcp://127.0.0.1:9", timeout="2s"))
    assert not (tmp_path / "s.zarr").exists()


def test_records_survive_in_the_store(threshold_engine, small_config, tmp_path):
    vol = np.zeros((16, 32, 32), np.uint8)
    vol[2:14, 2:14, 2:14] = 255

    class StopAtOnce(Progress):
        def on_advance(self, done, total):
            if self.stage_name == "blocks":
                self.cancel()

    with pytest.raises(Cancelled):
        segment_blocks(small_config, vol, P2, Params3D(min_size=0), output=tmp_path / "x.zarr",
                       block_shape=16, overlap=2, cluster=THREADS, progress=StopAtOnce())
    recs = [json.loads(p.read_text()) for p in (tmp_path / "x.zarr" / BLOCKS_DIR / "done").glob("*.json")]
    assert recs and all("objects" in r for r in recs)
    attrs = zarr.open_group(str(tmp_path / "x.zarr"), mode="r").attrs["panoptem"]
    assert attrs["complete"] is False
