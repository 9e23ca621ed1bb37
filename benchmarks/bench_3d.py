"""Time and memory of 3D inference.

``speed`` (default): the 64 x 256 x 256 real FIB-SEM volume
(``../shared/data/lucchi_pp/volume3d``) through stack (xy) and ortho-plane inference with
the MitoNet_v1 architecture (random weights, see ``bench_2d.py``), reporting the time inside
the model's forward passes, everything else (median filter, post-processing, matching,
consensus, writing) and peak RSS, each case in its own process.

``memory``: a 256 x 1024 x 1024 uint8 zarr volume (made from the SBEM training slices,
tiled) through stack inference with the output written to zarr, reporting peak RSS
against the 1 GiB its int32 output would take in memory. The model is the small demo
architecture (ResNet-18) because the forward cost is irrelevant to memory here.

    .venv/bin/python benchmarks/bench_3d.py speed
    .venv/bin/python benchmarks/bench_3d.py memory
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_2d  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VOLUME = ROOT.parent / "shared" / "data" / "lucchi_pp" / "volume3d" / "test_image_z0-63_y0-255_x192-447.tif"
SBEM = ROOT.parent / "shared" / "data" / "cdeep3m_sbem_mito" / "train" / "images"
CACHE = Path.home() / ".cache" / "panoptem-bench"


def config(model_path, padding_factor: int = 16) -> dict:
    return {"class_names": {1: "mito"}, "labels": [1], "thing_list": [1], "model": str(model_path),
            "model_quantized": None, "padding_factor": padding_factor,
            "norms": {"mean": 0.57571, "std": 0.12765}}


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 0)


def speed_case(mode: str, threads: int) -> dict:
    import tifffile
    import torch

    from panoptem.inference.volume import Engine3D, Params3D

    torch.set_num_threads(threads)
    vol = tifffile.imread(VOLUME)
    engine = Engine3D(config(bench_2d.model_file(CACHE)))
    p3 = Params3D(ortho_plane=(mode == "ortho"))
    engine.segment(vol[:8], params3d=p3)  # warm-up (TorchScript profiling runs)
    engine.engine2d.timings = {}
    t0 = time.perf_counter()
    res = engine.segment(vol, params3d=p3)
    total = time.perf_counter() - t0
    fwd = engine.engine2d.timings["forward"]
    n_slices = sum(vol.shape) if mode == "ortho" else vol.shape[0]
    return {"case": mode, "total_s": round(total, 2), "forward_s": round(fwd, 2),
            "other_s": round(total - fwd, 2), "other_pct": round(100 * (total - fwd) / fwd, 1),
            "forward_per_slice_s": round(fwd / n_slices, 3),
            "other_per_slice_s": round((total - fwd) / n_slices, 4),
            "objects": int(res.classes["mito"].max()), "peak_rss_mb": peak_rss_mb()}


def memory_case(threads: int, chunk: str) -> dict:
    import torch
    import zarr
    from PIL import Image

    from panoptem.demo import DEMO_ARCH, untrained_model
    from panoptem.inference.volume import Engine3D, Params3D
    from panoptem.models import export_torchscript

    torch.set_num_threads(threads)
    model = CACHE / "demo_arch_random.pth"
    if not model.exists():
        export_torchscript(untrained_model(DEMO_ARCH), model)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        src = zarr.create_array(store=f"{tmp}/in.zarr", shape=(256, 1024, 1024), chunks=(1, 1024, 1024),
                                dtype="uint8")
        slices = [np.asarray(Image.open(p)) for p in sorted(SBEM.glob("*.png"))]
        for z in range(256):
            src[z] = slices[z % len(slices)]
        base = peak_rss_mb()
        engine = Engine3D(config(model))
        t0 = time.perf_counter()
        res = engine.segment(src, params3d=Params3D(chunk_size=chunk), zarr_path=f"{tmp}/out.zarr")
        total = time.perf_counter() - t0
        return {"case": f"256x1024x1024 zarr->zarr, chunks {chunk}", "total_s": round(total, 1),
                "arrays": sorted(res.classes),
                "peak_rss_mb": peak_rss_mb(), "rss_before_inference_mb": base,
                "int32_output_mb": 256 * 1024 * 1024 * 4 // 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["speed", "memory"], nargs="?", default="speed")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--chunk", default="256")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        r = memory_case(args.threads, args.chunk) if args.one == "memory" else speed_case(args.one, args.threads)
        print(json.dumps(r))
        return
    bench_2d.model_file(CACHE)
    cases = ["stack", "ortho"] if args.what == "speed" else ["memory"]
    for case in cases:
        out = subprocess.run([sys.executable, __file__, "--one", case, "--threads", str(args.threads),
                              "--chunk", args.chunk], check=True, capture_output=True, text=True).stdout
        print(out.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
