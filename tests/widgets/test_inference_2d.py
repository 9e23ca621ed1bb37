"""The "2D Inference (Parameter Testing)" widget, driven through its callbacks on real EM data.

Each parameter path is checked against a direct call of the core engine with the same
parameters: the widget must only choose the plane/region and place the result.
"""

from __future__ import annotations

import numpy as np
import pytest
from widgetutils import click, open_from_menu

from panoptem import loading
from panoptem.inference.engine import Engine2D, Params2D


@pytest.fixture
def em_image(lucchi_image) -> np.ndarray:
    """A 256 x 320 crop of a real FIB-SEM image (small enough for fast CPU tests)."""
    return np.ascontiguousarray(lucchi_image[200:456, 300:620])


TITLE = "2D Inference (Parameter Testing)"


@pytest.fixture
def make_widget(make_napari_viewer, registered_model):
    """``viewer, widget = make_widget()``: a viewer with the 2D widget opened from the
    Plugins menu, set to the small test model on the CPU."""

    def make(**viewer_kwargs):
        viewer = make_napari_viewer(**viewer_kwargs)
        widget = open_from_menu(viewer, TITLE)
        widget.model_config.value = registered_model
        widget.use_quantized.value = False
        return viewer, widget

    return make


def run(widget, wait_job, **values):
    widget.reset_choices()
    for name, value in values.items():
        getattr(widget, name).value = value
    return wait_job(click(widget))


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


def test_use_quantized_runs_the_bundled_int8_model(make_widget, wait_job, em_image):
    """ "Use quantized model" with the bundled model runs its real int8 file on CPU."""
    viewer, widget = make_widget()
    layer = viewer.add_image(em_image)
    job = run(
        widget, wait_job, image_layer=layer, model_config="panoptem_mito_small", use_quantized=True
    )
    assert job.error is None
    # the widget loaded the int8 file, in the cache's quantized slot, and nothing else
    assert [(m.path.name, m.quantized) for m in loading.cached_models()] == [
        ("panoptem_mito_small_quantized.pth", True)
    ]
    out = viewer.layers["empanada_seg_2d"].data
    engine = Engine2D("panoptem_mito_small", quantized=True)
    assert engine.loaded.quantized
    np.testing.assert_array_equal(out, engine.segment(em_image))
    assert len(np.unique(out)) > 2  # the trained model finds several mitochondria here


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
        "bad-max-objects": "Max objects per class must be 0 (number the objects 1..N) or a whole number",
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
    assert click(widget) is None
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


def test_model_is_loaded_once_across_clicks(make_widget, wait_job, em_image, monkeypatch):
    import torch

    reads = []
    jit_load = torch.jit.load
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: reads.append(a[0]) or jit_load(*a, **k))
    viewer, widget = make_widget()
    layer = viewer.add_image(em_image[:64, :64])
    run(widget, wait_job, image_layer=layer)
    cached = loading.cached_models()
    run(widget, wait_job, image_layer=layer)
    assert len(cached) == 1 and loading.cached_models() == cached
    assert len(reads) == 1  # the second click used the loaded model
    assert len([lay for lay in viewer.layers if lay.name.startswith("empanada_seg_2d")]) == 2


def test_cancel_stops_a_tiled_run(make_widget, wait_job, notifications, lucchi_image):
    viewer, widget = make_widget()
    layer = viewer.add_image(lucchi_image)
    widget.reset_choices()
    widget.image_layer.value = layer
    widget.tile_size.value = 128
    job = click(widget)
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
    job = click(widget)
    job._relay.update.connect(lambda *_: bars.append((job.bar.desc, job.bar.n, job.bar.total)))
    wait_job(job)
    timer.stop()
    tiles = [b for b in bars if "tiles" in b[0]]
    assert tiles and tiles[-1][1] == tiles[-1][2] > 1  # determinate: n of N tiles
    assert len(ticks) > 5  # the event loop kept running while the model ran
    assert "empanada_seg_2d" in viewer.layers


