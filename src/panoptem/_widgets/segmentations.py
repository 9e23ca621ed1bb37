"""The "Export Segmentations" widget: labels (and their image) as tif files of a dataset.

It maps its fields onto :func:`panoptem.segmentations.export_segmentations`, run through
:func:`panoptem._widgets._worker.start_job` (a progress bar over the files, cancellable);
what was written, and any error, is a napari notification. Title, labels, defaults and
button text are the original's. A 3D image read from a folder of files (File > Open Folder,
a dask stack) names its exported slices after those files, as in the original.
"""

from __future__ import annotations

import re
from glob import glob
from pathlib import Path

import napari
from magicgui.widgets import FunctionGui
from napari.utils.notifications import show_error, show_info

from panoptem._widgets import _common
from panoptem._widgets._worker import start_job
from panoptem.errors import PanoptemError
from panoptem.segmentations import export_segmentations

__all__ = ["ExportSegmentations", "EXPORT_TYPES", "source_file_names"]

#: The "Export type" choices: one tif per slice, or one 3D tif.
EXPORT_TYPES = ["2D images", "3D image"]


def _natural_key(text: str) -> list:
    """napari's order of the files of an opened folder (numbers compared as numbers)."""
    return [int(c) if c.isdigit() else c for c in re.split("([0-9]+)", text)]


def source_file_names(layer) -> list[str] | None:
    """The files a stacked image layer was read from, one per slice, or None.

    napari's File > Open Folder makes a dask stack of the folder's files in natural order;
    when the layer's source is such a folder with one file per slice, their names are
    returned (the original names exported slices after them).
    """
    data = layer.data
    source = getattr(getattr(layer, "source", None), "path", None)
    if source is None or type(data).__module__.split(".")[0] != "dask" or data.ndim != 3:
        return None
    folder = Path(source)
    if not folder.is_dir():
        return None
    files = [f for f in sorted(glob(str(folder / "*.*")), key=_natural_key) if Path(f).is_file()]
    return [Path(f).name for f in files] if len(files) == data.shape[0] else None


class ExportSegmentations(FunctionGui):
    """The "Export Segmentations" widget (npe2 widget contribution).

    Clicking "Export labels" returns the started :class:`~panoptem._widgets._worker.Job`
    (its result is the list of mask files written), or None when a field is wrong (the
    reason is a notification).
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__(
            self.export_labels,
            call_button="Export labels",
            layout="vertical",
            name="export_segmentations",
            param_options=dict(
                image_layer=dict(
                    label="image layer", tooltip="The image; its name names the files"
                ),
                labels_layer=dict(label="labels layer", tooltip="The segmentation to export"),
                export_type=dict(
                    widget_type="RadioButtons",
                    choices=EXPORT_TYPES,
                    value=EXPORT_TYPES[0],
                    label="Export type",
                    tooltip="Exports segmentations as individual 2D images or a single 3D image.",
                ),
                dataset_name=dict(
                    widget_type="LineEdit",
                    value="",
                    label="Folder name",
                    tooltip="Name of the dataset folder made in the Save directory; an existing "
                    "folder is added to (no file in it is overwritten).",
                ),
                save_dir=dict(
                    widget_type="FileEdit",
                    value="",
                    label="Save directory",
                    mode="d",
                    tooltip="Directory in which to save segmentations",
                ),
                grayscale=dict(
                    widget_type="CheckBox",
                    value=False,
                    label="Export grayscale image",
                    tooltip="Also write the image to images/ under the same names (the "
                    "layout of a training dataset)",
                ),
            ),
        )

    def export_labels(
        self,
        image_layer: napari.layers.Image,
        labels_layer: napari.layers.Labels,
        export_type: str,
        dataset_name: str,
        save_dir,
        grayscale: bool,
    ):
        try:
            _common.require(
                image_layer is not None and labels_layer is not None,
                "Choose the image layer and the labels layer to export.",
            )
            _common.require(
                not getattr(image_layer, "rgb", False),
                f"'{image_layer.name}' is an RGB image; convert it to grayscale first.",
            )
            image = _common.level0(image_layer)
            labels = labels_layer.data[0] if labels_layer.multiscale else labels_layer.data
            _common.require(
                tuple(image.shape) == tuple(labels.shape),
                f"The image '{image_layer.name}' has shape {tuple(image.shape)} but the labels "
                f"'{labels_layer.name}' {tuple(labels.shape)}; choose the labels made for "
                "this image.",
            )
            folder = _common.folder_field(save_dir)
            _common.require(folder is not None, "Choose the Save directory.")
            _common.require(bool(str(dataset_name).strip()), "Type a Folder name.")
        except PanoptemError as err:
            show_error(str(err))
            return None
        as_3d = export_type == EXPORT_TYPES[1]
        names = source_file_names(image_layer) if labels.ndim == 3 and not as_3d else None
        root = Path(folder).expanduser() / str(dataset_name).strip()

        def work(progress):
            return export_segmentations(
                labels,
                folder,
                str(dataset_name),
                image_layer.name,
                image=image if grayscale else None,
                as_3d=as_3d,
                file_names=names,
                progress=progress,
            )

        def done(written) -> None:
            files = "file" if len(written) == 1 else "files"
            also = " and the image under the same names in images/" if grayscale else ""
            show_info(f"Exported {len(written)} label {files} to {root / 'masks'}{also}.")

        return start_job(work, title="Export Segmentations", on_done=done)
