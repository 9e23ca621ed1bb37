"""Is torch slower inside a napari thread worker than in the main thread?

micro-sam saw napari's thread workers slow torch down (its issue #740): torch's intra-op
thread count is kept per thread by OpenMP, so a worker thread may not use the count the
main thread has. This script runs the same 2D inference (``Engine2D.segment`` of a real EM
image with the demo architecture, PanopticDeepLabPR / ResNet-18) three ways, interleaved,
and reports the median seconds per run and the torch thread count seen by the work:

- ``main``: in the main (GUI) thread, no worker;
- ``napari worker``: in a plain ``napari.qt.threading.create_worker`` worker;
- ``panoptem job``: through ``panoptem._widgets._worker.start_job`` (the widgets' path),
  which sets the GUI thread's torch thread count inside the worker.

Each is measured with torch's default thread count and again after the main thread called
``torch.set_num_threads(1)`` (a user limiting torch, e.g. to keep the GUI responsive).

    QT_QPA_PLATFORM=offscreen .venv/bin/python benchmarks/bench_worker.py [--repeat 5] [--size 512]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
IMAGE = ROOT.parent / "shared" / "data" / "lucchi_pp" / "test" / "Test_In" / "mask0000.png"


def build_engine(tmp: Path):
    from panoptem.demo import DEMO_ARCH, untrained_model
    from panoptem.inference.engine import Engine2D
    from panoptem.models import export_torchscript

    path = tmp / "bench_worker_model.pth"
    if not path.exists():
        export_torchscript(untrained_model(DEMO_ARCH), path)
    cfg = {"class_names": {1: "mito"}, "labels": [1], "thing_list": [1], "model": str(path),
           "model_quantized": None, "padding_factor": 16,
           "norms": {"mean": 0.57571, "std": 0.12765}, "description": "benchmark"}
    return Engine2D(cfg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--size", type=int, default=512, help="side of the square image crop")
    ap.add_argument("--tmp", default="/tmp")
    args = ap.parse_args()
    if not os.environ.get("DISPLAY"):
        os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

    import torch
    from napari.qt.threading import create_worker
    from PIL import Image
    from qtpy.QtWidgets import QApplication

    from panoptem._widgets import _worker

    app = QApplication.instance() or QApplication(sys.argv)
    image = np.asarray(Image.open(IMAGE))[: args.size, : args.size]
    engine = build_engine(Path(args.tmp))
    engine.segment(image)  # warm-up: TorchScript profiling runs, allocator

    def work(_progress=None):
        t0 = time.perf_counter()
        engine.segment(image)
        return time.perf_counter() - t0, torch.get_num_threads()

    def in_main():
        return work()

    def wait(is_done):
        while not is_done():
            app.processEvents()
            time.sleep(0.001)

    def in_napari_worker():
        out = {}
        w = create_worker(work, _start_thread=False)
        w.returned.connect(lambda r: out.setdefault("r", r))
        w.finished.connect(lambda: out.setdefault("done", True))
        w.start()
        wait(lambda: "done" in out)
        return out["r"]

    def in_panoptem_job():
        job = _worker.start_job(work, title="bench")
        wait(lambda: job.done)
        return job.result

    ways = {"main": in_main, "napari worker": in_napari_worker, "panoptem job": in_panoptem_job}
    default_threads = torch.get_num_threads()
    results = []
    for label, threads in (("default", default_threads), ("set_num_threads(1)", 1)):
        torch.set_num_threads(threads)
        times = {k: [] for k in ways}
        seen = {}
        for _ in range(args.repeat):  # interleaved, so background load hits all alike
            for name, fn in ways.items():
                dt, n = fn()
                times[name].append(dt)
                seen[name] = n
        for name in ways:
            results.append({
                "main-thread setting": f"{label} ({threads})", "where": name,
                "torch threads in work": seen[name],
                "median s": round(statistics.median(times[name]), 3),
                "min s": round(min(times[name]), 3),
            })
    torch.set_num_threads(default_threads)
    print(json.dumps({"image": f"{args.size}x{args.size}", "cpu_count": os.cpu_count(),
                      "torch": torch.__version__, "repeat": args.repeat,
                      "results": results}, indent=1))
    print("\n| main-thread torch threads | where | threads in work | median s | min s |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['main-thread setting']} | {r['where']} | {r['torch threads in work']} | "
              f"{r['median s']} | {r['min s']} |")


if __name__ == "__main__":
    main()
