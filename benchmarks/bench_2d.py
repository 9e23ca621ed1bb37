"""Time 2D inference of a 1024 x 1024 real EM image with the MitoNet_v1 architecture.

For each case (downsampling 1 and 2, untiled and tiled, fine boundaries) it reports:
- forward: seconds spent inside the TorchScript model call during the whole call,
- total: seconds of the whole ``Engine2D.segment`` call (reading nothing from disk),
- overhead: (total - forward) / forward, the cost of everything outside the model,
- peak RSS of the process that ran only that case.

Weights are random (the architecture and TorchScript export are MitoNet_v1's, so the
forward cost is the real one); heads are given spatial structure so post-processing sees
a realistic number of objects. Run from the repository root:

    .venv/bin/python benchmarks/bench_2d.py [--repeat 3] [--threads 2] [--plain]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGE = ROOT.parent / "shared" / "data" / "cdeep3m_sbem_mito" / "train" / "images" / "images.010.png"
CASES = {
    "ds1": dict(downsampling=1),
    "ds2": dict(downsampling=2),
    "ds1-tiled512": dict(downsampling=1, tile_size=512),
    "ds2-tiled512": dict(downsampling=2, tile_size=512),
    "ds1-fine": dict(downsampling=1, fine_boundaries=True),
}
MITONET_V1 = {
    "arch": "PanopticDeepLabPR", "encoder": "resnet50", "num_classes": 1, "stage4_stride": 16,
    "decoder_channels": 256, "low_level_stages": [1], "low_level_channels_project": [32],
    "atrous_rates": [2, 4, 6], "aspp_channels": None, "aspp_dropout": 0.5, "ins_decoder": True,
    "ins_ratio": 0.5, "num_fc": 3, "train_num_points": 1024, "oversample_ratio": 3,
    "importance_sample_ratio": 0.75, "subdivision_steps": 2, "subdivision_num_points": 8192,
}


def model_file(cache: Path) -> Path:
    from panoptem.demo import untrained_model
    from panoptem.models import export_torchscript

    path = cache / "MitoNet_v1_arch_random.pth"
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        export_torchscript(untrained_model(MITONET_V1), path)
    return path


def run_case(name: str, repeat: int, threads: int, cache: Path, plain: bool = False) -> dict:
    import numpy as np
    import torch
    from PIL import Image

    from panoptem.inference.engine import Engine2D
    from panoptem.loading import load_model

    torch.set_num_threads(threads)
    img = np.asarray(Image.open(IMAGE))
    cfg = {"class_names": {1: "mito"}, "labels": [1], "thing_list": [1],
           "model": str(model_file(cache)), "model_quantized": None, "padding_factor": 16,
           "norms": {"mean": 0.57571, "std": 0.12765}}
    # plain: the TorchScript file's module as loaded, not prepared for inference (frozen)
    engine = Engine2D(load_model(cfg, optimize=not plain))
    engine.segment(img, **CASES[name])  # warm-up: TorchScript profiling runs
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        labels = engine.segment(img, **CASES[name])
        total = time.perf_counter() - t0
        runs.append((total, engine.timings["forward"]))
    total, forward = min(runs, key=lambda r: r[0])
    return {
        "case": name, "total_s": round(total, 3), "forward_s": round(forward, 3),
        "overhead_pct": round(100 * (total - forward) / forward, 1),
        "objects": int(len(np.unique(labels)) - 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 0),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cases", nargs="*", default=list(CASES))
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "panoptem-bench"))
    ap.add_argument("--plain", action="store_true",
                    help="run the model file as loaded (not frozen and optimised for inference)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_case(args.one, args.repeat, args.threads, Path(args.cache), args.plain)))
        return
    model_file(Path(args.cache))
    print(f"{'case':<14}{'total s':>9}{'forward s':>11}{'overhead':>10}{'objects':>9}{'peak RSS MB':>13}")
    for name in args.cases:  # one process per case so peak memory is that case's own
        out = subprocess.run([sys.executable, __file__, "--one", name, "--repeat", str(args.repeat),
                              "--threads", str(args.threads), "--cache", args.cache,
                              *(["--plain"] if args.plain else [])],
                             check=True, capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(f"{r['case']:<14}{r['total_s']:>9}{r['forward_s']:>11}{r['overhead_pct']:>9}%"
              f"{r['objects']:>9}{r['peak_rss_mb']:>13}")


if __name__ == "__main__":
    main()
