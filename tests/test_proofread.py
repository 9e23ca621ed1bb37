"""Proofreading core: merge, delete, split, morph, find, number, filter and count labels.

Every edit is checked against a brute-force answer on real mitochondria masks turned into
instances (tests/data/em, see testutils.mito_instances_2d/3d).
"""

from __future__ import annotations

import csv
import itertools

import numpy as np
import pytest
import zarr
from scipy import ndimage as ndi

from panoptem import proofread as pr
from panoptem.errors import PanoptemError
from testutils import mito_instances_2d, mito_instances_3d


def on(labels, label, k=0):
    """The k-th voxel of ``label`` (a point on it)."""
    return np.argwhere(labels == label)[k]


def applied(labels, change):
    out = np.array(labels)
    pr.apply_change(out, change)
    return out


@pytest.fixture(scope="module")
def mito2d():
    return mito_instances_2d()


@pytest.fixture(scope="module")
def mito3d():
    return mito_instances_3d()


# -- boxes ------------------------------------------------------------------------------
def test_boxes_are_the_objects_boxes_for_numpy_and_zarr(mito3d, tmp_path):
    truth = ndi.find_objects(mito3d)
    z = zarr.open_array(str(tmp_path / "l.zarr"), mode="w", shape=mito3d.shape, chunks=(2, 128, 128), dtype=mito3d.dtype)
    z[:] = mito3d
    for arr in (mito3d, z):
        boxes = pr.LabelBoxes.of(arr, slab_voxels=2 * 512 * 512)  # several slabs
        assert boxes.ids.tolist() == list(range(1, len(truth) + 1))
        assert all(boxes.box(i + 1) == truth[i] for i in range(len(truth)))
    assert boxes.box(10_000) is None and boxes.max_id == len(truth)


def test_boxes_grow_with_recorded_changes(mito2d):
    boxes = pr.LabelBoxes.of(mito2d)
    boxes.record((np.array([0, 500]), np.array([3, 7])), 999)
    assert boxes.box(999) == (slice(0, 501), slice(3, 8)) and boxes.max_id == 999


# -- merge ------------------------------------------------------------------------------
def test_merge_2d_takes_the_smallest_label_everywhere(mito2d):
    a, b, c = 4, 9, 21
    change = pr.merge_labels(mito2d, [on(mito2d, b), on(mito2d, a, 5), on(mito2d, c)])
    expected = np.where(np.isin(mito2d, [b, c]), a, mito2d)
    assert np.array_equal(applied(mito2d, change), expected)
    assert change.size == int(np.isin(mito2d, [b, c]).sum())


def test_merge_keeps_the_selected_label_when_it_is_among_them(mito2d):
    change = pr.merge_labels(mito2d, [on(mito2d, 4), on(mito2d, 9)], target=9)
    assert np.array_equal(applied(mito2d, change), np.where(mito2d == 4, 9, mito2d))
    # a selected label that is not among them does not count
    change = pr.merge_labels(mito2d, [on(mito2d, 4), on(mito2d, 9)], target=30)
    assert np.array_equal(applied(mito2d, change), np.where(mito2d == 9, 4, mito2d))


def test_merge_in_plane_mode_changes_only_the_points_plane(mito3d):
    # a 3D object spanning several planes, and a second one in plane 2
    spans = [i for i in range(1, mito3d.max() + 1) if len(np.unique(np.nonzero(mito3d == i)[0])) > 2]
    a = spans[0]
    p = on(mito3d, a)
    z = p[0]
    b = next(i for i in np.unique(mito3d[z]) if i not in (0, a))
    change = pr.merge_labels(mito3d, [p, on(mito3d[z:z + 1], b) + [z, 0, 0]], plane_axes=(0,))
    expected = mito3d.copy()
    keep, other = min(a, b), max(a, b)
    expected[z][expected[z] == other] = keep
    assert np.array_equal(applied(mito3d, change), expected)
    # apply in 3D: the whole object
    change = pr.merge_labels(mito3d, [p, on(mito3d[z:z + 1], b) + [z, 0, 0]])
    assert np.array_equal(applied(mito3d, change), np.where(mito3d == other, keep, mito3d))


def test_merge_4d_acts_on_the_frame_of_each_point(mito3d):
    stack = np.stack([mito3d[:3], mito3d[3:]])  # (t, z, y, x) flipbooks
    t, z = 1, 2
    frame = stack[t, z]
    a, b = np.unique(frame)[1:3]
    pts = [[t, z, *on(frame, a)], [t, z, *on(frame, b)]]
    change = pr.merge_labels(stack, pts, plane_axes=(0, 1))
    expected = stack.copy()
    expected[t, z][expected[t, z] == b] = a
    assert np.array_equal(applied(stack, change), expected)


