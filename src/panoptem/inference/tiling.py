"""Tiled 2D inference: cutting an image into overlapping tiles and stitching the results.

Layout (reference §5.2): along each axis every tile has the same length
``t = min(tile_size, side)``; the number of tiles is the smallest for which every seam
(the strip two neighbouring tiles share) is at least ``min(128, int(0.1 * tile_size))``
pixels wide; the total overlap is spread over the seams so their widths differ by at most
one pixel; edge tiles end exactly at the image border. An axis shorter than the tile
size gets a single tile, so thin images work.

Stitching invariant: every object that crosses a seam is seen, at least in part, by both
tiles inside the shared strip. Detections of the same class from different tiles that
share at least one pixel are joined (transitively) into one object whose pixels are the
union of theirs, so an object cut by seams comes out whole. A detection that no other tile
confirms is dropped when more than 10 % of its pixels lie in the seams, because there it is
a fragment cut off at a tile edge (the original's rule). Stuff classes are the union of
all tiles.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import fastremap
import numpy as np

from panoptem.inference.postprocess import class_mask
from panoptem.overlap import connected_groups
from panoptem.progress import Progress, ensure_progress

__all__ = ["Tile", "axis_tiles", "tile_grid", "stitch_tiles", "segment_tiled"]


@dataclass(frozen=True)
class Tile:
    """One tile: rows ``y0:y1`` and columns ``x0:x1`` of the image."""

    y0: int
    y1: int
    x0: int
    x1: int

    @property
    def slices(self) -> tuple[slice, slice]:
        return slice(self.y0, self.y1), slice(self.x0, self.x1)


def min_overlap(tile_size: int) -> int:
    """Minimum seam width for a tile size: ``min(128, int(0.1 * tile_size))``."""
    return min(128, int(0.1 * tile_size))


def axis_tiles(length: int, tile_size: int) -> list[tuple[int, int]]:
    """(start, stop) of the tiles along one axis of ``length`` pixels."""
    t = min(int(tile_size), int(length))
    if t >= length:
        return [(0, int(length))]
    o = min_overlap(tile_size)
    n = max(2, -(-(length - o) // (t - o)))  # ceil((L - o) / (t - o))
    total = n * t - length  # pixels shared by neighbours, spread over n - 1 seams
    base, extra = divmod(total, n - 1)
    spans, start = [], 0
    for i in range(n):
        spans.append((start, start + t))
        if i < n - 1:
            start += t - (base + (1 if i < extra else 0))
    assert spans[-1][1] == length
    return spans


def tile_grid(shape: tuple[int, int], tile_size: int) -> list[Tile]:
    """All tiles of a (H, W) image, enumerated column-major (outer loop over x)."""
    ys = axis_tiles(shape[0], tile_size)
    xs = axis_tiles(shape[1], tile_size)
    return [Tile(y0, y1, x0, x1) for (x0, x1) in xs for (y0, y1) in ys]


def _coverage(shape: tuple[int, int], tiles: list[Tile]) -> np.ndarray:
    cover = np.zeros(shape, dtype=np.uint8)
    for t in tiles:
        cover[t.slices] += 1
    return cover


def _pairs(tiles: list[Tile]) -> Iterator[tuple[int, int, tuple[slice, slice]]]:
    for i, a in enumerate(tiles):
        for j in range(i + 1, len(tiles)):
            b = tiles[j]
            y0, y1 = max(a.y0, b.y0), min(a.y1, b.y1)
            x0, x1 = max(a.x0, b.x0), min(a.x1, b.x1)
            if y0 < y1 and x0 < x1:
                yield i, j, (slice(y0, y1), slice(x0, x1))


def stitch_tiles(shape: tuple[int, int], tiles: list[Tile], results: list[np.ndarray],
                 thing_list, label_divisor: int) -> np.ndarray:
    """Join per-tile panoptic results into one (H, W) int32 panoptic image.

    Parameters
    ----------
    shape : (H, W) of the whole image
    tiles : the tiles, as from :func:`tile_grid`
    results : per tile, an int32 panoptic image of the tile's shape whose thing objects
        are connected components (ids ``class * label_divisor + k``)
    thing_list, label_divisor : as for the model

    Returns
    -------
    ndarray (H, W) int32; thing objects of each class numbered 1..N in raster order of their
    first pixel.
    """
    thing_list = [int(c) for c in thing_list]
    out = np.zeros(shape, dtype=np.int32)
    # stuff: union over tiles
    for t, res in zip(tiles, results, strict=True):
        cls, k = np.divmod(res, label_divisor)
        is_thing_class = class_mask(cls, thing_list)
        is_stuff = (res > 0) & (k == 0) & ~is_thing_class
        region = out[t.slices]
        region[is_stuff & (region == 0)] = res[is_stuff & (region == 0)]
    # things: nodes = (tile, compact id)
    compact, offsets, node_class, node_size, node_seam = [], [], [], [], []
    seams = _coverage(shape, tiles) >= 2
    n_nodes = 0
    for t, res in zip(tiles, results, strict=True):
        cls, k = np.divmod(res, label_divisor)
        things = np.where(class_mask(cls, thing_list) & (k > 0), res, 0)
        comp, remap = fastremap.renumber(things.astype(np.int64), in_place=False, preserve_zero=True)
        comp = comp.astype(np.int64)
        k = len(remap) - (1 if 0 in remap else 0)
        cls = np.zeros(k + 1, dtype=np.int64)
        for old, new in remap.items():
            if new:
                cls[new] = old // label_divisor
        node_class.append(cls[1:])
        node_size.append(np.bincount(comp.ravel(), minlength=k + 1)[1:])
        node_seam.append(np.bincount(comp[seams[t.slices]], minlength=k + 1)[1:])
        compact.append(comp)
        offsets.append(n_nodes)
        n_nodes += k
    if n_nodes == 0:
        return out
    node_class = np.concatenate(node_class)
    rows, cols = [], []
    for i, j, (sy, sx) in _pairs(tiles):
        ti, tj = tiles[i], tiles[j]
        a = compact[i][sy.start - ti.y0:sy.stop - ti.y0, sx.start - ti.x0:sx.stop - ti.x0]
        b = compact[j][sy.start - tj.y0:sy.stop - tj.y0, sx.start - tj.x0:sx.stop - tj.x0]
        both = (a > 0) & (b > 0)
        if not both.any():
            continue
        # one edge per shared pixel; duplicates are harmless for connected components
        ra, cb = a[both] + offsets[i] - 1, b[both] + offsets[j] - 1
        same = node_class[ra] == node_class[cb]
        rows.append(ra[same])
        cols.append(cb[same])
    rows = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    cols = np.concatenate(cols) if cols else np.zeros(0, np.int64)
    comp_of = connected_groups(n_nodes, rows, cols)
    members = np.bincount(comp_of, minlength=comp_of.max() + 1)
    size, seam = np.concatenate(node_size), np.concatenate(node_seam)
    keep = ~((members[comp_of] == 1) & (seam > 0.1 * size))
    # paint component index + 1, then number per class
    canvas = np.zeros(shape, dtype=np.int64)
    for t, comp, off in zip(tiles, compact, offsets, strict=True):
        lut = np.zeros(comp.max() + 1 if comp.size else 1, dtype=np.int64)
        n = len(lut) - 1
        lut[1:] = np.where(keep[off:off + n], comp_of[off:off + n] + 1, 0)
        vals = lut[comp]
        region = canvas[t.slices]
        region[vals > 0] = vals[vals > 0]
    comp_class = np.zeros(comp_of.max() + 2, dtype=np.int64)
    comp_class[comp_of + 1] = node_class
    for c in thing_list:
        sel = (canvas > 0) & (comp_class[canvas] == c)
        if not sel.any():
            continue
        numbered, _ = fastremap.renumber(np.where(sel, canvas, 0), in_place=False, preserve_zero=True)
        out[sel] = c * label_divisor + numbered[sel].astype(np.int32)
    return out


def segment_tiled(shape: tuple[int, int], tile_size: int, segment_tile: Callable[[Tile], np.ndarray],
                  thing_list, label_divisor: int, progress: Progress | None = None) -> np.ndarray:
    """Run ``segment_tile`` on every tile of an image and stitch the results.

    ``segment_tile(tile)`` returns the tile's int32 panoptic image with connected thing
    objects. Progress: one step per tile; a cancel stops between tiles.
    """
    tiles = tile_grid(shape, tile_size)
    prog = ensure_progress(progress)
    prog.stage("tiles", len(tiles))
    results = []
    for t in tiles:
        results.append(segment_tile(t))
        prog.advance()
    return stitch_tiles(shape, tiles, results, thing_list, label_divisor)
