"""The proofreading widgets as a user runs them: opened from the Plugins menu, clicked.

Labels are real mitochondria masks turned into instances (testutils.mito_instances_2d/3d);
the expected arrays are computed by brute force here. Every edit must undo to the exact
previous array and redo to the edited one.
"""

from __future__ import annotations

import csv

import numpy as np
import pytest
import zarr
from scipy import ndimage as ndi
from widgetutils import click, open_from_menu

from testutils import mito_instances_2d, mito_instances_3d

SCALE2 = (2.0, 0.5)
TRANSLATE2 = (10.0, -4.0)


def on(labels, label, k=0):
    return np.argwhere(labels == label)[k]


def world(layer, index_point):
    return np.asarray(layer.data_to_world(np.asarray(index_point, dtype=float)))


@pytest.fixture
def viewer2d(make_napari_viewer):
    viewer = make_napari_viewer()
    labels = viewer.add_labels(mito_instances_2d(), name="mito", scale=SCALE2, translate=TRANSLATE2)
    return viewer, labels


def run_edit(widget, wait_job):
    job = click(widget)
    wait_job(job)
    assert job.error is None, job.error
    return job


def press(layer, shift: bool = False) -> None:
    """Ctrl+Z (Ctrl+Shift+Z with ``shift``) on a Labels layer: the function napari's keymap
    binds to the key, as the canvas calls it on a key press."""
    from app_model.types import KeyCode, KeyMod
    from napari.utils.key_bindings import KeyBinding

    key = KeyMod.CtrlCmd | KeyCode.KeyZ | (KeyMod.Shift if shift else 0)
    type(layer).class_keymap[KeyBinding.from_int(key)](layer)


def assert_undo_redo(layer, before, after):
    press(layer)  # Ctrl+Z
    assert np.array_equal(np.asarray(layer.data), before)
    press(layer, shift=True)  # Ctrl+Shift+Z
    assert np.array_equal(np.asarray(layer.data), after)


# -- merge ------------------------------------------------------------------------------
def test_merge_2d_scaled_layer_with_undo_and_redo(viewer2d, wait_job):
    viewer, labels = viewer2d
    before = labels.data.copy()
    a, b = 4, 9
    points = viewer.add_points([world(labels, on(before, b)), world(labels, on(before, a, 7))], name="pts")
    widget = open_from_menu(viewer, "Merge Labels")
    widget.labels_layer.value, widget.points_layer.value = labels, points
    run_edit(widget, wait_job)
    expected = np.where(before == b, a, before)
    assert np.array_equal(labels.data, expected)
    assert len(points.data) == 0  # used points are cleared
    assert_undo_redo(labels, before, expected)


def test_merge_keeps_the_selected_label_and_merges_along_a_line(viewer2d, wait_job):
    viewer, labels = viewer2d
    before = labels.data.copy()
    a, b = 4, 9
    shapes = viewer.add_shapes([np.array([world(labels, on(before, a)), world(labels, on(before, b))])],
                               shape_type="line", name="line")
    labels.selected_label = 9
    widget = open_from_menu(viewer, "Merge Labels")
    widget.labels_layer.value, widget.shapes_layer.value = labels, shapes
    widget.points_layer.value = None
    run_edit(widget, wait_job)
    # the line crossed a and b (and maybe others): all of them are now the selected label 9
    assert np.all(labels.data[before == a] == 9) and np.all(labels.data[before == b] == 9)
    assert np.array_equal(labels.data, np.where(np.isin(before, list(np.unique(before[labels.data == 9]))), 9, before))