def test_merge_refuses_fewer_than_two_labels(mito2d):
    with pytest.raises(PanoptemError, match="at least two different labels"):
        pr.merge_labels(mito2d, [on(mito2d, 4), on(mito2d, 4, 3)])
    with pytest.raises(PanoptemError, match="at least two"):
        pr.merge_labels(mito2d, [on(mito2d, 0), on(mito2d, 4)])


def test_merge_along_lines_collects_the_labels_they_cross(mito2d):
    a, b = 4, 9
    pa, pb = on(mito2d, a), on(mito2d, b)
    hits = pr.ids_along_paths(mito2d, [np.array([pa, pb], dtype=float)])
    assert {a, b} <= set(pr.labels_at(mito2d, hits).tolist()) and 0 not in pr.labels_at(mito2d, hits)
    crossed = set(pr.labels_at(mito2d, hits).tolist())
    change = pr.merge_labels(mito2d, hits)
    keep = min(crossed)
    assert np.array_equal(applied(mito2d, change), np.where(np.isin(mito2d, list(crossed)), keep, mito2d))


# -- delete -----------------------------------------------------------------------------
def test_delete_2d_and_plane_and_3d(mito2d, mito3d):
    change = pr.delete_labels(mito2d, [on(mito2d, 7), on(mito2d, 11)])
    assert np.array_equal(applied(mito2d, change), np.where(np.isin(mito2d, [7, 11]), 0, mito2d))
    label = int(np.bincount(mito3d.ravel())[1:].argmax()) + 1
    p = on(mito3d, label)
    plane = applied(mito3d, pr.delete_labels(mito3d, [p], plane_axes=(0,)))
    expected = mito3d.copy()
    expected[p[0]][expected[p[0]] == label] = 0
    assert np.array_equal(plane, expected)
    whole = applied(mito3d, pr.delete_labels(mito3d, [p]))
    assert np.array_equal(whole, np.where(mito3d == label, 0, mito3d))


def test_delete_refuses_points_on_background_and_outside(mito2d):
    with pytest.raises(PanoptemError, match="background"):
        pr.delete_labels(mito2d, [on(mito2d, 0)])
    with pytest.raises(PanoptemError, match="outside the labels"):
        pr.delete_labels(mito2d, [[600.0, 3.0]])
    with pytest.raises(PanoptemError, match="2 coordinates but the labels are 3D"):
        pr.delete_labels(mito_instances_3d(2), [[3.0, 3.0]])


# -- split ------------------------------------------------------------------------------
def two_disks():
    """Two overlapping disks as one object (label 5) beside another object (label 9)."""
    yy, xx = np.mgrid[:80, :120]
    obj = ((yy - 40) ** 2 + (xx - 35) ** 2 < 20**2) | ((yy - 40) ** 2 + (xx - 70) ** 2 < 20**2)
    labels = np.zeros((80, 120), np.uint32)
    labels[obj] = 5
    labels[5:10, 100:110] = 9
    return labels


def test_split_by_distance_gives_two_new_labels_above_the_largest():
    labels = two_disks()
    out = applied(labels, pr.split_labels(labels, [[40, 50]], min_distance=10))
    assert set(np.unique(out).tolist()) == {0, 9, 10, 11}
    assert np.array_equal(out > 0, labels > 0)
    # the two pieces are the two disks (left piece centred left of the neck)
    left = np.argwhere(out == out[40, 35])[:, 1].mean()
    right = np.argwhere(out == out[40, 70])[:, 1].mean()
    assert out[40, 35] != out[40, 70] and left < 52 < right


def test_split_with_points_as_markers_and_a_start_label():
    labels = two_disks()
    out = applied(labels, pr.split_labels(labels, [[40, 20], [40, 85]], points_as_markers=True, start_label=100))
    assert out[40, 20] == 100 and out[40, 85] == 101 and set(np.unique(out).tolist()) == {0, 9, 100, 101}
    with pytest.raises(PanoptemError, match=r"already in use: start new label IDs from 10"):
        pr.split_labels(labels, [[40, 20], [40, 85]], points_as_markers=True, start_label=8)
    with pytest.raises(PanoptemError, match="Nothing to split"):
        pr.split_labels(labels, [[40, 20]], points_as_markers=True)
    with pytest.raises(PanoptemError, match="Nothing to split"):
        pr.split_labels(labels, [[7, 105]], min_distance=10)


