"""Turning user images into model input: validation, intensity scaling and padding.

Intensity rule (SPEC §5.1): a uint8 image is used as it is (0..255), as the original does.
Every other integer or float dtype is mapped linearly from the image's own intensity range
(min..max, or a range given by the caller so all slices of a stack share it) onto 0..255.
The model's ``norms`` (mean and std as fractions of 255) then apply:
``x = (v / 255 - mean) / std``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from panoptem.errors import PanoptemError

__all__ = [
    "check_image_2d",
    "intensity_range",
    "to_unit_range",
    "normalize",
    "pad_to_factor",
    "downsample",
]


def check_image_2d(image, what: str = "image") -> np.ndarray:
    """Return ``image`` as a 2-D numpy array or raise a :class:`PanoptemError` saying why not.

    Accepts (H, W) and (1, H, W) / (H, W, 1); refuses RGB(A), other shapes, empty arrays,
    booleans and complex numbers with a message that says what to change.
    """
    arr = np.asarray(image)
    if arr.ndim == 3 and 1 in (arr.shape[0], arr.shape[-1]):
        arr = arr.reshape(arr.shape[1:] if arr.shape[0] == 1 else arr.shape[:-1])
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        raise PanoptemError(
            f"The {what} looks like an RGB(A) picture (shape {arr.shape}); the models take "
            "one grayscale channel. Convert it to grayscale first (e.g. keep one channel)."
        )
    if arr.ndim != 2:
        raise PanoptemError(
            f"The {what} must be 2-D (height, width); got shape {arr.shape}. For a stack or "
            "volume use batch mode or 3D inference."
        )
    if arr.size == 0:
        raise PanoptemError(f"The {what} is empty (shape {arr.shape}); give an image with pixels.")
    if arr.dtype == bool or np.iscomplexobj(arr) or not np.issubdtype(arr.dtype, np.number):
        raise PanoptemError(
            f"The {what} has dtype {arr.dtype}; give an integer or floating-point grayscale image."
        )
    return arr


def intensity_range(image: np.ndarray) -> tuple[float, float] | None:
    """The (low, high) range that :func:`to_unit_range` maps onto 0..255.

    ``None`` for uint8 images (used as they are). NaNs are ignored.
    """
    if image.dtype == np.uint8:
        return None
    if np.issubdtype(image.dtype, np.floating):
        lo, hi = float(np.nanmin(image)), float(np.nanmax(image))
    else:
        lo, hi = float(image.min()), float(image.max())
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise PanoptemError("The image holds only NaN or infinite values; nothing to segment.")
    return lo, hi


def to_unit_range(image: np.ndarray, value_range: tuple[float, float] | None) -> torch.Tensor:
    """Map an image to float32 values in 0..255 as a (H, W) tensor.

    Parameters
    ----------
    image : ndarray (H, W), any integer or float dtype
    value_range : (low, high) or None
        None keeps the values (uint8). Otherwise ``low`` maps to 0 and ``high`` to 255; a
        constant image (high == low) maps to 0 everywhere.
    """
    arr = np.ascontiguousarray(image)
    t = torch.from_numpy(arr if arr.flags.writeable else arr.copy())
    if value_range is None:
        return t.to(torch.float32)
    lo, hi = value_range
    t = t.to(torch.float64 if image.dtype.itemsize > 2 else torch.float32)
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    out = ((t - lo) * scale).clamp_(0, 255).to(torch.float32)
    return torch.nan_to_num_(out, nan=0.0)


def normalize(x255: torch.Tensor, norms: dict) -> torch.Tensor:
    """Apply the model config's ``norms`` (fractions of 255) to values in 0..255."""
    mean, std = float(norms["mean"]), float(norms["std"])
    return (x255 - 255.0 * mean) / (255.0 * std)


def downsample(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Bilinear resize of a (1, 1, H, W) tensor of 0..255 values to (ceil(H/f), ceil(W/f)).

    The result is rounded to whole grey levels, as the original's 8-bit resize does, so
    downsampled inputs match the original's exactly.
    """
    if factor == 1:
        return x
    h, w = x.shape[-2:]
    size = (math.ceil(h / factor), math.ceil(w / factor))
    return torch.floor(F.interpolate(x, size=size, mode="bilinear", align_corners=False) + 0.5)


def pad_to_factor(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Zero-pad a (..., H, W) tensor at the bottom and right to multiples of ``factor``.

    After normalisation zero is the mean grey, as in the original.
    """
    h, w = x.shape[-2:]
    ph, pw = (-h) % factor, (-w) % factor
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph))
    return x
