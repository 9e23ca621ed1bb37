"""3D inference on a CUDA GPU: how much of the wall time the forward passes fill.

For each case (a model and a volume) it runs stack and ortho-plane inference
(``Engine3D.segment``) in the ways of :data:`VARIANTS`: ``on``, the default on a GPU (the
forward passes run ahead in a thread of their own, which copies each slice's outputs to the
CPU, where several slices are post-processed at once; an ortho-plane run starts each stack
once the forward passes of the one before are done: ``Engine3D.segment(overlap=True)``,
``post`` from ``post_workers``, ``to_host`` from ``outputs_to_host``); ``post1``, the same
with one slice post-processed at a time; ``off``, everything in one thread; and the two
ways that keep the post-processing on the GPU, as ``on`` otherwise: ``device``, the outputs
stay where the forward passes left them (``segment_stack(to_host=False)``, the default
before 2026-12-05: every thread queues its work on the GPU's one default stream, so each
read of a post-processing result waits for the forward passes queued before it);
``stream``, the same with the forward passes on a CUDA stream of their own. It also runs the
same forward passes alone (every slice of every plane through ``Engine2D.outputs_batch``,
read and normalised as ``segment_stack`` does). It reports, per way of running,

- ``wall_<way>_s``: the whole ``segment`` call (post-processing, matching, consensus, writing),
- ``share_<way>``: ``forward_s / wall``, the forward passes' share of the wall time,
- ``same_<way>``: whether its labels equal those of ``on`` (they must; ``device`` and
  ``stream`` post-process with the GPU's kernels, and where they differ ``agree_<way>``
  gives their agreement with ``on``),

and ``forward_s``, the model calls alone, each synchronised, summed over the forward-only run,
and ``model_syncs``, how often one forward pass, not waited for, still makes the CPU wait for
the GPU inside the model (:func:`hidden_syncs`; each wait costs the queued forward passes
their head start).

It also runs the bundled model on the CPU and reports the agreement of the GPU's results
with the CPU's (instance F1 at IoU 0.5, foreground IoU), and of bfloat16 with float32.

Models: the bundled trained model (real outputs on a real volume); the MitoNet_v1 and
MitoNet_v1_mini architectures with random weights (their forward cost is the real one; see
``bench_2d.py``). Volumes: a real 64 x 256 x 256 FIB-SEM crop (the Lucchi++ test volume,
``../shared/data/lucchi_pp/volume3d``), and the same tiled 4 x 4 in-plane to
64 x 1024 x 1024. Run on a machine with a CUDA GPU, from the repository root:

    python benchmarks/bench_gpu.py --volume VOLUME.tif [--json results.jsonl] [--budget 300]

Cases run in order of importance; one that would start after ``--budget`` seconds is skipped.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_3d import VOLUME, config  # noqa: E402
from side_by_side_2d import agreement  # noqa: E402


def random_model(name: str, cache: Path) -> dict:
    """Config of a random-weight TorchScript file of the MitoNet_v1 or _mini architecture."""
    import bench_2d
    import side_by_side

    from panoptem.demo import untrained_model
    from panoptem.models import export_torchscript

    arch = {"v1": bench_2d.MITONET_V1, "mini": side_by_side.MITONET_V1_MINI}[name]
    path = cache / f"{name}_random.pth"
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        export_torchscript(untrained_model(arch), path)
    return config(path, 128 if name == "mini" else 16)  # as the released files' configs


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def forward_only(engine2d, volume, axes, params2d) -> dict:
    """Every slice of ``axes`` through the model alone, as ``segment_stack`` reads them."""
    from panoptem.inference import preprocess as pre
    from panoptem.inference import stack as st

    vr = st.volume_intensity_range(volume)
    engine2d.timings = {}
    _sync()
    t0 = time.perf_counter()
    n = 0
    for ax in axes:
        a = st.AXES[ax]
        for i in range(volume.shape[a]):
            im = pre.check_image_2d(st.read_slice(volume, a, i))
            engine2d.outputs_batch([pre.to_unit_range(im, vr)], params2d)
            n += 1
    _sync()
    return {"forward_s": engine2d.timings["forward"], "loop_s": time.perf_counter() - t0, "slices": n}


def hidden_syncs(engine2d, volume, params2d) -> int | None:
    """How many times one slice's forward pass, not waited for (``outputs_batch(wait=False)``,
    as the stacks queue them), makes the CPU wait for the GPU inside the model: each such
    wait empties the queue that the stacks keep filled. None on a CPU."""
    import warnings

    import torch

    from panoptem.inference import preprocess as pre
    from panoptem.inference import stack as st

    if not torch.cuda.is_available():
        return None
    image = pre.to_unit_range(st.read_slice(volume, 0, 0), st.volume_intensity_range(volume))
    _sync()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            engine2d.outputs_batch([image], params2d, False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    _sync()
    return sum("synchroniz" in str(w.message) for w in caught)


def outputs_on_own_stream(plain, device):
    """``Engine2D.outputs_batch`` run on a CUDA stream of its own; the outputs are complete
    when it returns and are marked as used by the device's default stream, where the
    post-processing reads them (so that their memory is not reused on the forward stream
    before those reads are done)."""
    import torch

    if not torch.cuda.is_available():  # a CPU run: nothing to separate
        return plain
    stream = torch.cuda.Stream(device)
    consumer = torch.cuda.default_stream(device)

    def outputs_batch(images, params, wait=True):  # waits for its stream in any case
        with torch.cuda.stream(stream):
            outs = plain(images, params, wait)
        stream.synchronize()
        for out in outs:
            for t in out:
                if t.is_cuda:
                    t.record_stream(consumer)
        return outs
    return outputs_batch


def segment(engine3d, volume, ortho: bool, overlap: bool, post: int | None = None,
            max_objects: int = 10000, outputs: str | None = None):
    """``Engine3D.segment`` with ``overlap`` and the stack loop's ``post`` (slices
    post-processed at once) forced; ``post`` None keeps the default. ``outputs``: None (the
    default), "device" (the outputs stay on the GPU) or "stream" (the same, computed by
    :func:`outputs_on_own_stream`)."""
    from panoptem.inference import stack as st
    from panoptem.inference.volume import Params3D

    plain = st.segment_stack
    kept = {"to_host": False} if outputs in ("device", "stream") else {}
    st.segment_stack = functools.partial(plain, post=post, **kept)
    e2d = engine3d.engine2d
    if outputs == "stream":  # wrapped in an attribute of the engine, removed again below
        e2d.outputs_batch = outputs_on_own_stream(e2d.outputs_batch, e2d.device)
    try:
        _sync()
        t0 = time.perf_counter()
        res = engine3d.segment(volume, params3d=Params3D(ortho_plane=ortho, max_objects=max_objects),
                               overlap=overlap)
        _sync()
        return res, time.perf_counter() - t0
    finally:
        st.segment_stack = plain
        vars(e2d).pop("outputs_batch", None)  # the class's method again


#: The ways a case runs: forward passes overlapped with several slices post-processed at
#: once (the default on a GPU), overlapped with one slice at a time, all in one thread, and
#: the default with the post-processing on the GPU, its outputs computed on the default
#: stream or on a stream of their own.
VARIANTS = {"on": (True, None, None), "post1": (True, 1, None), "off": (False, 1, None),
            "device": (True, None, "device"), "stream": (True, None, "stream")}


def run_case(model: str, vol_name: str, volume, modes, device: str, cache: Path,
             precision: str = "float32", keep: bool = False) -> list[dict]:
    import torch

    from panoptem.inference.engine import Params2D
    from panoptem.inference.volume import Engine3D

    cfg = "panoptem_mito_small" if model == "bundled" else random_model(model, cache)
    engine = Engine3D(cfg, device=device, precision=precision)
    p2 = Params2D().validated()
    rows = []
    for mode in modes:
        axes = ["xy", "xz", "yz"] if mode == "ortho" else ["xy"]
        forward_only(engine.engine2d, volume, axes, p2)  # warm-up: every slice shape once
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        fo = forward_only(engine.engine2d, volume, axes, p2)
        row = {"model": model, "volume": vol_name, "mode": mode, "precision": precision,
               "slices": fo["slices"], "forward_s": round(fo["forward_s"], 3),
               "forward_loop_s": round(fo["loop_s"], 3),
               "model_syncs": hidden_syncs(engine.engine2d, volume, p2)}
        for key, (overlap, post, outputs) in VARIANTS.items():
            # random weights find many objects in the tiled volume
            res, wall = segment(engine, volume, mode == "ortho", overlap, post,
                                10000 if model == "bundled" else 10**6, outputs)
            row[f"wall_{key}_s"] = round(wall, 3)
            row[f"share_{key}"] = round(fo["forward_s"] / wall, 3)
            labels = res.classes["mito"]
            if key == "on":
                first = labels
            else:  # the way of running changes the time only
                row[f"same_{key}"] = bool(np.array_equal(labels, first))
                if key in ("device", "stream") and not row[f"same_{key}"]:
                    row[f"agree_{key}"] = agreement(first, labels)
            if key == "on":
                row["objects"] = int(res.classes["mito"].max())
                if keep:
                    row["result"] = res.classes["mito"]
        if torch.cuda.is_available():
            row["gpu_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "result"}), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--volume", default=str(VOLUME))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json", help="append one JSON line per result here")
    ap.add_argument("--budget", type=float, default=300.0,
                    help="seconds after which no further case is started")
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "panoptem-bench"))
    args = ap.parse_args()

    import tifffile
    import torch

    from panoptem.inference.volume import Engine3D, Params3D

    t_start = time.perf_counter()
    cache = Path(args.cache)
    real = np.ascontiguousarray(tifffile.imread(args.volume))
    big = np.ascontiguousarray(np.tile(real, (1, 4, 4)))
    vols = {f"{'x'.join(map(str, real.shape))}": real, f"{'x'.join(map(str, big.shape))}": big}
    small, large = list(vols)
    print(json.dumps({"torch": torch.__version__, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                      "cpu_threads": torch.get_num_threads()}), flush=True)
    out = open(args.json, "a") if args.json else None  # noqa: SIM115

    def emit(rows):
        for r in rows:
            if out:
                out.write(json.dumps({k: v for k, v in r.items() if k != "result"}) + "\n")
                out.flush()

    gpu = {}

    def agree_with_cpu():
        """The bundled model on the CPU, against the GPU's results (float32 and bfloat16)."""
        cpu = Engine3D("panoptem_mito_small", device="cpu")
        rows = []
        for mode in ("stack", "ortho"):
            ref = cpu.segment(real, params3d=Params3D(ortho_plane=mode == "ortho")).classes["mito"]
            row = {"check": "agreement", "mode": mode, "volume": small,
                   "cuda_float32_vs_cpu": agreement(ref, gpu[("float32", mode)])}
            if ("bfloat16", mode) in gpu:
                row["cuda_bfloat16_vs_cuda_float32"] = agreement(gpu[("float32", mode)],
                                                                 gpu[("bfloat16", mode)])
            rows.append(row)
            print(json.dumps(row), flush=True)
        return rows

    def bundled(precision):
        rows = run_case("bundled", small, real, ["stack", "ortho"], args.device, cache, precision, keep=True)
        for r in rows:
            gpu[(precision, r["mode"])] = r.pop("result")
        return rows

    plan = [
        lambda: bundled("float32"),
        lambda: run_case("v1", small, real, ["stack", "ortho"], args.device, cache),
        lambda: run_case("v1", large, big, ["stack"], args.device, cache),
        lambda: bundled("bfloat16"),
        agree_with_cpu,
        lambda: run_case("v1", large, big, ["stack"], args.device, cache, "bfloat16"),
        lambda: run_case("mini", small, real, ["stack", "ortho"], args.device, cache),
        lambda: run_case("mini", large, big, ["stack"], args.device, cache),
        lambda: run_case("v1", large, big, ["ortho"], args.device, cache),
        lambda: run_case("bundled", large, big, ["stack", "ortho"], args.device, cache),
    ]
    results = []
    for step in plan:
        if time.perf_counter() - t_start > args.budget:
            print(json.dumps({"skipped": "budget"}), flush=True)
            break
        rows = step()
        emit(rows)
        results += rows
    print(f"\n{'model':8} {'volume':14} {'mode':6} {'prec':9} {'fwd s':>7}"
          + "".join(f" {'wall ' + k:>10} {'share':>6}" for k in VARIANTS))
    for r in results:
        if "wall_on_s" in r:
            print(f"{r['model']:8} {r['volume']:14} {r['mode']:6} {r['precision']:9} {r['forward_s']:7.2f}"
                  + "".join(f" {r[f'wall_{k}_s']:10.2f} {r[f'share_{k}']:6.2f}" for k in VARIANTS))
    print(f"total {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
