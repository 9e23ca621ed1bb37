"""One source of truth for parameters: the widgets' fields are the dataclasses' parameters.

The original's exact labels, defaults and ranges are pinned in test_inference_2d.py and
test_inference_3d.py; here the widgets, the command line and Params2D / Params3D are
checked to agree, field by field, with the one documented difference (ortho-plane starts
on in the 3D widget, as the original's 1.2.4 widget, and off in the library and CLI).
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pytest
from widgetutils import click, open_from_menu

from panoptem._params import param_info
from panoptem.cli import build_parser
from panoptem.inference.engine import Engine2D, Params2D
from panoptem.inference.volume import LABELS_3D, MIN_DISTANCE_MAX_3D, Params3D

FIELDS_2D = {  # widget field -> Params2D field
    "downsampling": "downsampling",
    "confidence_thr": "confidence_thr",
    "center_confidence_thr": "center_confidence_thr",
    "min_distance_object_centers": "min_distance",
    "fine_boundaries": "fine_boundaries",
    "semantic_only": "semantic_only",
    "fill_holes_in_segmentation": "fill_holes",
    "maximum_objects_per_class": "max_objects",
    "tile_size": "tile_size",
}
FIELDS_3D = {  # widget field -> Params3D field
    "median_slices": "median_size",
    "min_size": "min_size",
    "min_extent": "min_extent",
    "maximum_objects_per_class": "max_objects",
    "inference_plane": "plane",
    "label_erosion": "erode",
    "label_dilation": "dilate",
    "fill_holes_in_segmentation": "fill_holes",
    "orthoplane": "ortho_plane",
    "return_panoptic": "return_stacks",
    "pixel_vote_thr": "vote_thr",
    "allow_one_view": "permit_one_stack",
    "chunk_size": "chunk_size",
}


def _shown(widget):
    """(label or check-box text, value, (min, max, step) or None, choices or None)."""
    label = widget.text if type(widget).__name__ == "CheckBox" else widget.label
    value = widget.value
    bounds = (widget.min, widget.max, widget.step) if hasattr(widget, "step") else None
    choices = tuple(widget.choices) if hasattr(widget, "choices") else None
    return label, value, bounds, choices


def _expected(info, widget, value=None):
    value = info.widget_default if value is None else value
    if type(widget).__name__ == "LineEdit":
        value = str(value)
    bounds = (info.min, info.max, info.step) if hasattr(widget, "step") else None
    return info.label, value, bounds, info.choices if hasattr(widget, "choices") else None


def test_2d_widget_cli_and_dataclass_agree(make_napari_viewer):
    w = open_from_menu(make_napari_viewer(), "2D Inference (Parameter Testing)")
    cli = vars(build_parser().parse_args(["segment", "x.tif", "-o", "y.tif"]))
    defaults = asdict(Params2D())
    for field, name in FIELDS_2D.items():
        info = param_info(Params2D, name)
        widget = getattr(w, field)
        assert _shown(widget) == _expected(info, widget), field
        assert info.widget_default == defaults[name] == cli[name], field


def test_3d_widget_cli_and_dataclass_agree(make_napari_viewer):
    w = open_from_menu(make_napari_viewer(), "3D Inference")
    cli = vars(build_parser().parse_args(["segment3d", "x.tif", "-o", "y.zarr"]))
    defaults = asdict(Params3D())
    for field, name in FIELDS_3D.items():
        info = param_info(Params3D, name)
        widget = getattr(w, field)
        assert _shown(widget) == _expected(info, widget), field
        assert defaults[name] == cli[name], field
        if name == "ortho_plane":  # the one widget default that differs, as in the original
            assert (info.widget_default, defaults[name]) == (True, False)
        else:
            assert info.widget_default == defaults[name], field
    # the 2D block of the 3D widget: Params2D with the 3D widget's own wording and range
    for field in ("downsampling", "confidence_thr", "center_confidence_thr",
                  "min_distance_object_centers", "fine_boundaries", "semantic_only"):
        name = FIELDS_2D[field]
        info = param_info(Params2D, name)
        label, value, bounds, choices = _shown(getattr(w, field))
        exp_label, exp_value, exp_bounds, exp_choices = _expected(info, getattr(w, field))
        assert (value, choices) == (exp_value, exp_choices) and value == cli[name], field
        assert label == LABELS_3D.get(name, exp_label), field
        if name == "min_distance":
            exp_bounds = (info.min, MIN_DISTANCE_MAX_3D, info.step)
        assert bounds == exp_bounds, field


def test_max_objects_0_in_the_2d_widget(make_napari_viewer, wait_job, registered_model,
                                        lucchi_image):
    image = np.ascontiguousarray(lucchi_image[200:456, 300:620])
    viewer = make_napari_viewer()
    w = open_from_menu(viewer, "2D Inference (Parameter Testing)")
    w.image_layer.value = viewer.add_image(image)
    w.model_config.value = registered_model
    w.use_quantized.value = False
    w.maximum_objects_per_class.value = "0"
    job = wait_job(click(w))
    assert job.error is None
    out = viewer.layers["empanada_seg_2d"].data
    expected = Engine2D(registered_model).segment(image, Params2D(max_objects=0))
    np.testing.assert_array_equal(out, expected)
    assert out.max() == len(np.unique(out)) - 1 >= 3  # ids 1..N


def test_max_objects_0_in_the_3d_widget(make_napari_viewer, wait_job, registered_model,
                                        em_volume):
    viewer = make_napari_viewer()
    w = open_from_menu(viewer, "3D Inference")
    w.image_layer.value = viewer.add_image(np.ascontiguousarray(em_volume[:8, :64, :64]),
                                           name="vol")
    for name, value in dict(model_config=registered_model, use_gpu=False, use_quantized=False,
                            orthoplane=False, min_size=50, min_extent=2, return_panoptic=True,
                            maximum_objects_per_class="0").items():
        getattr(w, name).value = value
    job = wait_job(click(w), timeout=600_000)
    assert job.error is None
    stack = viewer.layers["vol-panoptic-stack-xy"].data
    assert stack.max() == len(np.unique(stack)) - 1 >= 2  # no class offset: 1..N
    assert viewer.layers["vol-mito-prediction"].data.max() >= 1


@pytest.mark.parametrize("title, text", [("2D Inference (Parameter Testing)", "1"),
                                         ("3D Inference", "-5")])
def test_max_objects_1_or_negative_is_refused(make_napari_viewer, notifications, em_volume,
                                              registered_model, title, text):
    viewer = make_napari_viewer()
    w = open_from_menu(viewer, title)
    w.image_layer.value = viewer.add_image(np.ascontiguousarray(em_volume[:4, :32, :32]))
    w.model_config.value = registered_model
    w.maximum_objects_per_class.value = text
    assert click(w) is None
    errors = [t for level, t in notifications if level == "error"]
    assert any("must be 0 (number the objects 1..N) or a whole number >= 2" in t
               for t in errors), errors
