"""Helpers the panoptem widgets share: fields from the parameter dataclasses, the model
drop-down, device choices, the ROI default, messages, and the plane a 2D widget works on.

The model drop-down lists :func:`panoptem.registry.list_models` afresh whenever napari
resets widget choices (layer changes), when the widget is shown and when the user clicks
it, so a model registered while napari runs appears without reopening the widget
(SPEC §5.13).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from qtpy.QtCore import QEvent, QObject

from panoptem import registry
from panoptem._params import divisor_count, param_info
from panoptem._widgets import _settings
from panoptem.errors import PanoptemError

__all__ = [
    "param_options",
    "default_roi_layer",
    "model_choices",
    "model_combo_options",
    "install_model_refresh",
    "default_use_gpu",
    "default_use_quantized",
    "device_name",
    "require",
    "Plane",
    "level0",
    "layer_axes",
    "current_plane",
    "roi_mask",
]


def param_options(cls, name: str, widget_type: str | None = None, **overrides) -> dict:
    """magicgui options of a field that shows parameter ``name`` of dataclass ``cls``.

    Label (or check-box text), starting value, range, step, choices and tooltip come from
    the dataclass (:func:`panoptem._params.param_info`); ``overrides`` replace single
    options where one widget words or bounds a parameter differently (the 3D widget).
    A "LineEdit" shows the value as text (the original's "Max objects per class").
    """
    info = param_info(cls, name)
    if widget_type is None:
        kind = type(info.default)
        widget_type = ("CheckBox" if kind is bool else "ComboBox" if info.choices
                       else "FloatSpinBox" if kind is float else "SpinBox" if kind is int
                       else "LineEdit")
    value = info.widget_default
    opts: dict = {"widget_type": widget_type, "tooltip": info.help,
                  "value": str(value) if widget_type == "LineEdit" else value}
    opts["text" if widget_type == "CheckBox" else "label"] = info.label
    if info.choices and widget_type == "ComboBox":
        opts["choices"] = list(info.choices)
    for key in ("min", "max", "step"):
        if getattr(info, key) is not None and widget_type != "LineEdit":
            opts[key] = getattr(info, key)
    opts.update(overrides)
    return opts


def max_objects(text, label: str) -> int:
    """The "Max objects per class" text field (a line edit, as in the original widget) as a
    number, see :func:`~panoptem._params.divisor_count`."""
    try:
        value = int(str(text).strip())
    except ValueError:
        value = text
    return divisor_count(label, value)


def default_roi_layer(viewer):
    """The ROI layer a 2D run uses unless one is chosen: the first Shapes layer, else the
    first Labels layer (None when there is neither)."""
    from napari.layers import Labels, Shapes

    for kind in (Shapes, Labels):
        for layer in viewer.layers:
            if isinstance(layer, kind):
                return layer
    return None


def model_choices(*_args) -> list[str]:
    """Every registered model name, read from disk now (magicgui ``choices`` callable)."""
    _settings.apply_model_home()
    return registry.list_models()


def model_combo_options(label: str = "Model") -> dict:
    """magicgui options of a model drop-down whose choices are re-read on every reset."""
    names = model_choices()
    return dict(widget_type="ComboBox", choices=model_choices, label=label,
                value=names[0] if names else None, tooltip="Model to use for inference")


class _RefreshOnUse(QObject):
    """Re-reads a ComboBox's choices when it is clicked, focused or shown."""

    _EVENTS = (QEvent.Type.MouseButtonPress, QEvent.Type.FocusIn, QEvent.Type.Show)

    def __init__(self, combo) -> None:
        super().__init__(combo.native)
        self._combo = combo

    def eventFilter(self, obj, event) -> bool:  # noqa: N802 - Qt's name
        if event.type() in self._EVENTS:
            self._combo.reset_choices()
        return False


def install_model_refresh(combo) -> None:
    """Make a magicgui model ComboBox list newly registered models when used."""
    combo.native.installEventFilter(_RefreshOnUse(combo))


def default_use_gpu() -> bool:
    """"Use GPU" starts ticked when the preferences say so (auto: CUDA is present)."""
    return _settings.default_use_gpu()


def default_use_quantized() -> bool:
    """"Use quantized model" starts ticked without CUDA when torch has a quantized engine."""
    import torch

    engines = [e for e in torch.backends.quantized.supported_engines if e != "none"]
    return not torch.cuda.is_available() and bool(engines)


def device_name(use_gpu: bool) -> str:
    """The torch device of the "Use GPU" box: the first GPU, as the original; without CUDA
    the CPU, with one notice saying so (the original ignores the box there)."""
    if not use_gpu:
        return "cpu"
    import torch

    if torch.cuda.is_available():
        return "cuda"
    from napari.utils.notifications import show_warning

    show_warning("'Use GPU' is ticked but no CUDA GPU is available here: running on the CPU.")
    return "cpu"


def folder_field(value) -> str | None:
    """A folder field's path, None when it is empty or left at "." (the original's none)."""
    text = str(value or "").strip()
    return None if text in ("", ".") else text


def file_field(value) -> str | None:
    """A file field's path, None when empty (a cleared file field shows a folder)."""
    text = folder_field(value)
    return None if text is None or Path(text).is_dir() else text


def require(condition: bool, message: str) -> None:
    """Raise PanoptemError(message) when a widget precondition fails."""
    if not condition:
        raise PanoptemError(message)


# --------------------------------------------------------------------------------------
# The 2D plane a widget works on
# --------------------------------------------------------------------------------------
@dataclass
class Plane:
    """The 2D region of an image layer that the viewer shows, and how to put results back.

    Attributes
    ----------
    image : ndarray (h, w)
        The region as displayed: rows along ``axes[0]``, columns along ``axes[1]``.
    axes : (int, int)
        Data axes of the layer shown as rows and columns (``viewer.dims.order[-2:]``).
    index : tuple
        Index into the layer's (level-0) data that selects the region: an int on every
        fixed axis, a slice on the two displayed axes.
    shape : tuple
        Shape of the layer's level-0 data.
    """

    image: np.ndarray
    axes: tuple[int, int]
    index: tuple
    shape: tuple

    @property
    def fixed(self) -> list[int]:
        return [a for a in range(len(self.shape)) if a not in self.axes]

    def start(self, axis: int) -> int:
        return self.index[axis].start or 0

    def to_data_order(self, plane2d: np.ndarray) -> np.ndarray:
        """A (h, w) array in display orientation, as the layer's own axis order."""
        return plane2d.T if self.axes[0] > self.axes[1] else plane2d

    def from_data_order(self, region: np.ndarray) -> np.ndarray:
        return region.T if self.axes[0] > self.axes[1] else region

    def as_layer_data(self, plane2d: np.ndarray) -> np.ndarray:
        """The result with a length-1 axis on every fixed axis (a layer of the image's ndim)."""
        return np.expand_dims(self.to_data_order(plane2d), tuple(self.fixed))

    def translate(self, layer) -> np.ndarray:
        """World translate of :meth:`as_layer_data` given the image layer's scale/translate."""
        t = np.asarray(layer.translate, dtype=float).copy()
        scale = np.asarray(layer.scale, dtype=float)
        for a in range(len(self.shape)):
            t[a] += (self.index[a] if a in self.fixed else self.start(a)) * scale[a]
        return t

    def coordinates(self, mask: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
        """Data indices of the region's pixels (only where ``mask``, display orientation)."""
        h, w = self.image.shape
        rr, cc = np.nonzero(mask) if mask is not None else np.indices((h, w)).reshape(2, -1)
        coords = [None] * len(self.shape)
        coords[self.axes[0]] = rr + self.start(self.axes[0])
        coords[self.axes[1]] = cc + self.start(self.axes[1])
        for a in self.fixed:
            coords[a] = np.full(rr.shape, self.index[a], dtype=np.intp)
        return tuple(coords)


def level0(layer):
    """The full-resolution data of an image layer (level 0 of a multiscale one)."""
    return layer.data[0] if layer.multiscale else layer.data


def layer_axes(viewer, layer) -> tuple[list[int], list[int]]:
    """(fixed, displayed) data axes of ``layer`` in the viewer's current order."""
    offset = viewer.dims.ndim - layer.ndim
    order = [d - offset for d in viewer.dims.order if d >= offset]
    return order[:-2], order[-2:]


def current_plane(viewer, layer, viewport: bool = False) -> Plane:
    """The plane of ``layer`` the viewer shows, optionally cropped to the visible region.

    A 2D image is used whole; a 3D image is cut at the viewer's position along the first
    axis of ``dims.order`` (xy, xz or yz); a 4D stack at its position on the first two
    axes. Multiscale images use level 0. With ``viewport`` only the pixels inside the
    canvas (``layer.corner_pixels``) are taken.
    """
    data = level0(layer)
    if getattr(layer, "rgb", False):
        raise PanoptemError(f"'{layer.name}' is an RGB image; convert it to grayscale first.")
    if data.ndim not in (2, 3, 4):
        raise PanoptemError(
            f"'{layer.name}' has {data.ndim} dimensions; 2D inference takes a 2D image, a 3D "
            "volume or a 4D stack."
        )
    fixed, displayed = layer_axes(viewer, layer)
    offset = viewer.dims.ndim - layer.ndim
    pos = layer.world_to_data(np.asarray(viewer.dims.point)[offset:])
    index: list = [slice(None)] * data.ndim
    for a in fixed:
        index[a] = int(np.clip(np.round(pos[a]), 0, data.shape[a] - 1))
    if viewport:
        if data.ndim == 3 and fixed == [1]:
            raise PanoptemError(
                "Confine to viewport is not supported for xz planes; switch to the xy or yz "
                "view, or untick 'Confine to viewport'."
            )
        corners = (_viewport_corners(viewer, layer, displayed) if layer.multiscale
                   else np.asarray(layer.corner_pixels, dtype=float))
        for a in displayed:
            lo = int(np.clip(np.floor(corners[0, a]), 0, data.shape[a] - 1))
            hi = int(np.clip(np.ceil(corners[1, a]) + 1, lo + 1, data.shape[a]))
            index[a] = slice(lo, hi)
    region = np.asarray(data[tuple(index)])
    plane = Plane(region, (displayed[0], displayed[1]), tuple(index), tuple(data.shape))
    plane.image = plane.from_data_order(region)
    return plane


def _viewport_corners(viewer, layer, displayed: list[int]) -> np.ndarray:
    """(2, ndim) level-0 data corners of the canvas for a multiscale ``layer``.

    napari's ``corner_pixels`` of a multiscale layer are in the coordinates of the level on
    screen, grown to chunk boundaries and never shrunk while zooming in, so they are not
    the viewport. This maps the canvas corners (camera centre and zoom, viewbox size) from
    world to level-0 data coordinates the way napari does for single-scale layers.
    """
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera
    size = np.asarray(viewer.canvas.viewbox_size(viewer.layers), dtype=float)
    center = np.asarray(camera.center, dtype=float)[-2:]
    half = size / 2.0 / float(camera.zoom)
    offset = viewer.dims.ndim - layer.ndim
    world_axes = [a + offset for a in displayed]
    point = np.asarray(viewer.dims.point, dtype=float)
    corners = []
    for dy in (-1, 1):
        for dx in (-1, 1):
            p = point.copy()
            p[world_axes] = center + np.array([dy, dx]) * half
            corners.append(np.asarray(layer.world_to_data(p[offset:]), dtype=float))
    corners = np.asarray(corners)
    out = np.zeros((2, layer.ndim))
    out[0, displayed] = np.floor(corners[:, displayed].min(axis=0))
    out[1, displayed] = np.ceil(corners[:, displayed].max(axis=0))
    return out


def roi_mask(plane: Plane, image_layer, roi_layer) -> np.ndarray:
    """Boolean mask of ``plane`` (display orientation) from a Shapes or Labels layer.

    Shapes: the inside of every polygon, rectangle and ellipse on the current plane, mapped
    through both layers' scale and translate. Labels: the non-zero pixels of the same plane
    (the labels layer must have the image's shape).
    """
    kind = type(roi_layer).__name__
    if kind == "Labels":
        if tuple(roi_layer.data.shape) != plane.shape:
            raise PanoptemError(
                f"The ROI labels layer '{roi_layer.name}' has shape {tuple(roi_layer.data.shape)} "
                f"but the image has shape {plane.shape}; use a labels layer of the image's shape."
            )
        region = np.asarray(roi_layer.data[plane.index]) != 0
        if not region.any():
            raise PanoptemError(
                f"The ROI labels layer '{roi_layer.name}' has no labelled pixel in the "
                "current plane; paint the region to segment, or untick 'Confine to ROI'."
            )
        return plane.from_data_order(region)
    if kind != "Shapes":
        raise PanoptemError("Confine to ROI needs a Shapes or Labels layer as the ROI layer.")
    from skimage.draw import ellipse, polygon

    h, w = plane.image.shape
    mask = np.zeros((h, w), dtype=bool)
    nd_img, nd_shp = len(plane.shape), roi_layer.ndim
    img_s, img_t = np.asarray(image_layer.scale, float), np.asarray(image_layer.translate, float)
    shp_s, shp_t = np.asarray(roi_layer.scale, float), np.asarray(roi_layer.translate, float)

    def to_image(vertices: np.ndarray, a: int) -> np.ndarray | None:
        b = a - nd_img + nd_shp  # the same world axis in the shapes layer
        if b < 0:
            return None
        return (vertices[:, b] * shp_s[b] + shp_t[b] - img_t[a]) / img_s[a]

    for vertices, shape_type in zip(roi_layer.data, roi_layer.shape_type, strict=True):
        vertices = np.asarray(vertices, dtype=float)
        on_plane = True
        for a in plane.fixed:
            coord = to_image(vertices, a)
            if coord is not None and not np.all(np.round(coord) == plane.index[a]):
                on_plane = False
        rows, cols = to_image(vertices, plane.axes[0]), to_image(vertices, plane.axes[1])
        if not on_plane or rows is None or cols is None:
            continue
        rows = rows - plane.start(plane.axes[0])
        cols = cols - plane.start(plane.axes[1])
        if shape_type == "ellipse":
            rr, cc = ellipse((rows.min() + rows.max()) / 2, (cols.min() + cols.max()) / 2,
                             (rows.max() - rows.min()) / 2, (cols.max() - cols.min()) / 2,
                             shape=(h, w))
        else:
            rr, cc = polygon(rows, cols, shape=(h, w))
        mask[rr, cc] = True
    if not mask.any():
        raise PanoptemError(
            f"No shape of '{roi_layer.name}' covers the current plane; draw a polygon, "
            "rectangle or ellipse on it, or untick 'Confine to ROI'."
        )
    return mask
