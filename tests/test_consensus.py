"""Ortho-plane consensus (reference §6.4) on small synthetic volumes with known answers."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from panoptem.errors import Cancelled, PanoptemError
from panoptem.inference import consensus
from panoptem.inference._consensus_graph import build_clusters, greedy_merge
from panoptem.inference.consensus import ortho_plane_consensus, semantic_consensus
from panoptem.progress import CallbackProgress

SHAPE = (48, 48, 48)
GRID = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
# three well separated spheres; each view sees them slightly shifted, as real stacks do
CENTRES = [(12, 12, 12), (12, 34, 30), (34, 24, 20)]
RADIUS = 8
SHIFTS = [(0, 0, 0), (1, 0, 0), (0, 0, 1)]


def sphere(centre, radius=RADIUS, shift=(0, 0, 0)) -> np.ndarray:
    z, y, x = GRID
    c = np.add(centre, shift)
    return (z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 <= radius**2


def masks(i: int) -> list[np.ndarray]:
    """Sphere ``i`` as each of the three views sees it."""
    return [sphere(CENTRES[i], shift=s) for s in SHIFTS]


def views_of(present=((0, 1, 2),) * 3) -> list[np.ndarray]:
    """Three label volumes; ``present[k]`` lists the spheres view k found. Labels differ
    per view (view k labels sphere i as 10 * k + i + 1) so nothing relies on equal ids."""
    out = []
    for k in range(3):
        vol = np.zeros(SHAPE, dtype=np.int32)
        for i in present[k]:
            vol[masks(i)[k]] = 10 * k + i + 1
        out.append(vol)
    return out


def vote(ms, thr) -> np.ndarray:
    return np.sum(ms, axis=0) >= thr


def expected(spheres_and_masks) -> np.ndarray:
    vol = np.zeros(SHAPE, dtype=np.int32)
    for label, mask in spheres_and_masks:
        vol[mask] = label
    return vol


# -- spheres seen in three views ------------------------------------------------------------


def test_default_gives_each_sphere_once_as_the_majority_of_its_views():
    result = ortho_plane_consensus(views_of())
    assert result.dtype == np.int32 and result.shape == SHAPE
    want = expected((i + 1, vote(masks(i), 2)) for i in range(3))
    np.testing.assert_array_equal(result, want)


@pytest.mark.parametrize("thr", [1, 3])
def test_vote_one_is_the_union_and_vote_three_the_intersection(thr):
    result = ortho_plane_consensus(views_of(), vote_thr=thr)
    want = expected((i + 1, vote(masks(i), thr)) for i in range(3))
    np.testing.assert_array_equal(result, want)


def test_sphere_missing_in_one_view_survives_vote_two_but_not_vote_three():
    views = views_of(((0, 1, 2), (0, 2), (0, 1, 2)))  # the xz stack missed sphere 1
    two = ortho_plane_consensus(views, vote_thr=2)
    m = masks(1)
    np.testing.assert_array_equal(two == 2, m[0] & m[2])
    assert np.unique(two).tolist() == [0, 1, 2, 3]
    three = ortho_plane_consensus(views, vote_thr=3)
    assert not (three[m[0] | m[2]] != 0).any()
    assert np.unique(three).tolist() == [0, 1, 2]
    np.testing.assert_array_equal(three == 1, vote(masks(0), 3))


def test_sphere_found_in_one_view_needs_permit_one_stack_and_vote_one():
    views = views_of(((0, 1, 2), (0, 1), (0, 1)))  # sphere 2 only in the xy stack
    lone = masks(2)[0]
    default = ortho_plane_consensus(views)
    assert not default[lone].any() and default.max() == 2
    permitted = ortho_plane_consensus(views, vote_thr=1, permit_one_stack=True)
    np.testing.assert_array_equal(permitted == 3, lone)
    assert permitted.max() == 3
    # permitted into consensus, but two votes are still needed to keep a voxel
    assert not ortho_plane_consensus(views, vote_thr=2, permit_one_stack=True)[lone].any()


def test_sphere_split_in_one_view_comes_out_whole():
    views = views_of()
    m = masks(0)
    left = m[1] & (GRID[2] < CENTRES[0][2])
    views[1][m[1] & left] = 50  # the xz stack cut sphere 0 into two objects
    views[1][m[1] & ~left] = 51
    result = ortho_plane_consensus(views)
    np.testing.assert_array_equal(result == 1, vote(m, 2))
    assert np.unique(result).tolist() == [0, 1, 2, 3]


def test_touching_spheres_stay_two_objects():
    a, b = (16, 24, 15), (16, 24, 32)  # surfaces touch along x; views shift by one voxel
    views = []
    for k, s in enumerate(SHIFTS):
        vol = np.zeros(SHAPE, dtype=np.int32)
        vol[sphere(a, shift=s)] = 1 + k
        vol[sphere(b, shift=s)] = 7 + k
        views.append(vol)
    assert (views[2] == 3)[sphere(b)].any()  # the views really overlap across the contact
    result = ortho_plane_consensus(views)
    ma = [sphere(a, shift=s) for s in SHIFTS]
    mb = [sphere(b, shift=s) for s in SHIFTS]
    np.testing.assert_array_equal(result, expected([(1, vote(ma, 2)), (2, vote(mb, 2))]))


def test_original_reference_scenario():
    """The original library's sphere scenario (dl:tests/test_consensus.py) at half size:
    one sphere seen by all views, an overlapping one seen whole in xy but cut in xz and
    yz (where yz gives both spheres one label), and one seen only by xz."""
    ball = sphere((10, 10, 10), 10)[:21, :21, :21]
    cut = ball.copy()
    cut[:, 10:, 10:] = False
    a, b = (slice(0, 21),) * 3, (slice(8, 29),) * 3
    c = (slice(0, 21), slice(27, 48), slice(27, 48))
    xy, xz, yz = (np.zeros(SHAPE, dtype=np.int32) for _ in range(3))
    xy[a][ball], xy[b][ball] = 1, 2
    xz[a][ball], xz[b][cut], xz[c][ball] = 5, 4, 6
    yz[a][ball], yz[b][cut] = 3, 3

    def labels(*parts):
        vol = np.zeros(SHAPE, dtype=np.int32)
        for label, where, mask in parts:
            vol[where][mask] = label
        return vol

    views = [xy, xz, yz]
    np.testing.assert_array_equal(ortho_plane_consensus(views), labels((1, a, ball), (2, b, cut)))
    np.testing.assert_array_equal(
        ortho_plane_consensus(views, cluster_iou_thr=0.5), labels((1, a, ball), (1, b, cut))
    )
    np.testing.assert_array_equal(
        ortho_plane_consensus(views, vote_thr=1), labels((1, a, ball), (1, b, ball))
    )
    np.testing.assert_array_equal(
        ortho_plane_consensus(views, vote_thr=1, permit_one_stack=True),
        labels((1, a, ball), (1, b, ball), (2, c, ball)),
    )


# -- 3D inference's size and extent filters, applied on the way --------------------------------


def filtered(labels: np.ndarray, min_size: int, min_extent: int) -> np.ndarray:
    """The filters of 3D inference computed straight from a labelled volume: objects with
    fewer voxels or a thinner box go; the rest are numbered by first slice, then label."""
    boxes = ndimage.find_objects(labels)
    keep = []
    for i in np.unique(labels[labels > 0]).tolist():
        extent = min(s.stop - s.start for s in boxes[i - 1])
        if (labels == i).sum() >= min_size and extent >= min_extent:
            keep.append((boxes[i - 1][0].start, i))
    out = np.zeros_like(labels)
    for k, (_, i) in enumerate(sorted(keep), 1):
        out[labels == i] = k
    return out


def filter_scene() -> list[np.ndarray]:
    vol = np.zeros(SHAPE, dtype=np.int32)
    vol[20:40, 2:20, 2:20] = 1  # consensus number 1, but it starts on slice 20
    vol[2:12, 25:45, 25:45] = 2  # starts on slice 2: first after the filters
    vol[44:45, 2:40, 2:40] = 3  # 1444 voxels, one slice thin
    vol[30:33, 30:33, 30:33] = 4  # 27 voxels
    vol[2:7, 2:12, 2:3] = 5  # 50 voxels, 5 x 10 x 1
    vol[14:16, 2:12, 40:43] = 6  # 60 voxels, 2 x 10 x 3
    return [vol, vol * 10, vol + (vol > 0) * 5]  # each view labels them its own way


def test_filters_drop_small_and_thin_objects_and_number_by_first_slice():
    views = filter_scene()
    plain = ortho_plane_consensus(views)
    assert np.unique(plain).tolist() == list(range(7)) and (plain[20:40, 2:20, 2:20] == 1).all()
    result = ortho_plane_consensus(views, min_size=50, min_extent=3)
    want = np.zeros(SHAPE, dtype=np.int32)
    want[2:12, 25:45, 25:45] = 1
    want[20:40, 2:20, 2:20] = 2
    np.testing.assert_array_equal(result, want)
    # whole-number floats count, as in Params3D
    np.testing.assert_array_equal(ortho_plane_consensus(views, min_size=50.0, min_extent=3.0), want)
    # with nothing to drop the objects are still renumbered by first slice
    np.testing.assert_array_equal(ortho_plane_consensus(views, min_size=0, min_extent=0),
                                  filtered(plain, 0, 0))


@pytest.mark.parametrize("min_size, min_extent, kept", [
    (50, 1, {5, 6}), (51, 1, {6}), (60, 1, {6}), (61, 1, set()),  # 50 and 60 voxels
    (0, 2, {6}), (0, 3, set()),  # extents 1 and 2 along x, 2 along z
])
def test_filters_keep_objects_at_the_limits(min_size, min_extent, kept):
    keep = ([5, 6], [50, 60], [10, 11])  # objects 5 and 6 as each view labels them
    small = [np.where(np.isin(v, k), v, 0) for v, k in zip(filter_scene(), keep, strict=True)]
    result = ortho_plane_consensus(small, min_size=min_size, min_extent=min_extent)
    found = {5 if result[2:7, 2:12, 2:3].all() else 0, 6 if result[14:16, 2:12, 40:43].all() else 0}
    assert found - {0} == kept and np.count_nonzero(result) == sum({5: 50, 6: 60}[k] for k in kept)


def test_filters_with_labels_too_large_to_pack():
    views = [np.where(v > 0, v.astype(np.int64) + (1 << 40), 0) for v in filter_scene()]
    want = ortho_plane_consensus(filter_scene(), min_size=50, min_extent=3)
    np.testing.assert_array_equal(ortho_plane_consensus(views, min_size=50, min_extent=3), want)
    assert want.max() == 2


@pytest.mark.parametrize("min_size, min_extent", [(0, 0), (1000, 0), (0, 15), (400, 12)])
@pytest.mark.parametrize("blocks", [False, True])
def test_filters_equal_filtering_the_consensus_afterwards(monkeypatch, min_size, min_extent, blocks):
    views = views_of(((0, 1, 2), (0, 2), (0, 1, 2)))
    views[1][masks(0)[1] & (GRID[2] < 12)] = 50  # a split
    views[0][40:44, 2:6, 2:40] = 7  # a thin object the other views lack
    views[2][40:44, 2:6, 2:40] = 8
    want = filtered(ortho_plane_consensus(views), min_size, min_extent)
    if blocks:  # several blocks per slab, in two threads
        monkeypatch.setattr(consensus, "_BLOCK_VOXELS", SHAPE[1] * SHAPE[2] * 5)
        monkeypatch.setattr(consensus, "_THREADS", 2)
    got = ortho_plane_consensus(views, min_size=min_size, min_extent=min_extent, chunk_depth=20)
    np.testing.assert_array_equal(got, want)
    assert got.max() > 0


@pytest.mark.parametrize("bad", [{"min_size": -1}, {"min_extent": 2.5}, {"min_size": True},
                                 {"min_extent": "3"}, {"min_size": float("nan")}])
def test_bad_filter_values_are_refused(bad):
    with pytest.raises(PanoptemError, match="whole number"):
        ortho_plane_consensus(views_of(), **bad)


# -- the second-order link the original lost -----------------------------------------------


def test_absorbing_cluster_inherits_the_links_of_what_it_absorbs():
    """Four boxes along x, each its own cluster (pairwise IoU 0.15-0.3 < 0.75): A (xy)
    is linked to D (xz) and B (yz); C (xy) is linked only to B. A has as many links as B
    and comes first, so it absorbs D and B. Linking works as intended only if A then
    inherits B's link to C and absorbs C too: the B-C overlap gets two votes and is part
    of the object. The original dropped that link, left C alone (one member, discarded)
    and lost the B-C overlap."""

    def box(x0, x1):
        m = np.zeros(SHAPE, dtype=bool)
        m[10:20, 10:20, x0:x1] = True
        return m

    a, d, b, c = box(4, 20), box(0, 10), box(14, 30), box(26, 40)
    xy, xz, yz = (np.zeros(SHAPE, dtype=np.int32) for _ in range(3))
    xy[a], xy[c] = 1, 2
    xz[d] = 1
    yz[b] = 1
    result = ortho_plane_consensus([xy, xz, yz])
    want = (a & d) | (a & b) | (b & c)
    np.testing.assert_array_equal(result, want.astype(np.int32))


def test_greedy_merge_rejects_a_hub_smaller_than_a_neighbour():
    # cluster 0 (one member) links to 1 (three members) and 2 (one member): 0 is rejected
    # and its member votes with both neighbours
    merged = greedy_merge([[0], [1, 2, 3], [4]], [{1, 2}, {0}, {0}])
    assert merged == [[0, 1, 2, 3], [0, 4]]


def test_greedy_merge_rewires_second_order_neighbours():
    # chain 3 - 0 - 1 - 2 (all single members): 0 absorbs 3 and 1, inherits 1-2, absorbs 2
    assert greedy_merge([[0], [1], [2], [3]], [{1, 3}, {0, 2}, {1}, {0}]) == [[0, 1, 2, 3]]


def test_build_clusters_uses_mean_pairwise_weights():
    # 0-1 strong (one cluster); 2 overlaps only 0: mean IoU over 2 pairs = 0.015 > 0.01
    clusters, links = build_clusters(3, [(0, 1, 0.9, 5000), (0, 2, 0.03, 50)], 0.75)
    assert clusters == [[0, 1], [2]] and links == [{1}, {0}]
    # mean IoU 0.005 and mean overlap 60: not linked
    _, links = build_clusters(3, [(0, 1, 0.9, 5000), (0, 2, 0.01, 120)], 0.75)
    assert links == [set(), set()]


# -- storage, chunking, labels -------------------------------------------------------------


def test_zarr_views_and_zarr_out_match_numpy(tmp_path):
    zarr = pytest.importorskip("zarr")
    views = views_of()
    views[1][masks(0)[1] & (GRID[2] < 12)] = 50  # a split, for a less trivial case
    want = ortho_plane_consensus(views, vote_thr=2)
    zviews = []
    for k, v in enumerate(views):
        z = zarr.create_array(
            store=str(tmp_path / f"v{k}.zarr"), shape=v.shape, chunks=(16, 16, 16), dtype=v.dtype
        )
        z[:] = v
        zviews.append(z)
    out = zarr.create_array(
        store=str(tmp_path / "out.zarr"), shape=SHAPE, chunks=(20, 20, 20), dtype="int32"
    )
    got = ortho_plane_consensus(zviews, vote_thr=2, out=out, chunk_depth=10)
    assert got is out
    np.testing.assert_array_equal(out[:], want)
    sem = zarr.create_array(
        store=str(tmp_path / "sem.zarr"), shape=SHAPE, chunks=(16, 16, 16), dtype="uint8"
    )
    semantic_consensus(zviews, vote_thr=2, out=sem, chunk_depth=7)
    np.testing.assert_array_equal(sem[:], semantic_consensus(views, vote_thr=2))


@pytest.mark.parametrize("chunk_depth", [1, 5, 100])
def test_slab_depth_does_not_change_the_result(chunk_depth):
    views = views_of(((0, 1, 2), (0, 2), (0, 1, 2)))
    np.testing.assert_array_equal(
        ortho_plane_consensus(views, chunk_depth=chunk_depth), ortho_plane_consensus(views)
    )


def test_large_and_negative_label_values_work():
    views = views_of()
    want = ortho_plane_consensus(views)
    big = [np.where(v > 0, v.astype(np.int64) * (1 << 40) - 7, 0) for v in views]
    big[2] = np.where(views[2] > 0, -views[2].astype(np.int64), 0)
    np.testing.assert_array_equal(ortho_plane_consensus(big), want)


def test_empty_views_give_an_empty_result():
    result = ortho_plane_consensus([np.zeros(SHAPE, dtype=np.uint16)] * 3)
    assert result.dtype == np.int32 and not result.any()


def test_progress_has_one_step_per_slab_and_cancel_stops():
    seen = []
    progress = CallbackProgress(lambda stage, done, total: seen.append((stage, done, total)))
    ortho_plane_consensus(views_of(), chunk_depth=16, progress=progress)
    assert ("consensus: overlaps", 3, 3) in seen and ("consensus: voting", 3, 3) in seen

    cancelling = CallbackProgress(lambda stage, done, total: done and cancelling.cancel())
    with pytest.raises(Cancelled):
        ortho_plane_consensus(views_of(), chunk_depth=16, progress=cancelling)


# -- stuff classes ---------------------------------------------------------------------------


@pytest.mark.parametrize("thr", [1, 2, 3])
def test_semantic_vote_is_union_majority_intersection(thr):
    ms = [sphere((24, 24, 24), 12, shift=s) for s in [(0, 0, 0), (3, 0, 0), (0, 0, 4)]]
    result = semantic_consensus(
        [m.astype(np.uint8) * (k + 1) for k, m in enumerate(ms)], vote_thr=thr, chunk_depth=9
    )
    assert result.dtype == np.uint8
    want = {1: ms[0] | ms[1] | ms[2], 2: vote(ms, 2), 3: ms[0] & ms[1] & ms[2]}[thr]
    np.testing.assert_array_equal(result, want.astype(np.uint8))


# -- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize("func", [ortho_plane_consensus, semantic_consensus])
def test_bad_inputs_raise_panoptem_errors(func):
    v = np.zeros((8, 8, 8), dtype=np.int32)
    with pytest.raises(PanoptemError, match="exactly 3 views"):
        func([v, v])
    with pytest.raises(PanoptemError, match="exactly 3 views"):
        func(v)
    with pytest.raises(PanoptemError, match="same shape"):
        func([v, v, np.zeros((8, 8, 9), dtype=np.int32)])
    with pytest.raises(PanoptemError, match="3-D"):
        func([v[0], v[0], v[0]])
    for bad in (0, 4, 1.5, "2", True):
        with pytest.raises(PanoptemError, match="Voxel Vote Thr Out of 3 must be 1, 2 or 3"):
            func([v, v, v], vote_thr=bad)
    with pytest.raises(PanoptemError, match="chunk_depth"):
        func([v, v, v], chunk_depth=0)
    with pytest.raises(PanoptemError, match="'out' has shape"):
        func([v, v, v], out=np.zeros((8, 8, 7), dtype=np.int32))


def test_instance_specific_bad_inputs():
    v = np.zeros((8, 8, 8), dtype=np.int32)
    with pytest.raises(PanoptemError, match="integer ids"):
        ortho_plane_consensus([v, v, v.astype(np.float32)])
    with pytest.raises(PanoptemError, match="cluster_iou_thr"):
        ortho_plane_consensus([v, v, v], cluster_iou_thr=1.5)
