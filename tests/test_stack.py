"""Stack inference pieces: median filter, slice matching, filters, and whole stacks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from panoptem.inference.matching import match_slice
from panoptem.inference.stack import median_filtered
from panoptem.inference.volume import filter_objects, morphology


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


def test_filter_objects_by_size_and_extent():
    vol = np.zeros((10, 30, 30), np.int32)
    vol[2:8, 2:10, 2:10] = 7  # 384 voxels, extents 6, 8, 8
    vol[1:2, 15:29, 15:29] = 3  # a pancake, 1 slice thick
    vol[5:7, 20:22, 2:4] = 9  # 8 voxels
    filter_objects(vol, min_size=20, min_extent=3, slab=4)
    assert set(np.unique(vol)) == {0, 1} and (vol[2:8, 2:10, 2:10] == 1).all()


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
