"""Proofreading: merge, delete, split, morph, filter, count, find and number labels.

Pure functions on label arrays (numpy, or zarr / dask for big volumes), usable from a script,
the napari console or the widgets. The editing tools (merge, delete, split, morph) do not
write anything: they return a :class:`Change`, the coordinates of the voxels that change and
their new values. :func:`apply_change` writes it into an array; the napari widgets hand it
to ``Labels.data_setitem`` so that one edit is one step of napari's undo history.

Where an edit acts:

- ``points`` are coordinates in the array's own index space (napari widgets convert world
  coordinates with the layer's scale and translate first); the label under each point is
  the one acted on, background (0) is ignored.
- ``plane_axes`` are the axes fixed at each point's coordinate: ``()`` acts on whole objects
  (2D images, or 3D with "Apply in 3D"); ``(0,)`` on the 2D plane through each point of a
  3D volume; ``(0, 1)`` on the frame of each point of a 4D flipbook stack.

Speed on big volumes comes from :class:`LabelBoxes`: a box around every label, built once
in one pass over the array and grown by every edit, so an edit reads and writes only the
boxes of the labels it touches, not the volume.
"""

from __future__ import annotations

import csv
import functools
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import fastremap
import numpy as np
from scipy import ndimage as ndi

from panoptem._files import write_atomic
from panoptem.errors import PanoptemError

__all__ = [
    "Change",
    "LabelBoxes",
    "apply_change",
    "labels_at",
    "ids_along_paths",
    "merge_labels",
    "delete_labels",
    "split_labels",
    "morph_labels",
    "MORPH_OPERATIONS",
    "locate_label",
    "LabelLocation",
    "available_labels",
    "used_labels",
    "filter_labels",
    "FILTER_SCOPES",
    "count_labels",
    "labels_per_class",
    "parse_class_names",
    "write_counts_csv",
]

MORPH_OPERATIONS = ("Dilate", "Erode", "Close", "Open", "Fill holes")
FILTER_SCOPES = ("Current image", "2D patches", "3D image or z-stack")


# --------------------------------------------------------------------------------------
# changes and boxes
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Change:
    """Voxels to set: ``labels[index] = value`` (one value per coordinate)."""

    index: tuple[np.ndarray, ...]
    value: np.ndarray

    @property
    def size(self) -> int:
        return int(self.value.size)

    def __bool__(self) -> bool:
        return self.size > 0

    @classmethod
    def empty(cls, ndim: int, dtype) -> Change:
        return cls(tuple(np.zeros(0, np.intp) for _ in range(ndim)), np.zeros(0, dtype))

    @classmethod
    def join(cls, parts: Sequence[Change], ndim: int, dtype) -> Change:
        """One change from several; where two parts set the same voxel, the later wins."""
        parts = [p for p in parts if p]
        if not parts:
            return cls.empty(ndim, dtype)
        index = tuple(np.concatenate([p.index[a] for p in parts]) for a in range(ndim))
        value = np.concatenate([p.value for p in parts]).astype(dtype, copy=False)
        if len(parts) > 1:
            shape = tuple(int(i.max()) + 1 for i in index)
            flat = np.ravel_multi_index(index, shape)
            # keep the last occurrence of each voxel
            _, last = np.unique(flat[::-1], return_index=True)
            keep = np.sort(flat.size - 1 - last)
            index = tuple(i[keep] for i in index)
            value = value[keep]
        return cls(index, value)


def apply_change(labels, change: Change) -> np.ndarray:
    """Write ``change`` into ``labels`` (numpy or zarr) and return the values it replaced."""
    if not change:
        return np.zeros(0, dtype=labels.dtype)
    if isinstance(labels, np.ndarray):
        before = labels[change.index].copy()
        labels[change.index] = change.value
        return before
    # zarr and other chunked arrays: read-modify-write the box of the change
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in change.index)
    region = np.asarray(labels[box])
    local = tuple(i - s.start for i, s in zip(change.index, box, strict=True))
    before = region[local].copy()
    region[local] = change.value
    labels[box] = region
    return before


