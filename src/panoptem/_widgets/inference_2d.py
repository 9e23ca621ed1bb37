"""The "2D Inference (Parameter Testing)" widget.

Segments the plane the viewer shows (or, in batch mode, every image of a stack) with the
original's 2D parameters and writes a Labels layer. The widget only reads its fields and
the viewer's state; the work is one call of :class:`panoptem.inference.engine.Engine2D`
(``segment`` or ``segment_batch``) in a thread worker, with the model loaded once and
cached by :func:`panoptem.loading.load_model` across clicks.

Output: a new Labels layer ``empanada_seg_2d`` placed on the plane (the image's scale and
translate plus the plane, viewport and ROI offsets), ``<image>_batch_segs`` in batch mode,
or, with "Output to layer", the segmented region written into the chosen Labels layer
through napari's undo history.
"""


import napari
import numpy as np
from magicgui.widgets import FunctionGui
from napari.layers import Image, Labels, Shapes
from napari.utils.notifications import show_error

from panoptem._widgets import _common as common
from panoptem._widgets import _settings
from panoptem._widgets._worker import start_job
from panoptem.errors import PanoptemError
from panoptem.inference.engine import Params2D
from panoptem.inference.preprocess import check_image_2d

__all__ = ["Inference2D", "LAYER_NAME"]

#: Name of the layer a 2D run adds (the original's).
LAYER_NAME = "empanada_seg_2d"


def _options(viewer) -> dict:
    """magicgui options of the fields; the parameters' own come from :class:`Params2D`."""

    def roi_layers(_widget=None):
        return [(lay.name, lay) for lay in viewer.layers if isinstance(lay, Shapes | Labels)]

    def p2(name: str, widget_type: str | None = None) -> dict:
        return common.param_options(Params2D, name, widget_type)

    return dict(
        model_config=common.model_combo_options(),
        downsampling=p2("downsampling"),
        confidence_thr=p2("confidence_thr"),
        center_confidence_thr=p2("center_confidence_thr"),
        min_distance_object_centers=p2("min_distance"),
        fine_boundaries=p2("fine_boundaries"),
        semantic_only=p2("semantic_only"),
        fill_holes_in_segmentation=p2("fill_holes"),
        maximum_objects_per_class=p2("max_objects", "LineEdit"),
        tile_size=p2("tile_size"),
        batch_mode=dict(widget_type="CheckBox", text="Batch mode", value=False,
                        tooltip="Segment each image of a stack independently."),
        use_gpu=dict(widget_type="CheckBox", text="Use GPU", value=common.default_use_gpu(),
                     tooltip="Run on the first GPU (on the CPU when there is none)"),
        use_quantized=dict(widget_type="CheckBox", text="Use quantized model",
                           value=common.default_use_quantized(),
                           tooltip="Use the model's int8 version on CPU, if it has one"),
        viewport=dict(widget_type="CheckBox", text="Confine to viewport", value=False,
                      tooltip="Segment only the part of the plane visible in the viewer."),
        confine_to_roi=dict(widget_type="CheckBox", text="Confine to ROI", value=False,
                            tooltip="Segment only inside the shapes (or the non-zero labels) "
                                    "of the ROI layer."),
        roi_layer=dict(widget_type="ComboBox", choices=roi_layers, label="ROI layer",
                       nullable=True, tooltip="Shapes or Labels layer that defines the ROI "
                       "(the first Shapes layer, else the first Labels layer, unless chosen)"),
        output_to_layer=dict(widget_type="CheckBox", text="Output to layer", value=False,
                             tooltip="Write the segmentation into the selected output layer."),
        output_layer=dict(label="Output layer", nullable=True),
    )


def _check(image_layer, batch_mode, viewport, confine_to_roi, roi_layer, output_to_layer,
           output_layer) -> None:
    """The original's checks of conflicting options, as messages that say what to change."""
    common.require(image_layer is not None, "Add or select an image layer to segment.")
    if batch_mode:
        common.require(not output_to_layer, "Batch mode is not compatible with output to "
                       "layer: untick 'Output to layer' or 'Batch mode'.")
        common.require(not image_layer.multiscale, "Batch mode is not compatible with "
                       "multiscale images: untick 'Batch mode'.")
        common.require(not viewport, "Batch mode is not compatible with viewport inference: "
                       "untick 'Confine to viewport' or 'Batch mode'.")
        common.require(not confine_to_roi, "Batch mode is not compatible with ROI inference: "
                       "untick 'Confine to ROI' or 'Batch mode'.")
        common.require(not getattr(image_layer, "rgb", False),
                       f"'{image_layer.name}' is an RGB image; convert it to grayscale first.")
        common.require(image_layer.ndim in (2, 3), "Batch mode segments a 2D image or a 3D "
                       f"stack; '{image_layer.name}' is {image_layer.ndim}D.")
    if confine_to_roi:
        common.require(roi_layer is not None, "Confine to ROI needs a Shapes or Labels layer: "
                       "add one and choose it as the ROI layer.")
    if output_to_layer:
        common.require(output_layer is not None, "Must select an output layer or uncheck "
                       "'Output to layer'.")
        shape = tuple(common.level0(image_layer).shape)
        common.require(tuple(output_layer.data.shape) == shape,
                       f"Output layer must have the same shape as the input image: "
                       f"'{output_layer.name}' is {tuple(output_layer.data.shape)}, "
                       f"'{image_layer.name}' is {shape}.")