def test_merge_3d_plane_mode_apply_in_3d_and_4d(make_napari_viewer, wait_job):
    vol = mito_instances_3d()
    viewer = make_napari_viewer()
    labels = viewer.add_labels(vol.copy(), name="vol", scale=(3.0, 1.0, 1.0))
    z = 2
    a, b = np.unique(vol[z])[1:3]
    pts = [world(labels, [z, *on(vol[z], a)]), world(labels, [z, *on(vol[z], b)])]
    points = viewer.add_points(pts, name="pts")
    widget = open_from_menu(viewer, "Merge Labels")
    widget.labels_layer.value, widget.points_layer.value = labels, points
    run_edit(widget, wait_job)
    plane = vol.copy()
    plane[z][plane[z] == b] = a
    assert np.array_equal(labels.data, plane)
    labels.undo()
    points.data = pts
    widget.apply3d.value = True
    run_edit(widget, wait_job)
    assert np.array_equal(labels.data, np.where(vol == b, a, vol))

    # 4D flipbooks: the frame (t, z) of each point
    stack = np.stack([vol[:3], vol[3:]])
    viewer4 = make_napari_viewer()
    lab4 = viewer4.add_labels(stack.copy(), name="flip")
    t, z = 1, 2
    c, d = np.unique(stack[t, z])[1:3]
    p4 = viewer4.add_points([[t, z, *on(stack[t, z], c)], [t, z, *on(stack[t, z], d)]], name="p4")
    w4 = open_from_menu(viewer4, "Merge Labels")
    w4.labels_layer.value, w4.points_layer.value = lab4, p4
    run_edit(w4, wait_job)
    expected = stack.copy()
    expected[t, z][expected[t, z] == d] = c
    assert np.array_equal(lab4.data, expected)
    assert_undo_redo(lab4, stack, expected)


# -- delete -----------------------------------------------------------------------------
def test_delete_on_a_zarr_layer_writes_the_store(make_napari_viewer, wait_job, tmp_path):
    vol = mito_instances_3d()
    store = zarr.open_array(str(tmp_path / "seg.zarr"), mode="w", shape=vol.shape, chunks=(1, 128, 128), dtype=vol.dtype)
    store[:] = vol
    viewer = make_napari_viewer()
    labels = viewer.add_labels(store, name="seg")
    label = int(np.bincount(vol.ravel())[1:].argmax()) + 1
    p = on(vol, label)
    points = viewer.add_points([p], name="pts")
    widget = open_from_menu(viewer, "Delete Labels")
    widget.labels_layer.value, widget.points_layer.value = labels, points
    widget.apply3d.value = True
    run_edit(widget, wait_job)
    expected = np.where(vol == label, 0, vol)
    assert np.array_equal(zarr.open_array(str(tmp_path / "seg.zarr"), mode="r")[:], expected)
    labels.undo()
    assert np.array_equal(zarr.open_array(str(tmp_path / "seg.zarr"), mode="r")[:], vol)


def test_delete_in_the_plane_of_each_point_in_any_axis_order(make_napari_viewer, wait_job):
    vol = mito_instances_3d()
    viewer = make_napari_viewer()
    labels = viewer.add_labels(vol.copy(), name="vol")
    viewer.dims.order = (2, 0, 1)  # slicing along x: edits act in the yz plane of each point
    label = int(np.bincount(vol.ravel())[1:].argmax()) + 1
    p = on(vol, label, 50)
    points = viewer.add_points([p], name="pts")
    widget = open_from_menu(viewer, "Delete Labels")
    widget.labels_layer.value, widget.points_layer.value = labels, points
    run_edit(widget, wait_job)
    expected = vol.copy()
    sl = expected[:, :, p[2]]
    sl[sl == label] = 0
    assert np.array_equal(labels.data, expected)
    assert_undo_redo(labels, vol, expected)


# -- split ------------------------------------------------------------------------------
def test_split_gives_fresh_ids_and_undoes(viewer2d, wait_job):
    viewer, labels = viewer2d
    before = labels.data.copy()
    label = int(np.bincount(before.ravel())[1:].argmax()) + 1
    points = viewer.add_points([world(labels, on(before, label, 10))], name="pts")
    widget = open_from_menu(viewer, "Split Labels")
    assert widget.min_distance.value == 10 and widget.min_distance.max == 100
    widget.labels_layer.value, widget.points_layer.value = labels, points
    widget.min_distance.value = 5
    run_edit(widget, wait_job)
    after = labels.data.copy()
    pieces = np.unique(after[before == label])
    assert len(pieces) >= 2 and pieces.min() == before.max() + 1
    assert np.array_equal(after > 0, before > 0) and np.array_equal(after[before != label], before[before != label])
    assert_undo_redo(labels, before, after)