class LabelBoxes:
    """A box around every label of an array, for edits that cost the size of their objects.

    Each box holds every voxel of its label; after edits a box may be larger than its
    label (that only costs time, never correctness). Build it with :meth:`of` (one pass
    over the array, slab by slab, so a zarr volume is never loaded whole) and keep it true
    with :meth:`record` for every change written to the array. A label that is not in the
    boxes is not in the array.
    """

    def __init__(self, shape: Sequence[int], lo: dict[int, np.ndarray], hi: dict[int, np.ndarray]):
        self.shape = tuple(int(s) for s in shape)
        self._lo = lo
        self._hi = hi

    @classmethod
    def of(cls, labels, slab_voxels: int = 1 << 25) -> LabelBoxes:
        """Boxes of every non-zero label of ``labels`` (numpy, zarr or dask)."""
        shape = tuple(int(s) for s in labels.shape)
        lo: dict[int, np.ndarray] = {}
        hi: dict[int, np.ndarray] = {}
        if not shape or math.prod(shape) == 0:
            return cls(shape, lo, hi)
        plane = max(1, math.prod(shape[1:]))
        step = max(1, slab_voxels // plane)
        for z0 in range(0, shape[0], step):
            slab = np.asarray(labels[z0 : z0 + step])
            if not slab.any():
                continue
            top = int(slab.max())
            if np.issubdtype(slab.dtype, np.integer) and 0 < top <= 1 << 16 and slab.min() >= 0:
                # small ids (panoptic outputs): find_objects on the labels themselves is fastest
                ids = np.arange(top + 1, dtype=np.int64)
                found = ndi.find_objects(slab)
            else:
                renumbered, mapping = fastremap.renumber(slab, in_place=False, preserve_zero=True)
                ids = np.zeros(len(mapping) + 1, dtype=np.int64)
                for original, new in mapping.items():
                    ids[new] = original
                found = ndi.find_objects(renumbered)
            for k, box in enumerate(found, start=1):
                if box is None or ids[k] == 0:
                    continue
                start = np.array([s.start for s in box], dtype=np.int64)
                stop = np.array([s.stop for s in box], dtype=np.int64)
                start[0] += z0
                stop[0] += z0
                cls._grow(lo, hi, int(ids[k]), start, stop)
        return cls(shape, lo, hi)

    def refresh(self, labels) -> None:
        """Build the boxes again from ``labels`` (after it changed behind their back)."""
        fresh = LabelBoxes.of(labels)
        self.shape, self._lo, self._hi = fresh.shape, fresh._lo, fresh._hi

    @staticmethod
    def _grow(lo, hi, label: int, start: np.ndarray, stop: np.ndarray) -> None:
        if label in lo:
            np.minimum(lo[label], start, out=lo[label])
            np.maximum(hi[label], stop, out=hi[label])
        else:
            lo[label] = start.copy()
            hi[label] = stop.copy()

    def record(self, index: Sequence[np.ndarray], value) -> None:
        """Grow the boxes for voxels at ``index`` set to ``value`` (one value or one each)."""
        if len(index) == 0 or np.size(index[0]) == 0:
            return
        coords = np.stack([np.asarray(i, dtype=np.int64).ravel() for i in index], axis=1)
        value = np.asarray(value).ravel()
        if value.size == 1:
            label = int(value[0])
            if label:
                self._grow(self._lo, self._hi, label, coords.min(0), coords.max(0) + 1)
            return
        for label in fastremap.unique(value):
            if label:
                pts = coords[value == label]
                self._grow(self._lo, self._hi, int(label), pts.min(0), pts.max(0) + 1)

    def record_box(self, box: Sequence[slice], labels: Iterable[int]) -> None:
        """Grow the boxes of ``labels`` to include ``box`` (slices)."""
        start = np.array([s.start for s in box], dtype=np.int64)
        stop = np.array([s.stop for s in box], dtype=np.int64)
        for label in labels:
            if label:
                self._grow(self._lo, self._hi, int(label), start, stop)

    def box(self, label: int) -> tuple[slice, ...] | None:
        """The box of ``label`` as slices, or None when the label is not in the array."""
        label = int(label)
        if label not in self._lo:
            return None
        return tuple(slice(int(a), int(b)) for a, b in zip(self._lo[label], self._hi[label], strict=True))

    def __contains__(self, label) -> bool:
        return int(label) in self._lo

    @property
    def ids(self) -> np.ndarray:
        """Every label that may be in the array, sorted."""
        return np.array(sorted(self._lo), dtype=np.int64)

    @property
    def max_id(self) -> int:
        """The largest label that may be in the array (0 for none)."""
        return max(self._lo, default=0)

    def holds(self, label: int, point: Sequence[int]) -> bool:
        """Whether ``point`` lies in the box of ``label`` (a cheap check that the boxes are current)."""
        label = int(label)
        if label not in self._lo:
            return False
        p = np.asarray(point, dtype=np.int64)
        return bool(np.all(p >= self._lo[label]) and np.all(p < self._hi[label]))


# --------------------------------------------------------------------------------------
# points and where an edit acts
# --------------------------------------------------------------------------------------
def _points(labels, points) -> np.ndarray:
    """Points as integer voxel coordinates, refused when outside the array."""
    pts = np.asarray(points, dtype=float)
    if pts.size == 0:
        return np.zeros((0, labels.ndim), dtype=np.int64)
    pts = np.atleast_2d(pts)
    if pts.shape[1] != labels.ndim:
        raise PanoptemError(
            f"the points have {pts.shape[1]} coordinates but the labels are {labels.ndim}D: "
            "use a points layer made for these labels"
        )
    coords = np.round(pts).astype(np.int64)
    shape = np.asarray(labels.shape)
    outside = np.any((coords < 0) | (coords >= shape), axis=1)
    if outside.any():
        p = pts[np.argmax(outside)]
        raise PanoptemError(
            f"the point at {tuple(round(float(c), 1) for c in p)} lies outside the labels "
            f"(shape {tuple(labels.shape)}): move or delete it"
        )
    return coords


def labels_at(labels, points) -> np.ndarray:
    """The label under each point (points in the array's index space)."""
    coords = _points(labels, points)
    if len(coords) == 0:
        return np.zeros(0, dtype=labels.dtype)
    if isinstance(labels, np.ndarray):
        return labels[tuple(coords.T)]
    return np.array([np.asarray(labels[tuple(int(c) for c in p)]) for p in coords], dtype=labels.dtype)


def ids_along_paths(labels, paths: Iterable[np.ndarray]) -> np.ndarray:
    """Coordinates of labelled voxels under the segments of each path (lines, polylines).

    A path is an (n, ndim) array of vertices in the array's index space; its segments are
    drawn in the two last axes (the displayed plane), the other coordinates come from the
    first vertex. Returns the (m, ndim) coordinates of the non-background voxels hit.
    """
    from skimage.draw import line

    hits = []
    shape = np.asarray(labels.shape)
    for path in paths:
        verts = np.round(np.asarray(path, dtype=float)).astype(np.int64)
        verts = np.clip(verts, 0, shape - 1)
        for a, b in zip(verts[:-1], verts[1:], strict=True):
            rr, cc = line(int(a[-2]), int(a[-1]), int(b[-2]), int(b[-1]))
            pts = np.zeros((rr.size, labels.ndim), dtype=np.int64)
            pts[:, :-2] = a[:-2]
            pts[:, -2], pts[:, -1] = rr, cc
            hits.append(pts)
    if not hits:
        return np.zeros((0, labels.ndim), dtype=np.int64)
    pts = np.unique(np.concatenate(hits), axis=0)
    return pts[labels_at(labels, pts) != 0]


def _check_plane_axes(labels, plane_axes: Sequence[int]) -> tuple[int, ...]:
    axes = tuple(sorted(int(a) for a in plane_axes))
    if any(a < 0 or a >= labels.ndim for a in axes) or len(set(axes)) != len(axes):
        raise PanoptemError(f"plane axes {plane_axes} do not fit {labels.ndim}D labels")
    if labels.ndim - len(axes) < 2 and axes:
        raise PanoptemError("an edit in planes needs at least two free axes")
    return axes


def _boxes_for(labels, boxes: LabelBoxes | None) -> LabelBoxes:
    if boxes is None:
        return LabelBoxes.of(labels)
    if tuple(boxes.shape) != tuple(labels.shape):
        raise PanoptemError(
            f"the label boxes were made for shape {boxes.shape}, not {tuple(labels.shape)}: "
            "make them for these labels with LabelBoxes.of(labels)"
        )
    return boxes


def _region(box: tuple[slice, ...], plane_axes: tuple[int, ...], where: Sequence[int] | None):
    """``box`` limited to the plane through ``where`` on ``plane_axes`` (None when disjoint)."""
    region = list(box)
    for a in plane_axes:
        c = int(where[a])
        if not box[a].start <= c < box[a].stop:
            return None
        region[a] = slice(c, c + 1)
    return tuple(region)


def _voxels_of(labels, label: int, region: tuple[slice, ...]) -> tuple[np.ndarray, ...]:
    sub = np.asarray(labels[region])
    local = np.nonzero(sub == label)
    return tuple(i + s.start for i, s in zip(local, region, strict=True))


def _sites(labels, points, plane_axes, boxes: LabelBoxes):
    """(coords, ids) of the points on labels, and the planes they fix; checks the boxes."""
    coords = _points(labels, points)
    ids = labels_at(labels, coords)
    on = ids != 0
    coords, ids = coords[on], ids[on]
    for p, label in zip(coords, ids, strict=True):
        if not boxes.holds(label, p):
            raise _StaleBoxes
    planes = sorted({tuple(int(p[a]) for a in plane_axes) for p in coords})
    return coords, ids, planes


class _StaleBoxes(Exception):
    """The boxes do not hold a label seen in the array: the array changed behind them."""


def _with_fresh_boxes(fn):
    """Run ``fn(boxes)``; if the boxes turn out stale, rebuild them once and run again."""

    def run(labels, boxes):
        boxes = _boxes_for(labels, boxes)
        try:
            return fn(boxes), boxes
        except _StaleBoxes:
            boxes.refresh(labels)
            return fn(boxes), boxes

    return run


def _plane_point(plane_axes, plane, ndim) -> list[int]:
    where = [0] * ndim
    for a, c in zip(plane_axes, plane, strict=True):
        where[a] = c
    return where


def _replace(labels, ids, value, plane_axes, planes, boxes: LabelBoxes) -> Change:
    """Every voxel of ``ids`` (whole, or in each of ``planes``) set to ``value``."""
    parts = []
    for label in ids:
        box = boxes.box(label)
        if box is None:
            continue
        for plane in planes if plane_axes else [()]:
            region = _region(box, plane_axes, _plane_point(plane_axes, plane, labels.ndim))
            if region is None:
                continue
            index = _voxels_of(labels, label, region)
            parts.append(Change(index, np.full(index[0].size, value, dtype=labels.dtype)))
    return Change.join(parts, labels.ndim, labels.dtype)


# --------------------------------------------------------------------------------------
# merge, delete
# --------------------------------------------------------------------------------------
def merge_labels(
    labels,
    points,
    *,
    target: int | None = None,
    plane_axes: Sequence[int] = (),
    boxes: LabelBoxes | None = None,
) -> Change:
    """Merge the labels under ``points`` into one.

    The merged label is ``target`` when it is among them (napari's selected label), else
    the smallest. With ``plane_axes`` the merge happens only in the planes of the points.
    Raises PanoptemError when the points hit fewer than two labels.
    """
    axes = _check_plane_axes(labels, plane_axes)

    def run(boxes):
        _, ids, planes = _sites(labels, points, axes, boxes)
        found = np.unique(ids)
        if found.size < 2:
            raise PanoptemError(
                "Merge needs points (or lines) on at least two different labels; "
                f"they hit {found.size}: {found.tolist()}"
            )
        keep = int(target) if target is not None and int(target) in found else int(found.min())
        others = [int(i) for i in found if i != keep]
        return _replace(labels, others, keep, axes, planes, boxes), keep

    (change, _keep), boxes = _with_fresh_boxes(run)(labels, boxes)
    return change


def delete_labels(
    labels,
    points,
    *,
    plane_axes: Sequence[int] = (),
    boxes: LabelBoxes | None = None,
) -> Change:
    """Set the labels under ``points`` to background (in the points' planes with ``plane_axes``).

    Raises PanoptemError when every point is on background.
    """
    axes = _check_plane_axes(labels, plane_axes)

    def run(boxes):
        _, ids, planes = _sites(labels, points, axes, boxes)
        found = np.unique(ids)
        if found.size == 0:
            raise PanoptemError("Delete needs points on labels; every point is on background")
        return _replace(labels, [int(i) for i in found], 0, axes, planes, boxes)

    change, _ = _with_fresh_boxes(run)(labels, boxes)
    return change


# --------------------------------------------------------------------------------------
# split
# --------------------------------------------------------------------------------------
def _split_object(mask: np.ndarray, markers_at: np.ndarray | None, min_distance: int) -> np.ndarray:
    """Watershed pieces (1..n) of a binary object: distance peaks, or the given marker voxels."""
    from skimage.feature import peak_local_max
    from skimage.segmentation import watershed

    squeeze = tuple(a for a in range(mask.ndim) if mask.shape[a] == 1)
    m = np.squeeze(mask, axis=squeeze) if squeeze else mask
    if markers_at is None:
        distance = ndi.distance_transform_edt(m)
        peaks = peak_local_max(
            distance, min_distance=int(min_distance), labels=m.astype(np.uint8), exclude_border=False
        )
        seeds = np.zeros(m.shape, dtype=bool)
        seeds[tuple(peaks.T)] = True
        markers, _ = ndi.label(seeds)
        pieces = watershed(-distance, markers, mask=m)
    else:
        pts = np.delete(markers_at, squeeze, axis=1) if squeeze else markers_at
        markers = np.zeros(m.shape, dtype=np.int32)
        for k, p in enumerate(pts, start=1):
            markers[tuple(p)] = k
        pieces = watershed(np.zeros(m.shape, dtype=np.uint8), markers, mask=m)
    if squeeze:
        pieces = np.expand_dims(pieces, axis=squeeze)
    return pieces


def split_labels(
    labels,
    points,
    *,
    min_distance: int = 10,
    points_as_markers: bool = False,
    start_label: int | None = None,
    plane_axes: Sequence[int] = (),
    boxes: LabelBoxes | None = None,
) -> Change:
    """Split the labels under ``points`` into pieces, each with a new, unused label.

    Pieces come from a watershed of the object: from the peaks of its distance transform
    at least ``min_distance`` apart, or with ``points_as_markers`` from the points on it
    (one piece per point). New labels follow the largest label in the whole array, or
    start at ``start_label``; labels in use anywhere are refused. With ``plane_axes`` only
    the object's part in each point's plane is split.
    """
    axes = _check_plane_axes(labels, plane_axes)
    if int(min_distance) < 1:
        raise PanoptemError("Minimum Distance must be at least 1")

    def run(boxes):
        coords, ids, _ = _sites(labels, points, axes, boxes)
        if ids.size == 0:
            raise PanoptemError("Split needs points on labels; every point is on background")
        groups: dict[tuple, list[np.ndarray]] = {}
        for p, label in zip(coords, ids, strict=True):
            key = (int(label), tuple(int(p[a]) for a in axes))
            groups.setdefault(key, []).append(p)
        pieces_found = []
        for (label, plane), pts in groups.items():
            region = _region(boxes.box(label), axes, _plane_point(axes, plane, labels.ndim))
            mask = np.asarray(labels[region]) == label
            start = np.array([s.start for s in region])
            markers = None
            if points_as_markers:  # one marker per distinct point, in the points' order
                local = np.array(pts) - start
                _, first_seen = np.unique(local, axis=0, return_index=True)
                markers = local[np.sort(first_seen)]
            pieces = _split_object(mask, markers, min_distance)
            n = int(pieces.max())
            if n >= 2:
                pieces_found.append((region, pieces, n))
        if not pieces_found:
            how = "points" if points_as_markers else f"Minimum Distance {min_distance}"
            raise PanoptemError(
                f"Nothing to split: with {how} each object gives one piece "
                + ("(put two or more points on an object)" if points_as_markers else "(lower Minimum Distance)")
            )
        total = sum(n for _, _, n in pieces_found)
        first = boxes.max_id + 1 if start_label is None else int(start_label)
        if first < 1:
            raise PanoptemError("Start new label IDs from must be a positive number")
        limit = np.iinfo(labels.dtype).max if np.issubdtype(labels.dtype, np.integer) else 2**53
        if first + total - 1 > limit:
            raise PanoptemError(f"new labels up to {first + total - 1} do not fit the labels' {labels.dtype}")
        new_ids = np.arange(first, first + total, dtype=np.int64)
        taken = np.intersect1d(new_ids, boxes.ids)
        if taken.size:
            raise PanoptemError(
                f"labels {taken[:10].tolist()} are already in use: start new label IDs from "
                f"{boxes.max_id + 1} or leave the start empty"
            )
        parts, offset = [], first - 1
        for region, pieces, n in pieces_found:
            local = np.nonzero(pieces)
            index = tuple(i + s.start for i, s in zip(local, region, strict=True))
            parts.append(Change(index, (pieces[local].astype(np.int64) + offset).astype(labels.dtype)))
            offset += n
        return Change.join(parts, labels.ndim, labels.dtype)

    change, _ = _with_fresh_boxes(run)(labels, boxes)
    return change


# --------------------------------------------------------------------------------------
# morph
# --------------------------------------------------------------------------------------
def _footprint(ndim: int, radius: int) -> np.ndarray:
    from skimage.morphology import ball, disk

    fp = disk(radius) if ndim == 2 else ball(radius)
    return fp.astype(bool)


def morph_labels(
    labels,
    operation: str,
    *,
    points=None,
    radius: int = 1,
    hole_size: int = 64,
    plane_axes: Sequence[int] = (),
    planes: Sequence[Sequence[int]] = (),
    boxes: LabelBoxes | None = None,
) -> Change:
    """Dilate, erode, close, open or fill the holes of labels.

    Acts on the labels under ``points``, or on every label when there are none. With
    ``plane_axes`` it works plane by plane: in each point's plane, or without points in
    ``planes`` (the viewer's current plane). Dilate, close and fill grow a label only into
    background, never over another label; fill holes fills holes up to ``hole_size``
    voxels. The structuring element is a disk (2D work) or ball (3D) of ``radius``.
    """
    if operation not in MORPH_OPERATIONS:
        raise PanoptemError(f"unknown operation {operation!r}: choose one of {', '.join(MORPH_OPERATIONS)}")
    radius = int(radius)
    if not 1 <= radius <= 7 and operation != "Fill holes":
        raise PanoptemError("Radius must be between 1 and 7")
    if operation == "Fill holes" and int(hole_size) < 1:
        raise PanoptemError("Hole size must be a positive number of pixels")
    axes = _check_plane_axes(labels, plane_axes)
    pad = 0 if operation == "Fill holes" else radius

    def run(boxes):
        if points is not None and np.size(points):
            _, ids, site_planes = _sites(labels, points, axes, boxes)
            ids = np.unique(ids)
            if ids.size == 0:
                raise PanoptemError("Morph needs points on labels; every point is on background")
            todo_planes = site_planes
        else:
            ids = boxes.ids
            todo_planes = sorted({tuple(int(c) for c in p) for p in planes}) if axes else []
            if axes and not todo_planes:
                raise PanoptemError(
                    "morphing every label plane by plane needs the plane to work in: pass "
                    "planes=[(index,)] (or points on the labels to morph)"
                )
        parts, claimed = [], np.zeros(0, dtype=np.int64)
        for label in ids:
            box = boxes.box(label)
            if box is None:
                continue
            grown = tuple(
                slice(max(0, s.start - pad), min(n, s.stop + pad)) for s, n in zip(box, labels.shape, strict=True)
            )
            for plane in todo_planes if axes else [()]:
                region = _region(grown, axes, _plane_point(axes, plane, labels.ndim))
                if region is None:
                    continue
                change = _morph_one(labels, int(label), region, operation, radius, int(hole_size), axes)
                if not change:
                    continue
                if change.value.size and change.value[0] != 0:
                    flat = np.ravel_multi_index(change.index, labels.shape)
                    free = ~np.isin(flat, claimed)
                    claimed = np.concatenate([claimed, flat[free]])
                    change = Change(tuple(i[free] for i in change.index), change.value[free])
                parts.append(change)
        return Change.join(parts, labels.ndim, labels.dtype)

    change, _ = _with_fresh_boxes(run)(labels, boxes)
    return change


def _morph_one(labels, label, region, operation, radius, hole_size, axes) -> Change:
    from skimage.morphology import remove_small_holes

    sub = np.asarray(labels[region])
    squeeze = tuple(axes)
    work = np.squeeze(sub, axis=squeeze) if squeeze else sub
    mask = work == label
    if not mask.any():
        return Change.empty(labels.ndim, labels.dtype)
    if operation == "Fill holes":
        # holes of up to hole_size voxels (skimage 0.26 renamed area_threshold to max_size)
        key = "max_size" if _has_max_size() else "area_threshold"
        filled = remove_small_holes(mask, **{key: hole_size})
        changed, value = filled & ~mask & (work == 0), label
    else:
        fp = _footprint(work.ndim, radius)
        # pad so the array edge does not act as background (a label touching it stays there)
        padded = np.pad(mask, radius, mode="edge")
        inner = tuple(slice(radius, radius + n) for n in mask.shape)
        if operation == "Dilate":
            out = ndi.binary_dilation(padded, fp)[inner]
            changed, value = out & ~mask & (work == 0), label
        elif operation == "Close":
            out = ndi.binary_closing(padded, fp)[inner]
            changed, value = out & ~mask & (work == 0), label
        elif operation == "Erode":
            out = ndi.binary_erosion(padded, fp)[inner]
            changed, value = mask & ~out, 0
        else:  # Open
            out = ndi.binary_opening(padded, fp)[inner]
            changed, value = mask & ~out, 0
    if squeeze:
        changed = np.expand_dims(changed, axis=squeeze)
    local = np.nonzero(changed)
    index = tuple(i + s.start for i, s in zip(local, region, strict=True))
    return Change(index, np.full(index[0].size, value, dtype=labels.dtype))


@functools.cache
def _has_max_size() -> bool:
    import inspect

    from skimage.morphology import remove_small_holes

    return "max_size" in inspect.signature(remove_small_holes).parameters


# --------------------------------------------------------------------------------------
# find, number
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LabelLocation:
    """Where a label is: its box, the index along each axis where it has most voxels, its centre."""

    label: int
    box: tuple[slice, ...]
    best: tuple[int, ...]
    centre: tuple[float, ...]
    voxels: int


def locate_label(labels, label: int, *, boxes: LabelBoxes | None = None) -> LabelLocation:
    """Find ``label``: raises PanoptemError when it is not in the array."""
    label = int(label)
    boxes = _boxes_for(labels, boxes)
    box = boxes.box(label)
    index = _voxels_of(labels, label, box) if box is not None else ()
    if box is None or index[0].size == 0:
        raise PanoptemError(f"label {label} does not exist in these labels: check the Label ID")
    tight = tuple(slice(int(i.min()), int(i.max()) + 1) for i in index)
    best = tuple(int(np.bincount(i).argmax()) for i in index)
    centre = tuple(float(i.mean()) for i in index)
    return LabelLocation(label, tight, best, centre, int(index[0].size))


def used_labels(labels, *, boxes: LabelBoxes | None = None) -> np.ndarray:
    """Sorted non-zero labels of ``labels`` (whole array: from the boxes when given)."""
    if boxes is not None and tuple(boxes.shape) == tuple(labels.shape):
        return boxes.ids
    if isinstance(labels, np.ndarray):
        used = fastremap.unique(labels)
    else:
        parts = [fastremap.unique(np.asarray(labels[z : z + 16])) for z in range(0, labels.shape[0], 16)]
        used = np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)
    used = np.asarray(used, dtype=np.int64)
    return used[used != 0]


