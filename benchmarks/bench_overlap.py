"""The forward passes' share of a 3D run where they are short, measured on a CPU (issue 15 item 4).

On a GPU the forward passes run ahead in a thread of their own and everything else
(post-processing, matching, consensus, writing) has to hide behind them. This script stands
in for a GPU on a machine without one: it computes the bundled model's outputs for every
slice first (on the real 64 x 256 x 256 Lucchi++ crop, or the crop tiled 4 x 4 in-plane to
64 x 1024 x 1024 with ``--tile 4``), then runs ``Engine3D.segment`` on them through
``outputs_for`` set as on a GPU (``overlap=True``: the outputs arrive in a thread of their
own, and an ortho-plane run starts each stack once the outputs of the one before are in;
``post`` slices post-processed at once). Each slice's outputs arrive
after ``--forward-ms`` of sleep in that thread, as a GPU's forward pass leaves the CPU free
while its thread waits to synchronise. Everything else runs for real (the post-processing's
torch operations on the CPU, where a GPU would run them: so this errs on the slow side).

Reported per run: the wall time, the simulated forward time (slices x forward-ms), its share
of the wall time, and the wall time with no forward time at all (the CPU work alone, one
slice at a time: ``forward-ms 0, post 1, overlap off``).

    .venv/bin/python benchmarks/bench_overlap.py --mode stack --forward-ms 0 10 40 --post 1 2
    .venv/bin/python benchmarks/bench_overlap.py --mode stack --tile 4 --forward-ms 0 100 200
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
from bench_3d import VOLUME  # noqa: E402


def model_outputs(engine, volume, axes) -> dict:
    """Every slice's model outputs along each axis, computed as ``segment_stack`` reads them."""
    from panoptem.inference import preprocess as pre
    from panoptem.inference import stack as st
    from panoptem.inference.engine import Params2D

    p2 = Params2D().validated()
    vr = st.volume_intensity_range(volume)
    outs = {}
    for ax in axes:
        a = st.AXES[ax]
        outs[ax] = [tuple(t.clone() for t in engine.engine2d.outputs_batch(
            [pre.to_unit_range(st.read_slice(volume, a, i), vr)], p2)[0])
            for i in range(volume.shape[a])]
    return outs


def delayed(items, seconds: float):
    """``items``, each after ``seconds`` of sleep (a forward pass that leaves the CPU free)."""
    for item in items:
        if seconds:
            time.sleep(seconds)
        yield item


def run(engine, volume, outs, ortho: bool, forward_ms: float, post: int, overlap: bool) -> tuple:
    from panoptem.inference import stack as st
    from panoptem.inference.volume import Params3D

    plain = st.segment_stack
    st.segment_stack = functools.partial(plain, post=post)
    try:
        t0 = time.perf_counter()
        res = engine.segment(volume, params3d=Params3D(ortho_plane=ortho), overlap=overlap,
                             outputs_for=lambda ax: delayed(iter(outs[ax]), forward_ms / 1000))
        return res.classes["mito"], time.perf_counter() - t0
    finally:
        st.segment_stack = plain


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--volume", default=str(VOLUME))
    ap.add_argument("--tile", type=int, default=1, help="tile the volume this many times in y and x")
    ap.add_argument("--mode", choices=["stack", "ortho"], default="stack")
    ap.add_argument("--forward-ms", type=float, nargs="+", default=[0.0, 10.0, 40.0])
    ap.add_argument("--post", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", help="append one JSON line per result here")
    args = ap.parse_args()

    import tifffile

    from panoptem.inference.volume import Engine3D

    volume = np.ascontiguousarray(np.tile(tifffile.imread(args.volume), (1, args.tile, args.tile)))
    engine = Engine3D("panoptem_mito_small")
    ortho = args.mode == "ortho"
    t0 = time.perf_counter()
    outs = model_outputs(engine, volume, ["xy", "xz", "yz"] if ortho else ["xy"])
    slices = sum(len(o) for o in outs.values())
    print(json.dumps({"volume": "x".join(map(str, volume.shape)), "mode": args.mode, "slices": slices,
                      "outputs_s": round(time.perf_counter() - t0, 1)}), flush=True)
    out = open(args.json, "a") if args.json else None  # noqa: SIM115
    ref = None
    # the CPU work alone, one slice at a time, then the overlapped runs
    plan = [(0.0, 1, False)] + [(f, p, True) for f in args.forward_ms for p in args.post]
    for forward_ms, post, overlap in plan:
        walls = []
        for _ in range(args.repeat):
            labels, wall = run(engine, volume, outs, ortho, forward_ms, post, overlap)
            walls.append(wall)
            if ref is None:
                ref = labels
            elif not np.array_equal(labels, ref):  # the way of running changes the time only
                raise SystemExit("results differ between runs")
        best = min(walls)
        row = {"volume": "x".join(map(str, volume.shape)), "mode": args.mode, "forward_ms": forward_ms,
               "post": post, "overlap": overlap, "wall_s": round(best, 3),
               "walls": [round(w, 3) for w in walls], "forward_s": round(slices * forward_ms / 1000, 3),
               "share": round(slices * forward_ms / 1000 / best, 3)}
        print(json.dumps(row), flush=True)
        if out:
            out.write(json.dumps(row) + "\n")
            out.flush()


if __name__ == "__main__":
    main()
