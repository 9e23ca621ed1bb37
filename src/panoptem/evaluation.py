"""Quality of a segmentation against ground truth: foreground IoU, instance F1 and PQ.

The measures are those empanada reports while training (reference §7.6) and that SPEC §7
names for judging results on real EM data:

* **foreground IoU** - |P ∩ G| / |P ∪ G| over all pixels, where P and G are the non-zero
  pixels of the prediction and of the ground truth;
* **instance F1** at an IoU threshold (0.5 by default) - predicted and true objects are
  paired one-to-one by the Hungarian algorithm maximising the summed IoU, and pairs whose
  IoU is at least the threshold count as true positives;
* **panoptic quality** PQ = SQ x RQ, with SQ the mean IoU of the matched pairs and
  RQ = TP / (TP + FP/2 + FN/2) (which equals F1).

All pixel counts come from one table of (true id, predicted id) pair counts built with a
single ``numpy.bincount`` over compacted ids, so no per-object masks are ever made.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from panoptem.errors import PanoptemError
from panoptem.io import as_label_image
from panoptem.overlap import connected_groups, overlaps
from panoptem.progress import Progress, ensure_progress

__all__ = ["Metrics", "evaluate", "evaluate_files"]

_VALID_CONNECTIVITY = {2: (4, 8), 3: (6, 18, 26)}
_DEFAULT_CONNECTIVITY = {2: 8, 3: 26}


@dataclass(frozen=True)
class Metrics:
    """Segmentation quality of a prediction against ground truth.

    Attributes
    ----------
    fg_iou : float
        Foreground IoU, |P ∩ G| / |P ∪ G| over all pixels (non-zero = foreground).
    f1 : float
        Instance F1 at IoU >= ``iou_thr``: 2 TP / (2 TP + FP + FN).
    precision : float
        TP / (TP + FP).
    recall : float
        TP / (TP + FN).
    pq : float
        Panoptic quality, sum of matched IoUs / (TP + FP/2 + FN/2) = ``sq * rq``.
    sq : float
        Segmentation quality, the mean IoU of the matched pairs.
    rq : float
        Recognition quality, TP / (TP + FP/2 + FN/2).
    tp, fp, fn : int
        Matched pairs, unmatched predicted objects, unmatched true objects.
    n_pred, n_gt : int
        Number of predicted and of true objects (summed over slices for a stack).
    iou_thr : float
        The IoU a pair needs to count as a match.
    matched_iou_sum : float
        Sum of the IoUs of the matched pairs (what PQ and SQ are made of).
    fg_intersection, fg_union : int
        Pixel counts behind ``fg_iou``.
    slices : tuple of Metrics
        For a stack evaluated with ``per_slice=True``, the metrics of each slice (in
        order); empty otherwise.

    Notes
    -----
    A ratio whose denominator is zero can only happen when there is nothing to compare on
    that side. Every ratio is then 1.0 when *both* the prediction and the ground truth are
    empty (nothing to find and nothing found) and 0.0 otherwise.
    """

    fg_iou: float
    f1: float
    precision: float
    recall: float
    pq: float
    sq: float
    rq: float
    tp: int
    fp: int
    fn: int
    n_pred: int
    n_gt: int
    iou_thr: float
    matched_iou_sum: float
    fg_intersection: int
    fg_union: int
    slices: tuple[Metrics, ...] = field(default=(), repr=False)

    def as_dict(self, include_slices: bool = False) -> dict:
        """The metrics as a flat dict of plain Python numbers.

        Parameters
        ----------
        include_slices : bool, default False
            Add a ``"slices"`` entry: a list with one such dict per slice (empty when the
            input was not evaluated per slice). Without it the dict suits a CSV row.

        Returns
        -------
        dict
            Field name to value; ``n_slices`` gives the number of slices (0 if none).
        """
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "slices"}
        out["n_slices"] = len(self.slices)
        if include_slices:
            out["slices"] = [s.as_dict() for s in self.slices]
        return out

    def summary(self) -> str:
        """A few lines of text for people: the three measures and the counts behind them."""
        where = f" over {len(self.slices)} slices" if self.slices else ""
        return "\n".join(
            [
                f"foreground IoU   {self.fg_iou:.4f}{where}",
                f"F1 @ IoU {self.iou_thr:g}   {self.f1:.4f}  (precision {self.precision:.4f}, "
                f"recall {self.recall:.4f}; TP {self.tp}, FP {self.fp}, FN {self.fn})",
                f"PQ               {self.pq:.4f}  (SQ {self.sq:.4f} x RQ {self.rq:.4f})",
                f"objects          {self.n_pred} predicted, {self.n_gt} true",
            ]
        )


# ----------------------------------------------------------------------------- helpers


def _ratio(num: float, den: float, both_empty: bool) -> float:
    if den > 0:
        return float(num) / float(den)
    return 1.0 if both_empty else 0.0


def _from_counts(
    tp: int,
    fp: int,
    fn: int,
    iou_sum: float,
    inter: int,
    union: int,
    iou_thr: float,
    slices: tuple[Metrics, ...] = (),
) -> Metrics:
    """Every measure from the raw counts (the same formulas for one image and for a stack)."""
    n_pred, n_gt = tp + fp, tp + fn
    empty = n_pred == 0 and n_gt == 0
    rq = _ratio(tp, tp + 0.5 * fp + 0.5 * fn, empty)
    sq = _ratio(iou_sum, tp, empty)
    return Metrics(
        fg_iou=_ratio(inter, union, union == 0),
        f1=rq,
        precision=_ratio(tp, n_pred, empty),
        recall=_ratio(tp, n_gt, empty),
        pq=_ratio(iou_sum, tp + 0.5 * fp + 0.5 * fn, empty),
        sq=sq,
        rq=rq,
        tp=int(tp),
        fp=int(fp),
        fn=int(fn),
        n_pred=int(n_pred),
        n_gt=int(n_gt),
        iou_thr=float(iou_thr),
        matched_iou_sum=float(iou_sum),
        fg_intersection=int(inter),
        fg_union=int(union),
        slices=slices,
    )


def _is_binary(a: np.ndarray) -> bool:
    """Exactly one non-zero value (a mask); an all-zero array counts as binary too."""
    if a.dtype == bool:
        return True
    nz = a[a != 0]
    if nz.size == 0:
        return True
    first = nz.flat[0]
    return bool(np.all(nz == first))


def _components(mask: np.ndarray, connectivity: int) -> tuple[np.ndarray, int]:
    import cc3d

    labels, n = cc3d.connected_components(
        np.ascontiguousarray(mask != 0), connectivity=connectivity, return_N=True
    )
    return labels, int(n)


def _compact(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Ids renumbered to 1..K (0 stays background); every distinct non-zero value is one id."""
    import fastremap

    if labels.dtype == bool:
        labels = labels.view(np.uint8)
    if not labels.any():
        return np.zeros(labels.shape, np.uint8), 0
    out, mapping = fastremap.renumber(labels, preserve_zero=True, in_place=False)
    n = len(mapping) - (1 if 0 in mapping else 0)
    return out, n


