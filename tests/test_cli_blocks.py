"""``panoptem segment3d --blocks``: the program as a user runs it, killed and started again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import zarr

from panoptem.cli import main
from panoptem.inference.blockwise import BLOCKS_DIR

ARGS = ["--model", "panoptem_mito_small", "--block-size", "8,32,32", "--overlap", "3,16,16",
        "--workers", "1", "--min-size", "50", "--min-extent", "2", "--quiet"]


@pytest.fixture
def volume_npy(tmp_path, em_volume):
    path = tmp_path / "vol.npy"
    np.save(path, np.ascontiguousarray(em_volume[:32, 64:, 64:]))  # 4 x 2 x 2 blocks
    return path


def _program(*argv) -> list[str]:
    return [sys.executable, "-m", "panoptem.cli", *map(str, argv)]


def test_killed_run_resumes_to_the_identical_result(tmp_path, volume_npy, capsys):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    ref = tmp_path / "ref.zarr"
    subprocess.run(_program("segment3d", volume_npy, "-o", ref, "--blocks", *ARGS), check=True,
                   env=env, timeout=600)
    out = tmp_path / "out.zarr"
    done = out / BLOCKS_DIR / "done"
    proc = subprocess.Popen(_program("segment3d", volume_npy, "-o", out, "--blocks", *ARGS),
                            env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 600 and proc.poll() is None:
        if done.is_dir() and len(list(done.glob("*.json"))) >= 6:
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the program and its dask worker, with no goodbye
    proc.wait()
    finished = len(list(done.glob("*.json")))
    assert 6 <= finished < 16, f"{finished} blocks finished before the kill"
    attrs = zarr.open_group(str(out), mode="r").attrs["panoptem"]
    assert attrs["complete"] is False
    # started again, with the same command: the unfinished blocks run, the rest is kept
    res = subprocess.run(_program("segment3d", volume_npy, "-o", out, "--blocks", *ARGS),
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    a = zarr.open_array(str(ref / "labels" / "mito" / "0"), mode="r")[:]
    b = zarr.open_array(str(out / "labels" / "mito" / "0"), mode="r")[:]
    assert a.any()
    np.testing.assert_array_equal(b, a)
    assert not (out / BLOCKS_DIR).exists()
    # a finished store is refused (before any work), and kept
    assert main(["segment3d", str(volume_npy), "-o", str(out), "--blocks", *ARGS]) == 2
    assert "exists" in capsys.readouterr().err
    np.testing.assert_array_equal(zarr.open_array(str(out / "labels" / "mito" / "0"), mode="r")[:], a)


@pytest.mark.parametrize("extra,match", [
    (["--blocks", "--return-stacks"], "Return xy, xz, yz stacks"),
    (["--block-size", "8"], "only apply with --blocks"),
    (["--blocks", "--devices", "cpu,cpu"], "do not go together"),
    (["--blocks", "--block-size", "8,32,32", "--overlap", "3,40,16"], "larger than the block"),
])
def test_block_options_refused_before_any_work(tmp_path, volume_npy, capsys, extra, match):
    out = tmp_path / "o.zarr"
    assert main(["segment3d", str(volume_npy), "-o", str(out), "--model", "panoptem_mito_small",
                 *extra]) == 2
    assert match in capsys.readouterr().err
    assert not out.exists()


def test_blocks_need_a_zarr_output(tmp_path, volume_npy, capsys):
    assert main(["segment3d", str(volume_npy), "-o", str(tmp_path / "o.tif"), "--blocks"]) == 2
    assert "ending in .zarr" in capsys.readouterr().err


def test_ome_zarr_input_at_a_pyramid_level(tmp_path, em_volume, capsys):
    """An OME-Zarr image read at level 1 (half the size in y and x); its voxel size is
    carried into the output's label images."""

    vol = np.ascontiguousarray(em_volume[:8, :64, :64])
    img = tmp_path / "img.zarr"
    root = zarr.open_group(str(img), mode="w", zarr_format=2)
    root.create_array("0", data=vol, chunks=(8, 32, 32))
    root.create_array("1", data=vol[:, ::2, ::2], chunks=(8, 32, 32))
    root.attrs["multiscales"] = [{
        "version": "0.4", "name": "img",
        "axes": [{"name": a, "type": "space", "unit": "nanometer"} for a in "zyx"],
        "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [5, 5, 5]}]},
                     {"path": "1", "coordinateTransformations": [{"type": "scale", "scale": [5, 10, 10]}]}],
    }]
    out = tmp_path / "seg.zarr"
    assert main(["segment3d", str(img), "-o", str(out), "--blocks", "--level", "1", "--model",
                 "panoptem_mito_small", "--block-size", "4,16,16", "--overlap", "2,8,8",
                 "--min-size", "0", "--min-extent", "0", "--quiet"]) == 0
    labels = zarr.open_array(str(out / "labels" / "mito" / "0"), mode="r")
    assert labels.shape == (8, 32, 32)
    ms = zarr.open_group(str(out / "labels" / "mito"), mode="r").attrs["multiscales"][0]
    assert ms["datasets"][0]["coordinateTransformations"][0]["scale"] == [5.0, 10.0, 10.0]
    assert "labels/mito" in capsys.readouterr().out
