"""Training datasets in the original's folder layout (reference §7.1, SPEC §1 and §5.10).

``<root>/<source>/images/<name>`` holds an EM image and ``<root>/<source>/masks/<name>``
its label mask, for any number of ``<source>`` folders. Unlike the original (which paired
two unsorted file lists by position), images and masks are paired by file name in sorted
order; files that are not images are skipped with one warning; an unpaired file is an error.

Items are dicts made after augmentation, from the transformed mask:

* ``image``   float32 (1, H, W): ``(v / 255 - mean) / std`` of the 8-bit image
* ``sem``     float32 (1, H, W) (mask > 0) for one class; int64 (H, W) class ids for panoptic
* ``ctr_hmp`` float32 (1, H, W) and ``offsets`` float32 (2, H, W) (see :mod:`.targets`)
* ``fname``   str, the image path (as in the original, for debugging)
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, WeightedRandomSampler

from panoptem.errors import PanoptemError
from panoptem.io import IMAGE_SUFFIXES, read_image
from panoptem.training.targets import (
    DEFAULT_SIGMA,
    check_panoptic_labels,
    heatmap_and_offsets,
    panoptic_targets,
)

__all__ = [
    "DEFAULT_NORMS",
    "find_pairs",
    "sampling_weights",
    "read_image_8bit",
    "read_mask",
    "image_norms",
    "SingleClassInstanceDataset",
    "PanopticDataset",
    "make_sampler",
    "DatasetClasses",
    "check_batch",
    "DEFAULT_LABEL_DIVISOR",
]

#: The norms of MitoNet and of the CEM1.5M-pretrained encoder (fractions of 255).
DEFAULT_NORMS = {"mean": 0.57571, "std": 0.12765}

_LAYOUT = "<root>/<source>/images/<name> and <root>/<source>/masks/<same name>"


def _listing(folder: Path, ignored: list[str]) -> dict[str, Path]:
    """Image files of ``folder`` by name (none if it is missing); the rest go to ``ignored``."""
    found = {}
    for p in sorted(folder.iterdir()) if folder.is_dir() else ():
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES:
            found[p.name] = p
        else:
            ignored.append(str(p))
    return found


def _pair_source(source: Path, ignored: list[str], problems: list[str]) -> list:
    """Pair one source folder by exact name, then the leftovers by stem (one candidate only)."""
    images, masks = _listing(source / "images", ignored), _listing(source / "masks", ignored)
    pairs = {n: masks.pop(n) for n in list(images) if n in masks}
    for n in sorted(set(images) - set(pairs)):
        same_stem = [m for m in masks if Path(m).stem == Path(n).stem]
        if len(same_stem) == 1:
            pairs[n] = masks.pop(same_stem[0])
        elif same_stem:
            problems.append(f"image {images[n]} matches several masks ({', '.join(same_stem)})")
        else:
            problems.append(f"image {images[n]} has no mask {source / 'masks' / n}")
    problems += [f"mask {p} has no image {source / 'images' / n}" for n, p in masks.items()]
    return [(images[n], pairs[n], source.name) for n in sorted(pairs)]


def find_pairs(root) -> list[tuple[Path, Path, str]]:
    """List the (image, mask, source name) pairs of a training-dataset folder.

    Images and masks pair by identical file name; an image whose name has no mask pairs
    with the single mask of the same stem and another extension (``a.tif`` with ``a.png``).
    Only files with an image suffix (``.tif``, ``.tiff``, ``.png``, ``.jpg``, ``.jpeg``,
    ``.npy``) count; other files, hidden files (``.DS_Store``, ``._x.tif``), ``Thumbs.db``,
    sub-folders and source folders without ``images/`` or ``masks/`` are ignored with one
    :class:`UserWarning` that lists them.

    Parameters
    ----------
    root : path-like
        The dataset folder ``<root>/<source>/images|masks``.

    Returns
    -------
    list of (Path, Path, str)
        Sorted by source folder name, then image file name.

    Raises
    ------
    PanoptemError
        When ``root`` is not a folder, files have no partner (the message names them), or
        no pair is found (the message names ``root`` and the expected layout).
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise PanoptemError(f"The training dataset folder {root} does not exist; use {_LAYOUT}.")
    ignored: list[str] = []
    problems: list[str] = []
    pairs = []
    for source in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if (source / "images").is_dir() or (source / "masks").is_dir():
            pairs += _pair_source(source, ignored, problems)
        else:
            ignored.append(f"{source} (no images/ or masks/ folder)")
    if ignored:
        warnings.warn(
            f"Ignored {len(ignored)} entries of the training dataset {root} that are not "
            f"images: {', '.join(ignored)}", UserWarning, stacklevel=2,
        )
    if problems:
        more = f"; and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise PanoptemError(
            f"Unpaired training files: {'; '.join(problems[:10])}{more}. Every image needs a "
            "mask with the same file name (or the same name with another extension)."
        )
    if not pairs:
        nested = (root / "images").is_dir()
        hint = f" {root} holds images/ itself: give its parent." if nested else ""
        raise PanoptemError(f"No image/mask pairs found in {root}; expected {_LAYOUT}.{hint}")
    return pairs