def available_labels(used: np.ndarray, class_id: int, label_divisor: int) -> Iterator[int]:
    """Labels of class ``class_id`` not in ``used``, in increasing order.

    A class's labels are ``class_id * label_divisor + 1`` to ``(class_id + 1) * label_divisor
    - 1``, the panoptic numbering of the models' outputs.
    """
    class_id, label_divisor = int(class_id), int(label_divisor)
    if label_divisor < 2:
        raise PanoptemError("Label Divisor must be at least 2")
    if class_id < 0:
        raise PanoptemError("Class ID must be 0 or more")
    lo, hi = class_id * label_divisor + 1, (class_id + 1) * label_divisor
    used = np.asarray(used, dtype=np.int64)
    taken = used[(used >= lo) & (used < hi)]
    nxt = lo
    for t in np.unique(taken):
        while nxt < t:
            yield nxt
            nxt += 1
        nxt = int(t) + 1
    while nxt < hi:
        yield nxt
        nxt += 1


# --------------------------------------------------------------------------------------
# filter, count
# --------------------------------------------------------------------------------------
def _filter_2d_or_3d(labels: np.ndarray, min_area: int | None, border: bool) -> tuple[np.ndarray, list[int]]:
    if border:
        from skimage.segmentation import clear_border

        kept = clear_border(labels)
        before = fastremap.unique(labels)
        after = fastremap.unique(kept)
        removed = np.setdiff1d(before, after)
        return kept, [int(i) for i in removed if i]
    ids, counts = fastremap.unique(labels, return_counts=True)
    small = ids[(counts <= int(min_area)) & (ids != 0)]
    if small.size == 0:
        return labels.copy(), []
    kept = labels.copy()
    kept[np.isin(labels, small)] = 0
    return kept, [int(i) for i in small]


