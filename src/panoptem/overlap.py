"""Overlaps between two label images, and the groups that linked objects form.

Two small algorithms that several parts of panoptem need, written once:

* :func:`overlaps` counts, for two label images of one shape, each object's area and the
  pixels every pair of objects shares (the table behind slice-to-slice matching in 3D
  inference and behind instance matching in evaluation);
* :func:`connected_groups` splits a graph of linked objects into its connected components
  (objects of different tiles that overlap, consensus clusters, overlapping true and
  predicted objects), numbered in the order of each component's smallest node.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Overlaps", "overlaps", "pair_counts", "connected_groups", "DENSE_LIMIT"]

#: Up to this many (id a, id b) cells the pair counts use one dense bincount; beyond it
#: (very many objects on both sides) only the pairs that occur are counted.
DENSE_LIMIT = 1 << 22


@dataclass(frozen=True)
class Overlaps:
    """Areas and shared pixels of the objects of two label images ``a`` and ``b``.

    Attributes
    ----------
    ids_a, ids_b : ndarray (n,), (m,)
        The non-zero ids present, ascending.
    area_a, area_b : ndarray (n,), (m,) int64
        Pixels of each id.
    ia, ib : ndarray (k,) int64
        Indices into ``ids_a`` / ``ids_b`` of the pairs that share at least one pixel,
        ordered by ``ia`` then ``ib``.
    inter : ndarray (k,) int64
        Shared pixels of each pair.
    background : int
        Pixels that are 0 in both images.
    """

    ids_a: np.ndarray
    ids_b: np.ndarray
    area_a: np.ndarray
    area_b: np.ndarray
    ia: np.ndarray
    ib: np.ndarray
    inter: np.ndarray
    background: int

    def dense(self) -> np.ndarray:
        """The shared pixels as an (n, m) matrix (zero where two objects do not touch)."""
        table = np.zeros((len(self.ids_a), len(self.ids_b)), dtype=np.int64)
        table[self.ia, self.ib] = self.inter
        return table

    def iou(self) -> np.ndarray:
        """Intersection over union of each overlapping pair (aligned with ``ia``, ``ib``)."""
        return self.inter / (self.area_a[self.ia] + self.area_b[self.ib] - self.inter)


def overlaps(a, b) -> Overlaps:
    """Count the areas and pairwise shared pixels of the objects of ``a`` and ``b``.

    Parameters
    ----------
    a, b : array-like of one shape, integer labels (0 = background), any dimension.

    Returns
    -------
    Overlaps
    """
    import fastremap

    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"label images of different shapes: {a.shape} and {b.shape}")
    ua, ka = fastremap.unique(a.ravel(), return_inverse=True)
    ub, kb = fastremap.unique(b.ravel(), return_inverse=True)
    na, nb = len(ua), len(ub)
    ra, rb, cnt, area_a, area_b = pair_counts(ka, na, kb, nb)
    za = int(na > 0 and ua[0] == 0)  # 0 sorts first when present
    zb = int(nb > 0 and ub[0] == 0)
    background = int(cnt[(ra == 0) & (rb == 0)].sum()) if za and zb else 0
    keep = (ra >= za) & (rb >= zb)
    return Overlaps(ua[za:], ub[zb:], area_a[za:], area_b[zb:], ra[keep] - za, rb[keep] - zb,
                    cnt[keep].astype(np.int64), background)


def pair_counts(ka, na: int, kb, nb: int) -> tuple[np.ndarray, ...]:
    """Pixels shared by each pair of object indices, from two per-pixel index images.

    ``ka`` and ``kb`` (one shape, non-negative integers below ``na`` and ``nb``) give each
    pixel's object index in two label images (for instance the inverse of their unique ids).
    Returns ``(ra, rb, count, area_a, area_b)``: the index pairs that share at least one pixel,
    ordered by ``ra`` then ``rb``, their shared pixels, and each index's pixels (int64).
    """
    # one code per pixel, in 32 bits where they fit (fewer copies: 1024 x 1024, 13-14 -> 8-9 ms)
    wide = np.int64 if na * nb > np.iinfo(np.int32).max else np.int32
    ka = np.asarray(ka).ravel().astype(wide, copy=False)  # may be uint64 or narrow
    code = ka * wide(nb)
    np.add(code, np.asarray(kb).ravel(), out=code, casting="unsafe")  # kb < nb: no overflow
    if na * nb <= DENSE_LIMIT:
        counts = np.bincount(code, minlength=na * nb)
        codes = np.flatnonzero(counts)
        cnt = counts[codes]
        table = counts.reshape(na, nb)  # the areas are its row and column sums
        area_a, area_b = table.sum(axis=1, dtype=np.int64), table.sum(axis=0, dtype=np.int64)
    else:
        codes, cnt = np.unique(code, return_counts=True)
        area_a = np.bincount(ka, minlength=na).astype(np.int64)
        area_b = np.bincount(np.asarray(kb).ravel(), minlength=nb).astype(np.int64)
    ra, rb = np.divmod(codes.astype(np.int64, copy=False), nb)
    return ra, rb, cnt.astype(np.int64, copy=False), area_a, area_b


def connected_groups(n: int, u, v) -> np.ndarray:
    """Connected components of the undirected graph on nodes ``0..n-1`` with edges (u, v).

    Returns
    -------
    ndarray (n,) int64
        The component of each node, numbered 0, 1, ... in the order of each component's
        smallest node (so node 0 is in component 0, and a node isolated or not, every
        component's number is fixed by where its first node stands). Duplicate edges and
        self-loops are allowed.
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    u = np.asarray(u, dtype=np.int64)
    v = np.asarray(v, dtype=np.int64)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    graph = coo_matrix((np.ones(len(u), dtype=np.int8), (u, v)), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    _, first = np.unique(comp, return_index=True)  # smallest node of each component
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return rank[comp]
