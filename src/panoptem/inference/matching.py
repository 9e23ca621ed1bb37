"""Matching instances between neighbouring slices so an object keeps one id through a stack.

The rule (reference §6.2): objects of the new slice are paired one-to-one with objects of
the target slice by the Hungarian algorithm on IoU; a pair with IoU >= 0.25 takes the
target's id. A new object left unpaired whose intersection covers at least 25 % of its own
area (IoA) for some target object takes that object's id (it is merged into it). Any other
new object gets a fresh id (forward pass) or keeps its id (backward pass).
"""

from __future__ import annotations

import fastremap
import numpy as np
from scipy.optimize import linear_sum_assignment

from panoptem.overlap import overlaps

__all__ = ["match_slice", "match_objects"]

IOU_THR = 0.25
IOA_THR = 0.25


def match_slice(target: np.ndarray | None, labels: np.ndarray, next_label: int,
                assign_new: bool = True) -> tuple[np.ndarray, int]:
    """Relabel ``labels`` (one class of one slice) to agree with ``target``.

    Parameters
    ----------
    target : ndarray (H, W) or None
        The already matched previous slice (same class); None for the first slice, whose
        labels are returned unchanged.
    labels : ndarray (H, W) int
        The new slice's objects (connected components), 0 = background.
    next_label : int
        The id a new object receives when ``assign_new``; incremented per new object.
    assign_new : bool
        True in the forward pass; False in the backward pass (unmatched objects keep
        their ids).

    Returns
    -------
    (relabelled slice int32, next_label)
    """
    labels = np.asarray(labels)
    if target is None or not labels.any():
        return labels.astype(np.int32, copy=False), next_label
    table = overlaps(target, labels)
    new_ids, next_label = match_objects(table.ids_a, table.area_a, table.ids_b, table.area_b,
                                        table.dense(), next_label, assign_new)
    mapping = dict(zip(table.ids_b.tolist(), new_ids.tolist(), strict=True))
    mapping[0] = 0
    out = fastremap.remap(labels.astype(np.int32, copy=False), mapping, in_place=False)
    return out, next_label


def match_objects(ids_t: np.ndarray, area_t: np.ndarray, ids_n: np.ndarray, area_n: np.ndarray,
                  inter: np.ndarray, next_label: int, assign_new: bool = True) -> tuple[np.ndarray, int]:
    """The matching rule on the objects' areas and shared pixels instead of their images.

    Parameters
    ----------
    ids_t, area_t : ndarray (n,)
        The target slice's object ids (ascending) and pixel counts.
    ids_n, area_n : ndarray (m,)
        The new slice's object ids (ascending) and pixel counts.
    inter : ndarray (n, m) int
        Pixels each target object shares with each new object.
    next_label, assign_new : as :func:`match_slice`.

    Returns
    -------
    (ndarray (m,) int64: the id each new object takes, next_label)
    """
    new_ids = np.asarray(ids_n).astype(np.int64, copy=True)
    decided = np.zeros(len(new_ids), bool)
    if len(ids_t) and len(new_ids):
        iou = inter / (area_t[:, None] + area_n[None, :] - inter)
        rows, cols = linear_sum_assignment(iou, maximize=True)
        good = iou[rows, cols] >= IOU_THR
        new_ids[cols[good]] = ids_t[rows[good]]
        decided[cols[good]] = True
        ioa = inter / area_n[None, :]
        best = ioa.argmax(axis=0)
        merge = ~decided & (ioa[best, np.arange(len(new_ids))] >= IOA_THR)
        new_ids[merge] = ids_t[best[merge]]
        decided |= merge
    if assign_new:
        fresh = np.nonzero(~decided)[0]
        new_ids[fresh] = next_label + np.arange(len(fresh))
        next_label += len(fresh)
    return new_ids, next_label
