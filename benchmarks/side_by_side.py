"""The original empanada-napari and panoptem, side by side, in every inference mode.

Each case runs the same model file on the same input through the original (its real 2D
engine, 3D stack and ortho-plane pipelines with the widget defaults, driven headless by
``../shared/original/anchor_run.py``) and through panoptem, each in a process of its own
with 2 torch threads, one after the other. Reported per case: the warm wall time of the
whole call (best of ``--repeat`` runs after a first, cold one), the peak memory of each
process (the original's 3D pipelines also fork a matching process; its peak is given
beside), and how well the two label images agree (foreground IoU; instance F1 at IoU 0.5
after one-to-one matching).

The models are the original's MitoNet_v1 and MitoNet_v1_mini architectures as
``../shared/original/make_anchor_model.py`` trains and exports them (the released weights
cannot be downloaded here), with the original's int8 export of mini. The original's int8
export of v1 does not run under torch 2.13 (see ``../shared/original/README.md``), so the
quantized v1 case runs panoptem's int8 export of the same float file in both programs.

    ANCHOR_DIR=/path/outside/repo bash ../shared/original/setup-anchor.sh   # and its README's steps
    .venv/bin/python benchmarks/side_by_side.py --anchor-dir /path/outside/repo
    .venv/bin/python benchmarks/side_by_side.py --cases 2d-v1 stack-mini --repeat 3
    .venv/bin/python benchmarks/side_by_side.py --int8     # panoptem int8 against float
    .venv/bin/python benchmarks/side_by_side.py --cases stack-v1-bf16 ortho-v1-bf16  # opt-in

The ``-bf16`` cases run panoptem with ``precision="bfloat16"`` (an opt-in that changes the
numbers) against the original in float32.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from side_by_side_2d import agreement  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ORIGINAL = ROOT.parent / "shared" / "original"
ARCHS = {"v1": "MitoNet_v1_anchor", "mini": "MitoNet_v1_mini_anchor"}
# case -> (architecture, mode, options)
CASES = {
    "2d-v1": ("v1", "2d", {}),
    "2d-v1-fine": ("v1", "2d", {"fine_boundaries": True}),
    "2d-v1-q": ("v1", "2d", {"quantized": True}),
    "2d-mini": ("mini", "2d", {}),
    "2d-mini-fine": ("mini", "2d", {"fine_boundaries": True}),
    "2d-mini-q": ("mini", "2d", {"quantized": True}),
    "stack-v1": ("v1", "stack", {}),
    "stack-mini": ("mini", "stack", {}),
    "ortho-v1": ("v1", "ortho", {}),
    "ortho-mini": ("mini", "ortho", {}),
    # panoptem's opt-in bfloat16 against the original's float32 (its only precision)
    "2d-v1-bf16": ("v1", "2d", {"precision": "bfloat16"}),
    "2d-mini-bf16": ("mini", "2d", {"precision": "bfloat16"}),
    "stack-v1-bf16": ("v1", "stack", {"precision": "bfloat16"}),
    "stack-mini-bf16": ("mini", "stack", {"precision": "bfloat16"}),
    "ortho-v1-bf16": ("v1", "ortho", {"precision": "bfloat16"}),
    "ortho-mini-bf16": ("mini", "ortho", {"precision": "bfloat16"}),
}
#: the cases run by default: the original's own modes, panoptem in float32 or int8
DEFAULT_CASES = [c for c, (_, _, opts) in CASES.items() if "precision" not in opts]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_panoptem(args) -> None:
    """One case in this process (``--ours``): time ``--repeat`` calls, save the last result."""
    import torch

    torch.set_num_threads(args.threads)
    from panoptem.inference.engine import Engine2D, Params2D
    from panoptem.inference.volume import Engine3D, Params3D

    cfg = yaml.safe_load(Path(args.config).read_text())
    data = np.load(args.input)
    engine = Engine2D(cfg, "cpu", quantized=args.quantized, precision=args.precision)
    times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        if args.ours == "2d":
            labels = engine.segment(data, fine_boundaries=args.fine_boundaries)
        else:
            p3 = Params3D(ortho_plane=args.ours == "ortho")
            res = Engine3D(engine).segment(data, Params2D(fine_boundaries=args.fine_boundaries), p3)
            (labels,) = res.classes.values()
        times.append(time.perf_counter() - t0)
    np.save(args.out, np.asarray(labels))
    Path(args.json).write_text(json.dumps({"runs": [{"total_s": t} for t in times],
                                           "peak_rss_mb": _peak_rss_mb()}))


MITONET_V1_MINI = {  # as ../shared/original/make_anchor_model.py builds the mini anchor
    "arch": "PanopticBiFPNPR", "encoder": "resnet50", "num_classes": 1, "fpn_dim": 160,
    "fpn_layers": 3, "ins_decoder": True, "depthwise": True, "num_fc": 3, "train_num_points": 1024,
    "oversample_ratio": 3, "importance_sample_ratio": 0.75, "subdivision_steps": 2,
    "subdivision_num_points": 8192,
}


def quantized_panoptem(models: Path, cfg: dict, arch: str) -> Path:
    """panoptem's int8 export of an anchor float file (made once per quantizer version, kept
    beside the models under a name with the digest of ``panoptem.models.quantize``'s source)."""
    import hashlib

    from bench_2d import MITONET_V1
    from PIL import Image

    from panoptem.models import quantize

    digest = hashlib.sha256(Path(quantize.__file__).read_bytes()).hexdigest()[:10]
    out = models / f"{ARCHS[arch]}_quantized_panoptem_{digest}.pth"
    if out.exists():
        return out
    model = quantize.model_from_torchscript(cfg["model"], {"v1": MITONET_V1, "mini": MITONET_V1_MINI}[arch])
    files = [f for f in sorted((models.parent / "train_data").rglob("*.tif*")) if f.parent.name == "images"]
    images = [np.asarray(Image.open(f)) for f in files[:: max(1, len(files) // 16)]]
    quantize.save_quantized(quantize.quantize_model(
        model, quantize.calibration_tensors(images, cfg["norms"], multiple=int(cfg["padding_factor"])),
        already_fused=True), out)
    return out


def _case_config(name: str, args, work: Path, quantized: bool, own_int8: bool = False) -> Path:
    """The anchor model's config for a case, written to ``work``. The int8 file is panoptem's
    export for v1 (the original's does not run here) or with ``own_int8``, else the original's."""
    arch = CASES[name][0]
    models = Path(args.anchor_dir) / "models"
    cfg = yaml.safe_load((models / f"{ARCHS[arch]}.yaml").read_text())
    cfg["model"] = str((models / Path(cfg["model"]).name).resolve())
    if quantized and (arch == "v1" or own_int8):
        # made in a process of its own: a child inherits this process's peak RSS as its own
        # starting peak (Linux carries it over exec), so this process must stay small
        made = subprocess.run([sys.executable, __file__, "--make-int8", arch, "--anchor-dir", str(args.anchor_dir)],
                              input=yaml.safe_dump(cfg), capture_output=True, text=True)
        if made.returncode:
            raise RuntimeError(f"{name}: panoptem's int8 export failed:\n{made.stderr[-3000:]}")
        cfg["model_quantized"] = made.stdout.strip().splitlines()[-1]
    config = work / f"{name}.yaml"
    config.write_text(yaml.safe_dump(cfg))
    return config


def run_case(name: str, args, work: Path) -> dict:
    arch, mode, opts = CASES[name]
    anchor = Path(args.anchor_dir)
    config = _case_config(name, args, work, quantized=opts.get("quantized", False))
    data = Path(args.image if mode == "2d" else args.volume)
    flags = (["--fine-boundaries"] if opts.get("fine_boundaries") else []) + (
        ["--quantized"] if opts.get("quantized") else [])
    common = ["--config", str(config), "--repeat", str(args.repeat + 1), "--threads", str(args.threads)]
    orig_cmd = [str(anchor / "venv" / "bin" / "python"), str(ORIGINAL / "anchor_run.py"), str(data),
                "--mode", mode, *common, *flags, "--out", str(work / "orig.npy"), "--json", str(work / "orig.json")]
    ours_cmd = [sys.executable, __file__, "--ours", mode, "--input", str(data), *common, *flags,
                "--precision", opts.get("precision", "float32"),
                "--out", str(work / "ours.npy"), "--json", str(work / "ours.json")]
    env = dict(os.environ, ANCHOR_DIR=str(anchor))
    for cmd in (orig_cmd, ours_cmd):
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode:
            raise RuntimeError(f"{name}: {' '.join(cmd[:3])} failed:\n{done.stderr[-3000:]}")
    orig = json.loads((work / "orig.json").read_text())
    ours = json.loads((work / "ours.json").read_text())
    t_orig = min(r["total_s"] for r in orig["runs"][1:])
    t_ours = min(r["total_s"] for r in ours["runs"][1:])
    return {"case": name, "original_s": round(t_orig, 2), "panoptem_s": round(t_ours, 2),
            "speedup": round(t_orig / t_ours, 2),
            "original_rss_mb": round(orig["peak_rss_mb"]), "original_child_rss_mb": round(orig.get("peak_rss_child_mb") or 0),
            "panoptem_rss_mb": round(ours["peak_rss_mb"]),
            **agreement(np.load(work / "orig.npy"), np.load(work / "ours.npy"))}


def _time_ours(args, work: Path, case: str, quantized: bool, own_int8: bool = False):
    """Best warm time and last labels of one panoptem case, in a process of its own."""
    mode = CASES[case][1]
    config = _case_config(case, args, work, quantized=quantized, own_int8=own_int8)
    out, js = work / "int8.npy", work / "int8.json"
    cmd = [sys.executable, __file__, "--ours", mode, "--config", str(config),
           "--input", args.image if mode == "2d" else args.volume,
           "--repeat", str(args.repeat + 1), "--threads", str(args.threads),
           "--out", str(out), "--json", str(js)] + (["--quantized"] if quantized else [])
    subprocess.run(cmd, check=True, capture_output=True)
    return min(r["total_s"] for r in json.loads(js.read_text())["runs"][1:]), np.load(out)


def int8_check(args, work: Path) -> list[dict]:
    """panoptem's int8 path against its float path, both architectures, 2D and 3D stack.

    v1's int8 file is panoptem's export; mini is measured with the original's int8 file
    (encoder only) and with panoptem's export of the same float file."""
    rows: list[dict] = []
    floats: dict = {}  # case -> float run, shared by mini's two int8 files
    for arch, int8_file in (("v1", "panoptem"), ("mini", "original"), ("mini", "panoptem")):
        for case in (f"2d-{arch}", f"stack-{arch}"):
            if case not in floats:
                floats[case] = _time_ours(args, work, case, quantized=False)
            t_float, float_labels = floats[case]
            t_int8, int8_labels = _time_ours(args, work, case, quantized=True,
                                             own_int8=int8_file == "panoptem")
            agree = agreement(float_labels, int8_labels)
            rows.append({"arch": arch, "int8_file": int8_file, "mode": CASES[case][1],
                         "float_s": round(t_float, 2), "int8_s": round(t_int8, 2),
                         "speedup": round(t_float / t_int8, 2),
                         "fg_iou": agree["fg_iou"], "f1@0.5": agree["f1@0.5"]})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--anchor-dir", default=os.environ.get("ANCHOR_DIR", str(ROOT.parent.parent / "anchors")))
    ap.add_argument("--cases", nargs="*", default=DEFAULT_CASES, choices=list(CASES),
                    help="default: all but the -bf16 cases (panoptem's opt-in bfloat16)")
    ap.add_argument("--repeat", type=int, default=2, help="warm runs per case (after one cold run)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--image", help="2D input (.npy); default: the anchor's img2d_1024.npy")
    ap.add_argument("--volume", help="3D input (.npy); default: the anchor's vol3d_64x256x256.npy")
    ap.add_argument("--results", help="also write the rows as JSON here")
    ap.add_argument("--int8", action="store_true",
                    help="instead: panoptem's int8 against its float path (both architectures)")
    # internal: one panoptem case in a process of its own
    ap.add_argument("--ours", choices=["2d", "stack", "ortho"], help=argparse.SUPPRESS)
    ap.add_argument("--input", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)
    ap.add_argument("--fine-boundaries", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--quantized", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--precision", default="float32", help=argparse.SUPPRESS)
    # internal: make panoptem's int8 export of the anchor (config on stdin), print its path
    ap.add_argument("--make-int8", choices=list(ARCHS), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.ours:
        return run_panoptem(args)
    if args.make_int8:
        cfg = yaml.safe_load(sys.stdin.read())
        return print(quantized_panoptem(Path(args.anchor_dir) / "models", cfg, args.make_int8))
    data = Path(args.anchor_dir) / "data"
    args.image = args.image or str(data / "img2d_1024.npy")
    args.volume = args.volume or str(data / "vol3d_64x256x256.npy")
    if args.int8:
        with tempfile.TemporaryDirectory() as tmp:
            rows = int8_check(args, Path(tmp))
        if args.results:
            Path(args.results).write_text(json.dumps(rows, indent=1))
        return
    rows = []
    print("| case | original s | panoptem s | speed-up | peak RSS MB original (+ child) | panoptem | "
          "foreground IoU | F1@0.5 | objects (original / panoptem) |")
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.cases:
            r = run_case(name, args, Path(tmp))
            rows.append(r)
            print(f"| {name} | {r['original_s']} | {r['panoptem_s']} | {r['speedup']}x | "
                  f"{r['original_rss_mb']} (+{r['original_child_rss_mb']}) | {r['panoptem_rss_mb']} | "
                  f"{r['fg_iou']:.4f} | {r['f1@0.5']:.4f} | {r['objects_original']} / {r['objects_panoptem']} |",
                  flush=True)
            if args.results:
                Path(args.results).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
