"""The "2D Inference (Parameter Testing)" widget, driven through its callbacks on real EM data.

Each parameter path is checked against a direct call of the core engine with the same
parameters: the widget must only choose the plane/region and place the result.
"""

from __future__ import annotations

import numpy as np
import pytest

from panoptem.inference.engine import Engine2D, Params2D


@pytest.fixture
def em_image(lucchi_image) -> np.ndarray:
    """A 256 x 320 crop of a real FIB-SEM image (small enough for fast CPU tests)."""
    return np.ascontiguousarray(lucchi_image[200:456, 300:620])


@pytest.fixture
def make_widget(make_napari_viewer, registered_model):
    """``viewer, widget = make_widget()``: a viewer with the 2D widget docked."""

    def make(**viewer_kwargs):
        from panoptem._widgets.inference_2d import inference_2d_widget

        viewer = make_napari_viewer(**viewer_kwargs)
        widget = inference_2d_widget(viewer)
        viewer.window.add_dock_widget(widget)
        widget.model_config.value = registered_model
        widget.use_quantized.value = False
        return viewer, widget

    return make


def run(widget, wait_job, **values):
    widget.reset_choices()
    for name, value in values.items():
        getattr(widget, name).value = value
    return wait_job(widget())


def expected(registered_model, image, roi=None, **params):
    return Engine2D(registered_model).segment(image, Params2D(**params), roi=roi)


PARAMETER_PATHS = [
    {},
    {"downsampling": 2},
    {"confidence_thr": 0.3, "center_confidence_thr": 0.2, "min_distance": 7},
    {"fine_boundaries": True},
    {"semantic_only": True},
    {"fill_holes": True},
    {"max_objects": 1000},
    {"tile_size": 128},
]
WIDGET_NAMES = {
    "min_distance": "min_distance_object_centers",
    "fill_holes": "fill_holes_in_segmentation",
    "max_objects": "maximum_objects_per_class",
}