def test_split_with_points_as_markers_and_start_id(viewer2d, wait_job, notifications):
    viewer, labels = viewer2d
    before = labels.data.copy()
    label = int(np.bincount(before.ravel())[1:].argmax()) + 1
    vox = np.argwhere(before == label)
    ends = [vox[vox[:, 1].argmin()], vox[vox[:, 1].argmax()]]
    points = viewer.add_points([world(labels, p) for p in ends], name="pts")
    widget = open_from_menu(viewer, "Split Labels")
    widget.labels_layer.value, widget.points_layer.value = labels, points
    widget.points_as_markers.value = True
    widget.new_label.value = True
    widget.start_label.value = "3"  # in use: refused, nothing changes
    job = click(widget)
    wait_job(job)
    assert "already in use" in notifications[-1][1] and np.array_equal(labels.data, before)
    widget.start_label.value = "500"
    run_edit(widget, wait_job)
    assert labels.data[tuple(ends[0])] == 500 and labels.data[tuple(ends[1])] == 501
    assert set(np.unique(labels.data[before == label]).tolist()) == {500, 501}


# -- morph ------------------------------------------------------------------------------
def test_morph_dilate_pointed_label_and_erode_all(viewer2d, wait_job):
    from skimage.morphology import disk

    viewer, labels = viewer2d
    before = labels.data.copy()
    a = 4
    points = viewer.add_points([world(labels, on(before, a))], name="pts")
    widget = open_from_menu(viewer, "Morph Labels")
    assert widget.operation.choices == ("Dilate", "Erode", "Close", "Open", "Fill holes")
    widget.labels_layer.value, widget.points_layer.value = labels, points
    widget.radius.value = 2
    run_edit(widget, wait_job)
    expected = before.copy()
    expected[ndi.binary_dilation(before == a, disk(2)) & (before == 0)] = a
    assert np.array_equal(labels.data, expected)
    assert_undo_redo(labels, before, expected)
    widget.operation.value = "Erode"
    widget.points_layer.value = None
    widget.radius.value = 1
    run_edit(widget, wait_job)
    assert (labels.data > 0).sum() < (expected > 0).sum()
    assert set(np.unique(labels.data).tolist()) <= set(np.unique(expected).tolist())


# -- filter, count ----------------------------------------------------------------------
def test_filter_small_labels_adds_a_layer(viewer2d, wait_job):
    viewer, labels = viewer2d
    widget = open_from_menu(viewer, "Filter Labels")
    widget.labels_layer.value = labels
    widget.min_area.value = 300
    wait_job(click(widget))
    out = viewer.layers["Labels_removed_mito"]
    data = labels.data
    sizes = ndi.sum_labels(np.ones_like(data), data, index=np.arange(1, data.max() + 1))
    small = np.arange(1, data.max() + 1)[sizes <= 300]
    assert np.array_equal(out.data, np.where(np.isin(data, small), 0, data))
    assert tuple(out.scale) == SCALE2 and tuple(out.translate) == TRANSLATE2


