"""Exporting segmentations (and their images) as tif files, in the layout of a dataset.

The original's "Export Segmentations": labels go to ``<save_dir>/<folder_name>/masks/``
and, when the image is exported too, the image to ``<save_dir>/<folder_name>/images/``
under the same file name, which is the dataset layout that finetuning and training read.

* 2D labels: one file ``<name>.tiff``;
* 3D labels as 2D images: one file per slice, ``<name>_<i>.tiff`` with ``i`` zero-padded
  to the digits of the last index (``_0`` ... ``_9`` for 10 slices, ``_00`` ... ``_10``
  for 11), or the given file names (the slices' source files);
* 3D labels as a 3D image: one 3D file ``<name>.tiff``, written slice by slice.

Masks are written with a portable integer dtype (:func:`panoptem.io.labels_dtype`:
uint8, uint16, else int32, one for the whole export) and zlib compression; images in their
own dtype. An existing folder is added to; a file name already used in ``masks/`` or
``images/`` gets ``_1``, ``_2``, ... (:func:`panoptem._files.free_path`), so nothing is
ever overwritten. numpy, dask and zarr arrays work; 3D arrays are read one slice at a time.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from panoptem._files import atomic_path, free_path, writable_folder
from panoptem.errors import Cancelled, PanoptemError
from panoptem.io import labels_dtype
from panoptem.progress import Progress, ensure_progress

__all__ = ["export_segmentations", "slice_names"]

_BAD_NAME_CHARS = '/\\:*?"<>|'


def _clean_name(name: str) -> str:
    text = "".join("_" if c in _BAD_NAME_CHARS else c for c in str(name).strip())
    return text or "segmentation"


def slice_names(name: str, count: int, file_names: Sequence[str] | None = None) -> list[str]:
    """The file names of ``count`` slices exported as 2D images.

    ``<name>_<i>.tiff`` with ``i`` zero-padded to the digits of ``count - 1`` (as the
    original), or the stem of each of ``file_names`` + ``.tiff``.
    """
    if file_names is not None:
        if len(file_names) != count:
            raise PanoptemError(
                f"{len(file_names)} file names for {count} slices; give one name per slice."
            )
        return [_clean_name(Path(str(f)).stem) + ".tiff" for f in file_names]
    digits = len(str(max(count - 1, 0)))
    return [f"{_clean_name(name)}_{i:0{digits}d}.tiff" for i in range(count)]


def _value_range(arr) -> tuple[int, int]:
    """(min, max) of a labels array, one slice at a time for 3D lazy arrays."""
    if isinstance(arr, np.ndarray) or arr.ndim < 3:
        a = np.asarray(arr)
        return (int(a.min()), int(a.max())) if a.size else (0, 0)
    lo, hi = None, None
    for i in range(arr.shape[0]):
        a = np.asarray(arr[i])
        if a.size:
            lo = int(a.min()) if lo is None else min(lo, int(a.min()))
            hi = int(a.max()) if hi is None else max(hi, int(a.max()))
    return (lo or 0, hi or 0)


def _write(path: Path, data, *, mask: bool, dtype=None, shape=None) -> None:
    """Write ``data`` (an array, or an iterator of 2D slices with ``shape``/``dtype``)."""
    import tifffile

    options = {"compression": "zlib"} if mask else {}
    if shape is not None:
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        options.update(shape=shape, dtype=dtype, bigtiff=nbytes > 2**31)
    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, data, photometric="minisblack", **options)


def export_segmentations(
    labels,
    save_dir: str | os.PathLike,
    folder_name: str,
    name: str,
    *,
    image=None,
    as_3d: bool = False,
    file_names: Sequence[str] | None = None,
    progress: Progress | None = None,
) -> list[Path]:
    """Write labels (and optionally their image) as tif files into a dataset folder.

    Parameters
    ----------
    labels : array (H, W) or (Z, H, W), integer
        The segmentation; numpy, dask or zarr (read one slice at a time).
    save_dir : path
        Folder in which the dataset folder is made ("Save directory").
    folder_name : str
        The dataset folder ("Folder name"); created, or added to when it exists.
    name : str
        Base file name (the image layer's name in the widget).
    image : array of the labels' shape, optional
        The grayscale image ("Export grayscale image"), written in its own dtype to
        ``images/`` under the mask's file name.
    as_3d : bool, default False
        3D labels as one 3D tif ("3D image") instead of one tif per slice ("2D images").
    file_names : sequence of str, optional
        One name per slice for 3D labels written as 2D images (their stems are used, with
        ``.tiff``), e.g. the files a stack was read from.
    progress : Progress, optional
        One step per file written (stage "exporting"); a cancel stops between files and
        keeps the files already written.

    Returns
    -------
    list of Path
        The mask files written, in order (images have the same names under ``images/``).

    Raises
    ------
    PanoptemError
        Before anything is written: labels that are not 2D or 3D, an RGB image or one of
        another shape, an empty folder name, a save directory that cannot be written,
        file names that do not match the slices, label ids beyond 32 bits.
    """
    if labels is None or labels.ndim not in (2, 3):
        ndim = None if labels is None else labels.ndim
        raise PanoptemError(
            f"Export Segmentations writes 2D or 3D labels, not {ndim}-dimensional ones; for "
            "stacks of patches use 'Save finetune/training patches'."
        )
    if image is not None:
        if image.ndim == labels.ndim + 1 and image.shape[-1] in (3, 4):
            raise PanoptemError(
                "The image is RGB; convert it to grayscale, or untick 'Export grayscale image'."
            )
        if tuple(image.shape) != tuple(labels.shape):
            raise PanoptemError(
                f"The image has shape {tuple(image.shape)} but the labels "
                f"{tuple(labels.shape)}; choose the labels layer made for this image."
            )
    folder = str(folder_name or "").strip()
    if not folder or any(c in folder for c in _BAD_NAME_CHARS) or folder in (".", ".."):
        raise PanoptemError(
            f"The folder name {folder_name!r} cannot be a folder's name; type one without "
            '/ \\ : * ? " < > |.'
        )
    if save_dir is None or str(save_dir).strip() in ("", "."):
        raise PanoptemError("Choose the Save directory that receives the folder.")
    stacked = labels.ndim == 3 and not as_3d
    names = (
        slice_names(name, labels.shape[0], file_names) if stacked else [_clean_name(name) + ".tiff"]
    )
    dtype = labels_dtype(np.array(_value_range(labels)))
    root = writable_folder(writable_folder(save_dir, "Save directory") / folder, "dataset folder")
    mask_dir = writable_folder(root / "masks", "dataset folder")
    image_dir = writable_folder(root / "images", "dataset folder") if image is not None else None
    others = [root / "images"]

    progress = ensure_progress(progress)
    progress.stage("exporting", len(names))
    written: list[Path] = []
    taken: set[Path] = set()
    try:
        for i, file_name in enumerate(names):
            target = free_path(mask_dir / file_name, taken=taken, also_in=others)
            taken.add(target)
            if stacked:
                _write(target, np.asarray(labels[i]).astype(dtype, copy=False), mask=True)
                if image_dir is not None:
                    _write(image_dir / target.name, np.asarray(image[i]), mask=False)
            elif labels.ndim == 2:
                _write(target, np.asarray(labels).astype(dtype, copy=False), mask=True)
                if image_dir is not None:
                    _write(image_dir / target.name, np.asarray(image), mask=False)
            else:
                z = labels.shape[0]
                slices = (np.asarray(labels[k]).astype(dtype, copy=False) for k in range(z))
                _write(target, slices, mask=True, dtype=dtype, shape=tuple(labels.shape))
                if image_dir is not None:
                    pages = (np.asarray(image[k]) for k in range(z))
                    _write(
                        image_dir / target.name,
                        pages,
                        mask=False,
                        dtype=np.dtype(image.dtype),
                        shape=tuple(image.shape),
                    )
            written.append(target)
            progress.advance()
    except Cancelled as err:
        err.kept = f"{len(written)} of {len(names)} files were written to {mask_dir}."
        raise
    return written
