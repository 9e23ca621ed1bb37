"""Stack inference: every slice of a volume along one axis through the 2D engine.

Per slice (reference §6.2, SPEC §5.5): the model outputs go through a true median filter
of the semantic probabilities over the ``median_size`` slices around it (clipped at the
volume's ends, so volumes shorter than the filter work), the 2D panoptic post-processing
of the 2D engine, and forward matching against the previous slice. A backward pass then
matches every slice to the next one again, without creating ids, and collects each
object's size and bounding box for the size and extent filters.

The post-processing threads also index each slice's objects (ids, pixel counts, boxes);
the matching then needs only the pixels each object shares with the objects of the slice
before (one count over the two slices), and the backward pass works on those tables
alone, rewriting just the slices whose ids it changes. On a GPU, where the forward passes
are short, this keeps the work that cannot overlap with them small.

Slices are read one at a time (numpy, zarr and dask volumes alike) and the matched
panoptic slices go to a *store*: an (n_slices, h, w) int32 array-like, in memory or a
zarr array on disk, so memory stays bounded by a few slices.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import fastremap
import numpy as np
import torch
from scipy import ndimage

from panoptem._memory import release_free_memory
from panoptem.errors import PanoptemError
from panoptem.inference import preprocess as pre
from panoptem.inference.matching import match_objects
from panoptem.inference.pipeline import ahead, ordered_map
from panoptem.inference.postprocess import label_codes
from panoptem.overlap import pair_counts
from panoptem.progress import Progress, ensure_progress

__all__ = ["AXES", "read_slice", "slice_shape", "volume_intensity_range", "median_filtered",
           "StackResult", "segment_stack", "slice_workers", "slice_batch", "post_workers",
           "outputs_to_host"]

AXES = {"xy": 0, "xz": 1, "yz": 2}

#: On a CPU, slices of up to this many model-input pixels run two at a time (see
#: :func:`slice_workers`); larger ones one at a time, on all the cores.
PARALLEL_SLICE_PIXELS = 512 * 512

#: On a CPU, while slices run two at a time, slices also go through a float model two per
#: forward pass when its weights take at least this many bytes per model-input pixel (after
#: downsampling and padding; see :func:`slice_batch`).
BATCH_WEIGHT_BYTES_PER_PIXEL = 5000


#: On a GPU, at most this many slices are post-processed at once (see :func:`post_workers`).
MAX_POST_WORKERS = 4


def _index(axis: int, i) -> tuple:
    return (slice(None),) * axis + (i,)


def read_slice(volume, axis: int, i: int) -> np.ndarray:
    """Slice ``i`` along ``axis`` of a (Z, Y, X) numpy, zarr or dask array, as numpy."""
    s = volume[_index(axis, i)]
    if hasattr(s, "compute"):
        s = s.compute()
    return np.asarray(s)


def slice_shape(shape: tuple[int, int, int], axis: int) -> tuple[int, int]:
    return tuple(n for a, n in enumerate(shape) if a != axis)


def volume_intensity_range(volume, slab: int = 16) -> tuple[float, float] | None:
    """Intensity range of a whole volume read in slabs (None for uint8)."""
    if np.dtype(volume.dtype) == np.uint8:
        return None
    lo, hi = np.inf, -np.inf
    for z in range(0, volume.shape[0], slab):
        part = volume[z:z + slab]
        part = np.asarray(part.compute() if hasattr(part, "compute") else part)
        r = pre.intensity_range(part)
        lo, hi = min(lo, r[0]), max(hi, r[1])
    return lo, hi


def median_filtered(items: Iterator, size: int) -> Iterator:
    """Replace each item's probabilities by the median over the ``size`` items around it.

    ``items`` yields ``(probs, *rest)`` tuples; the output yields the same tuples, in order,
    with ``probs`` replaced by the voxel-wise median of the unfiltered ``probs`` of items
    ``i - size//2 .. i + size//2`` clipped to the sequence (for an even count at the ends,
    the mean of the two middle values, as ``numpy.median``). ``size`` 1 passes items through.
    """
    if size <= 1:
        yield from items
        return
    r = size // 2
    window: deque = deque()  # (index, item) of the last up-to-2r+1 items
    it = iter(items)
    i_next = 0  # next item to emit
    done = False
    while True:
        while not done and (not window or window[-1][0] < i_next + r):
            try:
                window.append((i_next if not window else window[-1][0] + 1, next(it)))
            except StopIteration:
                done = True
        if not window or i_next > window[-1][0]:
            return
        while window[0][0] < i_next - r:
            window.popleft()
        centre = next(item for j, item in window if j == i_next)
        yield (_median([item[0] for _, item in window]), *centre[1:])
        i_next += 1


def _median(probs: list[torch.Tensor]) -> torch.Tensor:
    """The element-wise median of tensors of one shape (of an even count, the mean of the
    two middle values)."""
    n = len(probs)
    if n == 1:
        return probs[0]
    if n == 2:
        return (probs[0] + probs[1]) / 2
    if n == 3:  # the middle value without a sort or a stacked copy: 0.03 against 0.78 ms
        a, b, c = probs  # (sorted) for 3 x 256² on a CPU
        return torch.maximum(torch.minimum(a, b), torch.minimum(torch.maximum(a, b), c))
    srt = torch.stack(probs).sort(dim=0).values
    if n % 2:
        return srt[n // 2]
    return (srt[n // 2 - 1] + srt[n // 2]) / 2


@dataclass
class StackResult:
    """Matched panoptic slices of one stack and the statistics of every object.

    Attributes
    ----------
    axis : str
        "xy", "xz" or "yz".
    store : array-like (n_slices, h, w) int32
        Panoptic ids ``class * label_divisor + object`` per slice, slices along ``axis``.
    stats : dict id -> [voxels, s0, s1, r0, r1, c0, c1]
        Voxel count and inclusive bounding box in (slice, row, column) coordinates, in
        order of first appearance in the backward pass (later slices first).
    label_divisor : int
    """

    axis: str
    store: object
    label_divisor: int
    stats: dict = field(default_factory=dict)

    def kept_ids(self, class_id: int, min_size: int = 0, min_extent: int = 0) -> list[int]:
        """Ids of one class that pass the size and extent filters, in tracker order."""
        div = self.label_divisor
        keep = []
        for i, (n, s0, s1, r0, r1, c0, c1) in self.stats.items():
            if i // div != class_id or i % div == 0:
                continue
            if n < min_size or min(s1 - s0, r1 - r0, c1 - c0) + 1 < min_extent:
                continue
            keep.append(i)
        return keep


@dataclass
class _Objects:
    """The objects of one panoptic slice, found once so that matching works on tables.

    Index 0 is the background (id 0, possibly no pixels); every other index is one id
    present in the slice.

    Attributes
    ----------
    ids : ndarray (k,) int64
        The id of each index.
    counts : ndarray (k,) int64 or None
        Pixels of each index (None until counted).
    boxes : ndarray (k, 4) int64
        Inclusive bounding box (r0, r1, c0, c1) of each index (zeros for the background).
    codes : ndarray (h, w) or None
        Each pixel's index; dropped once the next slice has been paired with this one.
    """

    ids: np.ndarray
    counts: np.ndarray | None
    boxes: np.ndarray
    codes: np.ndarray | None


def _objects(labels: np.ndarray) -> _Objects:
    """Index the ids of a 2D label image: renumber them 0..k-1, count and box each."""
    obj = _indexed(*label_codes(labels))
    obj.counts = _counts(obj)
    return obj


def _indexed(codes: np.ndarray, ids: np.ndarray) -> _Objects:
    """The objects of an index image whose index ``j`` has the id ``ids[j]``, boxed but not
    yet counted (the matching counts them with the pixels they share, see :func:`_touching`)."""
    k = len(ids)
    boxes = np.zeros((k, 4), np.int64)
    for j, (ys, xs) in enumerate(ndimage.find_objects(codes, max_label=k - 1), 1):
        boxes[j] = ys.start, ys.stop - 1, xs.start, xs.stop - 1
    return _Objects(ids, None, boxes, codes)


def _counts(obj: _Objects) -> np.ndarray:
    return np.bincount(obj.codes.ravel(), minlength=len(obj.ids)).astype(np.int64, copy=False)


def _group(values: np.ndarray, weights: np.ndarray, select: np.ndarray):
    """The distinct ``values[select]`` (ascending), each selected index's group and the
    summed ``weights`` of each group."""
    ids, group = np.unique(values[select], return_inverse=True)
    sums = np.bincount(group, weights=weights[select], minlength=len(ids)).astype(np.int64)
    return ids, group, sums


def _stats_table(slices) -> dict:
    """Per-id voxel counts and inclusive boxes ``[voxels, s0, s1, r0, r1, c0, c1]`` of
    indexed slices ``(s, ids, counts, boxes)``: ``ids`` gives each index's object (0 none;
    an object may span several indices), ``counts`` and ``boxes`` its pixels and box.

    Ids are in order of first appearance, slices taken in the order given and ids in
    ascending order within one slice. One pass of numpy over all slices' tables, so that
    the Python work grows with the objects, not with the slices.
    """
    parts = [(s, np.asarray(ids), np.asarray(counts), np.asarray(boxes))
             for s, ids, counts, boxes in slices]
    if not parts:
        return {}
    ids = np.concatenate([p[1] for p in parts]).astype(np.int64, copy=False)
    sel = ids != 0
    if not sel.any():
        return {}
    order_in = np.repeat(np.arange(len(parts)), [len(p[1]) for p in parts])[sel]  # place in `slices`
    where = np.array([p[0] for p in parts], np.int64)[order_in]  # slice number
    counts = np.concatenate([p[2] for p in parts]).astype(np.int64, copy=False)[sel]
    boxes = np.concatenate([p[3] for p in parts]).reshape(-1, 4).astype(np.int64, copy=False)[sel]
    uniq, group = np.unique(ids[sel], return_inverse=True)
    by_group = np.argsort(group, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(group[by_group]) != 0])

    def reduce(ufunc, values):
        return ufunc.reduceat(values[by_group], starts, axis=0)

    first = reduce(np.minimum, order_in)
    rows = np.column_stack([
        reduce(np.add, counts), reduce(np.minimum, where), reduce(np.maximum, where),
        reduce(np.minimum, boxes[:, 0]), reduce(np.maximum, boxes[:, 1]),
        reduce(np.minimum, boxes[:, 2]), reduce(np.maximum, boxes[:, 3])])
    order = np.lexsort((uniq, first))
    return dict(zip(uniq[order].tolist(), rows[order].tolist(), strict=True))


def _label_stats(slices) -> dict:
    """:func:`_stats_table` of 2D label images given as ``(s, labels)``."""
    return _stats_table((s, obj.ids, obj.counts, obj.boxes)
                        for s, labels in slices for obj in (_objects(labels),))


def _match_step(target: np.ndarray, target_counts: np.ndarray, new: np.ndarray,
                new_counts: np.ndarray, pairs: tuple, things, div: int, next_label: dict,
                assign_new: bool) -> np.ndarray:
    """Match the objects of one slice to those of the target slice, class by class, on tables.

    The rule of :func:`~.matching.match_slice`, applied to indexed slices (see
    :class:`_Objects`): ``target`` and ``new`` give the object id of each index of the
    target and the new slice (several indices may form one object), ``*_counts`` their
    pixels, and ``pairs`` ``(target index, new index, shared pixels)`` for the pairs of
    non-background indices that touch. Stuff ids pass through; thing ids of classes not in
    ``things`` become 0. Where the target has no object of a class, the new slice's objects
    of that class keep their ids (and, in the forward pass, ``next_label`` moves past them).

    Returns the matched id of each index of the new slice.
    """
    out = np.where(new % div > 0, 0, new)
    ti, ni, shared = pairs
    for c in things:
        in_new = (new // div == c) & (new % div > 0)
        if not in_new.any():
            continue
        ids_n, group_n, area_n = _group(new, new_counts, in_new)
        in_target = (target // div == c) & (target % div > 0)
        nxt = next_label[c]
        if not in_target.any():
            out[in_new] = new[in_new]
            if assign_new:
                nxt = max(nxt, int(ids_n[-1]) + 1)
        else:
            ids_t, group_t, area_t = _group(target, target_counts, in_target)
            row = np.full(len(target), -1)
            row[in_target] = group_t
            col = np.full(len(new), -1)
            col[in_new] = group_n
            r, k = row[ti], col[ni]
            touch = (r >= 0) & (k >= 0)
            inter = np.zeros((len(ids_t), len(ids_n)), np.int64)
            np.add.at(inter, (r[touch], k[touch]), shared[touch])
            matched, nxt = match_objects(ids_t, area_t, ids_n, area_n, inter, nxt, assign_new)
            out[in_new] = matched[group_n]
        if nxt >= (c + 1) * div:
            raise PanoptemError(
                f"More than {div - 1} objects of class {c} in the stack: raise 'Max objects "
                "per class in 3D'."
            )
        next_label[c] = nxt
    return out


def _touching(prev: _Objects, cur: _Objects) -> tuple:
    """``(index in prev, index in cur, shared pixels)`` of the objects of two neighbouring
    slices that touch (background excluded), and the pixels of each index of ``cur``.

    Only the pixels of ``cur``'s objects are counted (a 1024 x 1024 slice of mitochondria:
    about 3 against 8 ms for every pixel); its background's pixels are the rest.
    """
    where = np.flatnonzero(cur.codes)
    ra, rb, cnt, _, area = pair_counts(prev.codes.ravel()[where], len(prev.ids),
                                       cur.codes.ravel()[where], len(cur.ids))
    area[0] = cur.codes.size - len(where)
    keep = ra > 0
    return (ra[keep], rb[keep], cnt[keep]), area


def _relabel(labels: np.ndarray, old: np.ndarray, new: np.ndarray) -> np.ndarray:
    """``labels`` with each id in ``old`` replaced by the one at the same place in ``new``."""
    mapping = dict(zip(old.tolist(), new.tolist(), strict=True))
    return fastremap.remap(np.asarray(labels), mapping, preserve_missing_labels=True, in_place=False)


def _input_pixels(shape: tuple[int, int], downsampling: int, padding_factor: int = 1) -> int:
    """Pixels of the model input for a slice of ``shape``: downsampled as
    :func:`~panoptem.inference.preprocess.downsample` does (rounding up), then padded to
    multiples of ``padding_factor``."""
    pixels = 1
    for side in shape:
        down = -(-side // downsampling)
        pixels *= -(-down // padding_factor) * padding_factor
    return pixels


def slice_workers(engine, shape: tuple[int, int], params) -> int:
    """How many slices of ``shape`` run through the model at once: 2 or 1.

    On a CPU with at least 2 intra-op threads (``torch.get_num_threads()``), slices whose
    model input (after downsampling) has at most :data:`PARALLEL_SLICE_PIXELS` pixels run
    two at a time, each forward pass on half the threads. One forward pass on small slices
    keeps 2 cores only about 70 % busy: on 2 cores, MitoNet_v1 at 256 x 256 took 410-430 ms
    per slice one at a time and 310-370 ms two at a time (v1 int8 255 → 185 ms; mini 295 →
    215 ms). At 512 x 512 v1 went from 1.15-1.26 s to 0.91-0.93 s per slice for 155 MB
    more memory; larger slices keep the cores busy and would hold two sets of activations.
    On a GPU: 1 (the forward passes run ahead of the CPU work instead).
    """
    if engine.device.type != "cpu" or torch.get_num_threads() < 2:
        return 1
    return 2 if _input_pixels(shape, params.downsampling) <= PARALLEL_SLICE_PIXELS else 1


def post_workers(engine) -> int:
    """How many slices are post-processed at once: on a GPU, up to :data:`MAX_POST_WORKERS`,
    leaving 2 cores for the thread that runs the forward passes and the one that matches;
    on a CPU 1 (the forward passes use every core there).

    On a GPU the forward pass of a slice is short and the CPU work after it (centres,
    grouping, connected components, ids) took longer: on an H200 with 16 cores, the bundled
    model's forward passes filled only 22-48 % of a 64 x 256 x 256 run with one slice
    post-processed at a time (26-51 % with four).
    """
    if engine.device.type == "cpu":
        return 1
    return max(1, min(MAX_POST_WORKERS, (os.cpu_count() or 1) - 2))


def outputs_to_host(engine) -> bool:
    """Whether the thread that runs the forward passes copies each slice's model outputs to
    the CPU, where its post-processing then runs: on a GPU, yes; on a CPU they are there.

    Post-processing the outputs where they lie, on the GPU, costs the stacks their overlap:
    it reads its results back to the CPU three times per slice (the semantic classes, the
    centres, the offsets), and each read waits for everything queued on the GPU's stream
    before it, which is mostly the next slices' forward passes; the forward thread in turn
    waits for the post-processing's kernels. Copied once, queued right behind the forward
    pass, the outputs leave the GPU to the forward passes alone (:func:`_queued` queues the
    next slice's pass before it waits for the copies), and the CPU work (which does the
    grouping, connected components and matching on the CPU either way) runs beside them,
    as ``benchmarks/bench_overlap.py`` measures. The post-processing that moves to the CPU
    is small: a median of three slices, a threshold and a max-pool on the 1/4 grid. See
    ``benchmarks/README.md``.
    """
    return engine.device.type != "cpu"


def _to_host(outs: list[tuple], device: torch.device, wait: bool = True) -> list[tuple]:
    """``outs`` (per slice, a tuple of tensors) on the CPU. From a GPU the copies are queued
    together on this thread's stream and, with ``wait``, waited for once (they are complete
    then; else they are only queued); CPU tensors are returned as they are."""
    cuda = device.type == "cuda"
    host = [tuple(t.to("cpu", non_blocking=cuda) for t in out) for out in outs]
    if cuda and wait:
        torch.cuda.current_stream(device).synchronize()
    return host


def _queued(forward, groups: Iterator[list], device: torch.device) -> Iterator[list[tuple]]:
    """``forward(group, False)`` of each group (its model outputs, not waited for), copied
    to the CPU. A group's outputs are handed on once the next group's forward pass is
    queued behind their copies, and the copies are done: the GPU goes from one forward
    pass to the next without waiting for this thread. On a CPU, the same order."""
    cuda = device.type == "cuda"
    pending = None
    for group in groups:
        host = _to_host(forward(group, False), device, wait=False)
        done = torch.cuda.Event(blocking=True) if cuda else None  # its wait sleeps, not spins
        if done is not None:
            done.record(torch.cuda.current_stream(device))
        if pending is not None:
            yield _copied(*pending)
        pending = host, done
    if pending is not None:
        yield _copied(*pending)


def _copied(host: list[tuple], done) -> list[tuple]:
    if done is not None:  # the copies queued before this event are complete
        done.synchronize()
    return host


def _on_host(items: Iterator[tuple], device: torch.device) -> Iterator[tuple]:
    """Each item of ``items`` (model outputs computed elsewhere) through :func:`_to_host`;
    closing this closes ``items``."""
    try:
        for out in items:
            yield _to_host([out], device)[0]
    finally:
        if hasattr(items, "close"):
            items.close()


def slice_batch(engine, shape: tuple[int, int], params) -> int:
    """How many consecutive slices of ``shape`` go through the model in one call: 2 or 1.

    2 where slices run two at a time (:func:`slice_workers`), the model is a float one and
    its weights take at least :data:`BATCH_WEIGHT_BYTES_PER_PIXEL` bytes per pixel of the
    model input (after downsampling, padded to the padding factor). Each call of a float
    model on a CPU re-orders all its weights for oneDNN's convolutions (about 50 ms for
    MitoNet_v1's 220 MB, whatever the input size), so on small slices a large part of the
    call; two slices per call pay it once. Measured on 2 cores with two calls at once:

    - MitoNet_v1 (220 MB) at 64 x 256 (the xz and yz slices of a 64-slice volume, 13.5 kB
      per pixel): 120-123 -> 96-97 ms per slice; at 128 x 256 (6.7 kB): 202-210 -> 184-189
      ms; at 256 x 256 (3.4 kB): within this machine's noise (about 5 %).
    - MitoNet_v1_mini (119 MB) at 128 x 256 (3.6 kB): 111-121 -> 111-113 ms, and a whole
      ortho-plane run was no faster.

    int8 files keep their int8 weights packed for their kernels and are not batched (v1
    int8 at 64 x 256: 68-96 ms per slice one per call, 95-98 ms two per call). The
    outputs are those of one slice per call.

    Those figures are for models prepared by ``optimize_for_inference``, which is now the
    fallback. With channels-last convolutions (:mod:`panoptem._conv_graph`) only the 1 x 1
    weights are re-ordered per call, and a whole MitoNet_v1 ortho-plane run took the same
    time either way (29.1-30.4 s two per call, 29.5-29.6 s one per call; peak 837-849
    against 831-853 MB), so the rule is kept for the fallback.
    """
    loaded = engine.loaded
    if loaded.quantized or slice_workers(engine, shape, params) < 2:
        return 1
    pixels = _input_pixels(shape, params.downsampling, engine.padding_factor)
    return 2 if loaded.weight_bytes >= BATCH_WEIGHT_BYTES_PER_PIXEL * pixels else 1


def _chunks(items: Iterator, n: int) -> Iterator[list]:
    """Consecutive lists of ``n`` items (the last one may be shorter)."""
    chunk: list = []
    for item in items:
        chunk.append(item)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _then(items: Iterator, done) -> Iterator:
    """``items``, then a call to ``done()`` once they are exhausted."""
    yield from items
    done()


def segment_stack(engine, volume, params, *, axis: str = "xy", median_size: int = 3,
                  value_range=None, store=None, outputs: Iterator | None = None,
                  progress: Progress | None = None, overlap: bool | None = None,
                  workers: int | None = None, batch: int | None = None,
                  post: int | None = None, outputs_done=None,
                  to_host: bool | None = None) -> StackResult:
    """Infer, median-filter, post-process and match every slice along ``axis``.

    Parameters
    ----------
    engine : Engine2D
    volume : array-like (Z, Y, X)
        numpy, zarr or dask; read one slice at a time.
    params : Params2D (validated); its ``label_divisor`` is the 3D label divisor.
    axis : "xy", "xz" or "yz"
    median_size : odd int 1..11
    value_range : intensity range for non-uint8 volumes (see :func:`volume_intensity_range`)
    store : array-like (n, h, w) int32, optional
        Where matched slices go (a zarr array for big volumes); numpy if None.
    outputs : iterator, optional
        Model outputs ``(probs, ctr, off)`` per slice in order, when computed elsewhere
        (multi-process inference); by default the engine computes them.
    overlap : bool, optional
        Run the forward passes in a thread of their own, ahead of the post-processing.
        Default: on a GPU (the CPU work then hides behind the forward passes); off on a
        CPU, where the forward pass already uses every core and a second busy thread
        slowed 3D runs down by about 10 % on 2 cores. Slices are read ahead in any case.
    workers : int, optional
        On a CPU, run the forward passes of this many consecutive slices at once, in
        threads of their own, the intra-op threads (``torch.get_num_threads()``) shared
        among them; the post-processing then runs on one share too. Default
        :func:`slice_workers` (1 when ``overlap`` is given). With more than one worker the
        forward passes already run off this thread, and ``overlap`` is not used. The result
        equals that of one slice at a time up to the floating-point summation order of the
        model's kernels.
    batch : int, optional
        Run this many consecutive slices through the model in one call
        (:meth:`Engine2D.outputs_batch`). Default :func:`slice_batch` with more than one
        worker, else 1. The result again equals that of one slice at a time.
    post : int, optional
        Post-process this many consecutive slices at once, in threads of their own (the
        matching stays in order, in this thread). Default :func:`post_workers`: several on
        a GPU, 1 on a CPU. The result is the same whatever the count.
    outputs_done : callable(), optional
        Called once the model outputs of the last slice are computed, while the last
        slices may still be post-processed and matched: the device is free for other work
        from then on (an ortho-plane run starts its next stack). It runs in the thread
        that computes the outputs with ``overlap``, else in the calling thread.
    to_host : bool, optional
        Copy each slice's model outputs to the CPU in the thread that computes them, so
        that the post-processing runs on the CPU (``outputs`` given too are copied, in the
        thread that reads them). Default :func:`outputs_to_host`: on a GPU.

    Returns
    -------
    StackResult
    """
    a = AXES[axis]
    n = volume.shape[a]
    h, w = slice_shape(volume.shape, a)
    if store is None:
        store = np.zeros((n, h, w), dtype=np.int32)
    prog = ensure_progress(progress)
    div = params.label_divisor
    things = [] if params.semantic_only else list(engine.thing_list)

    def slices():  # numpy only: see the note on CPU threads in pipeline.ahead
        for i in range(n):
            yield pre.check_image_2d(read_slice(volume, a, i), f"slice {i}")

    def forward(images, wait=True):  # `batch` consecutive slices (fewer at the end) in one call
        return engine.outputs_batch([pre.to_unit_range(im, value_range) for im in images], params, wait)

    if outputs is not None:
        workers = batch = 1
    elif workers is None:
        workers = 1 if overlap is not None else slice_workers(engine, (h, w), params)
    if batch is None:
        batch = slice_batch(engine, (h, w), params) if workers > 1 else 1
    if batch < 1 or workers < 1:
        raise ValueError(f"workers and batch must be at least 1, not {workers} and {batch}")
    threads = torch.get_num_threads()
    share = max(1, threads // workers)
    to_host = outputs_to_host(engine) if to_host is None else to_host

    def model_outputs():
        images = ahead(slices(), name=f"panoptem-read-{axis}")
        groups = _chunks(images, batch)
        if workers > 1:
            results = ordered_map(forward, groups, workers, name=f"panoptem-model-{axis}",
                                  initializer=lambda: torch.set_num_threads(share))
        elif to_host:  # each forward pass is queued before the outputs of the one before are read
            results = _queued(forward, groups, engine.device)
        else:
            results = map(forward, groups)
        try:
            for outs in results:
                yield from outs
        finally:  # stops the pool's threads (ordered_map) and the read-ahead thread
            if hasattr(results, "close"):
                results.close()
            images.close()

    prog.stage(f"stack {axis}", n)
    next_label = {c: c * div + 1 for c in things}
    if overlap is None:
        overlap = engine.device.type != "cpu"
    if outputs is None:
        source = model_outputs()
    else:  # copied in the thread that reads them
        source = _on_host(outputs, engine.device) if to_host else outputs
    if outputs_done is not None:
        source = _then(source, outputs_done)
    # with overlap, the forward passes run ahead while the loop below post-processes
    source = ahead(source, name=f"panoptem-model-{axis}") if overlap and workers == 1 else iter(source)
    if workers > 1:
        torch.set_num_threads(share)  # this thread's post-processing takes one share
    post = post_workers(engine) if post is None else post
    if post < 1:
        raise ValueError(f"post must be at least 1, not {post}")

    def panoptic(item):  # the post-processing threads also index each slice's objects
        return _indexed(*engine.panoptic_codes(*item, params, (h, w)))

    filtered = median_filtered(source, median_size)
    pans = (ordered_map(panoptic, filtered, post, name=f"panoptem-post-{axis}") if post > 1
            else map(panoptic, filtered))
    # per slice: its objects (ids, counts, boxes), their forward ids, and the pairs it shares
    # with the slice before; the backward pass needs nothing else
    slices_seen: list[tuple[_Objects, np.ndarray, tuple]] = []
    first, no_pairs = np.zeros(1, np.int64), (np.zeros(0, np.int64),) * 3  # nothing before
    try:
        prev = prev_ids = None
        for i, obj in enumerate(pans):
            if prev is None:  # the first slice: its objects keep their ids
                target, target_counts, pairs = first, first, no_pairs
                obj.counts = _counts(obj)
            else:
                target, target_counts = prev_ids, prev.counts
                pairs, obj.counts = _touching(prev, obj)
                prev.codes = None
            ids = _match_step(target, target_counts, obj.ids, obj.counts, pairs, things, div,
                              next_label, assign_new=True)
            store[i] = np.take(ids.astype(np.int32), obj.codes)
            slices_seen.append((obj, ids, pairs))
            prev, prev_ids = obj, ids
            prog.advance()
    finally:  # on an error or a cancelled run: stop the threads before returning
        if hasattr(pans, "close"):
            pans.close()
        if hasattr(source, "close"):
            source.close()
        if workers > 1:  # also the count that threads started later begin with
            torch.set_num_threads(threads)
        release_free_memory()  # the forward passes' activations, freed in their threads' arenas

    # Backward pass: each slice matched to the next one, already matched, without new ids.
    # It works on the forward pass's tables; only slices whose ids change are rewritten.
    prog.stage(f"matching {axis}", n)
    after = None  # the next slice's objects, its final ids and the pairs it shares with this one
    final = []  # (slice, its objects' final ids, counts, boxes), last slice first
    for i in range(n - 1, -1, -1):
        obj, ids, pairs = slices_seen[i]
        if after is not None:
            nxt, nxt_ids, (here, there, shared) = after
            # Where every pair of touching objects already has one id, the rule keeps every
            # id: each object touches only its namesake, the one pairing it can get, and
            # one that pairs with nothing keeps its id. Most slices are so (tables only).
            if not np.array_equal(nxt_ids[there], ids[here]):
                matched = _match_step(nxt_ids, nxt.counts, ids, obj.counts,
                                      (there, here, shared), things, div, next_label,
                                      assign_new=False)
                changed = matched != ids
                if changed.any():
                    store[i] = _relabel(store[i], ids[changed], matched[changed])
                ids = matched
        final.append((i, ids, obj.counts, obj.boxes))
        after = (obj, ids, pairs)
        prog.advance()
    return StackResult(axis, store, div, _stats_table(final))