def test_fields_labels_defaults_and_button(make_napari_viewer, registered_model):
    """Labels, defaults, ranges and the button text are the original's (reference §5)."""
    viewer = make_napari_viewer()
    w = open_from_menu(viewer, TITLE)
    assert w._call_button.text == "Run 2D Inference"
    assert registered_model in w.model_config.choices
    labels = {
        "model_config": "Model",
        "downsampling": "Image Downsampling",
        "confidence_thr": "Segmentation Confidence Thr",
        "center_confidence_thr": "Center Confidence Thr",
        "min_distance_object_centers": "Centers Min Distance",
        "maximum_objects_per_class": "Max objects per class",
        "tile_size": "Tile size",
    }
    assert {name: getattr(w, name).label for name in labels} == labels
    texts = {
        "fine_boundaries": "Fine boundaries",
        "semantic_only": "Semantic only",
        "fill_holes_in_segmentation": "Fill holes in segmentation",
        "batch_mode": "Batch mode",
        "use_gpu": "Use GPU",
        "use_quantized": "Use quantized model",
        "viewport": "Confine to viewport",
        "confine_to_roi": "Confine to ROI",
        "output_to_layer": "Output to layer",
    }
    assert {name: getattr(w, name).text for name in texts} == texts
    defaults = {
        "downsampling": 1,
        "confidence_thr": 0.5,
        "center_confidence_thr": 0.1,
        "min_distance_object_centers": 3,
        "fine_boundaries": False,
        "semantic_only": False,
        "fill_holes_in_segmentation": False,
        "maximum_objects_per_class": "10000",
        "tile_size": 0,
        "batch_mode": False,
        "viewport": False,
        "confine_to_roi": False,
        "output_to_layer": False,
    }
    assert {name: getattr(w, name).value for name in defaults} == defaults
    assert list(w.downsampling.choices) == [1, 2, 4, 8, 16, 32, 64]
    ranges = {
        "confidence_thr": (0.1, 0.9, 0.1),
        "center_confidence_thr": (0.05, 0.9, 0.05),
        "min_distance_object_centers": (1, 35, 1),
        "tile_size": (0, 128000, 1280),
    }
    assert {n: (getattr(w, n).min, getattr(w, n).max, getattr(w, n).step) for n in ranges} == ranges


@pytest.mark.parametrize(
    "case, message",
    [
        ("rgb", "is an RGB image; convert it to grayscale"),
        ("rgb-batch", "is an RGB image; convert it to grayscale"),
        ("5d", "has 5 dimensions"),
        ("bool", "dtype bool"),
        ("roi-none", "Confine to ROI needs a Shapes or Labels layer"),
        ("roi-labels-shape", "use a labels layer of the image's shape"),
        ("roi-labels-empty", "has no labelled pixel in the current plane"),
        ("roi-shapes-elsewhere", "No shape of 'roi' covers the current plane"),
        ("no-output-layer", "Must select an output layer"),
        ("batch+viewport", "Batch mode is not compatible with viewport inference"),
        ("batch+multiscale", "Batch mode is not compatible with multiscale images"),
    ],
)
def test_bad_input_is_a_notification(make_widget, notifications, em_volume, case, message):
    """Each bad input is refused before any work starts, with a message that says what to do."""
    viewer, widget = make_widget()
    vol = np.ascontiguousarray(em_volume[:4, :64, :64])
    values: dict = {}
    if case.startswith("rgb"):
        layer = viewer.add_image(np.stack([vol[0]] * 3, axis=-1), rgb=True)
        values["batch_mode"] = case == "rgb-batch"
    elif case == "5d":
        layer = viewer.add_image(vol[:4, :16, :16].reshape(2, 2, 1, 16, 16))
    elif case == "bool":
        layer = viewer.add_image(vol[0] > 100)
    elif case == "batch+multiscale":
        layer = viewer.add_image([vol[0], vol[0, ::2, ::2]], multiscale=True)
        values["batch_mode"] = True
    else:
        layer = viewer.add_image(vol)
    if case == "roi-none":
        values["confine_to_roi"] = True
    elif case == "roi-labels-shape":
        values.update(confine_to_roi=True, roi_layer=viewer.add_labels(np.ones((4, 64, 65), int)))
    elif case == "roi-labels-empty":
        mask = np.zeros(vol.shape, np.uint8)
        mask[2, 10:20, 10:20] = 1  # another plane than the one shown (0)
        values.update(confine_to_roi=True, roi_layer=viewer.add_labels(mask))
    elif case == "roi-shapes-elsewhere":
        tri = np.array([[2, 1, 1], [2, 30, 1], [2, 30, 30]], float)  # drawn on plane 2
        roi = viewer.add_shapes([tri], shape_type="polygon", name="roi")
        values.update(confine_to_roi=True, roi_layer=roi)
    elif case == "no-output-layer":
        values["output_to_layer"] = True
    elif case == "batch+viewport":
        values.update(batch_mode=True, viewport=True)
    viewer.dims.set_point(0, 0)
    n_layers = len(viewer.layers)
    widget.reset_choices()
    values = {"image_layer": layer, **values}
    for name, value in values.items():
        getattr(widget, name).value = value
    assert click(widget) is None
    errors = [text for level, text in notifications if level == "error"]
    assert any(message in text for text in errors), errors
    assert len(viewer.layers) == n_layers


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_use_gpu_without_cuda_runs_on_the_cpu_with_one_notice(
    make_widget, wait_job, notifications, registered_model, em_image
):
    """As the original, a ticked "Use GPU" without CUDA runs on the CPU; one notice says so."""
    viewer, widget = make_widget()
    layer = viewer.add_image(em_image[:64, :64])
    job = run(widget, wait_job, image_layer=layer, use_gpu=True)
    assert job.error is None
    gpu_notes = [t for level, t in notifications if "Use GPU" in t]
    assert len(gpu_notes) == 1 and "running on the CPU" in gpu_notes[0]
    assert not [t for level, t in notifications if level == "error"]
    np.testing.assert_array_equal(
        viewer.layers["empanada_seg_2d"].data, expected(registered_model, em_image[:64, :64])
    )