def _instances(a: np.ndarray, binary: bool, connectivity: int) -> tuple[np.ndarray, int]:
    return _components(a, connectivity) if binary else _compact(a)


def _match(rows, cols, ious, iou_thr: float) -> np.ndarray:
    """IoUs of the matched pairs: Hungarian maximising summed IoU, then IoU >= ``iou_thr``.

    The maximisation splits into independent problems, one per connected group of
    overlapping objects; a group of one true and one predicted object needs no solver.
    """
    if len(ious) == 0:
        return np.zeros(0)
    from scipy.optimize import linear_sum_assignment

    # graph nodes: true objects first, then predicted objects (compact local indices)
    ur, ri = np.unique(rows, return_inverse=True)
    uc, ci = np.unique(cols, return_inverse=True)
    comp = connected_groups(len(ur) + len(uc), ri, ci + len(ur))
    pair_comp = comp[ri]
    order = np.argsort(pair_comp, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(pair_comp[order]) != 0])
    ends = np.r_[starts[1:], len(order)]
    matched = []
    single = ends - starts == 1
    if single.any():  # a lone overlapping pair is its own best assignment
        matched.append(ious[order[starts[single]]])
    for s, e in zip(starts[~single], ends[~single], strict=True):
        idx = order[s:e]
        r_loc, r = np.unique(ri[idx], return_inverse=True)
        c_loc, c = np.unique(ci[idx], return_inverse=True)
        m = np.zeros((len(r_loc), len(c_loc)))
        m[r, c] = ious[idx]
        a, b = linear_sum_assignment(m, maximize=True)
        matched.append(m[a, b])
    out = np.concatenate(matched)
    return out[out >= iou_thr]