def test_split_in_a_plane_gives_labels_unused_in_the_whole_volume(mito3d):
    vol = mito3d.copy()
    vol[0] = 0
    vol[0, :80, :120] = two_disks()  # the object to split, in plane 0
    out = applied(vol, pr.split_labels(vol, [[0, 40, 50]], min_distance=10, plane_axes=(0,)))
    new = set(np.unique(out[0]).tolist()) - {0, 9}
    assert len(new) == 2 and min(new) == vol.max() + 1
    assert np.array_equal(out[1:], vol[1:])


def test_split_real_mitochondria_keeps_every_voxel(mito2d):
    label = int(np.bincount(mito2d.ravel())[1:].argmax()) + 1
    change = pr.split_labels(mito2d, [on(mito2d, label, 10)], min_distance=5)
    out = applied(mito2d, change)
    assert np.array_equal(out > 0, mito2d > 0)
    pieces = np.unique(out[mito2d == label])
    assert len(pieces) >= 2 and pieces.min() > mito2d.max()


# -- morph ------------------------------------------------------------------------------
def test_dilate_grows_into_background_only(mito2d):
    a = 4
    out = applied(mito2d, pr.morph_labels(mito2d, "Dilate", points=[on(mito2d, a)], radius=2))
    from skimage.morphology import disk

    grown = ndi.binary_dilation(mito2d == a, disk(2))
    expected = mito2d.copy()
    expected[grown & (mito2d == 0)] = a
    assert np.array_equal(out, expected)


def test_erode_open_close_fill(mito2d):
    a = 4
    mask = mito2d == a
    out = applied(mito2d, pr.morph_labels(mito2d, "Erode", points=[on(mito2d, a)], radius=1))
    assert (out == a).sum() < mask.sum() and np.array_equal(out[~mask], mito2d[~mask])
    out = applied(mito2d, pr.morph_labels(mito2d, "Open", points=[on(mito2d, a)], radius=3))
    assert (out == a).sum() <= mask.sum() and np.array_equal(out[~mask], mito2d[~mask])
    holed = mito2d.copy()
    ys, xs = np.nonzero(ndi.binary_erosion(mask, iterations=3))
    holed[ys[0], xs[0]] = 0
    out = applied(holed, pr.morph_labels(holed, "Fill holes", points=[on(holed, a)], hole_size=64))
    assert out[ys[0], xs[0]] == a
    out = applied(holed, pr.morph_labels(holed, "Close", points=[on(holed, a)], radius=1))
    assert out[ys[0], xs[0]] == a


def test_morph_all_labels_and_plane_mode(mito3d):
    out = applied(mito3d, pr.morph_labels(mito3d, "Erode", plane_axes=(0,), planes=[(3,)]))
    assert np.array_equal(np.delete(out, 3, 0), np.delete(mito3d, 3, 0))
    assert (out[3] > 0).sum() < (mito3d[3] > 0).sum()
    all3d = applied(mito3d, pr.morph_labels(mito3d, "Dilate", radius=1))
    assert (all3d > 0).sum() > (mito3d > 0).sum() and np.array_equal(all3d[mito3d > 0], mito3d[mito3d > 0])
    with pytest.raises(PanoptemError, match="Radius"):
        pr.morph_labels(mito3d, "Dilate", radius=9)
    with pytest.raises(PanoptemError, match="unknown operation"):
        pr.morph_labels(mito3d, "Smooth")


# -- stale boxes, zarr ------------------------------------------------------------------
def test_stale_boxes_are_rebuilt(mito2d):
    labels = mito2d.copy()
    boxes = pr.LabelBoxes.of(labels)
    labels[500:505, 500:505] = 4  # changed behind the boxes' back
    change = pr.delete_labels(labels, [[502, 502]], boxes=boxes)
    assert np.array_equal(applied(labels, change), np.where(labels == 4, 0, labels))
    assert boxes.holds(4, (502, 502))


def test_changes_apply_to_zarr(mito3d, tmp_path):
    z = zarr.open_array(str(tmp_path / "l.zarr"), mode="w", shape=mito3d.shape, chunks=(1, 256, 256), dtype=mito3d.dtype)
    z[:] = mito3d
    label = 3
    change = pr.delete_labels(z, [on(mito3d, label)])
    before = pr.apply_change(z, change)
    assert np.all(before == label)
    assert np.array_equal(z[:], np.where(mito3d == label, 0, mito3d))