def filter_labels(
    labels,
    *,
    min_area: int | None = 100,
    border: bool = False,
    apply_to: str = "3D image or z-stack",
    plane: int = 0,
) -> tuple[np.ndarray, list[int]]:
    """A copy of ``labels`` without the small labels, or without those touching the border.

    Removes labels of ``min_area`` voxels or fewer (the original's rule), or with
    ``border`` the labels that touch the edge of the image. ``apply_to`` is one of
    :data:`FILTER_SCOPES`: the plane ``plane`` of a stack ("Current image"), each 2D plane
    on its own ("2D patches"), or the whole array. Returns the copy and the labels removed.
    """
    if apply_to not in FILTER_SCOPES:
        raise PanoptemError(f"Apply to must be one of {', '.join(FILTER_SCOPES)}")
    if not border and (min_area is None or int(min_area) < 1):
        raise PanoptemError("Minimum pixel/voxel area must be at least 1")
    arr = np.array(labels)
    if arr.ndim not in (2, 3):
        raise PanoptemError(f"Filter Labels works on 2D images and 3D stacks, not {arr.ndim}D labels")
    if apply_to == "3D image or z-stack" and arr.ndim != 3:
        raise PanoptemError("'3D image or z-stack' needs 3D labels: choose 'Current image' for a 2D image")
    if apply_to == "Current image" and arr.ndim == 3:
        if not 0 <= int(plane) < arr.shape[0]:
            raise PanoptemError(f"plane {plane} is outside the stack of {arr.shape[0]}")
        arr[int(plane)], removed = _filter_2d_or_3d(arr[int(plane)], min_area, border)
        return arr, removed
    if apply_to == "2D patches" and arr.ndim == 3:
        removed = []
        for z in range(arr.shape[0]):
            arr[z], r = _filter_2d_or_3d(arr[z], min_area, border)
            removed.extend(r)
        return arr, sorted(set(removed))
    return _filter_2d_or_3d(arr, min_area, border)