def _evaluate_labelled(g, ng, p, npred, iou_thr) -> Metrics:
    table = overlaps(g, p)
    fg_union = int(g.size) - table.background
    fg_inter = int(table.inter.sum())
    matched = _match(table.ia, table.ib, table.iou(), iou_thr)
    tp = len(matched)
    return _from_counts(tp, npred - tp, ng - tp, float(matched.sum()), fg_inter, fg_union, iou_thr)


def _check_connectivity(connectivity: int | None, ndim: int) -> int:
    if connectivity is None:
        return _DEFAULT_CONNECTIVITY[ndim]
    if connectivity not in _VALID_CONNECTIVITY[ndim]:
        *first, last = (str(c) for c in _VALID_CONNECTIVITY[ndim])
        allowed = f"{', '.join(first)} or {last}"
        raise PanoptemError(
            f"connectivity={connectivity} is not valid for {ndim}D objects; use {allowed}."
        )
    return int(connectivity)


# ----------------------------------------------------------------------------- public API


def evaluate(
    pred,
    gt,
    *,
    gt_is_binary: bool | None = None,
    pred_is_binary: bool | None = None,
    iou_thr: float = 0.5,
    connectivity: int | None = None,
    per_slice: bool = False,
    progress: Progress | None = None,
) -> Metrics:
    """Compare a predicted segmentation with ground truth.

    Parameters
    ----------
    pred : array_like
        Predicted instance labels, shape (H, W), (N, H, W) or (Z, Y, X). Every distinct
        non-zero value is one object (panoptic ids such as 1001, 1002 are fine). A binary
        prediction (a single non-zero value) is split into connected components.
    gt : array_like
        Ground truth of the same shape: instance labels, or a binary mask (0/1, 0/255, or
        any one non-zero value, or bool) whose connected components are the objects.
    gt_is_binary : bool or None, default None
        Whether ``gt`` is a mask to split into connected components. ``None`` decides from
        the data: binary when it holds exactly one non-zero value. Pass ``False`` to keep a
        one-object label image as it is even if that object is in several pieces.
    pred_is_binary : bool or None, default None
        The same choice for ``pred``.
    iou_thr : float, default 0.5
        A matched pair counts as a true positive when its IoU is at least this (``>=``).
    connectivity : int or None, default None
        Neighbourhood for connected components: 4 or 8 in 2D (default 8), 6, 18 or 26 in 3D
        (default 26). With ``per_slice=True`` the 2D values apply.
    per_slice : bool, default False
        Treat a 3D array as a stack of independent 2D images (N, H, W): objects are found
        and matched within each slice, and the result sums TP, FP, FN, matched IoUs and
        foreground pixel counts over all slices, with each slice's own metrics in
        ``Metrics.slices``. A 2D input is then one slice. Without it a 3D array is a volume
        whose objects extend in 3D.
    progress : Progress, optional
        Told one step per slice (``per_slice``), else one step each for the ground truth's
        objects, the prediction's objects and the matching; cancelling stops between steps.

    Returns
    -------
    Metrics
        Foreground IoU, F1/precision/recall, PQ/SQ/RQ and the counts behind them.

    Raises
    ------
    PanoptemError
        If the shapes differ, the arrays are not 2D or 3D, the values are not integral,
        ``iou_thr`` is outside (0, 1] or ``connectivity`` does not fit the dimension.

    Notes
    -----
    Matching follows empanada's ``fast_matcher``: the Hungarian algorithm
    (``scipy.optimize.linear_sum_assignment``) pairs true and predicted objects one-to-one
    maximising the summed IoU, then pairs below ``iou_thr`` are dropped. IoUs are exact
    float64 ratios, so a pair exactly at the threshold is a match.

    Empty inputs: when neither prediction nor ground truth has any object, fg_iou, F1,
    precision, recall, PQ, SQ and RQ are all 1.0 (empanada's convention). When only one
    side is empty they are 0.0 (fg_iou is 0.0 too, since the union is not empty).
    """
    pred = as_label_image(pred, "The prediction")
    gt = as_label_image(gt, "The ground truth")
    if pred.shape != gt.shape:
        raise PanoptemError(
            f"The prediction has shape {pred.shape} but the ground truth has shape "
            f"{gt.shape}; they must be the same size (resample or crop one of them)."
        )
    if pred.ndim not in (2, 3):
        raise PanoptemError(
            f"Cannot evaluate {pred.ndim}D arrays of shape {pred.shape}; pass a 2D image "
            "(H, W), a stack (N, H, W) with per_slice=True, or a 3D volume (Z, Y, X)."
        )
    iou_thr = float(iou_thr)
    if not 0.0 < iou_thr <= 1.0:
        raise PanoptemError(f"iou_thr={iou_thr} is outside (0, 1]; use e.g. 0.5.")

    progress = ensure_progress(progress)
    g_bin = _is_binary(gt) if gt_is_binary is None else bool(gt_is_binary)
    p_bin = _is_binary(pred) if pred_is_binary is None else bool(pred_is_binary)

    if per_slice:
        conn = _check_connectivity(connectivity, 2)
        if pred.ndim == 2:
            pred, gt = pred[None], gt[None]
        per = []
        progress.stage("evaluating slices", len(pred))
        for ps, gs in zip(pred, gt, strict=True):
            g, ng = _instances(gs, g_bin, conn)
            p, npred = _instances(ps, p_bin, conn)
            per.append(_evaluate_labelled(g, ng, p, npred, iou_thr))
            progress.advance()
        return _from_counts(
            sum(m.tp for m in per),
            sum(m.fp for m in per),
            sum(m.fn for m in per),
            float(sum(m.matched_iou_sum for m in per)),
            sum(m.fg_intersection for m in per),
            sum(m.fg_union for m in per),
            iou_thr,
            slices=tuple(per),
        )

    conn = _check_connectivity(connectivity, pred.ndim)
    progress.stage("evaluating", 3)
    g, ng = _instances(gt, g_bin, conn)
    progress.advance()
    p, npred = _instances(pred, p_bin, conn)
    progress.advance()
    metrics = _evaluate_labelled(g, ng, p, npred, iou_thr)
    progress.advance()
    return metrics


