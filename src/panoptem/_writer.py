"""napari writer: save a Labels layer as a tif that other programs open.

A label image is written with the most portable integer dtype that holds its ids (uint8,
uint16, else int32; never int64 or uint32, which Fiji and many viewers reject) and without
singleton axes (empanada-napari issue 14), through :func:`panoptem.io.write_labels`. Lazy
data (zarr, dask) is read into memory once; of multiscale labels the full resolution is
saved. No napari import here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from panoptem.io import write_labels as _write_tif

__all__ = ["write_labels"]


def write_labels(path: str, data, meta: dict) -> list[str]:
    """npe2 single-layer writer hook: write ``data`` to ``path`` (.tif/.tiff) and return [path].

    A path without a suffix gets ``.tif``. Raises PanoptemError for another suffix or for
    ids that do not fit in 32 bits.
    """
    if isinstance(data, list | tuple):  # multiscale: level 0 is the full resolution
        data = data[0]
    target = Path(path)
    if not target.suffix:
        target = target.with_name(target.name + ".tif")
    return [str(_write_tif(target, np.asarray(data)))]