@pytest.mark.parametrize("params", PARAMETER_PATHS, ids=lambda p: "-".join(p) or "defaults")
def test_parameters_on_2d_image(make_widget, wait_job, registered_model, em_image, params):
    viewer, widget = make_widget()
    layer = viewer.add_image(em_image, scale=(2.0, 2.0), translate=(10.0, -4.0))
    values = {
        WIDGET_NAMES.get(k, k): (str(v) if k == "max_objects" else v) for k, v in params.items()
    }
    job = run(widget, wait_job, image_layer=layer, **values)
    assert job.error is None
    out = viewer.layers["empanada_seg_2d"]
    np.testing.assert_array_equal(out.data, expected(registered_model, em_image, **params))
    np.testing.assert_allclose(out.scale, layer.scale)
    np.testing.assert_allclose(out.translate, layer.translate)
    divisor = params.get("max_objects", 10000)
    assert set(np.unique(out.data // divisor)) <= {0, 1}
    if params.get("semantic_only"):
        assert set(np.unique(out.data)) <= {0, divisor}
    if params.get("tile_size"):
        assert job.progress.stage_name == "tiles" and job.progress.done == job.progress.total > 1


@pytest.mark.parametrize(
    "order, fixed, transposed",
    [((0, 1, 2), 0, False), ((1, 0, 2), 1, False), ((2, 0, 1), 2, False), ((2, 1, 0), 2, True)],
    ids=["xy", "xz", "yz", "yz-transposed"],
)
def test_current_plane_of_a_volume(
    make_widget, wait_job, registered_model, em_volume, order, fixed, transposed
):
    viewer, widget = make_widget()
    vol = em_volume[:, :128, :160]
    layer = viewer.add_image(vol, scale=(3.0, 1.5, 1.5), translate=(6.0, 0.0, 9.0))
    index = 5
    viewer.dims.order = order
    viewer.dims.set_point(
        fixed, layer.data_to_world([index if a == fixed else 0 for a in range(3)])[fixed]
    )
    run(widget, wait_job, image_layer=layer)
    out = viewer.layers["empanada_seg_2d"]
    plane = np.take(vol, index, axis=fixed)
    want = (
        expected(registered_model, plane.T).T if transposed else expected(registered_model, plane)
    )
    assert out.data.shape == tuple(1 if a == fixed else vol.shape[a] for a in range(3))
    np.testing.assert_array_equal(np.take(out.data, 0, axis=fixed), want)
    t = np.array(layer.translate)
    t[fixed] += index * layer.scale[fixed]
    np.testing.assert_allclose(out.translate, t)
    np.testing.assert_allclose(out.scale, layer.scale)


def test_flipbook_4d(make_widget, wait_job, registered_model, em_volume):
    viewer, widget = make_widget()
    stack = em_volume[:6, :96, :128].reshape(2, 3, 96, 128)
    layer = viewer.add_image(stack)
    viewer.dims.set_point(0, 1)
    viewer.dims.set_point(1, 2)
    run(widget, wait_job, image_layer=layer)
    out = viewer.layers["empanada_seg_2d"]
    assert out.data.shape == (1, 1, 96, 128)
    np.testing.assert_array_equal(out.data[0, 0], expected(registered_model, stack[1, 2]))
    np.testing.assert_allclose(out.translate, (1, 2, 0, 0))


def test_multiscale_uses_level_0(make_widget, wait_job, registered_model, em_image):
    viewer, widget = make_widget()
    layer = viewer.add_image([em_image, em_image[::2, ::2]], multiscale=True)
    run(widget, wait_job, image_layer=layer)
    out = viewer.layers["empanada_seg_2d"]
    np.testing.assert_array_equal(out.data, expected(registered_model, em_image))


def test_confine_to_viewport(make_widget, wait_job, registered_model, lucchi_image):
    viewer, widget = make_widget()
    layer = viewer.add_image(lucchi_image)
    viewer.camera.center = (300, 500)
    viewer.camera.zoom = 6
    viewer.window._qt_viewer.canvas.on_draw(None)  # what a real redraw does: corner_pixels
    (y0, x0), (y1, x1) = layer.corner_pixels
    assert 0 < y0 < y1 < lucchi_image.shape[0] - 1 and 0 < x0 < x1 < lucchi_image.shape[1] - 1
    run(widget, wait_job, image_layer=layer, viewport=True)
    out = viewer.layers["empanada_seg_2d"]
    crop = lucchi_image[y0 : y1 + 1, x0 : x1 + 1]
    np.testing.assert_array_equal(out.data, expected(registered_model, crop))
    np.testing.assert_allclose(out.translate, (y0, x0))


def test_confine_to_shapes_roi(make_widget, wait_job, registered_model, em_image):
    from skimage.draw import polygon

    viewer, widget = make_widget()
    layer = viewer.add_image(em_image, scale=(2.0, 2.0))
    tri = np.array([[20.0, 30.0], [220.0, 60.0], [120.0, 300.0]])  # image pixels
    viewer.add_shapes([tri * 2.0], shape_type="polygon", name="roi")  # world = pixels * 2
    run(widget, wait_job, image_layer=layer, confine_to_roi=True, roi_layer=viewer.layers["roi"])
    mask = np.zeros(em_image.shape, bool)
    mask[polygon(tri[:, 0], tri[:, 1], em_image.shape)] = True
    out = viewer.layers["empanada_seg_2d"].data
    np.testing.assert_array_equal(out, expected(registered_model, em_image, roi=mask))
    assert not out[~mask].any() and out[mask].any()


def test_confine_to_labels_mask_on_a_volume_plane(
    make_widget, wait_job, registered_model, em_volume
):
    viewer, widget = make_widget()
    vol = em_volume[:8, :128, :128]
    layer = viewer.add_image(vol)
    mask_vol = np.zeros(vol.shape, np.uint8)
    mask_vol[3, 20:100, 10:90] = 1
    roi = viewer.add_labels(mask_vol, name="mask")
    viewer.dims.set_point(0, 3)
    run(widget, wait_job, image_layer=layer, confine_to_roi=True, roi_layer=roi)
    out = viewer.layers["empanada_seg_2d"].data[0]
    np.testing.assert_array_equal(out, expected(registered_model, vol[3], roi=mask_vol[3] > 0))


def test_batch_mode_stack_into_one_layer(make_widget, wait_job, registered_model, em_volume):
    viewer, widget = make_widget()
    stack = em_volume[:3, :128, :128]
    layer = viewer.add_image(stack, name="stack", scale=(4.0, 1.0, 1.0))
    job = run(widget, wait_job, image_layer=layer, batch_mode=True, fill_holes_in_segmentation=True)
    out = viewer.layers["stack_batch_segs"]
    want = Engine2D(registered_model).segment_batch(stack, Params2D(fill_holes=True))
    np.testing.assert_array_equal(out.data, want)
    np.testing.assert_allclose(out.scale, layer.scale)
    assert job.progress.stage_name == "images" and job.progress.done == 3


def test_output_to_layer_writes_only_the_plane_and_can_be_undone(
    make_widget, wait_job, registered_model, em_volume
):
    viewer, widget = make_widget()
    vol = em_volume[:6, :128, :128]
    layer = viewer.add_image(vol)
    before = np.zeros(vol.shape, np.int32)
    before[1, 5:9, 5:9] = 7  # the user's own labels elsewhere stay untouched
    before[4, :, :] = 3
    target = viewer.add_labels(before.copy(), name="target")
    viewer.dims.set_point(0, 4)
    run(widget, wait_job, image_layer=layer, output_to_layer=True, output_layer=target)
    want = expected(registered_model, vol[4])
    np.testing.assert_array_equal(target.data[4], want)
    np.testing.assert_array_equal(np.delete(target.data, 4, axis=0), np.delete(before, 4, axis=0))
    assert "empanada_seg_2d" not in viewer.layers
    target.undo()
    np.testing.assert_array_equal(target.data, before)


@pytest.mark.parametrize(
    "case", ["batch+output", "viewport-xz", "shape-mismatch", "batch+roi", "bad-max-objects"]
)
def test_conflicting_options_are_notifications(make_widget, notifications, em_volume, case):
    viewer, widget = make_widget()
    vol = em_volume[:4, :64, :64]
    layer = viewer.add_image(vol)
    widget.reset_choices()
    widget.image_layer.value = layer
    expect = {
        "batch+output": "Batch mode is not compatible with output to layer",
        "viewport-xz": "not supported for xz planes",
        "shape-mismatch": "Output layer must have the same shape as the input image",
        "batch+roi": "Batch mode is not compatible with ROI inference",
        "bad-max-objects": "Max objects per class must be a whole number",
    }[case]
    if case == "batch+output":
        target = viewer.add_labels(np.zeros(vol.shape, np.int32))
        widget.reset_choices()
        widget.batch_mode.value = widget.output_to_layer.value = True
        widget.output_layer.value = target
    elif case == "viewport-xz":
        viewer.dims.order = (1, 0, 2)
        widget.viewport.value = True
    elif case == "shape-mismatch":
        target = viewer.add_labels(np.zeros((4, 64, 65), np.int32))
        widget.reset_choices()
        widget.output_to_layer.value = True
        widget.output_layer.value = target
    elif case == "batch+roi":
        viewer.add_shapes([np.array([[1, 1], [30, 1], [30, 30]])], shape_type="polygon")
        widget.reset_choices()
        widget.batch_mode.value = widget.confine_to_roi.value = True
    else:
        widget.maximum_objects_per_class.value = "ten thousand"
    n_layers = len(viewer.layers)
    assert widget() is None
    assert any(level == "error" and expect in text for level, text in notifications)
    assert len(viewer.layers) == n_layers


def test_new_models_appear_without_reopening(make_widget, small_config, tmp_path, qtbot):
    import yaml
    from qtpy.QtCore import Qt

    from panoptem import registry

    viewer, widget = make_widget()
    assert "LateNet" not in widget.model_config.choices
    cfg = tmp_path / "late.yaml"
    cfg.write_text(yaml.safe_dump(small_config))
    registry.register_model("LateNet", cfg)
    qtbot.mouseClick(widget.model_config.native, Qt.MouseButton.LeftButton)  # opens the list
    widget.model_config.native.hidePopup()
    assert "LateNet" in widget.model_config.choices


def test_model_is_loaded_once_across_clicks(make_widget, wait_job, em_image):
    from panoptem import loading

    viewer, widget = make_widget()
    layer = viewer.add_image(em_image[:64, :64])
    run(widget, wait_job, image_layer=layer)
    cached = dict(loading._model_cache)
    run(widget, wait_job, image_layer=layer)
    assert len(cached) == 1 and loading._model_cache == cached
    assert len([lay for lay in viewer.layers if lay.name.startswith("empanada_seg_2d")]) == 2


def test_cancel_stops_a_tiled_run(make_widget, wait_job, notifications, lucchi_image):
    viewer, widget = make_widget()
    layer = viewer.add_image(lucchi_image)
    widget.reset_choices()
    widget.image_layer.value = layer
    widget.tile_size.value = 128
    job = widget()
    job.cancel()
    wait_job(job)
    assert type(job.error).__name__ == "Cancelled"
    assert "empanada_seg_2d" not in viewer.layers
    assert any(level == "info" and "cancelled" in text for level, text in notifications)


def test_labels_are_drawn_over_the_image(make_widget, wait_job, em_image, qtbot):
    viewer, widget = make_widget(show=True)
    image = viewer.add_image(em_image)
    run(widget, wait_job, image_layer=image, semantic_only=True, confidence_thr=0.1)
    labels = viewer.layers["empanada_seg_2d"]
    if not labels.data.any():
        pytest.skip("the untrained test model found no foreground on this image")
    viewer.reset_view()
    qtbot.wait(50)
    labels.visible = False
    under = viewer.screenshot(canvas_only=True, flash=False)[..., :3].astype(int)
    labels.visible = True
    over = viewer.screenshot(canvas_only=True, flash=False)[..., :3].astype(int)
    grey = np.abs(under - under.mean(-1, keepdims=True)).max(-1) < 2  # image only: grey
    coloured = np.abs(over - over.mean(-1, keepdims=True)).max(-1) > 20
    assert grey.mean() > 0.95
    changed = np.abs(over - under).sum(-1) > 30
    assert changed.any() and coloured[changed].mean() > 0.9


def test_gui_stays_responsive_and_the_bar_counts_tiles(make_widget, wait_job, lucchi_image, qtbot):
    from qtpy.QtCore import QTimer

    viewer, widget = make_widget()
    layer = viewer.add_image(lucchi_image[:384, :512])
    widget.reset_choices()
    widget.image_layer.value = layer
    widget.tile_size.value = 192
    ticks, bars = [], []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(1))
    timer.start(10)
    job = widget()
    job._relay.update.connect(lambda *_: bars.append((job.bar.desc, job.bar.n, job.bar.total)))
    wait_job(job)
    timer.stop()
    tiles = [b for b in bars if "tiles" in b[0]]
    assert tiles and tiles[-1][1] == tiles[-1][2] > 1  # determinate: n of N tiles
    assert len(ticks) > 5  # the event loop kept running while the model ran
    assert "empanada_seg_2d" in viewer.layers
