"""How the widget tests open and run widgets: only the ways a user does.

:func:`open_from_menu` runs the widget's app-model command, which is what
Plugins > panoptem > <widget> triggers (the other way, ``viewer.window.add_plugin_dock_widget``,
is tested in test_plugin_menu.py). A run is started with :func:`click`, a click on the
widget's call button, never by calling a factory by hand. Import as
``from widgetutils import ...`` (a module, not conftest.py: see tests/testutils.py).
"""

from __future__ import annotations

PLUGIN = "panoptem"


def widget_command(display_name: str) -> str:
    """The app-model command id of the panoptem widget called ``display_name``."""
    from npe2 import PluginManager

    pm = PluginManager.instance()
    pm.discover()
    for w in pm.get_manifest(PLUGIN).contributions.widgets:
        if w.display_name == display_name:
            return w.command
    raise KeyError(f"no panoptem widget named {display_name!r}")


def dock_name(display_name: str) -> str:
    """The name napari gives the dock widget (the Window menu's entry)."""
    return f"{display_name} ({PLUGIN})"


def open_from_menu(viewer, display_name: str):
    """Open a widget as Plugins > panoptem > ``display_name`` does, and return it.

    napari's menu item executes the widget's app-model command on the current viewer; a
    second execution toggles the dock widget's visibility.
    """
    from napari._app_model import get_app_model

    get_app_model().commands.execute_command(widget_command(display_name)).result()
    return viewer.window.dock_widgets[dock_name(display_name)]


def click(widget):
    """Click the widget's call button; return what the run returned (a Job or None)."""
    returned = []
    widget.called.connect(returned.append)
    try:
        widget.call_button.native.click()
    finally:
        widget.called.disconnect(returned.append)
    assert len(returned) == 1, "the click did not run the widget"
    return returned[0]
