"""The "3D Inference" widget: stack or ortho-plane segmentation of a volume.

The fields, labels, defaults and ranges are the original's (empanada-napari 1.2.4). A click
maps them onto :class:`~panoptem.inference.engine.Params2D` and
:class:`~panoptem.inference.volume.Params3D` and runs one core call in a thread worker:
:meth:`Engine3D.segment <panoptem.inference.volume.Engine3D.segment>`, or with "Multi GPU"
:func:`~panoptem.inference.distributed.segment_volume_distributed` over every CUDA device.
The results become Labels layers named as the original's, ``<image>-<class>-prediction``
and ``<image>-panoptic-stack-<axis>``, with the image's scale and translate. With a zarr
directory the arrays are written to ``<directory>/<image>_<model>.zarr`` and the layers
show them lazily from disk (edits, e.g. proofreading, are written back to the store);
:mod:`panoptem._reader` reopens that store later.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import napari
from magicgui import magicgui
from magicgui.widgets import FunctionGui, Label
from napari.layers import Image
from napari.utils.notifications import show_error, show_info

from panoptem._widgets import _common, _settings
from panoptem._widgets._worker import Job, start_job
from panoptem.errors import PanoptemError
from panoptem.inference.engine import Params2D
from panoptem.inference.volume import Params3D, check_volume

__all__ = ["inference_3d_widget", "NO_ZARR", "multi_gpu_devices", "zarr_store_path"]

#: The zarr directory field's value that means "keep the results in memory" (the original's).
NO_ZARR = "no zarr storage"

#: Group attribute under which the widget records how to name and place the zarr arrays.
ZARR_ATTR = "panoptem"


def multi_gpu_devices() -> list[str]:
    """The devices "Multi GPU" runs on: every visible CUDA device, as the original."""
    import torch

    return [f"cuda:{i}" for i in range(torch.cuda.device_count())]


def zarr_store_path(store_dir, image_name: str, model: str) -> Path | None:
    """``<store_dir>/<image>_<model>.zarr``, or None when no directory was chosen."""
    text = str(store_dir or "").strip()
    if text in ("", ".", NO_ZARR):
        return None
    return Path(text).expanduser() / f"{image_name}_{model}.zarr"


@dataclass(frozen=True)
class _Target:
    """The volume of an image layer and where its results go (taken at click time)."""

    volume: object
    name: str
    scale: tuple
    translate: tuple


def _target(layer: Image) -> _Target:
    """Level 0 of a multiscale image; a 4D image loses a leading or trailing channel axis
    of size 1, 3 or 4 (its first channel is used), and the scale and translate with it."""
    data = layer.data[0] if layer.multiscale else layer.data
    if getattr(layer, "rgb", False) and data.ndim == 3:
        raise PanoptemError(
            f"'{layer.name}' is a 2D RGB image, not a volume; 3D Inference needs a grayscale "
            "volume (Z, Y, X). Use 2D Inference on a grayscale version of it."
        )
    scale, translate = tuple(layer.scale), tuple(layer.translate)
    if data.ndim == 4 and data.shape[0] in (1, 3, 4):
        data, scale, translate = data[0], scale[1:], translate[1:]
    elif data.ndim == 4 and data.shape[-1] in (1, 3, 4):
        data, scale, translate = data[..., 0], scale[:-1], translate[:-1]
    if data.ndim != 3:
        raise PanoptemError(
            f"3D Inference needs a volume (Z, Y, X); '{layer.name}' has shape {tuple(data.shape)}. "
            "Use 2D Inference for single images."
        )
    check_volume(data)  # empty, boolean or non-numeric volumes: say so before any work
    return _Target(data, layer.name, scale[-3:], translate[-3:])


def _max_objects(text) -> int:
    try:
        return int(str(text).strip())
    except ValueError:
        raise PanoptemError(
            f"Max objects per class in 3D must be a whole number (e.g. 10000); got '{text}'."
        ) from None


def _finish_store(path: Path, target: _Target, model: str, result) -> None:
    """Record the image name, model, scale and translate in the zarr group for the reader,
    and reopen the result arrays writable so that proofreading edits go to the store."""
    import zarr

    group = zarr.open_group(str(path), mode="r+")
    group.attrs[ZARR_ATTR] = {
        "image": target.name, "model": model,
        "scale": [float(s) for s in target.scale],
        "translate": [float(t) for t in target.translate],
    }
    result.classes = {c: group[c] for c in result.classes}
    result.stacks = {ax: group[f"panoptic_{ax}"] for ax in result.stacks}


def _add_layers(viewer, image_layer, target: _Target, result) -> list:
    """Add every result array as a Labels layer; show only the image and the last one."""
    names = result.layer_names(target.name)
    order = sorted(names, key=lambda n: "-panoptic-stack-" not in n)  # stacks first, as the original
    added = [viewer.add_labels(names[n], name=n, scale=target.scale, translate=target.translate)
             for n in order]
    if added:
        for layer in viewer.layers:
            layer.visible = False
        added[-1].visible = True
        if image_layer in viewer.layers:
            image_layer.visible = True
    return added


def run_3d_inference(viewer, image_layer: Image, model: str, *, use_gpu: bool = False,
                     use_quantized: bool = False, multigpu: bool = False,
                     params2d: Params2D, params3d: Params3D, store_dir=NO_ZARR) -> Job:
    """Start a 3D run of ``model`` on ``image_layer``; the layers are added when it ends.

    Raises PanoptemError (before anything starts) for a missing layer or model, a 2D image,
    bad parameters, or "Multi GPU" with fewer than two CUDA devices.
    """
    _common.require(image_layer is not None, "Choose an image layer to segment.")
    _common.require(bool(model), "No model is registered; register one with 'Register a model'.")
    p3 = params3d.validated()
    p2 = params2d.validated()
    _settings.apply_model_home()
    target = _target(image_layer)
    zarr_path = zarr_store_path(store_dir, target.name, model)
    devices = multi_gpu_devices() if multigpu else None
    if devices is not None and len(devices) < 2:
        raise PanoptemError(
            f"Multi GPU needs at least two CUDA GPUs; {len(devices)} found. Untick Multi GPU."
        )

    def work(progress):
        if devices:
            from panoptem.inference.distributed import segment_volume_distributed

            result = segment_volume_distributed(model, target.volume, p2, p3, devices=devices,
                                                zarr_path=zarr_path, progress=progress,
                                                quantized=use_quantized)
        else:
            from panoptem.inference.engine import Engine2D
            from panoptem.inference.volume import Engine3D

            engine = Engine3D(Engine2D(model, _common.device_name(use_gpu), use_quantized,
                                       progress=progress))
            result = engine.segment(target.volume, p2, p3, zarr_path=zarr_path, progress=progress)
        if zarr_path is not None:
            _finish_store(zarr_path, target, model, result)
        return result

    def done(result):
        _add_layers(viewer, image_layer, target, result)
        if zarr_path is not None:
            show_info(f"3D Inference: results saved in {zarr_path}")

    return start_job(work, title="3D Inference", on_done=done)


def inference_3d_widget(viewer: napari.viewer.Viewer) -> FunctionGui:
    """The "3D Inference" dock widget for ``viewer`` (npe2 widget factory)."""

    @magicgui(
        call_button="Run 3D Inference",
        layout="vertical",
        scrollable=True,
        model_config=_common.model_combo_options(label="model"),
        use_gpu=dict(widget_type="CheckBox", text="Use GPU", value=_common.default_use_gpu(),
                     tooltip="If checked, run on GPU 0"),
        use_quantized=dict(widget_type="CheckBox", text="Use quantized model",
                           value=_common.default_use_quantized(),
                           tooltip="If checked, use the quantized model for faster CPU inference."),
        multigpu=dict(widget_type="CheckBox", text="Multi GPU", value=False,
                      tooltip="If checked, run on all available GPUs"),
        downsampling=dict(widget_type="ComboBox", choices=[1, 2, 4, 8, 16, 32, 64], value=1,
                          label="Image Downsampling",
                          tooltip="Downsampling factor to apply before inference"),
        confidence_thr=dict(widget_type="FloatSpinBox", value=0.5, min=0.1, max=0.9, step=0.1,
                            label="Segmentation Confidence Thr"),
        center_confidence_thr=dict(widget_type="FloatSpinBox", value=0.1, min=0.05, max=0.9,
                                   step=0.05, label="Center Confidence Thr"),
        min_distance_object_centers=dict(widget_type="SpinBox", value=3, min=1, max=21, step=1,
                                         label="Centers Min Distance"),
        fine_boundaries=dict(widget_type="CheckBox", text="Fine Boundaries", value=False,
                             tooltip="Finer boundaries between objects"),
        semantic_only=dict(widget_type="CheckBox", text="Semantic Only", value=False,
                           tooltip="Only run semantic segmentation for all classes."),
        median_slices=dict(widget_type="ComboBox", choices=[1, 3, 5, 7, 9, 11], value=3,
                           label="Median Filter Size", tooltip="Median filter size"),
        min_size=dict(widget_type="SpinBox", value=500, min=0, max=1_000_000, step=100,
                      label="Min Size (Voxels)"),
        min_extent=dict(widget_type="SpinBox", value=5, min=0, max=1000, step=1,
                        label="Min Box Extent"),
        maximum_objects_per_class=dict(widget_type="LineEdit", value="10000",
                                       label="Max objects per class in 3D",
                                       tooltip="Maximum number of objects per class in 3D inference"),
        inference_plane=dict(widget_type="ComboBox", choices=["xy", "xz", "yz"], value="xy",
                             label="Inference plane",
                             tooltip="Image plane along which to run inference. Overwritten, "
                                     "if using ortho-plane."),
        label_erosion=dict(widget_type="SpinBox", value=0, min=0, max=50, step=1,
                           label="Erode Labels",
                           tooltip="How much to erode labels produced after inference"),
        label_dilation=dict(widget_type="SpinBox", value=0, min=0, max=50, step=1,
                            label="Dilate Labels",
                            tooltip="How much to dilate labels produced after inference"),
        fill_holes_in_segmentation=dict(widget_type="CheckBox", text="Fill holes in segmentation",
                                        value=False, tooltip="Whether to fill holes in the "
                                        "segmentation after inference"),
        orthoplane=dict(widget_type="CheckBox", text="Run ortho-plane", value=True,
                        tooltip="Whether to run orthoplane inference"),
        return_panoptic=dict(widget_type="CheckBox", text="Return xy, xz, yz stacks", value=False,
                             tooltip="Whether to return the inference stacks."),
        pixel_vote_thr=dict(widget_type="SpinBox", value=2, min=1, max=3, step=1,
                            label="Voxel Vote Thr Out of 3",
                            tooltip="Number of votes out of 3 for a voxel to be labeled in the "
                                    "consensus"),
        allow_one_view=dict(widget_type="CheckBox",
                            text="Permit detections found in 1 stack into consensus", value=False,
                            tooltip="Whether to allow detections into consensus that were "
                                    "picked up by inference in just 1 stack"),
        store_dir=dict(widget_type="FileEdit", value=NO_ZARR, label="Directory", mode="d",
                       tooltip="location to store segmentations on disk"),
        chunk_size=dict(widget_type="LineEdit", value="256", label="Chunk size",
                        tooltip="Chunk size of the zarr array. Integer or comma separated list "
                                "of 3 integers."),
    )
    def widget(image_layer: napari.layers.Image, model_config, use_gpu, use_quantized, multigpu,
               downsampling, confidence_thr, center_confidence_thr, min_distance_object_centers,
               fine_boundaries, semantic_only, median_slices, min_size, min_extent,
               maximum_objects_per_class, inference_plane, label_erosion, label_dilation,
               fill_holes_in_segmentation, orthoplane, return_panoptic, pixel_vote_thr,
               allow_one_view, store_dir, chunk_size):
        try:
            p2 = Params2D(downsampling=int(downsampling), confidence_thr=float(confidence_thr),
                          center_confidence_thr=float(center_confidence_thr),
                          min_distance=int(min_distance_object_centers),
                          fine_boundaries=fine_boundaries, semantic_only=semantic_only,
                          max_objects=_max_objects(maximum_objects_per_class))
            p3 = Params3D(median_size=int(median_slices), min_size=int(min_size),
                          min_extent=int(min_extent), max_objects=p2.max_objects,
                          plane=inference_plane, erode=int(label_erosion),
                          dilate=int(label_dilation), fill_holes=fill_holes_in_segmentation,
                          ortho_plane=orthoplane, return_stacks=return_panoptic,
                          vote_thr=int(pixel_vote_thr), permit_one_stack=allow_one_view,
                          chunk_size=str(chunk_size))
            return run_3d_inference(viewer, image_layer, model_config, use_gpu=use_gpu,
                                    use_quantized=use_quantized, multigpu=multigpu,
                                    params2d=p2, params3d=p3, store_dir=store_dir)
        except PanoptemError as err:
            show_error(str(err))
            return None

    for name, title in (("downsampling", "2D Parameters"), ("median_slices", "Stack Parameters"),
                        ("label_erosion", "Ortho-plane Parameters (Optional)"),
                        ("store_dir", "Zarr Storage (optional)")):
        head = Label(name=f"{name}_head", label=f"<h3>{title}</h3>", gui_only=True)
        widget.insert(widget.index(getattr(widget, name)), head)
    _common.install_model_refresh(widget.model_config)
    return widget
