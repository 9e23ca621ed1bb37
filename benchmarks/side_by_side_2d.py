"""Run the original empanada-napari 2D engine and panoptem on the same image and model.

Needs the original's venv made by ``../shared/original/setup-anchor.sh`` (outside this
repository). The model is panoptem's random-weight MitoNet_v1-architecture TorchScript
file from ``bench_2d.py`` (the same file runs in both, which also shows that models
panoptem exports run in the original). Reports, per case, the warm wall time of each and
how well the label images agree (foreground IoU, instance F1 at IoU 0.5, object counts).

    .venv/bin/python benchmarks/side_by_side_2d.py --anchor-dir /work/anchors
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_2d  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ORIGINAL = ROOT.parent / "shared" / "original"
CASES = {
    "ds1": dict(downsampling=1),
    "ds2": dict(downsampling=2),
    "ds2-tiled512": dict(downsampling=2, tile_size=512),
}


def agreement(a: np.ndarray, b: np.ndarray) -> dict:
    """Foreground IoU and one-to-one instance F1 at IoU 0.5 of two label images (each
    distinct id is one object), by :func:`panoptem.evaluation.evaluate`."""
    from panoptem.evaluation import evaluate

    m = evaluate(b, a, gt_is_binary=False, pred_is_binary=False)
    return {"fg_iou": round(m.fg_iou, 6), "f1@0.5": round(m.f1, 4),
            "objects_original": m.n_gt, "objects_panoptem": m.n_pred}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--anchor-dir", default=os.environ.get("ANCHOR_DIR", str(ROOT.parent.parent / "anchors")))
    ap.add_argument("--image", default=str(bench_2d.IMAGE))
    ap.add_argument("--cases", nargs="*", default=list(CASES))
    args = ap.parse_args()
    from PIL import Image

    from panoptem.inference.engine import Engine2D

    anchor_py = Path(args.anchor_dir) / "venv" / "bin" / "python"
    model = bench_2d.model_file(Path.home() / ".cache" / "panoptem-bench")
    cfg = yaml.safe_load((ROOT / "src" / "panoptem" / "configs" / "MitoNet_v1.yaml").read_text())
    cfg.update(model=str(model), model_quantized=None)
    img = np.asarray(Image.open(args.image))
    engine = Engine2D(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "cfg.yaml").write_text(yaml.safe_dump(cfg))
        np.save(tmp / "img.npy", img)
        print(f"{'case':<14}{'original s':>11}{'panoptem s':>11}{'speed-up':>9}  agreement")
        for name in args.cases:
            p = CASES[name]
            cmd = [str(anchor_py), str(ORIGINAL / "anchor_run.py"), str(tmp / "img.npy"), "--config",
                   str(tmp / "cfg.yaml"), "--mode", "2d", "--repeat", "2", "--threads", "2",
                   "--downsampling", str(p["downsampling"]), "--tile-size", str(p.get("tile_size", 0)),
                   "--out", str(tmp / "orig.npy"), "--json", str(tmp / "orig.json")]
            subprocess.run(cmd, check=True, capture_output=True, env=dict(os.environ, ANCHOR_DIR=args.anchor_dir))
            t_orig = min(r["total_s"] for r in json.loads((tmp / "orig.json").read_text())["runs"])
            engine.segment(img, **p)  # warm-up, as the original's first run is
            times = []
            for _ in range(2):
                t0 = time.perf_counter()
                ours = engine.segment(img, **p)
                times.append(time.perf_counter() - t0)
            t_ours = min(times)
            agree = agreement(np.load(tmp / "orig.npy"), ours)
            print(f"{name:<14}{t_orig:>11.2f}{t_ours:>11.2f}{t_orig / t_ours:>8.1f}x  {json.dumps(agree)}")


if __name__ == "__main__":
    main()