def sampling_weights(pairs, weight_gamma: float) -> torch.Tensor:
    """Per-example sampling weights that balance source folders (the original's rule).

    Each source gets ``(1 / count) ** weight_gamma``; these are normalised to sum to 1 over
    the sources and every example gets its source's weight. 0 gives uniform sampling; 1
    makes every source equally likely whatever its size.

    Parameters
    ----------
    pairs : sequence of (image, mask, source)
    weight_gamma : float >= 0

    Returns
    -------
    Tensor (N,) float64, in the order of ``pairs``.
    """
    gamma = float(weight_gamma)
    if not gamma >= 0:
        raise PanoptemError(f"weight_gamma must be 0 or more (0 = uniform); got {weight_gamma}.")
    _, index, counts = np.unique([p[2] for p in pairs], return_inverse=True, return_counts=True)
    per_source = (1.0 / counts) ** gamma
    return torch.as_tensor(per_source[index.ravel()] / per_source.sum(), dtype=torch.float64)


def read_image_8bit(path) -> np.ndarray:
    """Read a training image as 8-bit grayscale, shape (H, W) uint8.

    uint8 images are kept. RGB(A) and palette images become gray with the ITU-R 601 weights
    (0.299 R + 0.587 G + 0.114 B, like the original's OpenCV reader); alpha is dropped.
    Other dtypes (uint16, float, ...) are mapped linearly from their own min..max onto
    0..255, exactly as panoptem's inference does (SPEC §5.1); the original's reader instead
    keeps the high byte of 16-bit images.
    """
    from panoptem.inference.preprocess import intensity_range, to_unit_range

    path = Path(path)
    if path.suffix.lower() in (".png", ".jpg", ".jpeg"):
        from PIL import Image

        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB") if im.mode in ("P", "PA", "1") else im)
    else:
        arr = read_image(path)
    if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[-1] not in (3, 4):
        arr = np.moveaxis(arr, 0, -1)  # channels first
    if arr.ndim == 3 and arr.shape[-1] in (2, 4):  # gray + alpha, RGBA
        arr = arr[..., :-1]
    if arr.ndim == 3 and arr.shape[-1] == 3:
        gray = arr.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        arr = np.clip(np.rint(gray), 0, 255).astype(np.uint8) if arr.dtype == np.uint8 else gray
    arr = np.squeeze(arr)
    if arr.ndim != 2:
        raise PanoptemError(f"Training image {path} must be 2-D grayscale; got shape {arr.shape}.")
    if arr.dtype == np.uint8 or arr.dtype == bool:
        return arr.astype(np.uint8) * (255 if arr.dtype == bool else 1)
    values = to_unit_range(arr, intensity_range(arr)).numpy()
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def read_mask(path) -> np.ndarray:
    """Read a label mask as (H, W) int64 ids (palette PNGs give their palette indices).

    Raises PanoptemError for colour masks, non-integer values and negative ids.
    """
    arr = np.squeeze(read_image(path))
    if arr.ndim != 2:
        raise PanoptemError(f"Mask {path} must be 2-D, one id per pixel; got shape {arr.shape}.")
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
            raise PanoptemError(f"Mask {path} holds non-integer values; save integer label ids.")
    elif arr.dtype != bool and not np.issubdtype(arr.dtype, np.integer):
        raise PanoptemError(f"Mask {path} has dtype {arr.dtype}; save integer label ids.")
    out = arr.astype(np.int64)
    if out.size and out.min() < 0:
        raise PanoptemError(f"Mask {path} holds negative ids; use 0 for background and ids > 0.")
    return out


def image_norms(pairs) -> dict:
    """Mean and std (fractions of 255) of the training images, for training from scratch.

    As the original: the averages of the per-image means and standard deviations of the
    8-bit images, divided by 255. Returns ``{'mean': float, 'std': float}``.
    """
    stats = [(img.mean(), img.std()) for img in (read_image_8bit(p[0]) for p in pairs)]
    if not stats:
        raise PanoptemError("No training images to compute norms from.")
    mean, std = np.mean(stats, axis=0) / 255.0
    return {"mean": float(mean), "std": float(std)}


