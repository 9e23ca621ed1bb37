"""Training targets made from a label mask: semantic map, centre heat map and centre offsets.

These are what a Panoptic-DeepLab style model learns to predict (reference §7.1):

* ``ctr_hmp``: a 1 is put at the centroid of every instance (row and column truncated to
  whole pixels) on a zero map, the map is blurred with a Gaussian of standard deviation
  ``sigma`` (kernel radius ``4 * sigma``, zeros beyond the border), and divided by its
  maximum so the highest peak is 1. Without instances the map stays all zero.
* ``offsets``: for every pixel of an instance, the vector from the pixel to its instance's
  (sub-pixel) centroid, as (dy, dx); zero on background.

Centroids are computed for all instances at once with ``np.bincount`` over a compact
relabelling, so the cost is a few passes over the image whatever the number of objects.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from panoptem.errors import PanoptemError

__all__ = ["DEFAULT_SIGMA", "heatmap_and_offsets", "panoptic_targets", "check_panoptic_labels"]

DEFAULT_SIGMA = 6.0


def _as_label_image(instances, what: str = "instance mask") -> np.ndarray:
    arr = np.asarray(instances)
    if arr.ndim != 2:
        raise PanoptemError(f"The {what} must be 2-D (height, width); got shape {arr.shape}.")
    if arr.dtype == bool:
        return arr.view(np.uint8)
    if not np.issubdtype(arr.dtype, np.integer):
        raise PanoptemError(f"The {what} must hold integer ids; got dtype {arr.dtype}.")
    return arr


def check_panoptic_labels(labels, label_divisor, minimum: int = 2) -> tuple[list[int], int]:
    """Validate class ids (at least ``minimum``, all > 0) and the divisor; return them as ints."""
    labels = [int(c) for c in labels]
    if len(labels) < minimum:
        raise PanoptemError(
            f"A panoptic dataset needs at least {minimum} class labels; got {labels}. For a "
            "single class use SingleClassInstanceDataset."
        )
    if labels and min(labels) < 1:
        raise PanoptemError(f"Class labels must be positive integers; got {labels}.")
    if int(label_divisor) < 1:
        raise PanoptemError(f"The label divisor must be a positive integer; got {label_divisor}.")
    return labels, int(label_divisor)


def heatmap_and_offsets(instances, sigma: float = DEFAULT_SIGMA) -> tuple[np.ndarray, np.ndarray]:
    """Centre heat map and offsets of an instance label image.

    Parameters
    ----------
    instances : ndarray (H, W), integer (or bool)
        Instance ids; 0 (and any value <= 0) is background. Ids need not be consecutive:
        panoptic ids such as ``class * label_divisor + k`` work as they are.
    sigma : float
        Standard deviation of the Gaussian, in pixels (6 in the original).

    Returns
    -------
    heatmap : ndarray (1, H, W) float32
        Blurred centroid impulses divided by their maximum (peak value 1); all zero when
        there is no instance.
    offsets : ndarray (2, H, W) float32
        ``centroid - pixel`` as (dy, dx) inside instances, 0 elsewhere.
    """
    labels = _as_label_image(instances)
    if not sigma > 0:
        raise PanoptemError(f"The heat-map sigma must be positive; got {sigma}.")
    h, w = labels.shape
    heatmap = np.zeros((h, w), np.float32)
    offsets = np.zeros((2, h, w), np.float32)
    fg = labels > 0
    if not fg.any():
        return heatmap[None], offsets

    ys, xs = np.nonzero(fg)  # row-major, the order of labels[fg]
    _, inverse = np.unique(labels[fg], return_inverse=True)
    inverse = inverse.ravel()
    counts = np.bincount(inverse).astype(np.float64)
    cy = np.bincount(inverse, weights=ys) / counts
    cx = np.bincount(inverse, weights=xs) / counts

    heatmap[cy.astype(np.intp), cx.astype(np.intp)] = 1.0
    heatmap = ndimage.gaussian_filter(heatmap, sigma, mode="constant", cval=0.0, truncate=4.0)
    peak = heatmap.max()
    if peak > 0:
        heatmap /= peak

    offsets[0, ys, xs] = cy[inverse] - ys
    offsets[1, ys, xs] = cx[inverse] - xs
    return heatmap[None].astype(np.float32, copy=False), offsets


def panoptic_targets(
    mask, labels, thing_list, label_divisor: int, sigma: float = DEFAULT_SIGMA
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Targets of a multi-class panoptic mask whose values are ``class * label_divisor + k``.

    Parameters
    ----------
    mask : ndarray (H, W), integer
        Panoptic ids; 0 is background. Values whose class is not in ``labels`` count as
        background.
    labels : sequence of int
        Class ids (all > 0).
    thing_list : sequence of int
        The classes with instances; only their pixels make heat-map peaks and offsets.
        Other classes are "stuff" (semantic only).
    label_divisor : int
        The panoptic id divisor (1000 in the original's training widget).
    sigma : float
        Heat-map Gaussian standard deviation in pixels.

    Returns
    -------
    sem : ndarray (H, W) int64
        Class id per pixel, 0 for background.
    heatmap : ndarray (1, H, W) float32
    offsets : ndarray (2, H, W) float32
        As :func:`heatmap_and_offsets` on the thing pixels, which keep their panoptic ids.
    """
    pan = _as_label_image(mask, "panoptic mask").astype(np.int64, copy=False)
    labels, label_divisor = check_panoptic_labels(labels, label_divisor, minimum=1)
    cls = np.where(pan > 0, pan // label_divisor, 0)
    known = np.isin(cls, labels)
    sem = np.where(known, cls, 0).astype(np.int64)
    things = known & np.isin(cls, [int(c) for c in thing_list])
    heatmap, offsets = heatmap_and_offsets(np.where(things, pan, 0), sigma)
    return sem, heatmap, offsets