def evaluate_files(pred_path: str | Path, gt_path: str | Path, **kwargs) -> Metrics:
    """Read a prediction and a ground-truth file and :func:`evaluate` them.

    Parameters
    ----------
    pred_path, gt_path : str or Path
        tif/tiff, png, jpg or npy files (read with :func:`panoptem.io.read_labels`: RGB(A)
        masks with equal colour channels are reduced to one channel). When the two shapes
        differ only by axes of length 1 (a (1, H, W) tif against an (H, W) png), those axes
        are dropped.
    **kwargs
        Passed to :func:`evaluate` (``gt_is_binary``, ``pred_is_binary``, ``iou_thr``,
        ``connectivity``, ``per_slice``).

    Returns
    -------
    Metrics
        As :func:`evaluate`.
    """
    from panoptem.io import read_labels

    pred, gt = read_labels(pred_path), read_labels(gt_path)
    if pred.shape != gt.shape and np.squeeze(pred).shape == np.squeeze(gt).shape:
        pred, gt = np.squeeze(pred), np.squeeze(gt)
    if pred.shape != gt.shape:
        raise PanoptemError(
            f"The prediction {Path(pred_path).name} has shape {pred.shape} but the ground "
            f"truth {Path(gt_path).name} has shape {gt.shape}; they must be the same size."
        )
    return evaluate(pred, gt, **kwargs)
