"""Ortho-plane consensus: one 3D segmentation from the xy, xz and yz stack results.

Thing classes (:func:`ortho_plane_consensus`, reference §6.4). Every 3D object of every
view is a node; objects of different views that share voxels are joined by an edge
carrying their IoU and overlap. Each connected component with at least
``min_cluster_size`` objects (2, or 1 with ``permit_one_stack``) is resolved on its own:

1. objects joined by an edge with IoU above ``cluster_iou_thr`` form clusters; clusters
   whose mean pairwise IoU exceeds 0.01 or mean pairwise overlap exceeds 100 voxels are
   linked;
2. linked clusters are merged greedily (``_consensus_graph.greedy_merge``); unlike
   the original, a cluster absorbing its neighbours inherits their other links;
3. every surviving cluster with at least ``min_cluster_size`` members keeps the voxels
   covered by at least ``vote_thr`` of its members;
4. results of one component that overlap (IoU > 0.01 or > 100 voxels) become one object.

``vote_thr`` below ``min_cluster_size`` sets ``cluster_iou_thr`` to 0 (maximal merging).

How it is computed. The three views are read twice, ``chunk_depth`` z-slices at a time,
so memory stays bounded for volumes of any depth. The first pass counts, for every
distinct triple of labels ``(xy id, xz id, yz id)`` seen at a foreground voxel, how many
voxels carry it. Object sizes, pairwise intersections and every vote follow exactly from
that table, because all voxels with the same triple are covered by the same objects. The
graph steps decide which triples belong to which output object; the second pass writes
the output slab by slab. With 3D inference's size and extent filters the first pass also
boxes each triple's voxels, so the filters and their renumbering are decided on the table
and the output is still written once. Each slab is handled in blocks, several at once.

Numbering. Output objects are numbered 1..N by connected component of the object graph,
components in the order of their first object, objects ordered by view (``views[0]``,
``[1]``, ``[2]``) and then by label ascending; within a component, by their first
cluster (clusters ordered by their first object). Where two objects of one component
overlap too little to be joined, the shared voxels go to the higher id (the original
paints objects in id order). Ids are consecutive: an object left without voxels is
skipped.

Stuff classes (:func:`semantic_consensus`) are a plain voxel vote over the three masks.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import numpy as np
from scipy import ndimage

from panoptem._params import as_whole, whole_count
from panoptem.errors import PanoptemError
from panoptem.inference._consensus_graph import label_rows, resolve_components
from panoptem.inference.pipeline import ordered_map
from panoptem.progress import Progress, ensure_progress

__all__ = ["ortho_plane_consensus", "semantic_consensus"]

#: Voxels handled at once inside a slab (bounds temporaries), up to :data:`_THREADS` blocks
#: at once (numpy leaves the GIL). The three views of an ortho-plane run on a 64 x 256 x 256
#: volume, both passes with 3D inference's filters, on 2 cores: 50-66 ms in 1M-voxel blocks
#: on 2 threads, 79-159 ms in one 4M-voxel block.
_BLOCK_VOXELS = 1 << 20
_THREADS = min(4, os.cpu_count() or 1)
_BITS = 21  # labels in [0, 2**21) are packed three to an int64
_MASK = (1 << _BITS) - 1


# -- input checks and slab iteration -------------------------------------------------------


def _check_inputs(views, vote_thr, chunk_depth, integer: bool) -> tuple[list, tuple[int, ...]]:
    if hasattr(views, "shape") and len(views.shape) != 4:
        views = [views]  # one volume given instead of three
    views = list(views)
    if len(views) != 3:
        raise PanoptemError(
            f"ortho-plane consensus needs exactly 3 views (the xy, xz and yz stacks); got "
            f"{len(views)}")
    views = [v if hasattr(v, "shape") and hasattr(v, "dtype") else np.asarray(v) for v in views]
    shapes = [tuple(int(s) for s in v.shape) for v in views]
    if any(len(s) != 3 for s in shapes):
        raise PanoptemError(f"consensus views must be 3-D (Z, Y, X) volumes; got shapes {shapes}")
    if len(set(shapes)) != 1:
        raise PanoptemError(f"the 3 consensus views must have the same shape; got {shapes}")
    if integer:
        for i, v in enumerate(views):
            if np.dtype(v.dtype).kind not in "biu":
                raise PanoptemError(
                    f"consensus view {i} has dtype {v.dtype}; instance views must hold "
                    f"integer ids (convert with .astype(np.int32))")
    if as_whole(vote_thr) not in (1, 2, 3):
        raise PanoptemError(f"Voxel Vote Thr Out of 3 must be 1, 2 or 3; got {vote_thr!r}")
    whole_count("chunk_depth", chunk_depth, lo=1)
    return views, shapes[0]


def _prepare_out(out, shape, dtype):
    if out is None:
        return np.zeros(shape, dtype=dtype)
    if tuple(int(s) for s in out.shape) != tuple(shape):
        raise PanoptemError(f"'out' has shape {tuple(out.shape)}; it must be {tuple(shape)}")
    if np.dtype(out.dtype).kind not in "iu":
        raise PanoptemError(f"'out' has dtype {out.dtype}; give an integer array ({np.dtype(dtype)})")
    return out


def _slabs(depth: int, chunk_depth: int) -> list[tuple[int, int]]:
    return [(z, min(z + chunk_depth, depth)) for z in range(0, depth, chunk_depth)]


def _read(view, z0: int, z1: int) -> np.ndarray:
    return np.asarray(view[z0:z1])


def _block_depth(slab: tuple[np.ndarray, ...]) -> int:
    """Slices per block of a slab: at most about ``_BLOCK_VOXELS`` voxels, one slice at least."""
    return max(1, _BLOCK_VOXELS // max(1, int(np.prod(slab[0].shape[1:]))))


def _blocks(slab: tuple[np.ndarray, ...]) -> Iterator[tuple[slice, tuple[np.ndarray, ...]]]:
    """Sub-blocks of whole slices of a slab (see :func:`_block_depth`), flattened (a copy
    where a view is not contiguous), one at a time."""
    step = _block_depth(slab)
    for z in range(0, slab[0].shape[0], step):
        sl = slice(z, z + step)
        yield sl, tuple(a[sl].reshape(-1) for a in slab)


def _map_blocks(fn, slab: tuple[np.ndarray, ...]) -> list:
    """``fn(sl, flat_arrays)`` for every block of a slab (see :func:`_blocks`), up to
    :data:`_THREADS` blocks at once (blocks are made as the threads take them); the results
    in block order."""
    threads = min(_THREADS, -(-slab[0].shape[0] // _block_depth(slab)))
    if threads < 2:
        return [fn(*b) for b in _blocks(slab)]
    return list(ordered_map(lambda b: fn(*b), _blocks(slab), threads, name="panoptem-consensus"))


# -- triple tables -------------------------------------------------------------------------


def _fits_packed(*arrays: np.ndarray) -> bool:
    return all(a.size == 0 or (a.min() >= 0 and a.max() <= _MASK) for a in arrays)


def _pack(a0, a1, a2) -> np.ndarray:
    return (a0 << (2 * _BITS)) | (a1 << _BITS) | a2


def _unique_triples(a0, a1, a2, inverse: bool = False):
    """Distinct label triples among aligned 1-D int64 arrays: ((m, 3) int64 sorted
    lexicographically, (m,) int64 voxel counts) and, with ``inverse``, each element's row."""
    if _fits_packed(a0, a1, a2):
        keys = _pack(a0, a1, a2)
        uniq, counts = np.unique(keys, return_counts=True)
        rows = np.stack([uniq >> (2 * _BITS), (uniq >> _BITS) & _MASK, uniq & _MASK], axis=1)
        # a search among the few distinct keys: about 5 times cheaper than return_inverse
        inv = np.searchsorted(uniq, keys) if inverse else None
        return rows, counts.astype(np.int64), inv
    u0, i0 = np.unique(a0, return_inverse=True)
    u1, i1 = np.unique(a1, return_inverse=True)
    u2, i2 = np.unique(a2, return_inverse=True)
    u01, i01 = np.unique(i0.astype(np.int64) * len(u1) + i1, return_inverse=True)
    keys, inv, counts = np.unique(i01.astype(np.int64) * len(u2) + i2, return_inverse=True,
                                  return_counts=True)
    k01 = u01[keys // len(u2)]
    rows = np.stack([u0[k01 // len(u1)], u1[k01 % len(u1)], u2[keys % len(u2)]], axis=1)
    return rows.astype(np.int64), counts.astype(np.int64), inv.reshape(-1) if inverse else None


def _merge_tables(rows: np.ndarray, counts: np.ndarray, boxes: np.ndarray | None = None):
    """Sum the counts of equal rows (and unite their boxes, when given); rows come back
    sorted lexicographically."""
    if len(rows) == 0:
        return rows.reshape(0, 3), counts, boxes
    order = np.lexsort((rows[:, 2], rows[:, 1], rows[:, 0]))
    rows, counts = rows[order], counts[order]
    first = np.ones(len(rows), dtype=bool)
    first[1:] = np.any(rows[1:] != rows[:-1], axis=1)
    starts = np.flatnonzero(first)
    if boxes is not None:
        boxes = boxes[order]
        lo = np.minimum.reduceat(boxes[:, 0::2], starts)
        hi = np.maximum.reduceat(boxes[:, 1::2], starts)
        boxes = np.stack([lo, hi], axis=2).reshape(-1, 6)  # (z0, z1, y0, y1, x0, x1)
    return rows[starts], np.add.reduceat(counts, starts), boxes


def _row_boxes(inv: np.ndarray, fg: np.ndarray, block_shape: tuple, n_rows: int,
               z0: int) -> np.ndarray:
    """Inclusive bounding box ``(z0, z1, y0, y1, x0, x1)`` of each row's voxels in a block
    of whole slices starting at slice ``z0``: ``inv`` gives the row of each foreground
    voxel (``fg`` the block's flat foreground mask)."""
    rows_img = np.zeros(fg.size, dtype=np.int32)
    rows_img[fg] = inv + 1
    boxes = np.zeros((n_rows, 6), dtype=np.int64)
    for r, box in enumerate(ndimage.find_objects(rows_img.reshape(block_shape), max_label=n_rows)):
        if box is not None:  # every row has voxels in the block it comes from
            boxes[r] = [b for s in box for b in (s.start, s.stop - 1)]
    boxes[:, :2] += z0
    return boxes


def _count_triples(views, shape, chunk_depth, progress: Progress, boxes: bool = False):
    """Pass 1: the table of foreground label triples and their voxel counts (and, with
    ``boxes``, the bounding box of each triple's voxels, see :func:`_row_boxes`)."""
    slabs = _slabs(shape[0], chunk_depth)
    progress.stage("consensus: overlaps", len(slabs))
    empty = (np.zeros((0, 3), dtype=np.int64), np.zeros(0, dtype=np.int64),
             np.zeros((0, 6), dtype=np.int64) if boxes else None)
    rows, counts, bx = empty

    def count(sl, arrays):  # the table of one block of the slab being read
        a0, a1, a2 = arrays
        fg = (a0 != 0) | (a1 != 0) | (a2 != 0)
        if not fg.any():
            return empty
        r, c, inv = _unique_triples(*(a[fg].astype(np.int64) for a in arrays), inverse=boxes)
        return r, c, _row_boxes(inv, fg, slab[0][sl].shape, len(r), z0 + sl.start) if boxes else None

    for z0, z1 in slabs:
        slab = tuple(_read(v, z0, z1) for v in views)
        parts = [(rows, counts, bx), *_map_blocks(count, slab)]
        rows, counts, bx = _merge_tables(np.concatenate([p[0] for p in parts]),
                                         np.concatenate([p[1] for p in parts]),
                                         np.concatenate([p[2] for p in parts]) if boxes else None)
        progress.advance()
    return rows, counts, bx


# -- the graph and the vote ------------------------------------------------------------------


def _object_nodes(table: np.ndarray, counts: np.ndarray):
    """Node index of every (row, view) (-1 for background), node sizes and the number of
    nodes. Nodes are numbered by view, then label ascending."""
    node = np.full(table.shape, -1, dtype=np.int64)
    offset = 0
    for k in range(3):
        fg = table[:, k] != 0
        labels = np.unique(table[fg, k])
        node[fg, k] = np.searchsorted(labels, table[fg, k]) + offset
        offset += len(labels)
    size = np.zeros(offset, dtype=np.int64)
    for k in range(3):
        fg = node[:, k] >= 0
        np.add.at(size, node[fg, k], counts[fg])
    return node, size, offset


def _object_edges(node, counts, size, n_nodes):
    """Pairs of overlapping objects of different views: u < v, overlap, IoU."""
    us, vs, ovs = [], [], []
    for j, k in ((0, 1), (0, 2), (1, 2)):
        both = (node[:, j] >= 0) & (node[:, k] >= 0)
        keys = node[both, j] * n_nodes + node[both, k]
        pairs, inverse = np.unique(keys, return_inverse=True)
        overlap = np.zeros(len(pairs), dtype=np.int64)
        np.add.at(overlap, inverse.reshape(-1), counts[both])
        us.append(pairs // n_nodes)
        vs.append(pairs % n_nodes)
        ovs.append(overlap)
    u, v, ov = (np.concatenate(x).astype(np.int64) for x in (us, vs, ovs))
    return u, v, ov, ov / (size[u] + size[v] - ov)


def _row_lookup(table: np.ndarray):
    """A function mapping aligned label arrays (foreground voxels) to table row indices."""
    if _fits_packed(table):
        keys = _pack(table[:, 0], table[:, 1], table[:, 2])
        return lambda a0, a1, a2: np.searchsorted(keys, _pack(a0, a1, a2))
    levels = [np.unique(np.concatenate([[0], table[:, k]])) for k in range(3)]
    n1, n2 = len(levels[1]), len(levels[2])
    g = [np.searchsorted(levels[k], table[:, k]) for k in range(3)]
    pairs = np.unique(g[0] * n1 + g[1])
    keys = np.searchsorted(pairs, g[0] * n1 + g[1]) * n2 + g[2]

    def lookup(a0, a1, a2):
        h = [np.searchsorted(levels[k], a) for k, a in enumerate((a0, a1, a2))]
        return np.searchsorted(keys, np.searchsorted(pairs, h[0] * n1 + h[1]) * n2 + h[2])

    return lookup


def _filter_rows(row_id: np.ndarray, counts: np.ndarray, boxes: np.ndarray, min_size: int,
                 min_extent: int) -> np.ndarray:
    """``row_id`` with the objects that fail the size or extent filter mapped to 0 and the
    others renumbered 1..N by first z-slice, then by their number in ``row_id``.

    Every voxel of a row gets the row's object, so an object's voxels are the sum of its
    rows' counts and its box the union of their boxes."""
    n = int(row_id.max(initial=0))
    sel = row_id > 0
    obj = row_id[sel]
    voxels = np.bincount(obj, weights=counts[sel], minlength=n + 1)
    lo = np.full((n + 1, 3), np.iinfo(np.int64).max, dtype=np.int64)
    hi = np.full((n + 1, 3), -1, dtype=np.int64)
    np.minimum.at(lo, obj, boxes[sel][:, 0::2])
    np.maximum.at(hi, obj, boxes[sel][:, 1::2])
    keep = (voxels >= min_size) & ((hi - lo).min(axis=1) + 1 >= min_extent)
    keep[0] = False
    ids = np.flatnonzero(keep)
    order = ids[np.lexsort((ids, lo[ids, 0]))]
    final = np.zeros(n + 1, dtype=row_id.dtype)
    final[order] = np.arange(1, len(order) + 1)
    return final[row_id]


# -- public API --------------------------------------------------------------------------------


def ortho_plane_consensus(views: Sequence, vote_thr: int = 2, cluster_iou_thr: float = 0.75,
                          permit_one_stack: bool = False, out=None, chunk_depth: int = 64,
                          progress: Progress | None = None, min_size: int | None = None,
                          min_extent: int | None = None):
    """Consensus instance segmentation of one thing class from three ortho-plane results.

    Parameters
    ----------
    views : sequence of 3 array-likes, each (Z, Y, X) integer
        Instance ids (0 = background) from stack inference along xy, xz and yz, all in
        ZYX layout. numpy or zarr arrays (anything sliceable along z); read
        ``chunk_depth`` z-slices at a time, twice.
    vote_thr : int, 1, 2 or 3
        A voxel belongs to a cluster's object when at least this many of its member
        objects cover it ("Voxel Vote Thr Out of 3"). 1 = union, 3 = intersection.
    cluster_iou_thr : float
        Objects of different views overlapping with IoU above this form one cluster.
        Forced to 0 when ``vote_thr`` is below the minimum cluster size.
    permit_one_stack : bool
        Keep objects found in one view only (minimum cluster size 1 instead of 2); they
        survive the vote only with ``vote_thr=1``.
    out : numpy or zarr array (Z, Y, X) integer, optional
        Written slab by slab (every voxel). Default: a new numpy int32 array.
    chunk_depth : int
        z-slices read and written at once.
    progress : Progress, optional
        Stages "consensus: overlaps" and "consensus: voting", one step per slab;
        cancelling stops between slabs with :class:`~panoptem.errors.Cancelled`.
    min_size, min_extent : int, optional
        3D inference's filters, applied on the way: objects with fewer than ``min_size``
        voxels, or whose bounding box spans fewer than ``min_extent`` voxels along any
        axis, are dropped. When either is given, the objects left are numbered 1..N in
        order of first appearance instead: by their first z-slice, then by their
        consensus number. Computed from the triple table (sizes, boxes), so the output is
        still written once.

    Returns
    -------
    array (Z, Y, X) int32 (or ``out``)
        Objects 1..N, numbered as described in the module docstring (or above, with the
        filters).

    Raises
    ------
    PanoptemError
        Not exactly 3 views, shapes differ or are not 3-D, non-integer views, a bad
        ``vote_thr``, ``cluster_iou_thr`` or ``chunk_depth``, or a wrongly shaped ``out``.
    """
    views, shape = _check_inputs(views, vote_thr, chunk_depth, integer=True)
    vote_thr, chunk_depth = int(vote_thr), int(chunk_depth)
    try:
        cluster_iou_thr = float(cluster_iou_thr)
    except (TypeError, ValueError):
        cluster_iou_thr = float("nan")
    if not 0.0 <= cluster_iou_thr <= 1.0:
        raise PanoptemError(f"cluster_iou_thr must be between 0 and 1; got {cluster_iou_thr}")
    out = _prepare_out(out, shape, np.int32)
    progress = ensure_progress(progress)

    min_cluster_size = 1 if permit_one_stack else 2
    if vote_thr < min_cluster_size:
        cluster_iou_thr = 0.0

    filtered = min_size is not None or min_extent is not None
    if filtered:
        min_size = whole_count("min_size", 0 if min_size is None else min_size)
        min_extent = whole_count("min_extent", 0 if min_extent is None else min_extent)

    table, counts, boxes = _count_triples(views, shape, chunk_depth, progress, boxes=filtered)
    node, size, n_nodes = _object_nodes(table, counts)
    u, v, ov, iou = _object_edges(node, counts, size, n_nodes)
    clusters = resolve_components(n_nodes, u, v, ov, iou, min_cluster_size, cluster_iou_thr,
                                   progress) if n_nodes else []
    row_id = label_rows(node, counts, clusters, n_nodes, vote_thr)
    if filtered:
        row_id = _filter_rows(row_id, counts, boxes, min_size, min_extent)
    if int(row_id.max(initial=0)) > np.iinfo(out.dtype).max:
        raise PanoptemError(f"{int(row_id.max())} objects do not fit in 'out' ({out.dtype}); "
                            "give an int32 array")
    lookup = _row_lookup(table) if len(table) else None

    slabs = _slabs(shape[0], chunk_depth)
    progress.stage("consensus: voting", len(slabs))
    plane = max(1, int(np.prod(shape[1:])))

    def write(sl, arrays):  # one block of the slab being written
        a0, a1, a2 = arrays
        fg = (a0 != 0) | (a1 != 0) | (a2 != 0)
        if lookup is not None and fg.any():
            rows = lookup(*(a[fg].astype(np.int64) for a in arrays))
            block = flat[sl.start * plane:sl.start * plane + a0.size]
            block[fg] = row_id[rows].astype(out.dtype, copy=False)

    for z0, z1 in slabs:
        slab = tuple(_read(view, z0, z1) for view in views)
        result = np.zeros(slab[0].shape, dtype=out.dtype)
        flat = result.reshape(-1)
        _map_blocks(write, slab)
        out[z0:z1] = result
        progress.advance()
    return out


def semantic_consensus(views: Sequence, vote_thr: int = 2, out=None, chunk_depth: int = 64,
                       progress: Progress | None = None):
    """Consensus of one stuff class: a voxel vote over three masks.

    Parameters
    ----------
    views : sequence of 3 array-likes, each (Z, Y, X), any dtype
        The class's masks (nonzero = inside) from the xy, xz and yz stacks, ZYX layout.
    vote_thr : int, 1, 2 or 3
        Voxels inside at least this many masks are kept (1 = union, 2 = majority,
        3 = intersection).
    out : numpy or zarr array (Z, Y, X) integer, optional
        Written slab by slab. Default: a new numpy uint8 array.
    chunk_depth : int
        z-slices read and written at once.
    progress : Progress, optional
        One stage "consensus: voting", one step per slab.

    Returns
    -------
    array (Z, Y, X) uint8 (or ``out``)
        1 where kept, 0 elsewhere.

    Raises
    ------
    PanoptemError
        Not exactly 3 views, shapes differ or are not 3-D, a bad ``vote_thr`` or
        ``chunk_depth``, or a wrongly shaped ``out``.
    """
    views, shape = _check_inputs(views, vote_thr, chunk_depth, integer=False)
    out = _prepare_out(out, shape, np.uint8)
    progress = ensure_progress(progress)
    slabs = _slabs(shape[0], int(chunk_depth))
    progress.stage("consensus: voting", len(slabs))
    for z0, z1 in slabs:
        votes = sum((_read(view, z0, z1) != 0).astype(np.uint8) for view in views)
        out[z0:z1] = (votes >= int(vote_thr)).astype(out.dtype)
        progress.advance()
    return out
