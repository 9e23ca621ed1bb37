"""The training widgets: Pick and Save finetune/training patches, Finetune and Train a model.

Each maps its fields onto one core call: :func:`panoptem.training.patches.pick_patches`,
:func:`~panoptem.training.patches.store_patches`,
:func:`panoptem.training.finetune.finetune_model` and
:func:`panoptem.training.train.train_model`. Picking and storing are quick; finetuning and
training run in a thread worker with a progress bar over the iterations whose text reads
out the loss and the last validation, and a cancel that keeps the last checkpoint. A new
model is registered at the end and every open model drop-down lists it at once. Titles,
labels, defaults and ranges are the original's.
"""

from __future__ import annotations

from pathlib import Path

import napari
import numpy as np
from magicgui.widgets import FunctionGui, Label
from napari.utils.notifications import show_error, show_info

from panoptem._widgets import _common, _settings
from panoptem._widgets._worker import start_job
from panoptem.errors import PanoptemError
from panoptem.training.config import ARCHITECTURES
from panoptem.training.loop import FINETUNE_LAYERS
from panoptem.training.patches import pick_patches, store_patches

__all__ = ["PickPatches", "SavePatches", "FinetuneModel", "TrainModel"]


# --------------------------------------------------------------------------------------
# Pick finetune/training patches
# --------------------------------------------------------------------------------------
def points_in_image(points_layer, image_layer, level: int) -> np.ndarray:
    """The points of ``points_layer`` as pixel coordinates of ``image_layer`` at ``level``.

    Both layers' scale and translate are respected (points go to world coordinates, then
    into the image's data coordinates); a multiscale level divides by its downsampling.
    """
    if points_layer is None or len(points_layer.data) == 0:
        return np.zeros((0, image_layer.ndim))
    ndim = image_layer.ndim
    out = []
    for point in np.asarray(points_layer.data, dtype=float):
        world = np.asarray(points_layer.data_to_world(point), dtype=float)[-ndim:]
        if len(world) < ndim:
            raise PanoptemError(
                f"The points layer '{points_layer.name}' has {points_layer.ndim} dimensions but "
                f"'{image_layer.name}' has {ndim}; use a points layer of the image's dimensions."
            )
        out.append(np.asarray(image_layer.world_to_data(world), dtype=float))
    pts = np.asarray(out)
    if image_layer.multiscale and level:
        pts = pts / np.asarray(image_layer.downsample_factors[level], dtype=float)
    return pts


