"""Graph steps of the ortho-plane consensus: clusters of objects, greedy merging, voting.

:func:`build_clusters` and :func:`greedy_merge` work on one connected component of the
object graph, nodes numbered ``0..n-1`` locally (ascending index = node order), in plain
Python on sets: components are small. :func:`resolve_components` runs them over every
component; :func:`label_rows` votes with sparse matrices on the table of label triples
built by :mod:`panoptem.inference.consensus` (one row per distinct triple of view labels
at a foreground voxel; every voxel of a row is covered by the same objects).

Clusters are numbered by their smallest node, so "first in node order" means "smallest
cluster index" everywhere below.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from scipy import sparse

from panoptem.overlap import connected_groups
from panoptem.progress import Progress

__all__ = [
    "LINK_IOU", "LINK_OVERLAP", "node_groups", "build_clusters", "greedy_merge",
    "resolve_components", "label_rows",
]

#: Two clusters (or two voted results) are linked when their mean IoU exceeds this ...
LINK_IOU = 0.01
#: ... or when their mean overlap exceeds this many voxels.
LINK_OVERLAP = 100


def node_groups(n: int, pairs: Iterable[tuple[int, int]]) -> list[list[int]]:
    """Connected components of the graph on nodes ``0..n-1`` with edges ``pairs``, as lists.

    Each component's nodes come in ascending order and the components in the order of their
    smallest node (isolated nodes are components of their own): the order the greedy merge
    and the numbering of the consensus rely on (:func:`panoptem.overlap.connected_groups`).
    """
    edges = np.asarray(list(pairs), dtype=np.int64).reshape(-1, 2)
    comp = connected_groups(n, edges[:, 0], edges[:, 1])
    order = np.argsort(comp, kind="stable")  # ascending nodes within each component
    bounds = np.cumsum(np.bincount(comp, minlength=int(comp.max(initial=-1)) + 1))[:-1]
    return [g.tolist() for g in np.split(order, bounds)] if n else []


def build_clusters(
    n: int,
    edges: Sequence[tuple[int, int, float, float]],
    cluster_iou_thr: float,
) -> tuple[list[list[int]], list[set[int]]]:
    """Group the objects of one component into clusters and link the clusters.

    Parameters
    ----------
    n : int
        Number of objects (nodes) in the component.
    edges : sequence of (u, v, iou, overlap)
        Every pair of overlapping objects from different views (local node indices, IoU
        as float, overlap in voxels).
    cluster_iou_thr : float
        Objects joined by an edge with IoU strictly above this are in the same cluster
        (transitively).

    Returns
    -------
    clusters : list of list of int
        Member nodes of each cluster, clusters ordered by smallest member.
    links : list of set of int
        For each cluster, the clusters it is linked to: the mean IoU over all member
        pairs (0 for pairs that do not overlap) exceeds :data:`LINK_IOU` or the mean
        overlap exceeds :data:`LINK_OVERLAP` voxels.
    """
    clusters = node_groups(n, ((u, v) for u, v, iou, _ in edges if iou > cluster_iou_thr))
    owner = [0] * n
    for c, members in enumerate(clusters):
        for m in members:
            owner[m] = c
    sums: dict[tuple[int, int], list[float]] = {}
    for u, v, iou, overlap in edges:
        cu, cv = owner[u], owner[v]
        if cu != cv:
            acc = sums.setdefault((min(cu, cv), max(cu, cv)), [0.0, 0.0])
            acc[0] += iou
            acc[1] += overlap
    links: list[set[int]] = [set() for _ in clusters]
    for (a, b), (iou_sum, overlap_sum) in sums.items():
        pairs = len(clusters[a]) * len(clusters[b])
        if iou_sum / pairs > LINK_IOU or overlap_sum / pairs > LINK_OVERLAP:
            links[a].add(b)
            links[b].add(a)
    return clusters, links


def greedy_merge(clusters: Sequence[Sequence[int]], links: Sequence[set[int]]) -> list[list[int]]:
    """Resolve linked clusters until no links remain (reference §6.4 step 3b).

    Repeatedly take the cluster with the most links (the smallest index on ties). If one
    of its linked neighbours has more members than it, it is rejected: its members join
    every neighbour and it disappears. Otherwise it absorbs all its neighbours; each
    absorbed neighbour's other links move to the absorbing cluster, so a cluster that was
    linked only through an absorbed neighbour stays linked (the original's typo dropped
    those links; panoptem does not, SPEC §5 item 6).

    Parameters
    ----------
    clusters : sequence of sequence of int
        Member nodes of each cluster.
    links : sequence of set of int
        Symmetric adjacency between clusters (not modified).

    Returns
    -------
    list of list of int
        Members (ascending) of the surviving clusters, in ascending cluster index.
    """
    members = [set(c) for c in clusters]
    adj = [set(s) for s in links]
    alive = [True] * len(members)
    while True:
        best, degree = -1, 0
        for c, neighbours in enumerate(adj):
            if alive[c] and len(neighbours) > degree:
                best, degree = c, len(neighbours)
        if best < 0:
            break
        neighbours = sorted(adj[best])
        if max(len(members[nb]) for nb in neighbours) > len(members[best]):
            for nb in neighbours:  # rejected: its members vote with every neighbour
                members[nb] |= members[best]
                adj[nb].discard(best)
            adj[best] = set()
            alive[best] = False
            continue
        for nb in neighbours:  # accepted: absorb the neighbours and inherit their links
            members[best] |= members[nb]
            for second in adj[nb]:
                if second != best:
                    adj[second].discard(nb)
                    adj[second].add(best)
                    adj[best].add(second)
            adj[best].discard(nb)
            adj[nb] = set()
            alive[nb] = False
    return [sorted(m) for m, ok in zip(members, alive, strict=True) if ok]


def resolve_components(n_nodes: int, u: np.ndarray, v: np.ndarray, ov: np.ndarray,
                       iou: np.ndarray, min_cluster_size: int, cluster_iou_thr: float,
                       progress: Progress) -> list[np.ndarray]:
    """Clusters of the whole object graph that survive greedy merging, in output order.

    Parameters
    ----------
    n_nodes : int
        Number of objects over all views (nodes ``0..n_nodes-1``, in node order).
    u, v : ndarray (E,) int64
        Edges: pairs of overlapping objects of different views.
    ov : ndarray (E,) int64
        Overlap of each pair in voxels.
    iou : ndarray (E,) float64
        IoU of each pair.
    min_cluster_size : int
        Components with fewer objects are skipped, and so are surviving clusters with
        fewer members.
    cluster_iou_thr : float
        See :func:`build_clusters`.
    progress : Progress
        Checked for a cancel request after each component.

    Returns
    -------
    list of ndarray int64
        Member nodes of each cluster, components in the order of their first node and
        clusters within a component by index. A node may belong to several clusters.
    """
    comp = connected_groups(n_nodes, u, v)  # numbered in the order of their first node
    n_comp = int(comp.max(initial=-1)) + 1
    node_order = np.argsort(comp, kind="stable")  # nodes grouped by component, ascending
    node_split = np.cumsum(np.bincount(comp, minlength=n_comp))[:-1]
    edge_order = np.argsort(comp[u], kind="stable")
    edge_split = np.cumsum(np.bincount(comp[u], minlength=n_comp))[:-1]
    groups = np.split(node_order, node_split)
    edge_groups = np.split(edge_order, edge_split)
    clusters: list[np.ndarray] = []
    for c in range(n_comp):
        nodes = groups[c]
        if len(nodes) < min_cluster_size:
            continue
        e = edge_groups[c]
        local = zip(np.searchsorted(nodes, u[e]).tolist(), np.searchsorted(nodes, v[e]).tolist(),
                    iou[e].tolist(), ov[e].tolist(), strict=True)
        found, links = build_clusters(len(nodes), list(local), cluster_iou_thr)
        for members in greedy_merge(found, links):
            if len(members) >= min_cluster_size:
                clusters.append(nodes[members])
        progress.check()
    return clusters


def label_rows(node: np.ndarray, counts: np.ndarray, clusters: list[np.ndarray], n_nodes: int,
               vote_thr: int) -> np.ndarray:
    """Output id of every row of the triple table: vote, join overlapping results, number.

    A row belongs to a cluster's result when at least ``vote_thr`` of its objects are
    members of the cluster. Results that overlap (IoU > :data:`LINK_IOU` or more than
    :data:`LINK_OVERLAP` voxels; they can only share voxels within a component) are joined
    (transitively) into one object; objects are numbered by their first cluster. A row in
    several objects goes to the highest id; ids left without rows are dropped and the
    rest renumbered 1..N in the same order.

    Parameters
    ----------
    node : ndarray (M, 3) int64
        Node of each row's object in each view, -1 for background.
    counts : ndarray (M,) int64
        Voxels per row.
    clusters : list of ndarray int64
        From :func:`resolve_components`.
    n_nodes : int
        Number of nodes.
    vote_thr : int
        Minimum number of member objects covering a voxel.

    Returns
    -------
    ndarray (M,) int32
        Output id per row, 0 = background.
    """
    m = len(node)
    if not clusters:
        return np.zeros(m, dtype=np.int32)
    k = len(clusters)
    fg_rows, fg_view = np.nonzero(node >= 0)
    covers = sparse.csr_matrix((np.ones(len(fg_rows)), (fg_rows, node[fg_rows, fg_view])),
                               shape=(m, n_nodes))
    member_nodes = np.concatenate(clusters)
    member_of = np.repeat(np.arange(k), [len(c) for c in clusters])
    membership = sparse.csr_matrix((np.ones(len(member_nodes)), (member_nodes, member_of)),
                                   shape=(n_nodes, k))
    votes = (covers @ membership).tocoo()  # row x cluster: members covering the row
    keep = votes.data >= vote_thr
    result = sparse.csr_matrix((np.ones(int(keep.sum())), (votes.row[keep], votes.col[keep])),
                               shape=(m, k))
    weighted = sparse.diags(counts.astype(np.float64)) @ result
    inter = (result.T @ weighted).tocoo()  # cluster x cluster shared voxels
    vox = np.zeros(k)
    diag = inter.row == inter.col
    vox[inter.row[diag]] = inter.data[diag]
    off = inter.row < inter.col
    a, b, shared = inter.row[off], inter.col[off], inter.data[off]
    linked = (shared / (vox[a] + vox[b] - shared) > LINK_IOU) | (shared > LINK_OVERLAP)
    groups = node_groups(k, zip(a[linked].tolist(), b[linked].tolist(), strict=True))
    group_of = np.zeros(k, dtype=np.int64)
    for g, members in enumerate(groups, start=1):
        group_of[members] = g
    row_id = np.zeros(m, dtype=np.int64)
    res = result.tocoo()
    np.maximum.at(row_id, res.row, group_of[res.col])  # the higher id wins shared voxels
    present = np.zeros(len(groups) + 1, dtype=bool)  # ids that kept voxels, renumbered
    present[row_id] = True
    present[0] = False
    renumber = np.zeros(len(groups) + 1, dtype=np.int64)
    renumber[present] = np.arange(1, int(present.sum()) + 1)
    return renumber[row_id].astype(np.int32)