def _segment_plane(model, device, quantized, params: Params2D, image, roi):
    """The work of one 2D run (worker thread): load (cached), then segment."""
    from panoptem.inference.engine import Engine2D
    from panoptem.loading import load_model

    def work(progress):
        progress.stage("loading model", 0)
        engine = Engine2D(load_model(model, device=device, quantized=quantized,
                                     progress=progress))
        tiled = params.tile_size > 0 and max(image.shape) > params.tile_size
        if not tiled:
            progress.stage("segmenting", 1)
        seg = engine.segment(image, params, roi=roi, progress=progress)
        if not tiled:
            progress.advance()
        return seg

    return work


def _segment_batch(model, device, quantized, params: Params2D, stack):
    from panoptem.inference.engine import Engine2D
    from panoptem.loading import load_model

    def work(progress):
        progress.stage("loading model", 0)
        engine = Engine2D(load_model(model, device=device, quantized=quantized,
                                     progress=progress))
        return engine.segment_batch(stack, params, progress=progress)

    return work


class Inference2D(FunctionGui):
    """The "2D Inference (Parameter Testing)" dock widget (npe2 widget contribution).

    napari builds it from the Plugins menu with the viewer (``napari_viewer``). Clicking
    "Run 2D Inference" (or calling the widget) starts the job and returns its
    :class:`~panoptem._widgets._worker.Job`, or None when an option was invalid (the
    reason is shown as a notification).
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        self._viewer = napari_viewer
        super().__init__(self.run_2d_inference, call_button="Run 2D Inference",
                         layout="vertical", scrollable=True, name="inference_2d",
                         param_options=_options(napari_viewer))
        common.install_model_refresh(self.model_config)
        self._default_roi()

    def reset_choices(self, *args) -> None:
        """Re-read layer and model choices (napari calls this when layers change)."""
        super().reset_choices(*args)
        self._default_roi()

    def _default_roi(self) -> None:
        if self.roi_layer.value is None:
            default = common.default_roi_layer(self._viewer)
            if default is not None:
                self.roi_layer.value = default

    def run_2d_inference(
        self,
        image_layer: Image,
        model_config: str,
        downsampling: int,
        confidence_thr: float,
        center_confidence_thr: float,
        min_distance_object_centers: int,
        fine_boundaries: bool,
        semantic_only: bool,
        fill_holes_in_segmentation: bool,
        maximum_objects_per_class: str,
        tile_size: int,
        batch_mode: bool,
        use_gpu: bool,
        use_quantized: bool,
        viewport: bool,
        confine_to_roi: bool,
        roi_layer,
        output_to_layer: bool,
        output_layer: Labels,
    ):
        viewer = self._viewer
        if confine_to_roi and roi_layer is None:
            roi_layer = common.default_roi_layer(viewer)
        try:
            _check(image_layer, batch_mode, viewport, confine_to_roi, roi_layer,
                   output_to_layer, output_layer)
            common.require(bool(model_config), "No model is registered; register one with "
                           "'Register a model'.")
            params = Params2D(
                downsampling=int(downsampling), confidence_thr=float(confidence_thr),
                center_confidence_thr=float(center_confidence_thr),
                min_distance=int(min_distance_object_centers), fine_boundaries=fine_boundaries,
                semantic_only=semantic_only, fill_holes=fill_holes_in_segmentation,
                max_objects=common.max_objects(maximum_objects_per_class, "Max objects per class"),
                tile_size=int(tile_size),
            ).validated()
            _settings.apply_model_home()
            if batch_mode:
                return _run_batch(viewer, image_layer, model_config,
                                  common.device_name(use_gpu), use_quantized, params)
            plane = common.current_plane(viewer, image_layer, viewport=viewport)
            check_image_2d(plane.image, what=f"current plane of '{image_layer.name}'")
            roi = common.roi_mask(plane, image_layer, roi_layer) if confine_to_roi else None
            device = common.device_name(use_gpu)
        except PanoptemError as err:
            show_error(str(err))
            return None

        def show(seg: np.ndarray) -> None:
            if output_to_layer:
                _write_into(output_layer, plane, seg, roi)
            else:
                viewer.add_labels(plane.as_layer_data(seg), name=LAYER_NAME,
                                  scale=image_layer.scale, translate=plane.translate(image_layer))

        work = _segment_plane(model_config, device, use_quantized, params, plane.image, roi)
        return start_job(work, title="2D inference", on_done=show)


def _run_batch(viewer, image_layer, model_config, device, quantized, params):
    data = np.asarray(image_layer.data)

    def show(stack: np.ndarray) -> None:
        if data.ndim == 2:
            viewer.add_labels(stack[0], name=LAYER_NAME, scale=image_layer.scale,
                              translate=image_layer.translate)
        else:
            viewer.add_labels(stack, name=f"{image_layer.name}_batch_segs",
                              scale=image_layer.scale, translate=image_layer.translate)

    work = _segment_batch(model_config, device, quantized, params, data)
    return start_job(work, title="2D batch inference", on_done=show)


def _write_into(layer, plane: common.Plane, seg: np.ndarray, roi: np.ndarray | None) -> None:
    """Write ``seg`` over the plane's region of a Labels layer (one undoable edit)."""
    coords = plane.coordinates(roi)
    values = seg[roi] if roi is not None else seg.reshape(-1)
    dtype = np.dtype(layer.data.dtype)
    if values.size and dtype.kind in "iu" and int(values.max()) > np.iinfo(dtype).max:
        raise PanoptemError(
            f"Label ids up to {int(values.max())} do not fit the {dtype} output layer "
            f"'{layer.name}'; lower 'Max objects per class' or use a uint32/int32 layer."
        )
    layer.data_setitem(coords, values.astype(layer.data.dtype, copy=False))
    layer.visible = True
