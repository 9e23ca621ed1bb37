"""Reading images and label files, and writing label images (command line, napari writer,
evaluation)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from panoptem._files import atomic_path
from panoptem.errors import PanoptemError

__all__ = ["IMAGE_SUFFIXES", "read_image", "read_labels", "label_channel", "write_labels",
           "labels_dtype"]

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


def label_channel(arr: np.ndarray, path: str | Path = "image") -> np.ndarray:
    """Reduce an image read from a file to one channel when it is a grey picture of a mask.

    Masks saved as RGB or RGBA PNGs (as in Lucchi++) repeat the same value in R, G and B:
    the first channel is returned. A 2D grey+alpha PNG keeps its grey channel.

    Parameters
    ----------
    arr : numpy.ndarray
        The array as read.
    path : str or Path
        The file it came from; PNG/JPEG files with differing colour channels are an error.

    Returns
    -------
    numpy.ndarray
        ``arr[..., 0]`` for a 3-axis array whose last axis has 3 or 4 entries with equal
        colour channels (or 2 entries for a PNG), otherwise ``arr`` unchanged.

    Raises
    ------
    PanoptemError
        If a PNG/JPEG has colour channels that differ, so it is no mask.
    """
    path = Path(path)
    picture = path.suffix.lower() in (".png", ".jpg", ".jpeg")
    if arr.ndim != 3:
        return arr
    if picture and arr.shape[-1] == 2:
        return arr[..., 0]
    if arr.shape[-1] not in (3, 4):
        return arr
    colour = arr[..., :3]
    if np.all(colour == colour[..., :1]):
        return arr[..., 0]
    if picture:
        raise PanoptemError(
            f"{path.name} is a colour picture (its red, green and blue channels differ); "
            "save the mask or labels as a single-channel image."
        )
    return arr


def as_label_image(arr, name: str) -> np.ndarray:
    """``arr`` as labels: bool or integer values (floats holding whole numbers become
    int64), none negative, at least one pixel; else a :class:`PanoptemError` naming
    ``name`` and saying what to change."""
    a = np.asarray(arr)
    if a.size == 0:
        raise PanoptemError(f"{name} is empty (shape {a.shape}); give a label image with pixels.")
    if a.dtype.kind == "f":
        if not np.all(np.isfinite(a)) or not np.array_equal(a, np.round(a)):
            raise PanoptemError(
                f"{name} has non-integer values (dtype {a.dtype}); pass a label image or a "
                "binary mask, e.g. threshold a probability map first."
            )
        a = a.astype(np.int64)
    elif a.dtype != bool and a.dtype.kind not in "iu":
        raise PanoptemError(
            f"{name} has dtype {a.dtype}; pass a label image or mask with integer or bool values."
        )
    if a.dtype.kind == "i" and a.min() < 0:
        raise PanoptemError(
            f"{name} has negative values (down to {a.min()}); labels are 0 for the background "
            "and positive ids for objects."
        )
    return a


def read_label_image(path) -> np.ndarray:
    """A 2D or 3D label image from a file (:func:`read_labels`, then :func:`as_label_image`);
    colour pictures, other dimensions and what is no label image are refused."""
    labels = read_labels(path)
    name = Path(path).name
    if labels.ndim == 3 and labels.shape[-1] in (3, 4):
        raise PanoptemError(
            f"{name} looks like an RGB(A) picture (shape {labels.shape}, its colour channels "
            "differ); save the labels as a single-channel image."
        )
    if labels.ndim not in (2, 3):
        raise PanoptemError(
            f"{name} has shape {labels.shape}; give a 2D label image (H, W) or a 3D one (Z, Y, X)."
        )
    return as_label_image(labels, name)


def read_labels(path) -> np.ndarray:
    """Read a label image or mask file (tif/tiff, png, jpg, npy) as one channel.

    As :func:`read_image`, then :func:`label_channel` (RGB(A) masks with equal colour
    channels give their first channel).
    """
    return label_channel(read_image(path), path)
