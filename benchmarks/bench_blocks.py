"""Block-wise 3D inference on dask.distributed: speed, memory per worker, agreement.

``scale`` (default): a 256 x 1024 x 1024 uint8 zarr volume, made by mirror-tiling the real
64 x 256 x 256 FIB-SEM volume (``../shared/data/lucchi_pp/volume3d``), segmented with the
bundled model (xy stack, widget defaults) on a local cluster of 1 and then 2 worker
processes. For each it reports the wall time, the time of the block stage, blocks per
second, and the peak RSS of every worker; then the same volume through the whole-volume
engine in one process (slice by slice, zarr output) for reference.

``agreement``: the real 64 x 256 x 256 volume, block-wise with blocks much smaller than
the volume against the whole-volume result (stack and ortho-plane), as foreground IoU and
instance F1@0.5.

``context``: how much of a slice the model must see for a block to agree with the whole
slice. Training images (never ``test/``), 2D: the whole image against the same image cut
into 128 x 128 tiles, each segmented with ``--margins`` pixels of context around it; the
foreground IoU of the assembled tiles against the whole image.

    .venv/bin/python benchmarks/bench_blocks.py scale [--quantized] [--workers 1 2]
    .venv/bin/python benchmarks/bench_blocks.py agreement
    .venv/bin/python benchmarks/bench_blocks.py context
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
VOLUME = ROOT.parent / "shared" / "data" / "lucchi_pp" / "volume3d" / "test_image_z0-63_y0-255_x192-447.tif"
CACHE = Path.home() / ".cache" / "panoptem-bench"
MODEL = "panoptem_mito_small"


def big_volume(shape=(256, 1024, 1024)) -> Path:
    """The real volume mirror-tiled to ``shape`` (continuous across tile faces), as zarr."""
    import tifffile
    import zarr

    path = CACHE / f"lucchi_tiled_{'x'.join(map(str, shape))}.zarr"
    if (path / "zarr.json").exists():
        return path
    src = tifffile.imread(VOLUME)
    reps = [int(np.ceil(s / n)) for s, n in zip(shape, src.shape, strict=True)]
    tiles = np.pad(src, [(0, (r - 1) * n) for r, n in zip(reps, src.shape, strict=True)],
                   mode="symmetric")[: shape[0], : shape[1], : shape[2]]
    out = zarr.create_array(str(path), shape=shape, dtype="uint8", chunks=(64, 256, 256),
                            overwrite=True)
    out[:] = tiles
    return path


def _worker_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _set_threads(n: int) -> int:
    import torch

    torch.set_num_threads(n)
    return torch.get_num_threads()


def scale_case(workers: int, quantized: bool, block) -> dict:
    import os

    from distributed import Client, LocalCluster

    from panoptem.inference.blockwise import segment_blocks
    from panoptem.progress import Progress

    vol = big_volume()
    stamps = {}

    class Stages(Progress):
        def on_stage(self, name, total):
            stamps[name] = [time.perf_counter(), total]

    tmp = Path(tempfile.mkdtemp(prefix="bench-blocks-"))
    try:
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                               dashboard_address=None, silence_logs=40)
        client = Client(cluster)
        client.run(_set_threads, max(1, (os.cpu_count() or 1) // workers))
        t0 = time.perf_counter()
        segment_blocks(MODEL, str(vol), output=tmp / "out.zarr", block_shape=block,
                       client=client, quantized=quantized, progress=Stages())
        total = time.perf_counter() - t0
        peaks = sorted(client.run(_worker_peak_mb).values())
        client.close()
        cluster.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    names = list(stamps)
    t_blocks = stamps[names[names.index("blocks") + 1]][0] - stamps["blocks"][0]
    n_blocks = stamps["blocks"][1]
    return {"workers": workers, "quantized": quantized, "blocks": n_blocks,
            "total_s": round(total, 1), "blocks_stage_s": round(t_blocks, 1),
            "blocks_per_s": round(n_blocks / t_blocks, 4),
            "s_per_block_per_worker": round(t_blocks * workers / n_blocks, 1),
            "stitch_and_pyramid_s": round(total - t_blocks - (stamps["blocks"][0] - t0), 1),
            "peak_rss_mb_per_worker": [round(p) for p in peaks]}


def whole_case(quantized: bool) -> dict:
    import zarr

    from panoptem.inference.volume import Engine3D

    vol = zarr.open_array(str(big_volume()), mode="r")
    tmp = Path(tempfile.mkdtemp(prefix="bench-whole-"))
    try:
        t0 = time.perf_counter()
        Engine3D(MODEL, quantized=quantized).segment(vol, zarr_path=tmp / "out.zarr")
        total = time.perf_counter() - t0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"whole_volume_s": round(total, 1), "peak_rss_mb": round(_worker_peak_mb())}


def agreement() -> list[dict]:
    import tifffile

    from panoptem.evaluation import evaluate
    from panoptem.inference.blockwise import Cluster, segment_blocks
    from panoptem.inference.engine import Params2D
    from panoptem.inference.volume import Engine3D, Params3D

    vol = tifffile.imread(VOLUME)
    p2 = Params2D()
    rows = []
    for ortho, block in ((False, (16, 128, 128)), (False, (32, 128, 128)), (True, (32, 128, 128))):
        p3 = Params3D(ortho_plane=ortho)
        whole = Engine3D(MODEL).segment(vol, p2, p3).classes["mito"]
        with tempfile.TemporaryDirectory() as tmp:
            got = segment_blocks(MODEL, vol, p2, p3, output=Path(tmp) / "b.zarr", block_shape=block,
                                 cluster=Cluster(workers=1, processes=False)).classes["mito"][:]
        m = evaluate(got, whole)
        rows.append({"mode": "ortho-plane" if ortho else "stack xy", "block": list(block),
                     "blocks": int(np.prod([int(np.ceil(s / b)) for s, b in zip(vol.shape, block, strict=True)])),
                     "objects_whole": m.n_gt, "objects_blocks": m.n_pred,
                     "f1": round(m.f1, 4), "fg_iou": round(m.fg_iou, 4)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def context(margins=(32, 64, 128, 192, 256), core: int = 128) -> list[dict]:
    from PIL import Image

    from panoptem.inference import preprocess as pre
    from panoptem.inference.engine import Engine2D

    data = ROOT.parent / "shared" / "data"
    files = (sorted((data / "lucchi_pp" / "train" / "Train_In").glob("*.png"))[::10][:3]
             + sorted((data / "cdeep3m_sbem_mito" / "train" / "images").glob("*.png"))[::4][:2])
    engine = Engine2D(MODEL, quantized=True)
    rows = []
    for f in files:
        img = np.asarray(Image.open(f))
        img = img if img.ndim == 2 else img[..., 0]
        vr = pre.intensity_range(img)
        whole = engine.segment(img) > 0
        h, w = img.shape
        row = {"image": f.name, "shape": list(img.shape)}
        for m in margins:
            tiled = np.zeros_like(whole)
            for y in range(0, h, core):
                for x in range(0, w, core):
                    y0, x0 = max(0, y - m), max(0, x - m)
                    seg = engine.segment(img[y0 : y + core + m, x0 : x + core + m], value_range=vr) > 0
                    tiled[y : y + core, x : x + core] = seg[y - y0 : y - y0 + core, x - x0 : x - x0 + core]
            row[f"margin {m}"] = round(float((tiled & whole).sum() / max(1, (tiled | whole).sum())), 4)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", nargs="?", default="scale", choices=["scale", "agreement", "context", "case", "whole"])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--quantized", action="store_true", help="the int8 CPU model")
    ap.add_argument("--block", default="64,512,512")
    ap.add_argument("--skip-whole", action="store_true")
    args = ap.parse_args()
    block = tuple(int(v) for v in args.block.split(","))
    if args.mode == "agreement":
        agreement()
        return
    if args.mode == "context":
        context()
        return
    if args.mode == "case":
        print(json.dumps(scale_case(args.workers[0], args.quantized, block)))
        return
    if args.mode == "whole":
        print(json.dumps(whole_case(args.quantized)))
        return
    big_volume()
    cases = [[str(n)] for n in args.workers] + ([] if args.skip_whole else [None])
    for case in cases:  # each in its own process, so peak memory is its own
        cmd = [sys.executable, __file__, "case" if case else "whole", "--block", args.block]
        cmd += (["--workers", *case] if case else []) + (["--quantized"] if args.quantized else [])
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        print(out.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