# -- find, number -----------------------------------------------------------------------
def test_locate_label(mito3d):
    label = int(np.bincount(mito3d.ravel())[1:].argmax()) + 1
    loc = pr.locate_label(mito3d, label)
    assert loc.box == ndi.find_objects((mito3d == label).astype(np.uint8))[0]
    zs = np.nonzero(mito3d == label)[0]
    assert loc.best[0] == np.bincount(zs).argmax() and loc.voxels == (mito3d == label).sum()
    with pytest.raises(PanoptemError, match="label 999 does not exist"):
        pr.locate_label(mito3d, 999)


def test_available_labels_per_class():
    labels = np.array([[0, 1, 2, 4], [10001, 10002, 20001, 0]], np.uint32)
    used = pr.used_labels(labels)
    assert list(itertools.islice(pr.available_labels(used, 0, 10000), 3)) == [3, 5, 6]
    assert list(itertools.islice(pr.available_labels(used, 1, 10000), 2)) == [10003, 10004]
    assert next(pr.available_labels(used, 3, 10000)) == 30001
    assert list(pr.available_labels([1, 2], 0, 4)) == [3]
    with pytest.raises(PanoptemError, match="Label Divisor"):
        next(pr.available_labels(used, 1, 1))


def test_used_labels_of_zarr_and_boxes(mito3d, tmp_path):
    z = zarr.open_array(str(tmp_path / "l.zarr"), mode="w", shape=mito3d.shape, chunks=(1, 256, 256), dtype=mito3d.dtype)
    z[:] = mito3d
    truth = np.unique(mito3d)[1:]
    assert np.array_equal(pr.used_labels(z), truth)
    assert np.array_equal(pr.used_labels(mito3d, boxes=pr.LabelBoxes.of(mito3d)), truth)


# -- filter, count ----------------------------------------------------------------------
def test_filter_small_labels_matches_scipy(mito2d):
    sizes = ndi.sum_labels(np.ones_like(mito2d), mito2d, index=np.arange(1, mito2d.max() + 1))
    small = np.arange(1, mito2d.max() + 1)[sizes <= 300]
    kept, removed = pr.filter_labels(mito2d, min_area=300, apply_to="Current image")
    assert removed == small.tolist() and len(removed) > 0
    assert np.array_equal(kept, np.where(np.isin(mito2d, small), 0, mito2d))


def test_filter_border_labels_and_scopes(mito3d):
    from skimage.segmentation import clear_border

    kept, removed = pr.filter_labels(mito3d, border=True, apply_to="2D patches")
    for z in range(mito3d.shape[0]):
        assert np.array_equal(kept[z], clear_border(mito3d[z]))
    kept, _ = pr.filter_labels(mito3d, min_area=400, apply_to="Current image", plane=2)
    assert np.array_equal(np.delete(kept, 2, 0), np.delete(mito3d, 2, 0))
    kept, removed = pr.filter_labels(mito3d, min_area=400)
    sizes = np.bincount(mito3d.ravel())
    assert removed == [i for i in range(1, len(sizes)) if 0 < sizes[i] <= 400]
    with pytest.raises(PanoptemError, match="needs 3D labels"):
        pr.filter_labels(mito3d[0], apply_to="3D image or z-stack")


def test_count_labels_matches_numpy_and_writes_csv(mito3d, tmp_path):
    panoptic = np.where(mito3d > 0, mito3d + np.where(mito3d % 2, 1000, 2000), 0).astype(np.uint32)
    rows = pr.count_labels(panoptic, label_divisor=1000)
    ids, counts = np.unique(panoptic[panoptic > 0], return_counts=True)
    assert [r["label_id"] for r in rows] == ids.tolist()
    assert [r["voxels"] for r in rows] == counts.tolist()
    assert [r["class_id"] for r in rows] == (ids // 1000).tolist()
    per_plane = pr.count_labels(panoptic, label_divisor=1000, per_plane=True)
    assert len(per_plane) == sum(len(np.unique(p)) - 1 for p in panoptic)
    assert {r["class_id"] for r in pr.count_labels(panoptic)} == {1}
    names = pr.parse_class_names("class_number,class_name\n1,mito\n2, nucleus ")
    assert names == {1: "mito", 2: "nucleus"}
    path = pr.write_counts_csv(tmp_path / "counts.csv", rows, names)
    with open(path) as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == len(rows) and table[0]["class_name"] in ("mito", "nucleus")
    with pytest.raises(PanoptemError, match="not 'class_number,class_name'"):
        pr.parse_class_names("1 mito")
