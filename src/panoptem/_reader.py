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
``_<registered model name>``.

Labels stores in OME-Zarr form (:mod:`panoptem.ngff`: a root without an image, whose
``labels`` group lists label images with ``multiscales`` and ``image-label`` metadata) give
one Labels layer per complete label image, ``<image>-<label>-prediction``, with all its
resolution levels (multiscale, lazily read), placed by level 0's scale and translation.

Stores that look like anything else (OME-Zarr images, with or without labels, other nested
groups, non-integer or non-3D arrays) are left to other readers.

No napari import here: the reader returns layer-data tuples.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = ["get_reader", "read_zarr_output", "read_ngff_labels"]

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


def _store_stem(path: Path) -> str:
    return path.name[: -len(".zarr")] if path.name.lower().endswith(".zarr") else path.name


def _image_name(path: Path, info: dict) -> str:
    if info.get("image"):
        return str(info["image"])
    stem = _store_stem(path)
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


def _ngff_label_images(group) -> list[str]:
    """Names of the complete label images of a panoptem OME-Zarr labels store; empty for
    any other group (an OME-Zarr image root, even with labels, is left to other readers)."""
    if group is None or "multiscales" in group.attrs or "ome" in group.attrs:
        return []
    from panoptem import ngff

    return ngff.label_image_names(group)


def read_ngff_labels(path) -> list[tuple]:
    """One ``(levels, kwargs, "labels")`` tuple per label image of an OME-Zarr labels store.

    ``levels`` is the list of the image's resolution levels (zarr arrays read lazily), or
    the array itself when there is only one; ``kwargs`` holds the layer name
    ``<image>-<label>-prediction`` (``<image>`` from the root's ``panoptem`` attribute, else
    the store name without ``.zarr``), level 0's scale and translate, ``multiscale`` and
    ``metadata`` (``source_zarr``, ``label_image`` and the root's ``panoptem`` attribute
    under ``panoptem``). The last layer is the visible one. Arrays are opened writable
    where the folder allows it.
    """
    from panoptem import ngff
    from panoptem.errors import PanoptemError

    path = Path(path)
    group = _open_group(path, writable=os.access(path, os.W_OK))
    names = _ngff_label_images(group)
    if not names:
        raise PanoptemError(f"{path} is not an OME-Zarr labels store with finished label "
                            "images.")
    info = group.attrs.get("panoptem")
    info = dict(info) if isinstance(info, dict) else {}
    image = str(info["image"]) if info.get("image") else _store_stem(path)
    labels = group["labels"]
    layers = []
    for i, name in enumerate(names):
        levels, scale, translate = ngff.open_levels(labels[name])
        kwargs = {"name": f"{image}-{name}-prediction", "visible": i == len(names) - 1,
                  "multiscale": len(levels) > 1, "scale": scale, "translate": translate,
                  "metadata": {"source_zarr": str(path), "label_image": name,
                               "panoptem": info}}
        layers.append((levels if len(levels) > 1 else levels[0], kwargs, "labels"))
    return layers


def get_reader(path):
    """npe2 reader hook: a reader for a 3D inference zarr store (flat, or an OME-Zarr
    labels store), else None."""
    if isinstance(path, list | tuple):
        if len(path) != 1:
            return None
        path = path[0]
    p = Path(str(path))
    if not p.name.lower().endswith(".zarr") or not p.is_dir():
        return None
    group = _open_group(p)
    if _result_arrays(group) is not None:
        return read_zarr_output
    if _ngff_label_images(group):
        return read_ngff_labels
    return None
