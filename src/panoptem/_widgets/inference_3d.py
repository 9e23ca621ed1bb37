"""The "3D Inference" widget: stack or ortho-plane segmentation of a volume.

The fields, labels, defaults and ranges are the original's (empanada-napari 1.2.4). A click
maps them onto :class:`~panoptem.inference.engine.Params2D` and
:class:`~panoptem.inference.volume.Params3D` and runs one core call in a thread worker:
:meth:`Engine3D.segment <panoptem.inference.volume.Engine3D.segment>`, or with "Multi GPU"
:func:`~panoptem.inference.distributed.segment_volume_distributed` over every CUDA device.
The results become Labels layers named as the original's, ``<image>-<class>-prediction``
and ``<image>-panoptic-stack-<axis>``, with the image's scale and translate. With a zarr
directory the arrays are written to ``<directory>/<image>_<model>.zarr`` (``_1``, ``_2``,
... when that store exists: an earlier run is never replaced; a directory that cannot be
written is refused before the run) and the layers show them lazily from disk (edits, e.g.
proofreading, are written back to the store); the engine records the layer names, scale
and translate in the store, so :mod:`panoptem._reader` reopens it as it was shown.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import napari
from magicgui.widgets import FunctionGui, Label
from napari.layers import Image
from napari.utils.notifications import show_error, show_info

from panoptem._files import free_path, writable_folder
from panoptem._widgets import _common, _settings
from panoptem._widgets._worker import Job, start_job
from panoptem.errors import PanoptemError
from panoptem.inference.engine import Params2D
from panoptem.inference.volume import (
    LABELS_3D,
    MIN_DISTANCE_MAX_3D,
    Params3D,
    check_volume,
)
from panoptem.inference.zarr_store import StoreInfo

__all__ = ["Inference3D", "NO_ZARR", "multi_gpu_devices", "zarr_store_path", "block_store_path"]

#: The zarr directory field's value that means "keep the results in memory" (the original's).
NO_ZARR = "no zarr storage"


def multi_gpu_devices() -> list[str]:
    """The devices "Multi GPU" runs on: every visible CUDA device, as the original."""
    import torch

    return [f"cuda:{i}" for i in range(torch.cuda.device_count())]


def zarr_store_path(store_dir, image_name: str, model: str) -> Path | None:
    """``<store_dir>/<image>_<model>.zarr`` (``_1``, ``_2``, ... if that store exists), or
    None when no directory was chosen.

    Raises PanoptemError when the directory cannot be created or written.
    """
    text = str(store_dir or "").strip()
    if text in ("", ".", NO_ZARR):
        return None
    folder = writable_folder(text, "zarr directory")
    return free_path(folder / f"{image_name}_{model}.zarr")


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


def block_store_path(store_dir, image_name: str, model: str) -> Path:
    """Where a block-wise run writes: ``<store_dir>/<image>_<model>.zarr`` when that store is
    an unfinished block-wise run (it is resumed), else the first free name as
    :func:`zarr_store_path`. Raises PanoptemError without a directory."""
    from panoptem.inference.blockwise import is_unfinished_run

    text = str(store_dir or "").strip()
    if text in ("", ".", NO_ZARR):
        raise PanoptemError("A block-wise run writes an OME-Zarr store: choose a Directory under "
                            "'Zarr Storage', or untick 'Run block-wise'.")
    first = writable_folder(text, "zarr directory") / f"{image_name}_{model}.zarr"
    return first if is_unfinished_run(first) else zarr_store_path(store_dir, image_name, model)


def run_3d_inference(viewer, image_layer: Image, model: str, *, use_gpu: bool = False,
                     use_quantized: bool = False, multigpu: bool = False,
                     params2d: Params2D, params3d: Params3D, store_dir=NO_ZARR,
                     blocks: bool = False, block_size: str = "", workers: int = 1,
                     precision: str = "float32") -> Job:
    """Start a 3D run of ``model`` on ``image_layer``; the layers are added when it ends.

    With ``blocks`` the volume runs block-wise on a local dask cluster of ``workers``
    processes (:func:`~panoptem.inference.blockwise.segment_blocks`) into an OME-Zarr store
    in ``store_dir``; an unfinished block-wise store of the same image and model there is
    resumed. ``precision="bfloat16"`` (panoptem's opt-in, "Use bfloat16") runs on one
    device, with the float model.

    Raises PanoptemError (before anything starts) for a missing layer or model, a 2D image,
    bad parameters, or "Multi GPU" with fewer than two CUDA devices.
    """
    _common.require(image_layer is not None, "Choose an image layer to segment.")
    _common.require(bool(model), "No model is registered; register one with 'Register a model'.")
    p3 = params3d.validated()
    p2 = params2d.validated()
    _settings.apply_model_home()
    target = _target(image_layer)
    devices = multi_gpu_devices() if multigpu else None
    if devices is not None and len(devices) < 2:
        raise PanoptemError(
            f"Multi GPU needs at least two CUDA GPUs; {len(devices)} found. Untick Multi GPU."
        )
    if blocks and devices:
        raise PanoptemError("Multi GPU and 'Run block-wise' do not go together: block-wise "
                            "workers take one GPU each. Untick one of them.")
    if precision != "float32":
        clash = [name for name, on in (("Use quantized model", use_quantized),
                                       ("Multi GPU", devices), ("Run block-wise", blocks)) if on]
        if clash:
            raise PanoptemError(f"'Use bfloat16' does not go together with '{clash[0]}': "
                                "untick one of them.")
    info = StoreInfo(target.name, target.scale, target.translate)
    device = None if devices else _common.device_name(use_gpu)
    if blocks:
        return _run_blocks(viewer, image_layer, target, model, device, use_quantized, p2, p3,
                           block_store_path(store_dir, target.name, model), info,
                           str(block_size).strip() or None, int(workers))
    zarr_path = zarr_store_path(store_dir, target.name, model)

    def work(progress):
        if devices:
            from panoptem.inference.distributed import segment_volume_distributed

            return segment_volume_distributed(model, target.volume, p2, p3, devices=devices,
                                              zarr_path=zarr_path, store_info=info,
                                              progress=progress, quantized=use_quantized)
        from panoptem.inference.engine import Engine2D
        from panoptem.inference.volume import Engine3D

        engine = Engine3D(Engine2D(model, device, use_quantized, progress=progress,
                                   precision=precision))
        return engine.segment(target.volume, p2, p3, zarr_path=zarr_path, store_info=info,
                              progress=progress)

    def done(result):
        _add_layers(viewer, image_layer, target, result)
        if zarr_path is not None:
            show_info(f"3D Inference: results saved in {zarr_path}")

    return start_job(work, title="3D Inference", on_done=done)


def _run_blocks(viewer, image_layer, target: _Target, model, device, quantized, p2, p3, path,
                info, block_size, workers) -> Job:
    from panoptem.inference.blockwise import BlockGrid, Cluster, segment_blocks

    if block_size is not None:
        BlockGrid.make(tuple(target.volume.shape), block_size, None, p3)  # say what is wrong now
    if p3.return_stacks:
        raise PanoptemError("'Return xy, xz, yz stacks' is not available block-wise: untick it "
                            "or 'Run block-wise'.")

    def work(progress):
        return segment_blocks(model, target.volume, p2, p3, output=path, block_shape=block_size,
                              cluster=Cluster(workers=workers), device=device, quantized=quantized,
                              store_info=info, progress=progress)

    def done(result):
        _add_layers(viewer, image_layer, target, result)
        show_info(f"3D Inference: results saved in {path}")

    return start_job(work, title="3D Inference (block-wise)", on_done=done)


def _options() -> dict:
    """magicgui options of the fields; the parameters' own come from Params2D / Params3D,
    with the 3D widget's own wording and "Centers Min Distance" range."""

    def p2(name: str, **overrides) -> dict:
        return _common.param_options(Params2D, name, **overrides)

    def p3(name: str, widget_type: str | None = None) -> dict:
        return _common.param_options(Params3D, name, widget_type)

    return dict(
        model_config=_common.model_combo_options(label="model"),
        use_gpu=dict(widget_type="CheckBox", text="Use GPU", value=_common.default_use_gpu(),
                     tooltip="If checked, run on GPU 0 (on the CPU when there is none)"),
        use_quantized=dict(widget_type="CheckBox", text="Use quantized model",
                           value=_common.default_use_quantized(),
                           tooltip="If checked, use the quantized model for faster CPU inference."),
        multigpu=dict(widget_type="CheckBox", text="Multi GPU", value=False,
                      tooltip="If checked, run on all available GPUs"),
        use_bfloat16=dict(widget_type="CheckBox", text="Use bfloat16", value=False,
                          tooltip="panoptem only: run the float model in bfloat16. Faster on "
                                  "CPUs with AVX-512 BF16 or AMX (slower on others); the labels "
                                  "agree closely but not exactly. Untick 'Use quantized model'."),
        downsampling=p2("downsampling"),
        confidence_thr=p2("confidence_thr"),
        center_confidence_thr=p2("center_confidence_thr"),
        min_distance_object_centers=p2("min_distance", max=MIN_DISTANCE_MAX_3D),
        fine_boundaries=p2("fine_boundaries", text=LABELS_3D["fine_boundaries"]),
        semantic_only=p2("semantic_only", text=LABELS_3D["semantic_only"]),
        median_slices=p3("median_size"),
        min_size=p3("min_size"),
        min_extent=p3("min_extent"),
        maximum_objects_per_class=p3("max_objects", "LineEdit"),
        inference_plane=p3("plane"),
        label_erosion=p3("erode"),
        label_dilation=p3("dilate"),
        fill_holes_in_segmentation=p3("fill_holes"),
        orthoplane=p3("ortho_plane"),
        return_panoptic=p3("return_stacks"),
        pixel_vote_thr=p3("vote_thr"),
        allow_one_view=p3("permit_one_stack"),
        store_dir=dict(widget_type="FileEdit", value=NO_ZARR, label="Directory", mode="d",
                       tooltip="location to store segmentations on disk"),
        chunk_size=p3("chunk_size", "LineEdit"),
        run_blockwise=dict(widget_type="CheckBox", text="Run block-wise (dask)", value=False,
                           tooltip="For volumes too big for memory: overlapping blocks run on a "
                                   "local dask cluster and are stitched; results go to an "
                                   "OME-Zarr store in the Directory, and an unfinished run of "
                                   "the same image and model there is resumed"),
        block_size=dict(widget_type="LineEdit", value="", label="Block size",
                        tooltip="Block size in voxels: one number or z, y, x (empty: 32, 1024, "
                                "1024 for an xy stack, 192, 384, 384 otherwise)"),
        workers=dict(widget_type="SpinBox", value=1, min=1, max=64, label="Workers",
                     tooltip="Worker processes of the local dask cluster (one GPU each with "
                             "Use GPU)"),
    )


#: Section headers of the original, placed above these fields.
_SECTIONS = (("downsampling", "2D Parameters"), ("median_slices", "Stack Parameters"),
             ("label_erosion", "Ortho-plane Parameters (Optional)"),
             ("store_dir", "Zarr Storage (optional)"),
             ("run_blockwise", "Block-wise (big volumes, optional)"))


class Inference3D(FunctionGui):
    """The "3D Inference" dock widget (npe2 widget contribution).

    napari builds it from the Plugins menu with the viewer (``napari_viewer``). Clicking
    "Run 3D Inference" (or calling the widget) returns the started
    :class:`~panoptem._widgets._worker.Job`, or None when an option was invalid (the
    reason is shown as a notification).
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        self._viewer = napari_viewer
        super().__init__(self.run_3d_inference, call_button="Run 3D Inference",
                         layout="vertical", scrollable=True, name="inference_3d",
                         param_options=_options())
        for name, title in _SECTIONS:
            head = Label(name=f"{name}_head", label=f"<h3>{title}</h3>", gui_only=True)
            self.insert(self.index(getattr(self, name)), head)
        _common.install_model_refresh(self.model_config)

    def run_3d_inference(self, image_layer: napari.layers.Image, model_config, use_gpu,
                         use_quantized, multigpu, use_bfloat16, downsampling, confidence_thr,
                         center_confidence_thr,
                         min_distance_object_centers, fine_boundaries, semantic_only,
                         median_slices, min_size, min_extent, maximum_objects_per_class,
                         inference_plane, label_erosion, label_dilation,
                         fill_holes_in_segmentation, orthoplane, return_panoptic,
                         pixel_vote_thr, allow_one_view, store_dir, chunk_size,
                         run_blockwise=False, block_size="", workers=1):
        try:
            p2 = Params2D(downsampling=int(downsampling), confidence_thr=float(confidence_thr),
                          center_confidence_thr=float(center_confidence_thr),
                          min_distance=int(min_distance_object_centers),
                          fine_boundaries=fine_boundaries, semantic_only=semantic_only,
                          max_objects=_common.max_objects(maximum_objects_per_class,
                                                         "Max objects per class in 3D"))
            p3 = Params3D(median_size=int(median_slices), min_size=int(min_size),
                          min_extent=int(min_extent), max_objects=p2.max_objects,
                          plane=inference_plane, erode=int(label_erosion),
                          dilate=int(label_dilation), fill_holes=fill_holes_in_segmentation,
                          ortho_plane=orthoplane, return_stacks=return_panoptic,
                          vote_thr=int(pixel_vote_thr), permit_one_stack=allow_one_view,
                          chunk_size=str(chunk_size))
            return run_3d_inference(self._viewer, image_layer, model_config, use_gpu=use_gpu,
                                    use_quantized=use_quantized, multigpu=multigpu,
                                    params2d=p2, params3d=p3, store_dir=store_dir,
                                    blocks=run_blockwise, block_size=block_size, workers=workers,
                                    precision="bfloat16" if use_bfloat16 else "float32")
        except PanoptemError as err:
            show_error(str(err))
            return None
