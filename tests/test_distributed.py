"""Multi-process 3D inference on CPU (gloo, 2 processes) equals the single-process run."""

from __future__ import annotations

import multiprocessing

import numpy as np
import pytest
import zarr

from panoptem.errors import Cancelled, PanoptemError
from panoptem.inference.distributed import segment_volume_distributed
from panoptem.inference.engine import Params2D
from panoptem.inference.volume import Engine3D, Params3D
from panoptem.progress import CallbackProgress, Progress
from testutils import model_config

P2 = Params2D(confidence_thr=0.5)
CPUS = ["cpu", "cpu"]


@pytest.fixture(scope="module")
def small_volume(em_volume):
    """8 x 64 x 80 of the real FIB-SEM test volume."""
    return np.ascontiguousarray(em_volume[:8, :64, :80])


@pytest.fixture(scope="module")
def engine3d(small_model_file):
    """One single-process engine for the references (its TorchScript warm-up paid once)."""
    return Engine3D(model_config(small_model_file))


def test_two_processes_equal_one_process(small_config, small_volume, engine3d):
    p3 = Params3D(min_size=20, min_extent=2, return_stacks=True)
    ref = engine3d.segment(small_volume, P2, p3)
    stages = []
    out = segment_volume_distributed(
        small_config,
        small_volume,
        P2,
        p3,
        devices=CPUS,
        threads=1,
        progress=CallbackProgress(lambda s, d, t: stages.append((s, d, t))),
    )
    assert set(out.classes) == {"mito"} and set(out.stacks) == {"xy"}
    assert isinstance(out.classes["mito"], np.ndarray) and ref.classes["mito"].any()
    np.testing.assert_array_equal(out.classes["mito"], ref.classes["mito"])
    np.testing.assert_array_equal(out.stacks["xy"], ref.stacks["xy"])
    assert ("stack xy", 8, 8) in stages and ("matching xy", 8, 8) in stages


def test_odd_slices_zarr_in_and_out(small_config, small_volume, engine3d, tmp_path):
    vol = small_volume[:7]  # 7 slices on 2 ranks: rank 1's last step repeats a slice
    src = zarr.create_array(
        store=str(tmp_path / "in.zarr"), shape=vol.shape, chunks=(1, 64, 80), dtype="uint8"
    )
    src[:] = vol
    p3 = Params3D(min_size=20, min_extent=2, return_stacks=True, chunk_size="4, 32, 40")
    ref = engine3d.segment(vol, P2, p3)
    out = segment_volume_distributed(
        small_config, src, P2, p3, devices=CPUS, threads=1, zarr_path=tmp_path / "out.zarr"
    )
    assert out.zarr_path == str(tmp_path / "out.zarr")
    assert out.classes["mito"].chunks == (4, 32, 40)
    np.testing.assert_array_equal(out.classes["mito"][:], ref.classes["mito"])
    np.testing.assert_array_equal(out.stacks["xy"][:], ref.stacks["xy"])
    group = zarr.open_group(str(tmp_path / "out.zarr"), mode="r")
    assert sorted(group.array_keys()) == ["mito", "panoptic_xy"]


def test_cancel_from_parent_leaves_no_complete_array(small_config, small_volume, tmp_path):
    class CancelAtStart(Progress):
        def on_stage(self, name, total):
            self.cancel()

    path = tmp_path / "cancelled.zarr"
    with pytest.raises(Cancelled):
        segment_volume_distributed(
            small_config,
            small_volume,
            P2,
            Params3D(min_size=20),
            devices=CPUS,
            threads=1,
            zarr_path=path,
            progress=CancelAtStart(),
        )
    assert not [p.name for p in path.iterdir() if p.is_dir()]
    assert not multiprocessing.active_children()


def test_error_in_the_ranks_reaches_the_parent(small_config, small_volume, tmp_path):
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a TorchScript file")
    with pytest.raises(PanoptemError, match="not a loadable TorchScript model"):
        segment_volume_distributed(
            dict(small_config, model=str(broken)), small_volume, P2, devices=CPUS, threads=1
        )
    assert not multiprocessing.active_children()


@pytest.mark.parametrize(
    "devices,match",
    [
        (["cpu"], "at least two devices"),
        ("cpu", "at least two devices"),
        (["cpu", "gpu7"], "Unknown device"),
    ],
)
def test_bad_devices(small_config, small_volume, devices, match):
    with pytest.raises(PanoptemError, match=match):
        segment_volume_distributed(small_config, small_volume, devices=devices)


def test_missing_model_file_fails_before_starting(small_config, small_volume, tmp_path):
    cfg = dict(small_config, model=str(tmp_path / "missing.pth"))
    with pytest.raises(PanoptemError, match="missing.pth does not exist"):
        segment_volume_distributed(cfg, small_volume, devices=CPUS)


def test_cuda_unavailable(small_config, small_volume):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(PanoptemError, match="CUDA is not available"):
        segment_volume_distributed(small_config, small_volume, devices=["cuda:0", "cuda:1"])
