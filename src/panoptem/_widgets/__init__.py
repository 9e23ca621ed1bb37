"""The napari widgets of panoptem (the only part of the package that imports napari or Qt).

Each widget module is thin: it reads its fields, calls one core function of panoptem in a
thread worker (:mod:`panoptem._widgets._worker`) and writes the result into layers. Widget
factories are listed in the npe2 manifest (``napari.yaml``); nothing here is imported by
``import panoptem``.
"""
