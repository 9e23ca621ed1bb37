"""Joint image/mask augmentations for training, in numpy, scipy.ndimage and torch.

The original builds its augmentations with albumentations (reference §7.7); these classes
reproduce the same transforms, parameters and defaults (including each one's probability
``p``), so a config written for the original means the same here.

Every transform is called as ``t(image, mask, rng)`` and returns ``(image, mask)``:

* ``image`` : ndarray (H, W), uint8 (what the datasets give) or float. Geometric transforms
  keep the dtype (uint8 results are rounded to whole grey levels).
* ``mask`` : ndarray (H, W), integer label ids. Geometric transforms resample it with
  nearest neighbour, so ids are never blended; intensity transforms leave it untouched.
* ``rng`` : :class:`numpy.random.Generator`; all randomness comes from it, so a seeded
  generator gives reproducible results.

Geometric conventions: zero fill outside the image (``border_mode`` 0 in the original),
rotations about the image centre ``((W - 1) / 2, (H - 1) / 2)``, positive angles
counter-clockwise on screen. Padding is centred (the original's default), the extra pixel of
an odd difference going to the bottom/right.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from panoptem.errors import PanoptemError

__all__ = [
    "Compose",
    "RandomScale",
    "PadIfNeeded",
    "RandomCrop",
    "Rotate",
    "RandomBrightnessContrast",
    "HorizontalFlip",
    "VerticalFlip",
    "default_augmentations",
    "augmentations_from_config",
]


def _range(limit, bias: float = 0.0) -> tuple[float, float]:
    """``x`` -> (-x, x) and (lo, hi) -> (lo, hi), plus ``bias`` on both ends."""
    if np.ndim(limit) == 0:
        lo, hi = -abs(float(limit)), abs(float(limit))
    else:
        lo, hi = (float(v) for v in limit)
    if lo > hi:
        raise PanoptemError(f"A limit range must be (low, high) with low <= high; got {limit}.")
    return lo + bias, hi + bias


def _back_to_dtype(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(values), info.min, info.max).astype(dtype)
    return values.astype(dtype, copy=False)


class Transform:
    """Base class: applies :meth:`apply` with probability ``p`` (one draw from ``rng``)."""

    def __init__(self, p: float = 1.0) -> None:
        if not 0.0 <= p <= 1.0:
            raise PanoptemError(f"A probability must lie in [0, 1]; got p={p}.")
        self.p = float(p)

    def __call__(self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator):
        if self.p < 1.0 and rng.random() >= self.p:
            return image, mask
        return self.apply(image, mask, rng)

    def apply(self, image, mask, rng):  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class Compose:
    """Apply transforms in order to an (image, mask) pair.

    Parameters
    ----------
    transforms : sequence of callables ``t(image, mask, rng) -> (image, mask)``
    seed : int or None
        Seeds the generator used when a call passes no ``rng``.
    """

    def __init__(self, transforms, seed: int | None = None) -> None:
        self.transforms = list(transforms)
        self.rng = np.random.default_rng(seed)

    def __call__(
        self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        rng = self.rng if rng is None else rng
        image, mask = np.asarray(image), np.asarray(mask)
        if image.shape != mask.shape:
            raise PanoptemError(f"Image {image.shape} and mask {mask.shape} differ in shape.")
        for t in self.transforms:
            image, mask = t(image, mask, rng)
        return np.ascontiguousarray(image), np.ascontiguousarray(mask)

    def __repr__(self) -> str:
        inner = ",\n    ".join(repr(t) for t in self.transforms)
        return f"Compose([\n    {inner}\n])"


class RandomScale(Transform):
    """Resize by ``1 + u``, ``u`` uniform in ``scale_limit``; new size ``int(side * factor)``.

    Image bilinear (half-pixel centres, no anti-aliasing, as OpenCV's INTER_LINEAR), mask
    nearest (source index ``floor(i * old / new)``, as OpenCV's INTER_NEAREST).
    """

    def __init__(self, scale_limit=(-0.9, 1.0), p: float = 0.5) -> None:
        super().__init__(p)
        self.scale_limit = _range(scale_limit)

    def apply(self, image, mask, rng):
        factor = 1.0 + rng.uniform(*self.scale_limit)
        h, w = image.shape
        nh, nw = max(1, int(h * factor)), max(1, int(w * factor))
        if (nh, nw) == (h, w):
            return image, mask
        t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
        resized = F.interpolate(t, size=(nh, nw), mode="bilinear", align_corners=False)
        rows = np.minimum((np.arange(nh) * (h / nh)).astype(np.intp), h - 1)
        cols = np.minimum((np.arange(nw) * (w / nw)).astype(np.intp), w - 1)
        return _back_to_dtype(resized[0, 0].numpy(), image.dtype), mask[np.ix_(rows, cols)]


class PadIfNeeded(Transform):
    """Zero-pad image and mask, centred, to at least ``min_height`` x ``min_width``."""

    def __init__(self, min_height: int, min_width: int, p: float = 1.0) -> None:
        super().__init__(p)
        self.min_height, self.min_width = int(min_height), int(min_width)

    def apply(self, image, mask, rng):
        h, w = image.shape
        dh, dw = max(0, self.min_height - h), max(0, self.min_width - w)
        if not (dh or dw):
            return image, mask
        pad = ((dh // 2, dh - dh // 2), (dw // 2, dw - dw // 2))
        return np.pad(image, pad), np.pad(mask, pad)


class RandomCrop(Transform):
    """Crop a ``height`` x ``width`` window at a uniformly random position."""

    def __init__(self, height: int, width: int, p: float = 1.0) -> None:
        super().__init__(p)
        self.height, self.width = int(height), int(width)

    def apply(self, image, mask, rng):
        h, w = image.shape
        if h < self.height or w < self.width:
            raise PanoptemError(
                f"Cannot crop {self.height}x{self.width} from an image of {h}x{w}; put "
                "PadIfNeeded with the patch size before RandomCrop."
            )
        y0 = int(rng.integers(0, h - self.height + 1))
        x0 = int(rng.integers(0, w - self.width + 1))
        window = (slice(y0, y0 + self.height), slice(x0, x0 + self.width))
        return image[window], mask[window]


class Rotate(Transform):
    """Rotate by an angle (degrees) uniform in ``limit`` about the centre, zero fill.

    Image bilinear, mask nearest; the output keeps the input's size.
    """

    def __init__(self, limit=180.0, p: float = 0.5) -> None:
        super().__init__(p)
        self.limit = _range(limit)

    def apply(self, image, mask, rng):
        angle = float(rng.uniform(*self.limit))
        out = ndimage.rotate(
            image.astype(np.float32), angle, reshape=False, order=1, mode="grid-constant", cval=0.0
        )
        rotated_mask = ndimage.rotate(
            mask, angle, reshape=False, order=0, mode="grid-constant", cval=0
        )
        return _back_to_dtype(out, image.dtype), rotated_mask


class RandomBrightnessContrast(Transform):
    """``image * alpha + beta * max_value``, clipped to ``[0, max_value]``; mask untouched.

    ``alpha = 1 + U(-contrast_limit, contrast_limit)``, ``beta = U(-brightness_limit,
    brightness_limit)`` (drawn in that order). ``max_value`` is the dtype's maximum for
    integer images (255 for uint8) and 1.0 for float images, as in albumentations.
    """

    def __init__(self, brightness_limit=0.2, contrast_limit=0.2, p: float = 0.5) -> None:
        super().__init__(p)
        self.brightness_limit = _range(brightness_limit)
        self.contrast_limit = _range(contrast_limit)

    def apply(self, image, mask, rng):
        alpha = 1.0 + rng.uniform(*self.contrast_limit)
        beta = rng.uniform(*self.brightness_limit)
        integer = np.issubdtype(image.dtype, np.integer)
        max_value = float(np.iinfo(image.dtype).max) if integer else 1.0
        out = np.clip(image.astype(np.float32) * alpha + beta * max_value, 0.0, max_value)
        return _back_to_dtype(out, image.dtype), mask


class HorizontalFlip(Transform):
    """Mirror left-right (the column axis)."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__(p)

    def apply(self, image, mask, rng):
        return image[:, ::-1], mask[:, ::-1]


class VerticalFlip(Transform):
    """Mirror top-bottom (the row axis)."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__(p)

    def apply(self, image, mask, rng):
        return image[::-1], mask[::-1]


def default_augmentations(patch_size: int = 256, seed: int | None = None) -> Compose:
    """The original's training/finetuning template (reference §7.7), for ``patch_size``.

    RandomScale(-0.9..1) -> PadIfNeeded(patch) -> RandomCrop(patch) -> Rotate(180) ->
    RandomBrightnessContrast(0.3, 0.3) -> HorizontalFlip -> VerticalFlip; normalisation and
    tensor conversion are done by the datasets.
    """
    patch = int(patch_size)
    return Compose(
        [
            RandomScale(scale_limit=(-0.9, 1.0)),
            PadIfNeeded(patch, patch),
            RandomCrop(patch, patch),
            Rotate(limit=180),
            RandomBrightnessContrast(brightness_limit=0.3, contrast_limit=0.3),
            HorizontalFlip(),
            VerticalFlip(),
        ],
        seed=seed,
    )


_BY_NAME = {
    cls.__name__: cls
    for cls in (
        RandomScale,
        PadIfNeeded,
        RandomCrop,
        Rotate,
        RandomBrightnessContrast,
        HorizontalFlip,
        VerticalFlip,
    )
}
_SIZE_KEYS = ("min_height", "min_width", "height", "width")
_DONE_BY_DATASET = ("Normalize", "ToTensorV2")


def augmentations_from_config(entries, patch_size: int, seed: int | None = None) -> Compose:
    """Build a pipeline from a config's ``TRAIN.augmentations`` list.

    Parameters
    ----------
    entries : list of dict
        ``{aug: <name>, <argument>: <value>, ...}`` as in the original's templates. Sizes
        given as null become ``patch_size``; ``border_mode`` may only be 0 (zero fill);
        ``Normalize`` and ``ToTensorV2`` are skipped (the datasets do them).
    patch_size : int
    seed : int or None

    Raises
    ------
    PanoptemError
        For an unknown augmentation name, an unknown argument or another border mode.
    """
    transforms = []
    for entry in entries or []:
        entry = dict(entry)
        name = entry.pop("aug", None)
        if name in _DONE_BY_DATASET:
            continue
        if name not in _BY_NAME:
            raise PanoptemError(
                f"Unknown augmentation {name!r} in the config; use one of {', '.join(_BY_NAME)}."
            )
        if entry.pop("border_mode", 0) != 0:
            raise PanoptemError(f"{name}: only border_mode 0 (zero fill) is supported.")
        for key in _SIZE_KEYS:
            if key in entry and entry[key] is None:
                entry[key] = patch_size
        try:
            transforms.append(_BY_NAME[name](**entry))
        except TypeError as err:
            raise PanoptemError(f"Bad arguments for augmentation {name}: {err}.") from None
    return Compose(transforms, seed=seed)
