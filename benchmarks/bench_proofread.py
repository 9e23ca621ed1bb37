"""Proofreading edits on a big label volume: the cost follows the objects, not the volume.

Builds a 512 x 2048 x 2048 uint32 label volume (8.6 GB) holding a grid of small ball-shaped
objects (radius 10, 8192 of them), then times, on two small objects:

- building the label boxes once (one pass over the volume; done on a layer's first edit),
- merge, delete and split (computing the change and writing it), each followed by its undo
  (writing the replaced values back), with the core functions;
- the same merge written through a napari ``Labels`` layer's ``data_setitem`` (what the
  widgets do) and undone with ``Labels.undo``, when napari is installed.

Run: ``.venv/bin/python benchmarks/bench_proofread.py [--shape 512 2048 2048]``.
Results are recorded in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from skimage.morphology import ball

from panoptem import proofread as pr


def make_volume(shape, spacing=64, radius=10):
    vol = np.zeros(shape, dtype=np.uint32)
    fp = ball(radius).astype(bool)
    d = fp.shape[0]
    label = 0
    centres = {}
    for z in range(spacing // 2, shape[0] - d, spacing):
        for y in range(spacing // 2, shape[1] - d, spacing):
            for x in range(spacing // 2, shape[2] - d, spacing):
                label += 1
                vol[z : z + d, y : y + d, x : x + d][fp] = label
                centres[label] = (z + radius, y + radius, x + radius)
    # the last object becomes two overlapping balls (a second one 15 voxels to its left), to split
    z, y, x = centres[label]
    region = vol[z - radius : z + radius + 1, y - radius : y + radius + 1, x - 15 - radius : x - 15 + radius + 1]
    region[fp] = label
    return vol, centres


def timed(fn, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, default=[512, 2048, 2048])
    args = ap.parse_args()
    shape = tuple(args.shape)
    (vol, centres), t_make = timed(make_volume, shape)
    n = len(centres)
    print(f"volume {shape} uint32 ({vol.nbytes / 1e9:.1f} GB), {n} objects, made in {t_make:.1f} s")

    boxes, t_boxes = timed(pr.LabelBoxes.of, vol)
    print(f"label boxes (once per layer): {t_boxes:.2f} s")
    a, b = 1, 2
    rows = []

    change, t = timed(pr.merge_labels, vol, [centres[a], centres[b]], boxes=boxes)
    before, t_w = timed(pr.apply_change, vol, change)
    boxes.record(change.index, change.value)
    undo = pr.Change(change.index, before)
    _, t_u = timed(pr.apply_change, vol, undo)
    rows.append(("merge 2 objects", change.size, t + t_w, t_u))

    change, t = timed(pr.delete_labels, vol, [centres[3], centres[4]], boxes=boxes)
    before, t_w = timed(pr.apply_change, vol, change)
    _, t_u = timed(pr.apply_change, vol, pr.Change(change.index, before))
    rows.append(("delete 2 objects", change.size, t + t_w, t_u))

    split_id = max(centres)
    change, t = timed(pr.split_labels, vol, [centres[split_id]], min_distance=5, boxes=boxes)
    before, t_w = timed(pr.apply_change, vol, change)
    boxes.record(change.index, change.value)
    _, t_u = timed(pr.apply_change, vol, pr.Change(change.index, before))
    rows.append((f"split 1 object into {len(np.unique(change.value))}", change.size, t + t_w, t_u))

    for name, voxels, t_edit, t_undo in rows:
        print(f"{name:28s} {voxels:7d} voxels  edit {t_edit * 1000:7.1f} ms  undo {t_undo * 1000:7.1f} ms")

    try:
        from napari.layers import Labels
    except ImportError:
        return
    layer, t_layer = timed(Labels, vol)
    change = pr.merge_labels(vol, [centres[5], centres[6]], boxes=boxes)
    t0 = time.perf_counter()
    with layer.block_history():
        layer.data_setitem(change.index, change.value)
    t_edit = time.perf_counter() - t0
    _, t_undo = timed(layer.undo)
    assert np.all(vol[change.index] == 6), "undo did not restore the merged object"
    print(f"napari Labels layer ({t_layer:.1f} s to make): merge via data_setitem {t_edit * 1000:.1f} ms, "
          f"Labels.undo {t_undo * 1000:.1f} ms")


if __name__ == "__main__":
    main()
