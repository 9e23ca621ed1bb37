"""The "Create Tiles" and "Merge Tiles" widgets: a large 2D image cut into square tiles
and put back together.

Each maps its fields onto one core call, :func:`panoptem.tiles.create_tiles` or
:func:`panoptem.tiles.merge_tiles`, run off the GUI thread through
:func:`panoptem._widgets._worker.start_job` with a progress bar over the tiles and a
cancel. Merge Tiles then opens the merged image (and the mask, as a Labels layer) in the
viewer; the original only saved them. Titles, labels, defaults and button texts are the
original's (both folder fields start at the current working directory, as there).
"""

from __future__ import annotations

import os
from pathlib import Path

import napari
import numpy as np
from magicgui.widgets import FunctionGui
from napari.utils.notifications import show_error, show_info

from panoptem._widgets import _common
from panoptem._widgets._worker import start_job
from panoptem.errors import PanoptemError
from panoptem.tiles import create_tiles, merge_tiles

__all__ = ["CreateTiles", "MergeTiles"]


# --------------------------------------------------------------------------------------
# Create Tiles
# --------------------------------------------------------------------------------------
class CreateTiles(FunctionGui):
    """The "Create Tiles" widget (npe2 widget contribution).

    Clicking "Create Tiles" returns the started :class:`~panoptem._widgets._worker.Job`
    (its result is the tiles folder), or None when a field is missing (the reason is a
    notification).
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__(
            self.create_tiles,
            call_button="Create Tiles",
            layout="vertical",
            name="create_tiles",
            param_options=dict(
                image_path=dict(
                    widget_type="FileEdit",
                    value="",
                    label="Path to tif image",
                    mode="r",
                    tooltip="A large 2D tif image (height x width)",
                ),
                mask_path=dict(
                    widget_type="FileEdit",
                    value="",
                    label="Path to tif mask (optional)",
                    mode="r",
                    tooltip="Its mask or labels (the same height and width), cut on the same grid",
                ),
                patch_size=dict(
                    widget_type="FloatSpinBox",
                    min=1,
                    max=300000,
                    step=1,
                    value=512,
                    label="Tile size (px)",
                    tooltip="Tile size (px)",
                ),
                save_directory=dict(
                    widget_type="FileEdit",
                    mode="d",
                    value=os.getcwd(),
                    label="Directory to save tiles",
                    tooltip="Directory to save tiles and metadata; it must not hold tiles "
                    "already (nothing is overwritten)",
                ),
            ),
        )

    def create_tiles(self, image_path, mask_path, patch_size: float, save_directory):
        try:
            image = _common.file_field(image_path)
            _common.require(image is not None, "Choose the tif image to cut ('Path to tif image').")
            out = _common.folder_field(save_directory)
            _common.require(out is not None, "Choose the 'Directory to save tiles'.")
        except PanoptemError as err:
            show_error(str(err))
            return None
        mask = _common.file_field(mask_path)

        def work(progress):
            return create_tiles(image, out, patch_size, mask_path=mask, progress=progress)

        def done(folder: Path) -> None:
            count = len(list((folder / "im").iterdir()))
            masks = " (and the mask's in msk/)" if mask is not None else ""
            show_info(f"Tiles created: {count} image tiles in {folder / 'im'}{masks}.")

        return start_job(work, title="Create Tiles", on_done=done)


# --------------------------------------------------------------------------------------
# Merge Tiles
# --------------------------------------------------------------------------------------
def _open_merged(path: Path) -> np.ndarray:
    """The merged file, memory-mapped copy-on-write: painting changes the layer, not the file."""
    import tifffile

    try:
        return tifffile.memmap(path, mode="c")
    except Exception:  # not memory-mappable: read it
        return tifffile.imread(path)


class MergeTiles(FunctionGui):
    """The "Merge Tiles" widget (npe2 widget contribution).

    Clicking "Merge Tiles" returns the started :class:`~panoptem._widgets._worker.Job`
    (its result is ``(image_path, mask_path, image, mask)``: the merged files, mask ones
    None without a mask, and the arrays shown), or None when a field is missing. When the
    job is done the merged image (and mask, as labels) are layers of the viewer.
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        self._viewer = napari_viewer
        super().__init__(
            self.merge_tiles,
            call_button="Merge Tiles",
            layout="vertical",
            name="merge_tiles",
            param_options=dict(
                patch_directory=dict(
                    widget_type="FileEdit",
                    mode="d",
                    value=os.getcwd(),
                    label='Directory with patches (same as from "Create Tiles" option)',
                    tooltip="Directory containing image patches (and optional mask patches) "
                    "and metadata.tif",
                ),
                save_directory=dict(
                    widget_type="FileEdit",
                    mode="d",
                    value=os.getcwd(),
                    label="Directory to save merged image",
                    tooltip="Directory to save merged image and mask (if applicable); an "
                    "existing im.tif / msk.tif is kept and the new pair numbered",
                ),
            ),
        )

    def merge_tiles(self, patch_directory, save_directory):
        try:
            tiles = _common.folder_field(patch_directory)
            _common.require(tiles is not None, "Choose the directory with the tiles.")
            out = _common.folder_field(save_directory)
            _common.require(out is not None, "Choose the 'Directory to save merged image'.")
        except PanoptemError as err:
            show_error(str(err))
            return None

        def work(progress):
            image_path, mask_path = merge_tiles(tiles, out, progress=progress)
            image = _open_merged(image_path)
            mask = _open_merged(mask_path) if mask_path is not None else None
            return image_path, mask_path, image, mask

        def done(result) -> None:
            image_path, mask_path, image, mask = result
            self._viewer.add_image(image, name=image_path.stem)
            if mask is not None:
                if mask.dtype.kind in "iub":
                    self._viewer.add_labels(mask, name=mask_path.stem)
                else:
                    self._viewer.add_image(mask, name=mask_path.stem)
            paths = f"{image_path}" + (f" and {mask_path}" if mask_path is not None else "")
            show_info(f"Merged tiles saved to {paths}; opened in the viewer.")

        return start_job(work, title="Merge Tiles", on_done=done)