def test_count_labels_per_class_to_csv(make_napari_viewer, tmp_path, notifications):
    vol = mito_instances_3d()
    panoptic = np.where(vol > 0, vol + np.where(vol % 3 == 0, 2000, 1000), 0).astype(np.uint32)
    viewer = make_napari_viewer()
    labels = viewer.add_labels(panoptic, name="pan")
    widget = open_from_menu(viewer, "Count Labels")
    widget.labels_layer.value = labels
    widget.label_type.value = "3D volume or z-stack"
    widget.label_text.value = "1,mito\n2,other"
    widget.label_divisor.value = "1000"
    widget.export_csv.value = True
    widget.folder_name.value = "counts"
    widget.save_dir.value = str(tmp_path)
    click(widget)
    with open(tmp_path / "counts" / "pan_label_ids.csv") as fh:
        rows = list(csv.DictReader(fh))
    ids, counts = np.unique(panoptic[panoptic > 0], return_counts=True)
    assert [int(r["label_id"]) for r in rows] == ids.tolist()
    assert [int(r["voxels"]) for r in rows] == counts.tolist()
    assert {r["class_name"] for r in rows} == {"mito", "other"}
    n1 = int((ids // 1000 == 1).sum())
    assert f"mito: {n1} label IDs" in notifications[-1][1]
    click(widget)  # a second export never overwrites the first
    assert (tmp_path / "counts" / "pan_label_ids_1.csv").exists()


# -- jump, next available ---------------------------------------------------------------
def test_jump_to_label_in_any_axis_order(make_napari_viewer, notifications):
    vol = mito_instances_3d()
    viewer = make_napari_viewer()
    labels = viewer.add_labels(vol, name="vol", scale=(4.0, 1.0, 1.0), translate=(100.0, 0, 0))
    label = int(np.bincount(vol.ravel())[1:].argmax()) + 1
    widget = open_from_menu(viewer, "Jump to label")
    widget.labels_layer.value = labels
    widget.label_id.value = str(label)
    viewer.dims.order = (1, 0, 2)  # slicing along y
    click(widget)
    ys = np.nonzero(vol == label)[1]
    assert viewer.dims.point[1] == pytest.approx(np.bincount(ys).argmax())
    assert labels.selected_label == label
    assert np.any(vol[:, int(round(viewer.dims.point[1])), :] == label)
    widget.label_id.value = "9999"
    click(widget)
    assert "label 9999 does not exist" in notifications[-1][1]


def test_find_next_available_label(make_napari_viewer):
    vol = np.zeros((3, 20, 20), np.uint32)
    vol[0, :2, :2], vol[0, 5:7, 5:7], vol[1, 9:11, 9:11] = 1001, 1002, 1003
    viewer = make_napari_viewer()
    labels = viewer.add_labels(vol, name="vol")
    widget = open_from_menu(viewer, "Find next available label")
    widget.labels_layer.value = labels
    widget.label_divisor.value = "1000"
    widget.apply3d.value = True
    assert click(widget) == 1004 and labels.selected_label == 1004
    assert click(widget) == 1005
    widget.apply3d.value = False  # per plane: plane 0 holds 1001 and 1002 only
    viewer.dims.set_point(0, 0)
    assert click(widget) == 1003
    widget.class_id.value = "2"
    assert click(widget) == 2001


# -- the messages a user gets -----------------------------------------------------------
def test_no_points_layer_adds_one_in_add_mode(viewer2d, notifications):
    viewer, labels = viewer2d
    widget = open_from_menu(viewer, "Delete Labels")
    widget.labels_layer.value = labels
    widget.points_layer.value = None
    assert click(widget) is None
    assert viewer.layers["Points"].mode == "add"
    assert "click on the labels to delete" in notifications[-1][1]


def test_points_on_background_and_points_of_another_shape(viewer2d, make_napari_viewer, wait_job, notifications):
    viewer, labels = viewer2d
    before = labels.data.copy()
    points = viewer.add_points([world(labels, on(before, 0))], name="bg")
    widget = open_from_menu(viewer, "Delete Labels")
    widget.labels_layer.value, widget.points_layer.value = labels, points
    wait_job(click(widget))
    assert "every point is on background" in notifications[-1][1]
    assert np.array_equal(labels.data, before) and len(points.data) == 1

    viewer3 = make_napari_viewer()
    vol = viewer3.add_labels(mito_instances_3d(), name="vol")
    flat = viewer3.add_points(np.array([[10.0, 10.0]]), name="flat", ndim=2)
    w3 = open_from_menu(viewer3, "Split Labels")
    w3.labels_layer.value, w3.points_layer.value = vol, flat
    assert click(w3) is None
    assert "has 2 dimensions but 'vol' has 3" in notifications[-1][1]


# -- every editing tool in every mode ---------------------------------------------------
MODES = ["2d", "plane", "3d", "4d"]


def _mode_setup(viewer, mode):
    """A labels layer for the mode, a point on a big label, and the region the edit may touch."""
    vol = mito_instances_3d()
    if mode == "2d":
        data = vol[0]
    elif mode == "4d":
        data = np.stack([vol[:3], vol[3:]])
    else:
        data = vol
    labels = viewer.add_labels(data.copy(), name="lab", scale=(1.5,) * data.ndim)
    counts = np.bincount(data.ravel())
    counts[0] = 0
    label = int(counts.argmax())
    p = on(data, label, 20)
    region = np.zeros(data.shape, bool)
    if mode in ("2d", "3d"):
        region[...] = True
    elif mode == "plane":
        region[p[0]] = True
    else:
        region[p[0], p[1]] = True
    return data, labels, label, p, region


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("tool", ["Delete Labels", "Split Labels", "Morph Labels"])
def test_each_tool_in_each_mode(make_napari_viewer, wait_job, tool, mode):
    from skimage.morphology import ball, disk

    viewer = make_napari_viewer()
    data, labels, label, p, region = _mode_setup(viewer, mode)
    points = viewer.add_points([world(labels, p)], name="pts")
    widget = open_from_menu(viewer, tool)
    widget.labels_layer.value, widget.points_layer.value = labels, points
    widget.apply3d.value = mode == "3d"
    if tool == "Split Labels":
        widget.min_distance.value = 3
    run_edit(widget, wait_job)
    after = np.asarray(labels.data).copy()
    target = (data == label) & region
    if tool == "Delete Labels":
        expected = np.where(target, 0, data)
    elif tool == "Morph Labels":  # Dilate, radius 1: a disk in a plane, a ball in 3D
        expected = data.copy()
        if mode == "3d":
            grown = ndi.binary_dilation(data == label, ball(1))
        elif mode == "2d":
            grown = ndi.binary_dilation(data == label, disk(1))
        else:  # the plane (3D) or frame (4D) of the point
            at = tuple(p[: data.ndim - 2])
            grown = np.zeros(data.shape, bool)
            grown[at] = ndi.binary_dilation(data[at] == label, disk(1))
        expected[grown & (data == 0) & region] = label
    if tool == "Split Labels":
        assert np.array_equal(after[~target], data[~target])  # only the object, only in the region
        pieces = np.unique(after[target])
        assert len(pieces) >= 2 and pieces.min() > data.max()  # fresh ids, unused in the volume
        assert np.all(after[target] > 0)
    else:
        assert np.array_equal(after, expected)
    assert not np.array_equal(after, data)
    assert_undo_redo(labels, data, after)


def test_edits_go_to_a_3d_output_store_opened_in_napari(make_napari_viewer, wait_job, tmp_path, registered_model, em_volume):
    from panoptem.inference.engine import Params2D
    from panoptem.inference.volume import Engine3D, Params3D

    vol = np.ascontiguousarray(em_volume[:8, :64, :64])
    path = tmp_path / "crop.zarr"
    Engine3D(registered_model).segment(vol, Params2D(), Params3D(min_size=50, min_extent=2), zarr_path=path)
    viewer = make_napari_viewer()
    viewer.open(str(path), plugin="panoptem")
    mito = viewer.layers[-1]
    before = np.asarray(mito.data[:]).copy()
    label = int(np.unique(before)[1])
    points = viewer.add_points([world(mito, on(before, label))], name="pts")
    widget = open_from_menu(viewer, "Delete Labels")
    widget.labels_layer.value, widget.points_layer.value = mito, points
    widget.apply3d.value = True
    run_edit(widget, wait_job)
    stored = zarr.open_array(str(path / mito.metadata["array"]), mode="r")[:]
    assert np.array_equal(stored, np.where(before == label, 0, before))
    mito.undo()
    assert np.array_equal(zarr.open_array(str(path / mito.metadata["array"]), mode="r")[:], before)


def test_dask_labels_are_refused_with_what_to_do(make_napari_viewer, notifications):
    import dask.array as da

    viewer = make_napari_viewer()
    labels = viewer.add_labels(da.from_array(mito_instances_2d(), chunks=128), name="lazy")
    points = viewer.add_points([[100.0, 100.0]], name="pts")
    widget = open_from_menu(viewer, "Delete Labels")
    widget.labels_layer.value, widget.points_layer.value = labels, points
    assert click(widget) is None
    assert "'lazy' cannot be edited (Array): load it as a numpy array or a zarr array" in notifications[-1][1]