class PickPatches(FunctionGui):
    """The "Pick finetune/training patches" widget (npe2 widget contribution).

    Adds ``<image>_patches`` (2D images and stacks) or ``<image>_flipbooks`` (volumes) and
    a Labels layer of the same shape to annotate (or the cropped paired labels); the patch
    names and crops are kept in both layers' metadata for "Save finetune/training patches".
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        self._viewer = napari_viewer
        super().__init__(
            self.run, call_button="Pick patches", layout="vertical",
            name="pick_patches",
            param_options=dict(
                points_layer=dict(label="points layer", nullable=True,
                                  tooltip="Optional: points on the places to pick"),
                num_patches=dict(widget_type="SpinBox", value=16, min=1, max=3200, step=1,
                                 label="Number of patches for annotation"),
                patch_size=dict(widget_type="SpinBox", value=256, min=224, max=102400, step=16,
                                label="Patch size in pixels"),
                pyramid_level=dict(widget_type="ComboBox", choices=list(range(9)), value=0,
                                   label="Multiscale image level",
                                   tooltip="For a multiscale image, the level to pick from"),
                pick_points_only=dict(widget_type="CheckBox", text="Pick all points",
                                      value=False, tooltip="One patch per point, no random ones"),
                isotropic=dict(widget_type="CheckBox", text="Pick from xy, xz, or yz",
                               value=False, tooltip="A volume with isotropic voxels: flipbooks "
                               "along any of its three planes"),
                is_2d_stack=dict(widget_type="CheckBox", text="Image is 2D stack", value=False,
                                 tooltip="The image is a stack of unrelated 2D images"),
                label_option=dict(widget_type="CheckBox",
                                  text="Pick paired patches from images and GT labels",
                                  value=False, tooltip="Crop the labels layer too"),
                labels_layer=dict(label="labels layer", nullable=True,
                                  tooltip="The ground-truth labels of the image"),
            ),
        )
        head = Label(name="label_option_head", label="<h3>Paired labeled data (optional)</h3>",
                     gui_only=True)
        self.insert(self.index(self.label_option), head)

    def run(self, image_layer: napari.layers.Image, points_layer: napari.layers.Points,
                     num_patches: int, patch_size: int, pyramid_level: int,
                     pick_points_only: bool, isotropic: bool, is_2d_stack: bool,
                     label_option: bool, labels_layer: napari.layers.Labels):
        viewer = self._viewer
        try:
            _common.require(image_layer is not None, "Add or select the image to pick from.")
            _common.require(not getattr(image_layer, "rgb", False),
                            f"'{image_layer.name}' is an RGB image; convert it to grayscale first.")
            level = int(pyramid_level) if image_layer.multiscale else 0
            if image_layer.multiscale:
                _common.require(level < len(image_layer.data), f"'{image_layer.name}' has "
                                f"{len(image_layer.data)} levels; choose a level below that.")
            data = image_layer.data[level] if image_layer.multiscale else image_layer.data
            labels = None
            if label_option:
                _common.require(labels_layer is not None, "Pick paired patches needs a labels "
                                "layer: choose it, or untick the paired option.")
                labels = labels_layer.data
            points = points_in_image(points_layer, image_layer, level)
        except PanoptemError as err:
            show_error(str(err))
            return None

        def work(progress):
            progress.stage("picking", 0)
            return pick_patches(
                data, name=image_layer.name, points=points, n_patches=int(num_patches),
                patch_size=int(patch_size), pick_all_points=pick_points_only, level=level,
                isotropic=isotropic, is_2d_stack=is_2d_stack, labels=labels)

        def show(picked) -> None:
            kind = "flipbooks" if picked.flipbook else "patches"
            meta = {"prefix": picked.prefix, "suffices": list(picked.suffixes)}
            name = f"{picked.prefix}_{kind}"
            viewer.add_image(picked.images, name=name, metadata=dict(meta))
            labels_data = (picked.labels if picked.labels is not None
                           else np.zeros(picked.images.shape, np.int32))
            viewer.add_labels(labels_data, name=f"{name}_labels", metadata=dict(meta))
            if picked.flipbook:  # the first flipbook, on its middle slice
                viewer.dims.current_step = (0, 2, *viewer.dims.current_step[2:])
            show_info(f"Picked {len(picked.images)} {kind} from '{picked.prefix}'; annotate "
                      f"'{name}_labels', then save them with 'Save finetune/training patches'.")

        return start_job(work, title="Pick patches", on_done=show)


# --------------------------------------------------------------------------------------
# Save finetune/training patches
# --------------------------------------------------------------------------------------
class SavePatches(FunctionGui):
    """The "Save finetune/training patches" widget: appends annotated patches to a dataset."""

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__(
            self.run, call_button="Save dataset", layout="vertical",
            name="save_patches",
            param_options=dict(
                image_layer=dict(label="image layer", tooltip="The picked patches or flipbooks"),
                labels_layer=dict(label="labels layer", tooltip="Their annotation"),
                save_dir=dict(widget_type="FileEdit", mode="d", label="Save directory",
                              tooltip="Folder that holds datasets"),
                dataset_name=dict(widget_type="LineEdit", value="", label="Dataset name",
                                  tooltip="A new dataset, or one to add to"),
            ),
        )

    def run(self, image_layer: napari.layers.Image, labels_layer: napari.layers.Labels,
                     save_dir, dataset_name: str):
        try:
            _common.require(image_layer is not None and labels_layer is not None,
                            "Choose the patches (image layer) and their annotation (labels "
                            "layer).")
            folder = _common.folder_field(save_dir)
            _common.require(folder is not None, "Choose the Save directory.")
            _common.require(bool(str(dataset_name).strip()), "Type a Dataset name.")
            meta = image_layer.metadata or {}
            written = store_patches(folder, str(dataset_name).strip(), image_layer.data,
                                    labels_layer.data, prefix=meta.get("prefix"),
                                    suffixes=meta.get("suffices"))
        except PanoptemError as err:
            show_error(str(err))
            return None
        show_info(f"Saved {len(written)} image/mask pairs in "
                  f"{Path(folder) / str(dataset_name).strip()}.")
        return written


# --------------------------------------------------------------------------------------
# Finetune a model / Train a model
# --------------------------------------------------------------------------------------
def _common_training_fields(name: str) -> dict:
    """The fields the Finetune and Train widgets share, as the original words them."""
    return dict(
        model_name=dict(widget_type="LineEdit", value=name, label="Model name, no spaces",
                        tooltip="Name of the new model in every model list"),
        train_dir=dict(widget_type="FileEdit", mode="d", label="Train directory",
                       tooltip="Dataset folder: <dir>/<source>/images|masks"),
        eval_dir=dict(widget_type="FileEdit", mode="d", value=".",
                      label="Validation directory (optional)",
                      tooltip="Dataset folder for validation (may be the train directory)"),
        model_dir=dict(widget_type="FileEdit", mode="d", label="Model directory",
                       tooltip="Where the model files are written (created if needed)"),
        custom_config=dict(widget_type="FileEdit", mode="r", value="", filter="*.yaml",
                           label="Custom config (optional)",
                           tooltip="A training YAML for other hyperparameters"),
    )


def _run_setup(model_name, train_dir, model_dir) -> tuple[str, str, str, str]:
    """The new model's name, the train and model directories (all required), and the device
    to train on (the plugin settings' model folder and device are applied first)."""
    name = str(model_name or "").strip()
    _common.require(bool(name) and " " not in name, "Type a Model name without spaces.")
    train, out = _common.folder_field(train_dir), _common.folder_field(model_dir)
    _common.require(train is not None, "Choose the Train directory.")
    _common.require(out is not None, "Choose the Model directory.")
    _settings.apply_model_home()
    return name, train, out, _common.device_name(_common.default_use_gpu())


def _refresh_model_lists(viewer) -> None:
    """Make every open widget re-read its model list (a new model was registered)."""
    for widget in viewer.window.dock_widgets.values():
        reset = getattr(widget, "reset_choices", None)
        if callable(reset):
            reset()


def _trained(viewer, what: str):
    def done(out) -> None:
        _refresh_model_lists(viewer)
        last = out.evaluations[-1] if out.evaluations else None
        scores = (f" Validation: IoU {last['iou']:.3f}, F1@0.5 {last['f1']:.3f}, PQ "
                  f"{last['pq']:.3f}." if last else "")
        show_info(f"{what} '{out.exported.name}' is registered and in every model list; files "
                  f"in {out.exported.model_path.parent}.{scores}")

    return done


class FinetuneModel(FunctionGui):
    """The "Finetune a model" widget (npe2 widget contribution)."""

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        self._viewer = napari_viewer
        fields = _common_training_fields("FinetunedModel")
        super().__init__(
            self.run, call_button="Finetune model", layout="vertical",
            name="finetune_model",
            param_options=dict(
                **fields,
                base_model=_common.model_combo_options(label="Model to finetune"),
                finetune_layer=dict(widget_type="ComboBox", choices=list(FINETUNE_LAYERS),
                                    value="none", label="Finetunable layers",
                                    tooltip="Encoder stages to train"),
                iterations=dict(widget_type="SpinBox", value=100, min=100, max=5000, step=100,
                                label="Iterations"),
                patch_size=dict(widget_type="SpinBox", value=256, min=224, max=512, step=16,
                                label="Patch size in pixels"),
            ),
        )
        _common.install_model_refresh(self.base_model)

    def run(self, model_name: str, train_dir, eval_dir, model_dir, base_model: str,
            finetune_layer: str, iterations: int, patch_size: int, custom_config):
        try:
            _common.require(bool(base_model), "Choose the Model to finetune.")
            name, train, out, device = _run_setup(model_name, train_dir, model_dir)
        except PanoptemError as err:
            show_error(str(err))
            return None

        def work(progress):
            from panoptem.training.finetune import finetune_model

            return finetune_model(
                base_model, train, out, name=name, iterations=int(iterations),
                patch_size=int(patch_size), finetune_layer=finetune_layer, device=device,
                config=_common.file_field(custom_config), eval_dir=_common.folder_field(eval_dir), progress=progress)

        return start_job(work, title="Finetune", on_done=_trained(self._viewer, "Model"))


class TrainModel(FunctionGui):
    """The "Train a model" widget (npe2 widget contribution)."""

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        self._viewer = napari_viewer
        fields = _common_training_fields("NewModel")
        custom = fields.pop("custom_config")
        super().__init__(
            self.run, call_button="Train model", layout="vertical",
            name="train_model", scrollable=True,
            param_options=dict(
                **fields,
                dataset_labels=dict(widget_type="TextEdit", value="1,mito,instance",
                                    label="Dataset labels",
                                    tooltip="One class per line: id,name,instance or "
                                            "id,name,semantic"),
                label_divisor=dict(widget_type="LineEdit", value="1000", label="Label divisor",
                                   tooltip="Several classes: masks hold class x divisor + k"),
                model_arch=dict(widget_type="ComboBox", choices=list(ARCHITECTURES),
                                value="PanopticDeepLab", label="Model architecture"),
                use_cem=dict(widget_type="CheckBox", text="Use CEM pretrained weights",
                             value=True, tooltip="Start the encoder from the CEM1.5M weights "
                             "(downloaded once)"),
                finetune_layer=dict(widget_type="ComboBox", choices=list(FINETUNE_LAYERS),
                                    value="all", label="Finetunable layers",
                                    tooltip="Encoder stages to train (all without CEM weights)"),
                iterations=dict(widget_type="SpinBox", value=500, min=1, max=10000, step=1,
                                label="Iterations"),
                patch_size=dict(widget_type="SpinBox", value=256, min=224, max=512, step=16,
                                label="Patch size in pixels"),
                custom_config=custom,
                description=dict(widget_type="TextEdit", value="", label="Description",
                                 tooltip="What the model is for and what it was trained on"),
            ),
        )

    def run(self, model_name: str, train_dir, eval_dir, model_dir, dataset_labels: str,
            label_divisor: str, model_arch: str, use_cem: bool, finetune_layer: str,
            iterations: int, patch_size: int, custom_config, description: str):
        try:
            divisor = str(label_divisor or "").strip()
            _common.require(divisor.isdigit(), f"Label divisor must be a whole number (e.g. "
                            f"1000); got '{label_divisor}'.")
            name, train, out, device = _run_setup(model_name, train_dir, model_dir)
        except PanoptemError as err:
            show_error(str(err))
            return None

        def work(progress):
            from panoptem.training.train import train_model

            return train_model(
                _common.file_field(custom_config), architecture=model_arch, train_dir=train, model_dir=out,
                name=name, iterations=int(iterations), patch_size=int(patch_size),
                eval_dir=_common.folder_field(eval_dir), device=device, dataset_labels=dataset_labels,
                label_divisor=int(divisor), use_cem=use_cem, finetune_layer=finetune_layer,
                description=str(description or "").strip() or None, progress=progress)

        return start_job(work, title="Train", on_done=_trained(self._viewer, "Model"))
