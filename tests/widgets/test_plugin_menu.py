"""Every widget opens the ways a user opens it, and starts as the original's does.

Plugins > panoptem > <widget> executes the widget's app-model command (what the menu item
triggers); ``viewer.window.add_plugin_dock_widget`` is the scripting way. napari hands the
widget a public-only proxy of the viewer there, and panoptem's own warnings are errors in
the tests, so a widget that touched the viewer's private state would fail here.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
from widgetutils import click, dock_name, open_from_menu, widget_command

from panoptem import registry
from panoptem.inference.engine import Engine2D, Params2D

MANIFEST_WIDGETS = [
    "2D Inference (Parameter Testing)",
    "3D Inference",
    "Export Segmentations",
    "Count Labels",
    "Merge Labels",
    "Delete Labels",
    "Morph Labels",
    "Split Labels",
    "Filter Labels",
    "Jump to label",
    "Find next available label",
    "Pick finetune/training patches",
    "Save finetune/training patches",
    "Finetune a model",
    "Train a model",
    "Register a model",
    "Get model info",
    "Export a model",
    "Import a model",
    "Archive a model",
    "Create Tiles",
    "Merge Tiles",
]


def _widget_class(display_name: str):
    from npe2 import PluginManager

    pm = PluginManager.instance()
    command = widget_command(display_name)
    for c in pm.get_manifest("panoptem").contributions.commands:
        if c.id == command:
            module, _, attr = c.python_name.partition(":")
            return getattr(importlib.import_module(module), attr)
    raise KeyError(command)


@pytest.mark.parametrize("title", MANIFEST_WIDGETS)
def test_menu_opens_the_widget_and_a_second_click_toggles_it(make_napari_viewer, title, qtbot):
    from napari._app_model import get_app_model

    viewer = make_napari_viewer(show=True)
    widget = open_from_menu(viewer, title)
    assert isinstance(widget, _widget_class(title))
    dock = widget.native.parent()
    qtbot.waitUntil(dock.isVisible)
    # the menu item is a toggle: a second click hides the same dock widget, a third shows it
    app = get_app_model()
    app.commands.execute_command(widget_command(title)).result()
    assert not dock.isVisible()
    app.commands.execute_command(widget_command(title)).result()
    assert dock.isVisible()
    assert viewer.window.dock_widgets[dock_name(title)] is widget
    assert list(viewer.window.dock_widgets).count(dock_name(title)) == 1


@pytest.mark.parametrize("title", MANIFEST_WIDGETS)
def test_add_plugin_dock_widget_opens_the_widget(make_napari_viewer, title):
    viewer = make_napari_viewer()
    dock, widget = viewer.window.add_plugin_dock_widget("panoptem", title)
    assert isinstance(widget, _widget_class(title))
    assert viewer.window.add_plugin_dock_widget("panoptem", title)[1] is widget  # once only


def test_2d_run_through_add_plugin_dock_widget(make_napari_viewer, wait_job, registered_model,
                                               lucchi_image):
    """The scripted way gives the widget a public-only viewer proxy: a run that reads the
    viewer (plane, viewport, ROI default) and adds a layer must work through it."""
    viewer = make_napari_viewer(show=True)
    _, widget = viewer.window.add_plugin_dock_widget("panoptem", "2D Inference (Parameter Testing)")
    image = viewer.add_image(lucchi_image[:256, :320])
    viewer.add_shapes([np.array([[10, 10], [10, 200], [150, 200], [150, 10]], float)],
                      shape_type="rectangle", name="roi")
    widget.reset_choices()
    widget.image_layer.value = image
    widget.model_config.value = registered_model
    widget.use_quantized.value = False
    widget.confine_to_roi.value = True
    job = wait_job(click(widget))
    assert job.error is None
    mask = np.zeros((256, 320), bool)
    mask[10:151, 10:201] = True
    expected = Engine2D(registered_model).segment(lucchi_image[:256, :320], Params2D(), roi=mask)
    np.testing.assert_array_equal(viewer.layers["empanada_seg_2d"].data, expected)


def test_model_dropdowns_start_with_mitonet_then_builtins_bundled_and_user_models(
    make_napari_viewer, registered_model
):
    viewer = make_napari_viewer()
    expected = ["MitoNet_v1", "MitoNet_v1_mini", "NucleoNet_base_v2", "DropNet_base_v1",
                "panoptem_mito_small", registered_model]
    assert registry.list_models() == expected
    for title, field in (("2D Inference (Parameter Testing)", "model_config"),
                         ("3D Inference", "model_config"), ("Get model info", "model_name"),
                         ("Export a model", "model_name"), ("Archive a model", "model_name")):
        combo = getattr(open_from_menu(viewer, title), field)
        assert list(combo.choices) == expected, title
        assert combo.value == "MitoNet_v1", title


@pytest.mark.parametrize("layers, expected", [(("labels", "shapes"), "shapes"),
                                              (("labels",), "labels"), ((), None)])
def test_roi_layer_defaults_to_the_first_shapes_then_labels_layer(make_napari_viewer, layers,
                                                                  expected):
    viewer = make_napari_viewer()
    viewer.add_image(np.zeros((32, 32), np.uint8), name="image")
    for kind in layers:
        getattr(viewer, f"add_{kind}")(
            np.zeros((32, 32), np.int32) if kind == "labels" else None, name=kind)
    widget = open_from_menu(viewer, "2D Inference (Parameter Testing)")
    value = widget.roi_layer.value
    assert (value.name if value is not None else None) == expected
    if expected is None:  # a Shapes layer added later becomes the default
        viewer.add_shapes(name="later")
        assert widget.roi_layer.value.name == "later"


def test_unreachable_model_names_the_bundled_offline_model(make_napari_viewer, wait_job,
                                                           notifications, lucchi_image,
                                                           monkeypatch):
    """MitoNet_v1 (preselected) is not in the cache and cannot be downloaded here: the
    notification says so and names the model that needs no download."""
    monkeypatch.setenv("PANOPTEM_OFFLINE", "1")
    viewer = make_napari_viewer()
    widget = open_from_menu(viewer, "2D Inference (Parameter Testing)")
    widget.image_layer.value = viewer.add_image(lucchi_image[:64, :64])
    widget.use_quantized.value = False
    assert widget.model_config.value == "MitoNet_v1"
    job = wait_job(click(widget))
    assert type(job.error).__name__ == "PanoptemError"
    errors = [text for level, text in notifications if level == "error"]
    assert any("MitoNet_v1.pth" in t and "'panoptem_mito_small'" in t for t in errors), errors
    widget.model_config.value = "panoptem_mito_small"
    job = wait_job(click(widget))
    assert job.error is None and "empanada_seg_2d" in viewer.layers
