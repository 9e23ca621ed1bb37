"""Foreground IoU, instance F1 and PQ on hand-made cases with known values, and on Lucchi++."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from panoptem.errors import PanoptemError
from panoptem.evaluation import Metrics, evaluate, evaluate_files
from testutils import EM_DATA

LUCCHI_MASK = EM_DATA / "lucchi_test_0000_mask.png"


def approx(x):
    return pytest.approx(x, abs=1e-12)


def one_matched_one_missed():
    """gt: A (10 px) and B (5 px); pred covers 6 px of A (IoU 0.6) and nothing of B."""
    gt = np.zeros((8, 12), np.uint16)
    gt[0, 0:10] = 1
    gt[5, 0:5] = 2
    pred = np.zeros_like(gt, dtype=np.int32)
    pred[0, 0:6] = 7
    return pred, gt


def test_one_matched_at_iou_06_one_missed():
    pred, gt = one_matched_one_missed()
    m = evaluate(pred, gt)
    assert (m.tp, m.fp, m.fn) == (1, 0, 1)
    assert (m.n_pred, m.n_gt) == (1, 2)
    assert m.f1 == approx(2 / 3)
    assert m.precision == approx(1.0) and m.recall == approx(0.5)
    # PQ = 0.6 / (1 + 0/2 + 1/2)
    assert m.pq == approx(0.6 / 1.5)
    assert m.sq == approx(0.6) and m.rq == approx(2 / 3)
    assert m.pq == approx(m.sq * m.rq)
    # foreground: 6 shared pixels, 15 in the union
    assert m.fg_iou == approx(6 / 15)
    assert (m.fg_intersection, m.fg_union) == (6, 15)


def test_split_prediction():
    gt = np.zeros((3, 12), np.uint8)
    gt[1, 0:10] = 1
    pred = np.zeros_like(gt)
    pred[1, 0:4] = 1  # IoU 0.4
    pred[1, 4:10] = 2  # IoU 0.6
    m = evaluate(pred, gt, gt_is_binary=True)
    assert (m.tp, m.fp, m.fn) == (1, 1, 0)
    assert m.f1 == approx(2 / 3)
    assert m.pq == approx(0.6 / 1.5)
    assert m.fg_iou == approx(1.0)


def test_iou_exactly_at_threshold_is_a_match():
    gt = np.zeros((3, 12), np.uint8)
    gt[1, 0:10] = 1
    pred = np.zeros_like(gt)
    pred[1, 0:5] = 1  # IoU exactly 0.5
    m = evaluate(pred, gt)
    assert m.tp == 1 and m.sq == approx(0.5)
    m = evaluate(pred, gt, iou_thr=0.51)
    assert (m.tp, m.fp, m.fn) == (0, 1, 1) and m.f1 == 0.0 and m.pq == 0.0


def test_label_permutation_and_panoptic_ids_do_not_matter():
    rng = np.random.default_rng(1)
    gt = rng.integers(0, 6, size=(40, 40))
    pred = gt.copy()
    pred[rng.random(gt.shape) < 0.2] = 0
    base = evaluate(pred, gt)
    gperm = np.r_[0, rng.permutation(np.arange(1, 6)) + 100]
    pperm = np.r_[0, rng.permutation(np.arange(1, 6)) + 10000]
    other = evaluate(pperm[pred], gperm[gt])
    assert other.as_dict() == base.as_dict()
    # swapping roles swaps precision and recall, FP and FN
    swapped = evaluate(gt, pred)
    assert (swapped.fp, swapped.fn) == (base.fn, base.fp)
    assert swapped.precision == approx(base.recall) and swapped.pq == approx(base.pq)


def test_binary_gt_0_255_becomes_components():
    gt = np.zeros((10, 10), np.uint8)
    gt[1:4, 1:4] = 255
    gt[6:9, 6:9] = 255
    pred = np.zeros((10, 10), np.int64)
    pred[1:4, 1:4] = 10001
    pred[6:9, 6:9] = 10002
    m = evaluate(pred, gt)
    assert m.n_gt == 2 and m.f1 == 1.0 and m.pq == approx(1.0) and m.fg_iou == 1.0
    # told it is a label image, the single value is one 18-px object: each 9-px prediction
    # has IoU 0.5 with it, so one matches and the other is a false positive
    m = evaluate(pred, gt, gt_is_binary=False)
    assert m.n_gt == 1 and (m.tp, m.fp, m.fn) == (1, 1, 0) and m.sq == approx(0.5)
    # bool ground truth and a binary prediction are split into components too
    m = evaluate(pred > 0, gt > 0)
    assert (m.n_pred, m.n_gt, m.tp) == (2, 2, 2)


def test_binary_prediction_becomes_components_unless_told():
    gt = np.zeros((10, 10), np.uint8)
    gt[1:4, 1:4] = 1
    gt[6:9, 6:9] = 2
    pred = (gt > 0).astype(np.uint8)
    assert evaluate(pred, gt).f1 == 1.0
    m = evaluate(pred, gt, pred_is_binary=False)  # one 18-px object against two of 9 px
    assert m.n_pred == 1 and (m.tp, m.fp, m.fn) == (1, 0, 1)


def test_3d_diagonal_touching_cubes_use_26_connectivity():
    gt = np.zeros((4, 4, 4), np.uint8)
    gt[0:2, 0:2, 0:2] = 1
    gt[2:4, 2:4, 2:4] = 1  # touches the first cube only at a corner
    pred = gt.astype(np.int32)
    pred[2:4, 2:4, 2:4] = 2
    m = evaluate(pred, gt)
    assert m.n_gt == 1 and m.n_pred == 2
    # each cube has IoU 8/16 = 0.5 with the joined object: one match at the threshold
    assert (m.tp, m.fp, m.fn) == (1, 1, 0) and m.sq == approx(0.5)
    m = evaluate(pred, gt, connectivity=6)
    assert m.n_gt == 2 and m.f1 == 1.0 and m.pq == approx(1.0)
    # 2D default is 8-connectivity
    img = np.eye(4, dtype=np.uint8)
    assert evaluate(img, img).n_gt == 1
    assert evaluate(img, img, connectivity=4).n_gt == 4


def test_stack_per_slice_sums_counts():
    pred1, gt1 = one_matched_one_missed()
    gt0 = np.zeros_like(gt1)
    gt0[2:5, 2:5] = 3
    pred0 = np.where(gt0 > 0, 5, 0).astype(pred1.dtype)
    pred = np.stack([pred0, pred1])
    gt = np.stack([gt0, gt1])
    m = evaluate(pred, gt, per_slice=True)
    assert len(m.slices) == 2
    assert m.slices[0].f1 == 1.0 and m.slices[1].f1 == approx(2 / 3)
    assert (m.tp, m.fp, m.fn) == (2, 0, 1)
    assert m.f1 == approx(4 / 5)
    assert m.pq == approx((1.0 + 0.6) / (2 + 0.5))
    assert m.fg_iou == approx((9 + 6) / (9 + 15))
    assert m.as_dict()["n_slices"] == 2
    assert len(m.as_dict(include_slices=True)["slices"]) == 2
    assert "over 2 slices" in m.summary()


def test_per_slice_counts_an_object_in_every_slice():
    gt = np.zeros((3, 6, 6), np.uint8)
    gt[:, 1:4, 1:4] = 1
    vol = evaluate(gt, gt)
    stack = evaluate(gt, gt, per_slice=True)
    assert vol.n_gt == 1 and stack.n_gt == 3 and stack.f1 == 1.0
    # a 2D image with per_slice is a stack of one
    assert len(evaluate(gt[0], gt[0], per_slice=True).slices) == 1


def test_empty_cases():
    z = np.zeros((5, 5), np.uint8)
    m = evaluate(z, z)
    assert (m.f1, m.pq, m.fg_iou, m.precision, m.recall, m.sq, m.rq) == (1.0,) * 7
    assert (m.tp, m.fp, m.fn, m.n_pred, m.n_gt) == (0, 0, 0, 0, 0)
    obj = z.copy()
    obj[1:3, 1:3] = 1
    m = evaluate(obj, z)  # only predictions
    assert (m.tp, m.fp, m.fn) == (0, 1, 0)
    assert (m.f1, m.pq, m.fg_iou, m.precision) == (0.0, 0.0, 0.0, 0.0)
    m = evaluate(z, obj)  # only ground truth
    assert (m.tp, m.fp, m.fn) == (0, 0, 1)
    assert (m.f1, m.pq, m.fg_iou, m.recall) == (0.0, 0.0, 0.0, 0.0)
    m = evaluate(np.zeros((2, 5, 5)), np.zeros((2, 5, 5)), per_slice=True)
    assert m.f1 == 1.0 and m.pq == 1.0 and m.fg_iou == 1.0


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(PanoptemError, match=r"\(4, 5\).*\(5, 4\)"):
        evaluate(np.zeros((4, 5)), np.zeros((5, 4)))


@pytest.mark.parametrize(
    ("pred", "gt", "kwargs", "match"),
    [
        (np.zeros((2, 2, 2, 2)), np.zeros((2, 2, 2, 2)), {}, "4D"),
        (np.full((3, 3), 0.5), np.zeros((3, 3)), {}, "non-integer"),
        (np.zeros((3, 3)), np.zeros((3, 3)), {"connectivity": 26}, "4 or 8"),
        (np.zeros((3, 3, 3)), np.zeros((3, 3, 3)), {"connectivity": 8}, "6, 18 or 26"),
        (np.zeros((3, 3)), np.zeros((3, 3)), {"iou_thr": 0}, "iou_thr"),
        (np.zeros((0, 3), np.uint8), np.zeros((0, 3), np.uint8), {}, "The prediction is empty"),
        (np.zeros((3, 3)), np.full((3, 3), -1), {}, "The ground truth has negative values"),
    ],
)
def test_user_errors(pred, gt, kwargs, match):
    with pytest.raises(PanoptemError, match=match):
        evaluate(pred, gt, **kwargs)


def _reference(pred: np.ndarray, gt: np.ndarray, thr: float):
    """Dense IoU matrix from per-object masks, one Hungarian over it (empanada's recipe)."""
    gids = [i for i in np.unique(gt) if i]
    pids = [i for i in np.unique(pred) if i]
    iou = np.zeros((len(gids), len(pids)))
    for a, g in enumerate(gids):
        for b, p in enumerate(pids):
            gm, pm = gt == g, pred == p
            iou[a, b] = (gm & pm).sum() / (gm | pm).sum()
    r, c = linear_sum_assignment(iou, maximize=True)
    vals = iou[r, c]
    vals = vals[vals >= thr]
    return len(vals), float(vals.sum())


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("thr", [0.1, 0.3, 0.5])
def test_matches_dense_hungarian_reference(seed, thr):
    rng = np.random.default_rng(seed)
    gt = np.repeat(np.repeat(rng.integers(0, 8, size=(6, 6)), 4, 0), 4, 1)
    pred = np.roll(gt, (rng.integers(0, 3), rng.integers(0, 3)), axis=(0, 1))
    pred = np.where(rng.random(pred.shape) < 0.1, rng.integers(0, 9, size=pred.shape), pred)
    m = evaluate(pred, gt, iou_thr=thr, gt_is_binary=False, pred_is_binary=False)
    tp, iou_sum = _reference(pred, gt, thr)
    assert m.tp == tp
    assert m.matched_iou_sum == pytest.approx(iou_sum)


def test_sparse_pair_table_gives_the_same_result(monkeypatch):
    import panoptem.overlap

    rng = np.random.default_rng(3)
    gt = rng.integers(0, 50, size=(30, 30))
    pred = np.roll(gt, 1, axis=1)
    dense = evaluate(pred, gt)
    monkeypatch.setattr(panoptem.overlap, "DENSE_LIMIT", 0)
    assert evaluate(pred, gt).as_dict() == dense.as_dict()


def test_as_dict_and_summary():
    m = evaluate(*one_matched_one_missed())
    d = m.as_dict()
    assert isinstance(m, Metrics)
    assert {"fg_iou", "f1", "precision", "recall", "pq", "sq", "rq", "tp", "fp", "fn"} <= set(d)
    assert d["n_slices"] == 0 and "slices" not in d
    text = m.summary()
    assert "F1" in text and "PQ" in text and "foreground IoU" in text and "0.6667" in text


def test_evaluate_files_npy_and_singleton_axes(tmp_path):
    pred, gt = one_matched_one_missed()
    np.save(tmp_path / "pred.npy", pred[None])
    np.save(tmp_path / "gt.npy", gt)
    m = evaluate_files(tmp_path / "pred.npy", tmp_path / "gt.npy")
    assert m.f1 == approx(2 / 3)
    np.save(tmp_path / "small.npy", gt[:4])
    with pytest.raises(PanoptemError, match="shape"):
        evaluate_files(tmp_path / "pred.npy", tmp_path / "small.npy")


@pytest.fixture(scope="module")
def lucchi_mask() -> np.ndarray:
    return LUCCHI_MASK


def test_lucchi_mask_against_itself_and_eroded(lucchi_mask, tmp_path):
    import cc3d
    from PIL import Image
    from scipy import ndimage as ndi

    m = evaluate_files(lucchi_mask, lucchi_mask)
    assert m.n_gt > 5
    assert (m.fg_iou, m.f1, m.pq, m.sq, m.precision, m.recall) == (1.0,) * 6

    mask = np.asarray(Image.open(lucchi_mask))[..., 0] > 0
    # eroded by 1 px: every object keeps its match, the foreground shrinks
    out = tmp_path / "eroded1.png"
    Image.fromarray(ndi.binary_erosion(mask, iterations=1).astype(np.uint8) * 255).save(out)
    m = evaluate_files(out, lucchi_mask)
    assert m.fg_iou < 1.0 and m.pq < 1.0
    assert m.f1 == 1.0 and m.tp == m.n_pred == m.n_gt

    # eroded by 2 px: an eroded object lies inside its original, so its IoU is the share of
    # pixels it keeps; a thin 192-px sliver on the left edge keeps under half and is missed
    eroded = ndi.binary_erosion(mask, iterations=2)
    out = tmp_path / "eroded2.png"
    Image.fromarray(eroded.astype(np.uint8) * 255).save(out)
    m = evaluate_files(out, lucchi_mask)
    labels, n = cc3d.connected_components(mask, connectivity=8, return_N=True)
    kept = np.bincount(labels[eroded], minlength=n + 1)[1:] / np.bincount(labels.ravel())[1:]
    assert m.fg_iou < 1.0
    assert m.tp == int(np.sum(kept >= 0.5)) == n - 1
    assert m.fn == 1 and m.f1 < 1.0


def test_progress_counts_slices_and_cancel_stops():
    from panoptem.errors import Cancelled
    from panoptem.progress import CallbackProgress

    seen = []
    gt = np.zeros((3, 20, 20), np.uint8)
    gt[:, 2:8, 2:8] = 1
    m = evaluate(gt, gt, per_slice=True, progress=CallbackProgress(lambda *a: seen.append(a)))
    assert m.tp == 3 and seen[-1] == ("evaluating slices", 3, 3)
    stop = CallbackProgress(lambda *a: None)
    stop.cancel()
    with pytest.raises(Cancelled):
        evaluate(gt, gt, progress=stop)
