"""The one overlap table and the one connected-component grouping, which 3D matching,
evaluation, tile stitching and the ortho-plane consensus all use."""

from __future__ import annotations

import numpy as np
import pytest

import panoptem.overlap as ov
from panoptem.inference._consensus_graph import node_groups
from panoptem.overlap import connected_groups, overlaps


def test_overlaps_known_values():
    a = np.array([[0, 5, 5, 0],
                  [0, 5, 7, 7],
                  [0, 0, 0, 0]])
    b = np.array([[2, 2, 0, 0],
                  [0, 2, 9, 0],
                  [0, 0, 9, 0]])
    t = overlaps(a, b)
    assert t.ids_a.tolist() == [5, 7] and t.ids_b.tolist() == [2, 9]
    assert t.area_a.tolist() == [3, 2] and t.area_b.tolist() == [3, 2]
    # 5 and 2 share (0,1) and (1,1); 7 and 9 share (1,2); 5 and 9 share nothing
    pairs = zip(t.ia.tolist(), t.ib.tolist(), t.inter.tolist(), strict=True)
    assert list(pairs) == [(0, 0, 2), (1, 1, 1)]
    np.testing.assert_array_equal(t.dense(), [[2, 0], [0, 1]])
    np.testing.assert_allclose(t.iou(), [2 / 4, 1 / 3])
    assert t.background == 5  # (0,3), (1,0), (2,0), (2,1), (2,3)
    assert t.background == int(((a == 0) & (b == 0)).sum())


@pytest.mark.parametrize("shape", [(40, 50), (6, 20, 30)])
def test_overlaps_dense_and_sparse_counting_agree_with_a_direct_count(monkeypatch, shape):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 30, size=shape) * 7  # ids not compact, zeros present
    b = np.roll(a, 2, axis=-1) + (rng.random(shape) < 0.2)
    dense = overlaps(a, b)
    monkeypatch.setattr(ov, "DENSE_LIMIT", 0)
    sparse = overlaps(a, b)
    for field in ("ids_a", "ids_b", "area_a", "area_b", "ia", "ib", "inter"):
        np.testing.assert_array_equal(getattr(dense, field), getattr(sparse, field))
    assert dense.background == sparse.background
    full = dense.dense()
    for i, j in [(0, 0), (3, 4), (len(dense.ids_a) - 1, len(dense.ids_b) - 1)]:
        direct = ((a == dense.ids_a[i]) & (b == dense.ids_b[j])).sum()
        assert full[i, j] == direct


def test_overlaps_of_empty_images():
    t = overlaps(np.zeros((4, 4), int), np.zeros((4, 4), int))
    assert len(t.ids_a) == len(t.ids_b) == len(t.inter) == 0 and t.background == 16
    t = overlaps(np.ones((2, 2), int), np.zeros((2, 2), int))
    assert t.ids_a.tolist() == [1] and len(t.ids_b) == 0 and t.background == 0


def test_connected_groups_are_numbered_by_their_smallest_node():
    """The order the consensus relies on: component k is the one whose smallest node comes
    k-th; isolated nodes count, duplicate edges and self-loops are harmless."""
    comp = connected_groups(7, [5, 6, 3, 3, 2], [1, 6, 4, 4, 2])
    # components: {0}, {1, 5}, {2}, {3, 4}, {6}
    assert comp.tolist() == [0, 1, 2, 3, 3, 1, 4]
    assert connected_groups(0, [], []).tolist() == []
    rng = np.random.default_rng(1)
    n = 200
    u, v = rng.integers(0, n, 150), rng.integers(0, n, 150)
    comp = connected_groups(n, u, v)
    assert (comp[u] == comp[v]).all()
    _, first = np.unique(comp, return_index=True)
    assert (np.diff(first) > 0).all()  # first nodes ascend with the component number


def test_node_groups_lists_components_in_node_order():
    assert node_groups(6, [(4, 1), (2, 3)]) == [[0], [1, 4], [2, 3], [5]]
    assert node_groups(3, []) == [[0], [1], [2]]
    assert node_groups(0, []) == []


@pytest.mark.parametrize("dtype, na, nb", [(np.uint16, 40, 30), (np.uint64, 40, 30),
                                           (np.int64, 70000, 40000), (np.uint8, 3, 200)])
def test_pair_counts_equal_a_direct_count_in_32_and_64_bits(monkeypatch, dtype, na, nb):
    """Codes are packed in 32 bits where ``na * nb`` fits, else in 64 (70000 x 40000)."""
    rng = np.random.default_rng(na)
    ka = rng.integers(0, na, (30, 40)).astype(dtype)
    kb = rng.integers(0, nb, (30, 40)).astype(dtype)
    ka[:3], kb[:, :2] = na - 1, nb - 1  # the largest indices pack to the largest codes
    for limit in (ov.DENSE_LIMIT, 0):  # a dense table, and unique codes
        monkeypatch.setattr(ov, "DENSE_LIMIT", limit)
        ra, rb, cnt, area_a, area_b = ov.pair_counts(ka, na, kb, nb)
        pairs = {}
        for x, y in zip(ka.ravel().tolist(), kb.ravel().tolist(), strict=True):
            pairs[(x, y)] = pairs.get((x, y), 0) + 1
        assert sorted(pairs) == list(zip(ra.tolist(), rb.tolist(), strict=True))
        assert cnt.tolist() == [pairs[p] for p in sorted(pairs)]
        assert area_a.tolist() == np.bincount(ka.ravel().astype(np.int64), minlength=na).tolist()
        assert area_b.tolist() == np.bincount(kb.ravel().astype(np.int64), minlength=nb).tolist()
        assert all(a.dtype == np.int64 for a in (ra, rb, cnt, area_a, area_b))