class _PairDataset(Dataset):
    """Shared reading, augmentation and normalisation of both dataset kinds."""

    binary_to_components = False

    def __init__(self, root_or_pairs, transforms=None, norms: dict | None = None,
                 weight_gamma: float | None = 0.7, heatmap_sigma: float = DEFAULT_SIGMA,
                 seed: int | None = None) -> None:
        super().__init__()
        if isinstance(root_or_pairs, (str, Path)):
            self.pairs = find_pairs(root_or_pairs)
        else:  # explicit pairs; the source defaults to the folder above images/
            self.pairs = [
                (Path(p[0]), Path(p[1]), p[2] if len(p) > 2 else Path(p[0]).parent.parent.name)
                for p in root_or_pairs
            ]
        if not self.pairs:
            raise PanoptemError("The training dataset has no image/mask pairs.")
        self.transforms = transforms
        self.norms = dict(DEFAULT_NORMS if norms is None else norms)
        if not float(self.norms.get("std", 0)) > 0:
            raise PanoptemError(f"norms must have a mean and a positive std; got {self.norms}.")
        self.weight_gamma = weight_gamma
        self.weights = None if weight_gamma is None else sampling_weights(self.pairs, weight_gamma)
        self.heatmap_sigma = float(heatmap_sigma)
        self.seed = seed
        self._rng, self._rng_worker = np.random.default_rng(seed), None

    def __len__(self) -> int:
        return len(self.pairs)

    def _generator(self) -> np.random.Generator:
        """This process's generator; each DataLoader worker reseeds from its torch seed."""
        info = torch.utils.data.get_worker_info()
        if info is not None and self._rng_worker != info.id:
            self._rng = np.random.default_rng([info.seed % 2**63, info.id])
            self._rng_worker = info.id
        return self._rng

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The pair before augmentation: image (H, W) uint8 and mask (H, W) int64."""
        image_path, mask_path, _ = self.pairs[index]
        image, mask = read_image_8bit(image_path), read_mask(mask_path)
        if image.shape != mask.shape:
            raise PanoptemError(
                f"Image {image_path} {image.shape} and mask {mask_path} {mask.shape} differ in "
                "shape; give a mask of the image's size."
            )
        if self.binary_to_components and len(np.unique(mask[mask != 0])) == 1:
            import cc3d

            mask = cc3d.connected_components(mask != 0, connectivity=8).astype(np.int64)
        return image, mask

    def __getitem__(self, index: int) -> dict:
        from panoptem.inference.preprocess import normalize

        image, mask = self.load(index)
        if self.transforms is not None:
            image, mask = self.transforms(image, mask, self._generator())
        x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
        item = {"image": normalize(x, self.norms)[None], **self.targets(np.asarray(mask))}
        item["fname"] = str(self.pairs[index][0])
        return item

    def targets(self, mask: np.ndarray) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError


class SingleClassInstanceDataset(_PairDataset):
    """Image/mask pairs of one instance class (masks hold instance ids, 0 background).

    A mask with a single non-zero value (a binary mask) is split into its 8-connected
    components, so each object gets its own centre.

    Parameters
    ----------
    root_or_pairs : path-like or sequence of (image, mask[, source])
        A dataset folder (see :func:`find_pairs`) or explicit pairs.
    transforms : callable ``(image, mask, rng) -> (image, mask)`` or None
        E.g. :func:`panoptem.training.augment.default_augmentations`.
    norms : dict with 'mean' and 'std' (fractions of 255); default :data:`DEFAULT_NORMS`
    weight_gamma : float or None
        Source balancing for :attr:`weights` (see :func:`sampling_weights`); None: no weights.
    heatmap_sigma : float
    seed : int or None
        Seeds the augmentation generator (DataLoader workers derive theirs from torch).
    """

    binary_to_components = True

    def targets(self, mask: np.ndarray) -> dict:
        heatmap, offsets = heatmap_and_offsets(mask, self.heatmap_sigma)
        return _tensors((mask > 0).astype(np.float32)[None], heatmap, offsets)


class PanopticDataset(_PairDataset):
    """Image/mask pairs of several classes; mask values are ``class * label_divisor + k``.

    Parameters are those of :class:`SingleClassInstanceDataset` plus ``labels`` (class ids,
    more than one, all > 0), ``thing_list`` (classes with instances) and ``label_divisor``.
    """

    def __init__(self, root_or_pairs, labels, thing_list, label_divisor: int, transforms=None,
                 norms: dict | None = None, weight_gamma: float | None = 0.7,
                 heatmap_sigma: float = DEFAULT_SIGMA, seed: int | None = None) -> None:
        self.labels, self.label_divisor = check_panoptic_labels(labels, label_divisor)
        self.thing_list = [int(c) for c in thing_list]
        super().__init__(root_or_pairs, transforms, norms, weight_gamma, heatmap_sigma, seed)

    def targets(self, mask: np.ndarray) -> dict:
        return _tensors(*panoptic_targets(mask, self.labels, self.thing_list,
                                          self.label_divisor, self.heatmap_sigma))


def _tensors(sem: np.ndarray, heatmap: np.ndarray, offsets: np.ndarray) -> dict:
    return {"sem": torch.from_numpy(sem), "ctr_hmp": torch.from_numpy(heatmap),
            "offsets": torch.from_numpy(offsets)}


def make_sampler(dataset, num_samples: int, generator: torch.Generator | None = None):
    """A with-replacement :class:`WeightedRandomSampler` drawing ``num_samples`` items.

    Uses ``dataset.weights``; uniform when the dataset has none.
    """
    weights = getattr(dataset, "weights", None)
    if weights is None:
        weights = torch.ones(len(dataset), dtype=torch.float64)
    return WeightedRandomSampler(weights, int(num_samples), replacement=True, generator=generator)


#: The label divisor of a multi-class dataset when none is given (the original's default).
DEFAULT_LABEL_DIVISOR = 1000


@dataclass(frozen=True)
class DatasetClasses:
    """The classes of a training dataset and how its masks encode them.

    Attributes
    ----------
    class_names : dict int -> str
    labels : list of int
        Class ids, in order.
    thing_list : list of int
        Classes with instances ("instance"); the others are semantic ("stuff").
    label_divisor : int
        Masks hold ``class * label_divisor + k`` when there are several classes; with one
        class they hold instance ids (or a binary mask).
    """

    class_names: dict
    labels: list
    thing_list: list
    label_divisor: int = DEFAULT_LABEL_DIVISOR

    @property
    def dataset_class(self) -> str:
        """The original's rule: one class -> SingleClassInstanceDataset, else PanopticDataset."""
        return "SingleClassInstanceDataset" if len(self.labels) == 1 else "PanopticDataset"

    def dataset(self, root_or_pairs, **kwargs):
        """The dataset of :attr:`dataset_class` over ``root_or_pairs`` (see the classes)."""
        if self.dataset_class == "SingleClassInstanceDataset":
            return SingleClassInstanceDataset(root_or_pairs, **kwargs)
        return PanopticDataset(root_or_pairs, labels=self.labels, thing_list=self.thing_list,
                               label_divisor=self.label_divisor, **kwargs)

    @classmethod
    def from_text(cls, text: str, label_divisor: int | None = None) -> DatasetClasses:
        """Parse the Train widget's "Dataset labels": one class per line (or separated by
        ``;``), ``id,name,instance`` or ``id,name,semantic``, e.g. ``1,mito,instance``."""
        names, labels, things = {}, [], []
        entries = [e.strip() for e in str(text).replace(";", "\n").splitlines() if e.strip()]
        for entry in entries:
            parts = [p.strip() for p in entry.split(",")]
            if len(parts) != 3 or not parts[0].isdigit() or int(parts[0]) < 1 or not parts[1] \
                    or parts[2].lower() not in ("instance", "semantic"):
                raise PanoptemError(
                    f"Dataset label {entry!r} is not 'id,name,instance' or 'id,name,semantic' "
                    "(id a whole number >= 1), e.g. '1,mito,instance'; one class per line."
                )
            cid = int(parts[0])
            if cid in names:
                raise PanoptemError(f"Class id {cid} is given twice in the dataset labels.")
            names[cid] = parts[1]
            labels.append(cid)
            if parts[2].lower() == "instance":
                things.append(cid)
        if not labels:
            raise PanoptemError("Dataset labels are empty: give one class per line, e.g. "
                                "'1,mito,instance'.")
        return cls.checked(names, labels, things, label_divisor)

    @classmethod
    def checked(cls, class_names, labels, thing_list, label_divisor=None) -> DatasetClasses:
        """Validated classes (a multi-class divisor larger than any class's object count)."""
        names = {int(k): str(v) for k, v in dict(class_names).items()}
        labels = [int(c) for c in labels]
        things = [int(c) for c in thing_list]
        divisor = DEFAULT_LABEL_DIVISOR if label_divisor in (None, "", 0) else label_divisor
        try:
            divisor = int(divisor)
        except (TypeError, ValueError):
            raise PanoptemError(f"The label divisor must be a whole number; got {divisor!r}.") from None
        if len(labels) > 1:
            check_panoptic_labels(labels, divisor)
        missing = [c for c in [*labels, *things] if c not in names]
        if missing or not set(things) <= set(labels):
            raise PanoptemError(f"Class ids {missing or sorted(set(things) - set(labels))} have no "
                                "name or are not among the labels; list every class once.")
        return cls(names, labels, things, divisor)


def check_batch(dataset, batch_size: int, folder) -> None:
    """Refuse a dataset with fewer image/mask pairs than one batch (as the original)."""
    if len(dataset) < int(batch_size):
        raise PanoptemError(
            f"{folder} holds {len(dataset)} image/mask pair(s) but one batch takes "
            f"{batch_size}: pick and store more patches (at least {batch_size})."
        )
