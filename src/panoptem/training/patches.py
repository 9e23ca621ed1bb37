"""Picking training patches from an image, and storing them as a dataset (reference §7.2-7.3).

The jobs behind the "Pick finetune/training patches" and "Save finetune/training patches"
widgets, on numpy arrays:

* :func:`pick_patches` cuts square patches out of a 2D image or a stack of 2D images, or
  *flipbooks* (5 consecutive slices) out of a 3D volume, centred on given points first and
  at random places for the rest, from the image and, when given, its paired labels. Each
  patch gets the original's name suffix, which records where it came from.
* :func:`store_patches` writes them in the original's dataset layout,
  ``<dir>/<dataset>/<image name>/images|masks/<image name>-<suffix>.tiff``: the middle slice
  of a flipbook, without the zero padding a patch got at the image border. It appends to an
  existing dataset and never replaces a file.

Suffixes (``s<level>-LOC-...``, LOC being the crop): ``s0-LOC-2d_<y0>-<y1>_<x0>-<x1>`` for a
2D image, ``s0-LOC-2d-<plane>_<y0>-<y1>_<x0>-<x1>`` for a plane of a 2D stack and
``s0-LOC-<axis>_<z0>-<z1>_<y0>-<y1>_<x0>-<x1>`` for a flipbook (axis 0, 1 or 2 of the
volume; z the slices along it). Ranges are half-open, in the picked level's pixels.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from panoptem._files import atomic_path, free_path, writable_folder
from panoptem.errors import PanoptemError

__all__ = ["FLIPBOOK_DEPTH", "PickedPatches", "pick_patches", "store_patches", "patch_crop"]

#: Slices in a flipbook; the middle one is the training image (the others give context).
FLIPBOOK_DEPTH = 5
_HALF = FLIPBOOK_DEPTH // 2
_RANGE = re.compile(r"_(\d+)-(\d+)_(\d+)-(\d+)$")


@dataclass
class PickedPatches:
    """Patches cut from one image.

    Attributes
    ----------
    images : ndarray (N, P, P), or (N, 5, P, P) for flipbooks
        The image's dtype; zero where a patch reached past the image's border.
    labels : ndarray of the same shape (int32), or None without paired labels
    prefix : str
        The image's name (the dataset's source folder).
    suffixes : list of str
        One per patch (see the module docstring).
    points_used : list of int
        Indices of the points a patch was centred on.
    """

    images: np.ndarray
    labels: np.ndarray | None
    prefix: str
    suffixes: list = field(default_factory=list)
    points_used: list = field(default_factory=list)

    @property
    def flipbook(self) -> bool:
        return self.images.ndim == 4


def _start(center: float, length: int, size: int) -> int:
    """First index of a window of ``size`` centred on ``center``, kept inside ``length``."""
    return int(np.clip(int(round(center)) - size // 2, 0, max(length - size, 0)))


def _grid_start(rng: np.random.Generator, length: int, size: int) -> int:
    """A random window start on the grid of multiples of ``size`` (the original's rule)."""
    return int(rng.integers(0, max(length // size, 1))) * size


def _pad(block: np.ndarray, shape: tuple) -> np.ndarray:
    out = np.zeros(shape, dtype=block.dtype)
    out[tuple(slice(0, s) for s in block.shape)] = block
    return out


def pick_patches(image, *, name: str = "image", points=None, n_patches: int = 16,
                 patch_size: int = 256, pick_all_points: bool = False, level: int = 0,
                 isotropic: bool = False, is_2d_stack: bool = False, labels=None,
                 seed: int | None = None) -> PickedPatches:
    """Cut training patches (2D) or flipbooks (3D) out of ``image``.

    Parameters
    ----------
    image : array (H, W), or (Z, H, W) a volume or, with ``is_2d_stack``, a stack of images
    name : str
        The image's name: the prefix of every patch name.
    points : array (K, image.ndim), optional
        Patch centres in the image's pixel coordinates (for a volume or stack the first
        coordinate is the slice). They are used first, in order; random patches fill up to
        ``n_patches``.
    n_patches : int
        Number of patches ("Number of patches", 16).
    patch_size : int
        Side of a square patch in pixels ("Patch size", 256).
    pick_all_points : bool
        One patch per point and no random ones ("Pick all points": the number of patches
        becomes the number of points).
    level : int
        The multiscale level ``image`` is (recorded in the names).
    isotropic : bool
        Flipbooks of a volume run along a random axis (xy, xz or yz planes) instead of
        axis 0; for voxels of equal size in every direction.
    is_2d_stack : bool
        A 3D image is a stack of unrelated 2D images: square patches of single planes.
    labels : array of ``image``'s shape, optional
        Paired labels, cropped the same way ("Pick paired data").
    seed : int, optional
        For repeatable random patches.

    Raises
    ------
    PanoptemError
        An image that is not 2D or 3D, RGB, empty; labels of another shape; a volume too
        thin for flipbooks; a patch size or count out of range; points outside the image.
    """
    # a zarr or dask array stays on disk: only the crops are read
    img = image if hasattr(image, "shape") and hasattr(image, "dtype") else np.asarray(image)
    if len(img.shape) not in (2, 3) or min(img.shape, default=0) == 0:
        raise PanoptemError(
            f"Patches are picked from a 2D image, a 2D stack or a 3D volume; '{name}' has "
            f"shape {img.shape}. An RGB image must be converted to grayscale first."
        )
    if labels is not None:
        labels = labels if hasattr(labels, "shape") else np.asarray(labels)
        if tuple(labels.shape) != tuple(img.shape):
            raise PanoptemError(
                f"The paired labels have shape {labels.shape} but '{name}' has shape "
                f"{img.shape}; pair the image with a labels layer of its shape."
            )
    if int(patch_size) < 16 or int(patch_size) % 16:
        raise PanoptemError(f"Patch size must be a multiple of 16 (e.g. 256); got {patch_size}.")
    if int(n_patches) < 1:
        raise PanoptemError(f"Number of patches must be at least 1; got {n_patches}.")
    pts = np.zeros((0, img.ndim)) if points is None else np.asarray(points, dtype=float)
    if pts.size and (pts.ndim != 2 or pts.shape[1] != img.ndim):
        raise PanoptemError(
            f"Points need {img.ndim} coordinates for '{name}' (shape {img.shape}); got "
            f"points of shape {pts.shape}. Use a points layer of the image's dimensions."
        )
    pts = pts.reshape(-1, img.ndim)
    inside = np.all((pts > -0.5) & (pts < np.asarray(img.shape) - 0.5), axis=1)
    if len(pts) and not inside.all():
        bad = np.flatnonzero(~inside)[:3].tolist()
        raise PanoptemError(f"Points {bad} lie outside '{name}' (shape {img.shape}); delete them "
                            "or move them onto the image.")
    volume = img.ndim == 3 and not is_2d_stack
    longest = max(img.shape) if isotropic else img.shape[0]
    if volume and longest < FLIPBOOK_DEPTH:
        raise PanoptemError(
            f"'{name}' has {img.shape[0]} slices; flipbooks need at least {FLIPBOOK_DEPTH}. Tick "
            "'Image is 2D stack' if its slices are separate images."
        )
    if pick_all_points and not len(pts):
        raise PanoptemError("'Pick all points' needs points: add a points layer with a point on "
                            "each place to pick, or untick 'Pick all points'.")
    n_points = len(pts) if pick_all_points else min(len(pts), int(n_patches))
    total = n_points if pick_all_points else int(n_patches)
    rng = np.random.default_rng(seed)
    size = int(patch_size)
    images, label_patches, suffixes = [], [], []
    for i in range(total):
        point = pts[i] if i < n_points else None
        if volume:
            region, suffix = _flipbook(img, point, size, isotropic, rng)
            shape = (FLIPBOOK_DEPTH, size, size)

            def cut(a, region=region):
                return _flip(a, region)
        else:
            index, suffix = _square(img, point, size, rng)
            shape = (size, size)

            def cut(a, index=index):
                return np.asarray(a[index])
        images.append(_pad(cut(img), shape))
        if labels is not None:
            label_patches.append(_pad(cut(labels).astype(np.int32, copy=False), shape))
        suffixes.append(f"s{int(level)}-LOC-{suffix}")
    return PickedPatches(np.stack(images), np.stack(label_patches) if labels is not None else None,
                         str(name), suffixes, list(range(n_points)))


def _square(img: np.ndarray, point, size: int, rng) -> tuple:
    """(index, suffix) of a square patch of a 2D image or of one plane of a 2D stack."""
    h, w = img.shape[-2:]
    if point is not None:
        y0, x0 = _start(point[-2], h, size), _start(point[-1], w, size)
    else:
        y0, x0 = _grid_start(rng, h, size), _grid_start(rng, w, size)
    y1, x1 = min(y0 + size, h), min(x0 + size, w)
    if img.ndim == 2:
        return np.s_[y0:y1, x0:x1], f"2d_{y0}-{y1}_{x0}-{x1}"
    plane = int(round(point[0])) if point is not None else int(rng.integers(0, img.shape[0]))
    return np.s_[plane, y0:y1, x0:x1], f"2d-{plane}_{y0}-{y1}_{x0}-{x1}"


def _flipbook(img: np.ndarray, point, size: int, isotropic: bool, rng) -> tuple:
    """(region, suffix) of five consecutive slices along an axis (random when isotropic)."""
    axes = [a for a in range(3) if img.shape[a] >= FLIPBOOK_DEPTH] if isotropic else [0]
    axis = int(rng.choice(axes))
    rows, cols = [a for a in range(3) if a != axis]
    n, h, w = img.shape[axis], img.shape[rows], img.shape[cols]
    if point is not None:
        plane = int(np.clip(round(point[axis]), _HALF, n - 1 - _HALF))
        y0, x0 = _start(point[rows], h, size), _start(point[cols], w, size)
    else:
        plane = int(rng.integers(_HALF, n - _HALF))
        y0, x0 = _grid_start(rng, h, size), _grid_start(rng, w, size)
    z0, z1 = plane - _HALF, plane + _HALF + 1
    y1, x1 = min(y0 + size, h), min(x0 + size, w)
    return (axis, (z0, z1), (y0, y1), (x0, x1)), f"{axis}_{z0}-{z1}_{y0}-{y1}_{x0}-{x1}"


def _flip(arr, region) -> np.ndarray:
    """The (slices, rows, columns) block of a flipbook region, slices along its axis."""
    axis, (z0, z1), (y0, y1), (x0, x1) = region
    rows, cols = [a for a in range(3) if a != axis]
    index = [slice(None)] * 3
    index[axis], index[rows], index[cols] = slice(z0, z1), slice(y0, y1), slice(x0, x1)
    return np.moveaxis(np.asarray(arr[tuple(index)]), axis, 0)


def patch_crop(suffix: str, size: int) -> tuple[int, int]:
    """(height, width) of the image inside a padded patch, read from its name suffix."""
    match = _RANGE.search(suffix or "")
    if match is None:
        return size, size
    y0, y1, x0, x1 = (int(g) for g in match.groups())
    return min(y1 - y0, size), min(x1 - x0, size)


def store_patches(save_dir, dataset_name: str, images, labels, *, prefix: str | None = None,
                  suffixes=None) -> list[Path]:
    """Write patches (and their masks) into a dataset in the original's layout.

    Parameters
    ----------
    save_dir : folder holding datasets ("Save directory")
    dataset_name : the dataset's folder name ("Dataset name")
    images : array (N, P, P) patches or (N, 5, P, P) flipbooks (the middle slice is saved)
    labels : array of the same shape: the masks (instance ids, or class * divisor + k)
    prefix : the image name the patches came from ("unknown" when not known)
    suffixes : the patch name suffixes from :func:`pick_patches`; without them each patch
        gets a random one, and nothing is cropped

    Returns
    -------
    list of Path
        The image files written (masks have the same names under ``masks/``).

    Nothing is written when the images and labels do not match; a file name already in the
    dataset gets ``_1``, ``_2``, ... so every earlier patch stays.
    """
    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim == 2:
        images, labels = images[None], labels[None] if labels.ndim == 2 else labels
    if images.ndim not in (3, 4) or images.shape != labels.shape:
        raise PanoptemError(
            f"The patches have shape {images.shape} but the labels {labels.shape}; store the "
            "labels layer that was picked with these patches (same number and size)."
        )
    if suffixes is not None and len(suffixes) != len(images):
        raise PanoptemError(f"{len(images)} patches but {len(suffixes)} names in the layer's "
                            "metadata; pick the patches again.")
    if not str(dataset_name).strip() or any(c in str(dataset_name) for c in '/\\:*?"<>|'):
        raise PanoptemError(f"The dataset name {dataset_name!r} cannot be a folder name; "
                            "choose a name without / \\ : * ? \" < > |.")
    prefix = str(prefix or "unknown")
    source = Path(save_dir).expanduser() / str(dataset_name).strip() / prefix
    image_dir = writable_folder(source / "images", "dataset folder")
    mask_dir = writable_folder(source / "masks", "dataset folder")
    import tifffile

    written = []
    size = images.shape[-1]
    for i, (image, mask) in enumerate(zip(images, labels, strict=True)):
        if image.ndim == 3:  # a flipbook: its middle slice
            image, mask = image[_HALF], mask[_HALF]
        suffix = suffixes[i] if suffixes is not None else secrets.token_hex(5)
        h, w = patch_crop(suffix, size)
        target = free_path(image_dir / f"{prefix}-{suffix.lstrip('-')}.tiff", also_in=[mask_dir])
        with atomic_path(mask_dir / target.name) as tmp:
            tifffile.imwrite(tmp, np.ascontiguousarray(mask[:h, :w].astype(np.int32)))
        with atomic_path(target) as tmp:
            tifffile.imwrite(tmp, np.ascontiguousarray(image[:h, :w]))
        written.append(target)
    return written