def parse_class_names(text: str) -> dict[int, str]:
    """The Count Labels "id,name" lines as {class id: name}; the original's placeholder is skipped."""
    names: dict[int, str] = {}
    for n, line in enumerate(str(text or "").splitlines(), start=1):
        line = line.strip()
        if not line or line.replace(" ", "") == "class_number,class_name":
            continue
        cid, sep, name = line.partition(",")
        if not sep or not cid.strip().lstrip("-").isdigit() or not name.strip():
            raise PanoptemError(f"line {n} {line!r} of the dataset labels is not 'class_number,class_name' (e.g. 1,Mito)")
        names[int(cid)] = name.strip()
    return names


def count_labels(
    labels,
    *,
    label_divisor: int | None = None,
    per_plane: bool = False,
    plane: int | None = None,
) -> list[dict]:
    """Labels and their voxel counts, by class.

    A label's class is ``label // label_divisor``; without a divisor every label is class 1.
    By default the whole array is counted; ``plane`` counts one plane of a stack ("Current
    image"), ``per_plane`` each plane on its own ("2D patches"). Returns one row per label:
    ``{"image": plane or None, "class_id", "label_id", "voxels"}``.
    """
    if label_divisor is not None and int(label_divisor) < 1:
        raise PanoptemError(f"The label divisor must be at least 1 (got {label_divisor}); leave it "
                            "out to count every label as class 1.")
    if plane is not None and labels.ndim > 2 and not 0 <= int(plane) < labels.shape[0]:
        raise PanoptemError(f"plane {plane} is outside the stack of {labels.shape[0]}")
    if per_plane and labels.ndim < 3:
        raise PanoptemError("'2D patches' needs a stack of 2D images (3D labels)")

    def rows(arr, image):
        ids, counts = fastremap.unique(np.asarray(arr), return_counts=True)
        out = []
        for i, c in zip(ids, counts, strict=True):
            if i == 0:
                continue
            cls = int(i) // int(label_divisor) if label_divisor else 1
            out.append({"image": image, "class_id": cls, "label_id": int(i), "voxels": int(c)})
        return out

    if per_plane:
        return [r for z in range(labels.shape[0]) for r in rows(labels[z], z)]
    if plane is not None and labels.ndim > 2:
        return rows(labels[int(plane)], int(plane))
    return rows(labels, None)


def labels_per_class(rows: list[dict]) -> dict[int, list[int]]:
    """The distinct label ids of :func:`count_labels` rows by class id, both sorted."""
    classes: dict[int, set[int]] = {}
    for r in rows:
        classes.setdefault(r["class_id"], set()).add(r["label_id"])
    return {cid: sorted(ids) for cid, ids in sorted(classes.items())}


def write_counts_csv(path, rows: list[dict], class_names: dict[int, str] | None = None) -> Path:
    """Write :func:`count_labels` rows as CSV (written whole, never half a file)."""
    import io as _io

    names = class_names or {}
    buf = _io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["image", "class_id", "class_name", "label_id", "voxels"])
    for r in rows:
        image = "" if r["image"] is None else r["image"]
        writer.writerow([image, r["class_id"], names.get(r["class_id"], ""), r["label_id"], r["voxels"]])
    path = Path(path)
    write_atomic(path, buf.getvalue().encode())
    return path
