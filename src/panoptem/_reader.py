"""napari reader for the zarr outputs of 3D inference (panoptem's and empanada's).

A 3D run with a zarr directory writes one group ``<image>_<model>.zarr`` holding one array
per class (named by the class) and, when asked, ``panoptic_xy``, ``panoptic_xz``,
``panoptic_yz``: several equal-shape arrays in one store, which generic zarr readers do not
open as separate layers (empanada-napari issue 21). This reader gives one Labels layer per
array, lazily read from disk, named as the 3D widget names them:
``<image>-<class>-prediction`` and ``<image>-panoptic-stack-<axis>``.

The image name comes from the group's ``panoptem`` attribute (written by the 3D engine at
the end of every run, from the widget, the CLI or a script, with the image's scale and
translate); without it (the original's stores) it is the store name without a trailing
``_<registered model name>``. Stores that look like anything else
(OME-Zarr, nested groups, non-integer or non-3D arrays) are left to other readers.

No napari import here: the reader returns layer-data tuples.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = ["get_reader", "read_zarr_output"]

_STACK_PREFIX = "panoptic_"


def _open_group(path, writable: bool = False):
    """The zarr group at ``path`` (read-write when asked and allowed), or None."""
    import zarr

    for mode in ("r+", "r") if writable else ("r",):
        try:
            return zarr.open_group(str(path), mode=mode)
        except Exception:  # not a zarr group (an array, not zarr at all), or read-only
            continue
    return None


def _result_arrays(group) -> dict | None:
    """The group's result arrays by name, or None when it is not a 3D inference output."""
    if group is None or "multiscales" in group.attrs:
        return None
    if any(True for _ in group.group_keys()):
        return None
    arrays = {name: arr for name, arr in group.arrays()
              if not name.startswith(".") and not name.endswith(".partial")}
    shapes = {tuple(a.shape) for a in arrays.values()}
    if not arrays or len(shapes) != 1 or len(next(iter(shapes))) != 3:
        return None
    if not all(np.issubdtype(np.dtype(a.dtype), np.integer) for a in arrays.values()):
        return None
    return arrays


def _image_name(path: Path, info: dict) -> str:
    if info.get("image"):
        return str(info["image"])
    stem = path.name[: -len(".zarr")] if path.name.lower().endswith(".zarr") else path.name
    try:
        from panoptem import registry

        models = sorted(registry.list_models(), key=len, reverse=True)
    except Exception:  # an unreadable model folder must not stop the reader
        models = []
    for model in models:
        if stem.endswith(f"_{model}") and len(stem) > len(model) + 1:
            return stem[: -len(model) - 1]
    return stem


def _layer_name(image: str, array: str) -> str:
    axis = array[len(_STACK_PREFIX):]
    if array.startswith(_STACK_PREFIX) and axis in ("xy", "xz", "yz"):
        return f"{image}-panoptic-stack-{axis}"
    return f"{image}-{array}-prediction"


def read_zarr_output(path) -> list[tuple]:
    """One ``(zarr array, kwargs, "labels")`` tuple per result array of the store at ``path``.

    Class layers come after the panoptic stacks, in name order, so the last (visible) one
    is a class. Arrays stay on disk (napari reads the slices it shows) and are opened
    writable where the folder allows it, so proofreading edits are saved in the store.
    """
    path = Path(path)
    group = _open_group(path, writable=os.access(path, os.W_OK))
    arrays = _result_arrays(group)
    if arrays is None:
        from panoptem.errors import PanoptemError

        raise PanoptemError(f"{path} is not a zarr output of 3D inference.")
    from panoptem.inference.zarr_store import INFO_ATTR

    info = dict(group.attrs.get(INFO_ATTR, {}) or {})
    image = _image_name(path, info)
    names = sorted(arrays, key=lambda n: (not n.startswith(_STACK_PREFIX), n))
    layers = []
    for i, name in enumerate(names):
        kwargs = {"name": _layer_name(image, name), "visible": i == len(names) - 1,
                  "metadata": {"source_zarr": str(path), "array": name}}
        for key in ("scale", "translate"):
            if len(info.get(key, ())) == 3:
                kwargs[key] = tuple(float(v) for v in info[key])
        layers.append((arrays[name], kwargs, "labels"))
    return layers


def get_reader(path):
    """npe2 reader hook: a reader for a 3D inference zarr store, else None."""
    if isinstance(path, list | tuple):
        if len(path) != 1:
            return None
        path = path[0]
    p = Path(str(path))
    if not p.name.lower().endswith(".zarr") or not p.is_dir():
        return None
    if _result_arrays(_open_group(p)) is None:
        return None
    return read_zarr_output
