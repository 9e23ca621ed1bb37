"""Stack inference pieces: median filter, slice matching, filters, and whole stacks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from panoptem.errors import PanoptemError
from panoptem.inference.matching import match_slice
from panoptem.inference.postprocess import label_codes, relabel_connected
from panoptem.inference.stack import median_filtered, segment_stack
from panoptem.inference.volume import morphology


def disc(shape, cy, cx, r):
    yy, xx = np.indices(shape)
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


@pytest.mark.parametrize("n,k", [(9, 3), (9, 5), (3, 7), (1, 3), (6, 11)])
def test_median_is_true_median_of_clipped_window(n, k):
    rng = np.random.default_rng(n * k)
    probs = [torch.from_numpy(rng.random((1, 5, 6)).astype(np.float32)) for _ in range(n)]
    out = list(median_filtered(((p, i) for i, p in enumerate(probs)), k))
    assert [o[1] for o in out] == list(range(n))  # every slice, in order, with its own extras
    stack = np.stack([p.numpy() for p in probs])
    r = k // 2
    for i, (m, _) in enumerate(out):
        window = stack[max(0, i - r) : i + r + 1]
        np.testing.assert_allclose(m.numpy(), np.median(window, axis=0), rtol=1e-6)
    if n > k:  # in the interior it equals scipy's median filter along the slices
        from scipy.ndimage import median_filter

        ref = median_filter(stack, size=(k, 1, 1, 1))
        np.testing.assert_allclose(out[n // 2][0].numpy(), ref[n // 2], rtol=1e-6)


def test_median_size_one_passes_through():
    items = [(torch.ones(1, 2, 2) * i, i) for i in range(4)]
    assert [float(p.max()) for p, _ in median_filtered(iter(items), 1)] == [0, 1, 2, 3]


def test_moving_discs_keep_their_ids():
    shape = (80, 80)
    rng = np.random.default_rng(0)
    target, next_label, seen = None, 1001, []
    for z in range(12):
        lab = np.zeros(shape, np.int32)
        centres = [(20 + z, 20), (50, 20 + 2 * z), (60 - z, 60)]
        order = rng.permutation(3)  # per-slice ids in a different order every slice
        for k, (cy, cx) in zip(order, centres, strict=True):
            lab[disc(shape, cy, cx, 7)] = 1001 + k
        target, next_label = match_slice(target, lab, next_label)
        seen.append([int(target[cy, cx]) for cy, cx in centres])
    assert all(s == seen[0] for s in seen)
    assert len(set(seen[0])) == 3


def test_new_object_gets_fresh_id_and_split_merges_by_ioa():
    shape = (60, 60)
    a = np.zeros(shape, np.int32)
    a[disc(shape, 30, 30, 12)] = 5
    b = np.zeros(shape, np.int32)
    b[disc(shape, 30, 30, 12) & (np.indices(shape)[1] < 30)] = 1  # left half
    b[disc(shape, 30, 30, 12) & (np.indices(shape)[1] > 30)] = 2  # right half: merged by IoA
    b[disc(shape, 5, 50, 3)] = 3  # a newcomer
    out, nxt = match_slice(a, b, next_label=10)
    assert set(np.unique(out[b == 1])) == {5} and set(np.unique(out[b == 2])) == {5}
    assert set(np.unique(out[b == 3])) == {10} and nxt == 11
    # backward pass: no new ids, unmatched objects keep theirs
    out2, nxt2 = match_slice(a, b, next_label=10, assign_new=False)
    assert set(np.unique(out2[b == 3])) == {3} and nxt2 == 10


def test_morphology_erodes_apart_and_fills():
    vol = np.zeros((5, 20, 30), np.int32)
    vol[:, 5:15, 2:12] = 1
    vol[:, 5:15, 16:26] = 1
    vol[:, 9:11, 12:16] = 1  # a thin bridge, gone after one erosion
    out = morphology(vol, erode=1)
    assert len(np.unique(out[out > 0])) == 2
    holed = np.zeros((3, 12, 12), np.int32)
    holed[:, 2:10, 2:10] = 4
    holed[:, 5:7, 5:7] = 0
    assert (morphology(holed, fill_holes=True)[:, 5:7, 5:7] > 0).all()


class LabelEngine:
    """Stands in for Engine2D where the 'model outputs' already are panoptic slices."""

    device = torch.device("cpu")

    def __init__(self, things):
        self.thing_list = things

    def panoptic_codes(self, pan, _ctr, _off, _params, _shape):
        return label_codes(pan)


def em_panoptic_slices(volume, div):
    """Panoptic slices of a real EM volume: dark and bright blobs (thing classes 1 and 2,
    one object per connected component) and a band of grey (stuff class 3)."""
    from scipy import ndimage

    smooth = ndimage.gaussian_filter(volume.astype(np.float32), (0, 2, 2))
    lo, band0, band1, hi = np.percentile(smooth, [15, 50, 53, 88])
    pans = []
    for s in smooth:
        pan = np.where((s > band0) & (s < band1), 3 * div, 0).astype(np.int32)
        pan[s < lo], pan[s > hi] = div + 1, 2 * div + 1
        pans.append(relabel_connected(pan, [1, 2], div))
    return pans


def match_images(pans, things, div):
    """Stack matching done on whole images with match_slice: a forward pass, a backward
    pass, then each id's voxels and box in order of first appearance going backwards."""

    def match(target, pan, next_label, assign_new):
        out = np.where(pan % div > 0, 0, pan)
        for c in things:
            part = np.where((pan % div > 0) & (pan // div == c), pan, 0)
            tgt = None if target is None else np.where((target % div > 0) & (target // div == c), target, 0)
            tgt = tgt if tgt is not None and tgt.any() else None
            matched, nxt = match_slice(tgt, part, next_label[c], assign_new)
            if tgt is None and part.any() and assign_new:
                nxt = max(nxt, int(part.max()) + 1)
            if nxt >= (c + 1) * div:
                raise PanoptemError("More than ... objects")
            next_label[c] = nxt
            out = np.where(matched > 0, matched, out)
        return out

    next_label = {c: c * div + 1 for c in things}
    forward, target = [], None
    for pan in pans:
        target = match(target, pan, next_label, True)
        forward.append(target)
    final, stats, target = [None] * len(pans), {}, None
    for i in range(len(pans) - 1, -1, -1):
        target = forward[i] if target is None else match(target, forward[i], next_label, False)
        final[i] = target
        for j in np.unique(target[target > 0]).tolist():
            ys, xs = np.nonzero(target == j)
            box = [len(ys), i, i, ys.min(), ys.max(), xs.min(), xs.max()]
            st = stats.setdefault(j, box)
            if st is not box:
                st[0] += box[0]
                st[1::2] = [min(a, b) for a, b in zip(st[1::2], box[1::2], strict=True)]
                st[2::2] = [max(a, b) for a, b in zip(st[2::2], box[2::2], strict=True)]
    return np.stack(forward), np.stack(final), stats


@pytest.mark.parametrize("things", [[1, 2], [2]])
def test_stack_matching_on_tables_equals_matching_the_images(em_volume, things):
    """segment_stack matches slices on tables of object overlaps (and rewrites in the
    backward pass only slices whose ids change); the ids, the per-id voxel counts and
    boxes, and their order must be those of matching whole images slice by slice."""
    from types import SimpleNamespace

    div = 1000
    pans = em_panoptic_slices(em_volume[:24], div)
    forward, final, stats = match_images(pans, things, div)
    assert (forward != final).any(axis=(1, 2)).sum() >= 3  # the backward pass merges tracks
    assert len({j // div for j in stats}) == len(things) + 1  # stuff ids pass through
    res = segment_stack(LabelEngine(things), em_volume[:24],
                        SimpleNamespace(label_divisor=div, semantic_only=False), median_size=1,
                        outputs=iter([(p, None, None) for p in pans]))
    np.testing.assert_array_equal(res.store, final)
    assert list(res.stats.items()) == list(stats.items())


def test_backward_pass_skips_slices_whose_touching_objects_share_ids(em_volume, monkeypatch):
    """Where every object of a slice touches only objects of its own id in the next slice,
    the backward pass keeps the slice's ids without running the rule. The labels and stats
    must still be those of matching whole images. Blobs of the volume smoothed in 3D (no
    stuff band, which touches everything): some slices are so, some not."""
    from types import SimpleNamespace

    from scipy import ndimage

    from panoptem.inference import stack

    div = 1000
    smooth = ndimage.gaussian_filter(em_volume[:24].astype(np.float32), (1, 3, 3))
    lo, hi = np.percentile(smooth, [15, 88])
    pans = []
    for s in smooth:
        pan = np.zeros(s.shape, np.int32)
        pan[s < lo], pan[s > hi] = div + 1, 2 * div + 1
        pans.append(relabel_connected(pan, [1, 2], div))
    forward, final, stats = match_images(pans, [1, 2], div)
    assert (forward != final).any(axis=(1, 2)).sum() >= 2  # some slices the rule changes
    calls = []
    rule = stack._match_step

    def counted(*args, assign_new):
        calls.append(assign_new)
        return rule(*args, assign_new=assign_new)

    monkeypatch.setattr(stack, "_match_step", counted)
    res = segment_stack(LabelEngine([1, 2]), em_volume[:24],
                        SimpleNamespace(label_divisor=div, semantic_only=False), median_size=1,
                        outputs=iter([(p, None, None) for p in pans]))
    np.testing.assert_array_equal(res.store, final)
    assert list(res.stats.items()) == list(stats.items())
    assert calls.count(True) == 24
    assert 2 <= calls.count(False) <= 20  # of 23 slice pairs


def test_stats_table_sums_boxes_and_orders_by_first_appearance():
    """Objects in order of first appearance (slices in the order given, ids ascending in
    one slice); an object's indices and slices summed and boxed together; 0 skipped."""
    from panoptem.inference.stack import _stats_table

    box = np.array
    table = _stats_table([
        (7, [0, 1005, 1002, 1005], [50, 3, 4, 5], box([[0] * 4, [1, 2, 3, 4], [0, 0, 9, 9], [5, 6, 0, 1]])),
        (6, [0], [80], box([[0] * 4])),
        (5, [0, 1001, 1002], [60, 2, 6], box([[0] * 4, [4, 4, 4, 4], [8, 9, 1, 2]])),
    ])
    assert list(table.items()) == [
        (1002, [10, 5, 7, 0, 9, 1, 9]),
        (1005, [8, 7, 7, 1, 6, 0, 4]),
        (1001, [2, 5, 5, 4, 4, 4, 4]),
    ]
    assert _stats_table([]) == {} and _stats_table([(0, [0], [9], box([[0] * 4]))]) == {}


@pytest.mark.parametrize("seed", range(40))
def test_rule_keeps_ids_that_every_touching_pair_shares(seed):
    """The claim the backward pass's skip rests on, on random tables: when each touching
    pair of objects has one id, matching without new ids changes no id, whatever the
    areas and overlaps (and whatever objects touch nothing)."""
    from panoptem.inference.stack import _match_step

    rng = np.random.default_rng(seed)
    div = 100
    shared_ids = rng.choice(np.arange(1, 60), 12, replace=False) + div * rng.integers(1, 3, 12)
    only_t = 10 * div + np.arange(1, 4)  # stuff-like and lone ids on either side
    target = np.concatenate([[0], shared_ids[:9], [div * 3]]).astype(np.int64)
    new = np.concatenate([[0], rng.permutation(shared_ids[3:]), only_t[:2]]).astype(np.int64)
    new = np.where(new >= 10 * div, new - 8 * div, new)  # lone thing ids of classes 2
    t_counts = rng.integers(1, 400, len(target))
    n_counts = rng.integers(1, 400, len(new))
    ti, ni = [], []
    for a, i in enumerate(target):
        for b, j in enumerate(new):
            if i == j and i > 0 and rng.random() < 0.8:
                ti.append(a), ni.append(b)
    shared = np.minimum(t_counts[ti], n_counts[ni]) * rng.uniform(0.01, 1, len(ti))
    pairs = (np.array(ti, np.int64), np.array(ni, np.int64), shared.astype(np.int64) + 1)
    assert np.array_equal(target[pairs[0]], new[pairs[1]]) and len(ti) >= 2
    next_label = {1: 1 * div + 90, 2: 2 * div + 90}
    out = _match_step(target, t_counts, new, n_counts, pairs, [1, 2], div, next_label,
                      assign_new=False)
    np.testing.assert_array_equal(out, new)


def test_stack_with_more_objects_than_the_divisor_allows(em_volume):
    from types import SimpleNamespace

    pans = em_panoptic_slices(em_volume[:8], 1000)
    div = int(max(int(p.max()) % 1000 for p in pans)) + 2  # every slice fits, the stack does not
    pans = [np.where(p > 0, p // 1000 * div + p % 1000, 0).astype(np.int32) for p in pans]
    with pytest.raises(PanoptemError, match="raise 'Max objects per class in 3D'"):
        segment_stack(LabelEngine([1, 2]), em_volume[:8],
                      SimpleNamespace(label_divisor=div, semantic_only=False), median_size=1,
                      outputs=iter([(p, None, None) for p in pans]))


def test_touching_counts_the_objects_pixels_and_the_shared_ones(em_volume):
    from panoptem.inference.stack import _objects, _touching

    div = 1000
    pans = em_panoptic_slices(em_volume[:2], div)
    prev, cur = _objects(pans[0]), _objects(pans[1])
    (here, there, shared), area = _touching(prev, cur)
    assert area.tolist() == np.bincount(cur.codes.ravel(), minlength=len(cur.ids)).tolist()
    assert area[0] == (pans[1] == 0).sum() > 0 and len(shared) > 10
    for i, j, n in zip(here.tolist(), there.tolist(), shared.tolist(), strict=True):
        assert i > 0 and j > 0 and n == ((pans[0] == prev.ids[i]) & (pans[1] == cur.ids[j])).sum()
    both = (pans[0] > 0) & (pans[1] > 0)  # every touching pair is listed
    assert shared.sum() == both.sum()
