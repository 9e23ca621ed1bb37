"""The napari widgets of panoptem (the only part of the package that imports napari or Qt).

Each widget module is thin: it reads its fields, calls one core function of panoptem in a
thread worker (:mod:`panoptem._widgets._worker`) and writes the result into layers.

Every widget is a class (a magicgui ``FunctionGui`` subclass) whose ``__init__`` takes
``napari_viewer``: napari 0.9 builds such a class from the Plugins menu and from
``viewer.window.add_plugin_dock_widget``, handing it the viewer (a plain function would be
called with no arguments). The classes are listed in the npe2 manifest (``napari.yaml``);
their fields take labels, defaults and ranges from the core's parameter dataclasses.
Nothing here is imported by ``import panoptem``.
"""
