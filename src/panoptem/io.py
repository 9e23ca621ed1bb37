"""Reading images and writing label images for the command line and the napari writer."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from panoptem._files import atomic_path
from panoptem.errors import PanoptemError

__all__ = ["IMAGE_SUFFIXES", "read_image", "write_labels", "labels_dtype"]

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".npy")


def read_image(path) -> np.ndarray:
    """Read a tif/tiff, png, jpg or npy file into a numpy array (no conversion of values).

    Palette PNGs give their palette indices (as label files are usually stored); other
    PNG/JPEG modes keep their channels, so an RGB picture is reported by the engine.
    """
    path = Path(path)
    if not path.exists():
        raise PanoptemError(f"No such file: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix in (".tif", ".tiff"):
            import tifffile

            return tifffile.imread(path)
        if suffix == ".npy":
            return np.load(path, allow_pickle=False)
        if suffix in (".png", ".jpg", ".jpeg"):
            from PIL import Image

            with Image.open(path) as im:
                return np.asarray(im)
    except PanoptemError:
        raise
    except Exception as err:  # unreadable or truncated file
        raise PanoptemError(f"Could not read {path}: {err}. Check that the file is a valid image.") from None
    raise PanoptemError(
        f"Cannot read '{path.name}': the suffix {suffix or '(none)'} is not one of "
        f"{', '.join(IMAGE_SUFFIXES)}."
    )


def labels_dtype(labels: np.ndarray) -> np.dtype:
    """The most portable integer dtype that holds the labels: uint8, uint16, else int32.

    These three open in Fiji/ImageJ, napari, tifffile and most viewers (uint32 and int64 do
    not, everywhere). Negative labels are kept signed.
    """
    lo = int(labels.min()) if labels.size else 0
    hi = int(labels.max()) if labels.size else 0
    if lo >= 0 and hi <= np.iinfo(np.uint8).max:
        return np.dtype(np.uint8)
    if lo >= 0 and hi <= np.iinfo(np.uint16).max:
        return np.dtype(np.uint16)
    if np.iinfo(np.int32).min <= lo and hi <= np.iinfo(np.int32).max:
        return np.dtype(np.int32)
    raise PanoptemError(f"Label ids {lo}..{hi} do not fit in 32 bits; lower 'Max objects per class'.")


def write_labels(path, labels: np.ndarray) -> Path:
    """Write a label image or volume as a zlib-compressed tif with a portable integer dtype.

    Singleton axes are removed. The folder is created if needed; an existing file is
    replaced only once the new one is complete (written beside it, then renamed).
    """
    import tifffile

    path = Path(path)
    if path.suffix.lower() not in (".tif", ".tiff"):
        raise PanoptemError(f"Label images are written as .tif; change the output name '{path.name}'.")
    arr = np.squeeze(np.asarray(labels))
    if arr.ndim == 0:
        arr = arr.reshape(1, 1)
    arr = arr.astype(labels_dtype(arr), copy=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, arr, compression="zlib", photometric="minisblack")
    return path