def test_multiscale_confine_to_viewport(make_widget, wait_job, registered_model, lucchi_image):
    """A multiscale image is cut at the canvas (napari's multiscale corner_pixels are the
    loaded, chunk-grown region of the level on screen, not the viewport)."""
    viewer, widget = make_widget()
    big = np.ascontiguousarray(np.tile(lucchi_image[:512, :512], (2, 2)))
    levels = [big, big[::2, ::2], big[::4, ::4]]
    layer = viewer.add_image(levels, multiscale=True, scale=(2.0, 2.0), translate=(4.0, 6.0))
    flat = viewer.add_image(big, scale=(2.0, 2.0), translate=(4.0, 6.0), opacity=0, name="flat")
    viewer.scene.camera.center = (1100.0, 900.0)
    viewer.scene.camera.zoom = 1.5
    viewer.window._qt_viewer.canvas.on_draw(None)
    (y0, x0), (y1, x1) = flat.corner_pixels  # the viewport as napari computes it (level 0)
    assert 0 < y0 < y1 < big.shape[0] - 1 and 0 < x0 < x1 < big.shape[1] - 1
    run(widget, wait_job, image_layer=layer, viewport=True)
    out = viewer.layers["empanada_seg_2d"]
    oy, ox = np.round((np.asarray(out.translate) - (4.0, 6.0)) / 2.0).astype(int)
    h, w = out.data.shape
    # the same region up to one pixel of floating-point rounding at each edge
    assert abs(oy - y0) <= 1 and abs(ox - x0) <= 1
    assert abs(oy + h - 1 - y1) <= 1 and abs(ox + w - 1 - x1) <= 1
    assert h * w < big.size / 4
    np.testing.assert_array_equal(
        out.data, expected(registered_model, big[oy : oy + h, ox : ox + w])
    )
    np.testing.assert_allclose(out.scale, layer.scale)


def test_output_to_layer_on_a_transposed_plane_with_a_labels_roi(
    make_widget, wait_job, registered_model, em_volume
):
    """yz shown transposed (order z, y, x -> x, y, z): the result goes back into the right
    voxels of the output layer, only inside the ROI mask, and undo restores the layer."""
    viewer, widget = make_widget()
    vol = np.ascontiguousarray(em_volume[:32, :64, :48])
    layer = viewer.add_image(vol)
    before = np.zeros(vol.shape, np.int32)
    before[:, :, 7] = 5
    target = viewer.add_labels(before.copy(), name="target")
    mask = np.zeros(vol.shape, np.uint8)
    mask[4:28, 10:50, 7] = 1
    roi = viewer.add_labels(mask, name="mask")
    viewer.dims.order = (2, 1, 0)
    viewer.dims.set_point(2, 7)
    run(
        widget,
        wait_job,
        image_layer=layer,
        confine_to_roi=True,
        roi_layer=roi,
        output_to_layer=True,
        output_layer=target,
    )
    shown = vol[:, :, 7].T  # rows y, columns z
    seg = expected(registered_model, shown, roi=mask[:, :, 7].T > 0).T
    want = before.copy()
    inside = mask[:, :, 7] > 0
    want[:, :, 7][inside] = seg[inside]
    np.testing.assert_array_equal(target.data, want)
    target.undo()
    np.testing.assert_array_equal(target.data, before)
