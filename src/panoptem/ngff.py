"""OME-Zarr (OME-NGFF) images in and label images out, without loading whole volumes.

Writing: a labels store is an OME-Zarr root group (zarr format 2, NGFF 0.4) holding only
label images, one per class::

    <store>.zarr/
        .zattrs                 {"panoptem": {"image": <image name>, ...run parameters}}
        labels/.zattrs          {"labels": ["mito", ...]}
        labels/mito/.zattrs     {"multiscales": [...], "image-label": {...}}
        labels/mito/0, 1, ...   int arrays, one per resolution level, chunks under "/"

:func:`create_labels_store` makes (or reopens) the root, :func:`create_label_image` the
full-resolution array ``labels/<name>/0`` that a run fills block by block, and
:func:`finish_label_image` adds the lower-resolution levels (nearest-neighbour: every
second voxel) chunk by chunk and writes the NGFF metadata, so volumes larger than memory
can be written. A label image is complete, for :func:`label_image_names` and panoptem's
napari reader, once it has its ``multiscales`` and ``image-label`` attributes.

Reading: :func:`open_image` opens one resolution level of an NGFF image (0.4 with zarr
format 2, or 0.5 with zarr format 3, where the metadata sits under the ``ome`` attribute)
or a plain zarr array, lazily, with the voxel size and origin of its z, y, x axes.
:func:`open_levels` gives all levels of an NGFF image group with their transformations.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from panoptem.errors import PanoptemError
from panoptem.progress import Progress, ensure_progress

__all__ = [
    "NGFF_VERSION",
    "SPACE_UNITS",
    "create_labels_store",
    "create_label_image",
    "finish_label_image",
    "label_image_names",
    "open_image",
    "open_levels",
    "SpaceView",
]

#: The NGFF version written by this module.
NGFF_VERSION = "0.4"

#: Units NGFF 0.4 allows for space axes.
SPACE_UNITS = (
    "angstrom", "attometer", "centimeter", "decimeter", "exameter", "femtometer", "foot",
    "gigameter", "hectometer", "inch", "kilometer", "megameter", "meter", "micrometer", "mile",
    "millimeter", "nanometer", "parsec", "petameter", "picometer", "terameter", "yard",
    "yoctometer", "yottameter", "zeptometer", "zettameter",
)

_LABELS = "labels"
_INFO_ATTR = "panoptem"  # the same key as panoptem.inference.zarr_store.INFO_ATTR
_SPACE_NAMES = ("z", "y", "x")
_ZARR_MARKERS = (".zgroup", ".zarray", "zarr.json")


# -- writing ---------------------------------------------------------------------------


def _is_zarr_dir(path: Path) -> bool:
    return path.is_dir() and any((path / marker).exists() for marker in _ZARR_MARKERS)


def _where(node) -> str:
    """The file system path of a zarr node, for messages."""
    root = getattr(node.store, "root", None)
    base = str(root) if root is not None else str(node.store_path)
    return f"{base}/{node.path}" if node.path else base


def create_labels_store(path, image_name: str, *, overwrite: bool = False):
    """Create, or reopen, an OME-Zarr labels store (zarr format 2) at ``path``.

    Parameters
    ----------
    path : str or Path
        The store's folder, conventionally ending in ``.zarr``. It may be missing or an
        empty folder; an existing store is reopened when it is already a labels store.
    image_name : str
        Name of the segmented image, recorded as ``attrs["panoptem"]["image"]`` of the root
        (other keys already under ``"panoptem"`` are kept); panoptem's napari reader names
        its layers ``<image_name>-<label>-prediction``.
    overwrite : bool
        Delete an existing zarr store at ``path`` (and everything in it) and start afresh.

    Returns
    -------
    zarr.Group
        The root group, writable, with a ``labels`` subgroup whose ``labels`` attribute
        lists the label images. Attributes the caller adds to the root later are kept.

    Raises
    ------
    PanoptemError
        When ``path`` is a file, a folder with other content, or a zarr store that is not a
        zarr-format-2 labels store (for instance an OME-Zarr image) and ``overwrite`` is
        false; or when ``image_name`` is empty.
    """
    import zarr

    if not isinstance(image_name, str) or not image_name.strip():
        raise PanoptemError("The image name of a labels store must be a non-empty text.")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise PanoptemError(f"{path} is a file, not a zarr store; choose a folder path "
                            "ending in .zarr for the labels.")
    if path.is_dir() and any(path.iterdir()) and not _is_zarr_dir(path):
        raise PanoptemError(f"{path} is a folder with other files, not a zarr store; choose "
                            "a new path (ending in .zarr) for the labels.")
    if not path.exists() or overwrite or not any(path.iterdir()):
        root = zarr.open_group(str(path), mode="w", zarr_format=2)
    else:
        try:
            root = zarr.open_group(str(path), mode="r+")
        except Exception as err:
            raise PanoptemError(
                f"{path} is a zarr store that is not a group ({type(err).__name__}); choose "
                "a new path for the labels, or pass overwrite=True to replace it."
            ) from None
        labels = root.get(_LABELS)
        if (root.metadata.zarr_format != 2 or "multiscales" in root.attrs
                or "ome" in root.attrs or not isinstance(labels, zarr.Group)):
            raise PanoptemError(
                f"{path} is a zarr store but not a panoptem labels store (an OME-Zarr root "
                "of zarr format 2 with only a 'labels' group); choose a new path for the "
                "labels, or pass overwrite=True to replace it."
            )
    labels = root.require_group(_LABELS)
    if not isinstance(labels.attrs.get("labels"), list):
        labels.attrs["labels"] = []
    info = root.attrs.get(_INFO_ATTR)
    info = dict(info) if isinstance(info, dict) else {}
    root.attrs[_INFO_ATTR] = {**info, "image": image_name}
    return root


def _check_name(name) -> str:
    if (not isinstance(name, str) or not name or name in (".", "..") or name.startswith(".")
            or any(c in name for c in "/\\")):
        raise PanoptemError(f"'{name}' cannot name a label image: use a non-empty name without "
                            "'/' or '\\' that does not start with '.'.")
    return name


def _chunks(chunks, shape) -> tuple[int, ...]:
    parts = [chunks] * len(shape) if isinstance(chunks, int | np.integer) else list(chunks)
    if len(parts) != len(shape) or any(int(c) < 1 for c in parts):
        raise PanoptemError(f"Chunks {chunks!r} do not fit shape {tuple(shape)}: give one whole "
                            f"number or {len(shape)}, all at least 1.")
    return tuple(max(1, min(int(c), int(s))) for c, s in zip(parts, shape, strict=True))


def create_label_image(root, name: str, shape, dtype, chunks):
    """The full-resolution array ``labels/<name>/0`` of a labels store, created if absent.

    Parameters
    ----------
    root : zarr.Group
        A store from :func:`create_labels_store`.
    name : str
        The label image's name (a class name such as ``"mito"``); it is added to the
        ``labels`` group's ``labels`` attribute.
    shape : (z, y, x) ints
        Shape of the labels.
    dtype : integer numpy dtype
        Dtype of the labels.
    chunks : int or (z, y, x) ints
        Chunk shape (clipped to ``shape``). Ignored when the array already exists.

    Returns
    -------
    zarr.Array
        A writable zarr-format-2 array filled with 0 and chunk keys separated by ``/``.
        An existing array of the same shape and dtype (a resumed run) is returned as it is.

    Raises
    ------
    PanoptemError
        When the shape is not 3D, the dtype not an integer, the name unusable, or the array
        exists with another shape or dtype.
    """
    import zarr

    _check_name(name)
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise PanoptemError(f"A label image is a (z, y, x) volume with every size at least 1; "
                            f"got shape {shape}.")
    dtype = np.dtype(dtype)
    if not np.issubdtype(dtype, np.integer):
        raise PanoptemError(f"Labels need an integer dtype (e.g. uint32); got {dtype}.")
    labels = root.require_group(_LABELS)
    group = labels.require_group(name)
    existing = group.get("0")
    if existing is not None:
        if (isinstance(existing, zarr.Array) and tuple(existing.shape) == shape
                and np.dtype(existing.dtype) == dtype):
            array = existing
        else:
            what = (f"shape {tuple(existing.shape)} and dtype {np.dtype(existing.dtype)}"
                    if isinstance(existing, zarr.Array) else "a group")
            raise PanoptemError(
                f"{_where(group)}/0 already holds {what}, not shape {shape} and dtype {dtype}; "
                "write to a new store, or pass overwrite=True to create_labels_store to "
                "start again."
            )
    else:
        array = group.create_array(
            "0", shape=shape, dtype=dtype, chunks=_chunks(chunks, shape), fill_value=0,
            chunk_key_encoding={"name": "v2", "separator": "/"},
        )
    names = labels.attrs.get("labels")
    names = list(names) if isinstance(names, list) else []
    if name not in names:
        labels.attrs["labels"] = [*names, name]
    return array


def _pyramid(shape, scale, min_size) -> list[tuple[tuple[int, ...], tuple[float, ...], int]]:
    """``(shape, scale, z step from the previous level)`` of every level, level 0 first."""
    levels = [(tuple(shape), tuple(scale), 1)]
    while True:
        (nz, ny, nx), (sz, sy, sx), _ = levels[-1]
        new_y, new_x = (ny + 1) // 2, (nx + 1) // 2
        if new_y < min_size and new_x < min_size:
            return levels
        fz = 2 if 2 * sz <= 2 * sy else 1  # the new z voxel is not larger than the new y one
        levels.append((((nz + fz - 1) // fz, new_y, new_x), (sz * fz, 2 * sy, 2 * sx), fz))


def _vector(values, what: str, positive: bool) -> tuple[float, float, float]:
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        out = ()
    if len(out) != 3 or not all(math.isfinite(v) and (v > 0 or not positive) for v in out):
        kind = "positive numbers" if positive else "numbers"
        raise PanoptemError(f"The {what} must be three finite {kind} (z, y, x); got {values!r}.")
    return out


def _chunk_slices(shape, chunks):
    """The regions of an array's chunk grid, as tuples of slices."""
    ranges = [range(0, s, c) for s, c in zip(shape, chunks, strict=True)]
    for z in ranges[0]:
        for y in ranges[1]:
            for x in ranges[2]:
                yield tuple(slice(o, min(o + c, s)) for o, c, s
                            in zip((z, y, x), chunks, shape, strict=True))


def downsample_region(source, target, region, fz: int) -> None:
    """Write ``region`` of a pyramid level ``target`` from the level above it, ``source``
    (every second voxel in y and x, every ``fz``-th in z). Arrays or their paths."""
    import zarr

    if isinstance(source, str | Path):
        source = zarr.open_array(str(source), mode="r")
    if isinstance(target, str | Path):
        target = zarr.open_array(str(target), mode="r+")
    zs, ys, xs = region
    target[region] = source[zs.start * fz:zs.stop * fz:fz, ys.start * 2:ys.stop * 2:2,
                            xs.start * 2:xs.stop * 2:2]


def finish_label_image(root, name: str, *, scale=(1.0, 1.0, 1.0), translate=(0.0, 0.0, 0.0),
                       unit: str | None = "nanometer", min_size: int = 64,
                       progress: Progress | None = None, run_level=None) -> list[str]:
    """Add the lower-resolution levels of a label image and write its NGFF 0.4 metadata.

    Level ``k + 1`` takes every second voxel of level ``k`` in y and x, and in z only when
    its z voxel size would then not exceed its y voxel size (so near-isotropic data halve
    in z too, and strongly anisotropic data only once y and x have caught up). Levels are
    added while the new level has at least ``min_size`` voxels in y or x. Each level is
    computed one output chunk at a time from the level before it, so memory holds a few
    chunks, never the volume. Levels from an earlier call are replaced.

    Parameters
    ----------
    root : zarr.Group
        A store from :func:`create_labels_store`.
    name : str
        A label image made by :func:`create_label_image`, with level 0 fully written.
    scale : (z, y, x) floats
        Voxel size of level 0.
    translate : (z, y, x) floats
        Position of the first voxel of level 0 (the same for every level: nearest
        sampling keeps the first voxel).
    unit : str or None
        Unit of ``scale`` and ``translate``, one of :data:`SPACE_UNITS`; None for none.
    min_size : int
        Smallest y or x size of a lower-resolution level.
    progress : Progress, optional
        Receives one stage with one step per chunk written, and can cancel.
    run_level : callable, optional
        ``run_level(source_path, target_path, regions, fz, progress)`` writes one level's
        chunks elsewhere (for instance as dask tasks, each calling
        :func:`downsample_region`); by default they are written here, one after another.

    Returns
    -------
    list of str
        The level paths, ``["0", "1", ...]``.

    Raises
    ------
    PanoptemError
        When the label image does not exist, or scale, translate, unit or min_size are
        invalid.
    """
    import zarr

    _check_name(name)
    scale = _vector(scale, "scale (voxel size)", positive=True)
    translate = _vector(translate, "translate (origin)", positive=False)
    if unit is not None and unit not in SPACE_UNITS:
        raise PanoptemError(f"Unit '{unit}' is not an OME-NGFF space unit; use one of "
                            f"{', '.join(SPACE_UNITS)}, or None.")
    if isinstance(min_size, bool) or not isinstance(min_size, int | np.integer) or min_size < 1:
        raise PanoptemError(f"min_size must be a whole number of at least 1; got {min_size!r}.")
    labels = root.get(_LABELS)
    group = labels.get(name) if isinstance(labels, zarr.Group) else None
    base = group.get("0") if isinstance(group, zarr.Group) else None
    if not isinstance(base, zarr.Array):
        raise PanoptemError(f"{_where(root)} has no label image '{name}'; create it with "
                            "create_label_image and write its labels first.")
    levels = _pyramid(base.shape, scale, int(min_size))
    # an earlier call's metadata and levels go first, so a stopped call leaves the image
    # unfinished rather than pointing at missing or stale levels
    if "multiscales" in group.attrs or "image-label" in group.attrs:
        group.attrs.put({k: v for k, v in group.attrs.items()
                         if k not in ("multiscales", "image-label")})
    for key in list(group.keys()):
        if key.isdigit() and key != "0":
            del group[key]
    progress = ensure_progress(progress)
    if len(levels) > 1:
        steps = sum(math.prod(-(-s // c) for s, c in zip(shp, _chunks(base.chunks, shp),
                                                          strict=True))
                    for shp, _, _ in levels[1:])
        progress.stage(f"Building the resolution levels of '{name}'", steps)
    source = base
    for k, (shp, _, fz) in enumerate(levels[1:], start=1):
        chunks = _chunks(base.chunks, shp)
        target = group.create_array(
            str(k), shape=shp, dtype=base.dtype, chunks=chunks, fill_value=0,
            chunk_key_encoding={"name": "v2", "separator": "/"},
        )
        regions = list(_chunk_slices(shp, chunks))
        folder = getattr(root.store, "root", None)  # a store on disk: its levels by path
        if run_level is not None and folder is not None:
            base_dir = Path(str(folder)) / _LABELS / name
            run_level(str(base_dir / str(k - 1)), str(base_dir / str(k)), regions, fz, progress)
        else:
            for region in regions:
                downsample_region(source, target, region, fz)
                progress.advance()
        source = target
    axes = [{"name": n, "type": "space", **({"unit": unit} if unit else {})}
            for n in _SPACE_NAMES]
    datasets = [{"path": str(k), "coordinateTransformations": [
        {"type": "scale", "scale": list(s)},
        {"type": "translation", "translation": list(translate)},
    ]} for k, (_, s, _) in enumerate(levels)]
    group.attrs.update({
        "multiscales": [{
            "version": NGFF_VERSION, "name": name, "axes": axes, "datasets": datasets,
            "type": "nearest",
            "metadata": {"description": "every second voxel of the level above",
                         "method": "numpy slicing [::2]"},
        }],
        "image-label": {"version": NGFF_VERSION, "source": {"image": "../../"}},
    })
    return [str(k) for k in range(len(levels))]


def label_image_names(root) -> list[str]:
    """Names of the complete label images of a store (listed in ``labels`` and carrying
    ``multiscales`` and ``image-label``), in the listed order; empty for other groups."""
    import zarr

    labels = root.get(_LABELS) if isinstance(root, zarr.Group) else None
    if not isinstance(labels, zarr.Group):
        return []
    listed = _ome_attrs(labels).get("labels")
    names = []
    for name in listed if isinstance(listed, list) else []:
        group = labels.get(name) if isinstance(name, str) and name else None
        if not isinstance(group, zarr.Group):
            continue
        attrs = _ome_attrs(group)
        if attrs.get("multiscales") and isinstance(attrs.get("image-label"), dict):
            names.append(name)
    return names


# -- reading ---------------------------------------------------------------------------


def _ome_attrs(group) -> dict:
    """The NGFF attributes of a group: under ``ome`` (NGFF 0.5), else at the top (0.4)."""
    attrs = dict(group.attrs)
    ome = attrs.get("ome")
    return dict(ome) if isinstance(ome, dict) else attrs


def _axes(multiscale: dict, ndim: int, where: str) -> list[tuple[str, str]]:
    """``(name, type)`` of every axis; NGFF 0.1/0.2 (no axes) are t, c, z, y, x."""
    axes = multiscale.get("axes")
    if axes is None:
        if ndim > 5:
            raise PanoptemError(f"{where} has {ndim} dimensions and no axes metadata; "
                                "give an image of at most 5 dimensions (t, c, z, y, x).")
        names = ["t", "c", "z", "y", "x"][5 - ndim:]
    else:
        names = [a.get("name") if isinstance(a, dict) else a for a in axes]
    out = []
    for i, axis in enumerate(axes if axes is not None else names):
        name = str(names[i])
        kind = axis.get("type") if isinstance(axis, dict) else None
        if kind is None:
            kind = {"t": "time", "c": "channel"}.get(name, "space" if name in _SPACE_NAMES else "")
        out.append((name, str(kind)))
    if len(out) != ndim:
        raise PanoptemError(f"{where}: the metadata names {len(out)} axes but the array has "
                            f"{ndim} dimensions; fix the image's OME-NGFF metadata.")
    return out


def _transform(transforms, ndim: int, scale: list, translate: list, where: str) -> None:
    """Apply one ``coordinateTransformations`` list to ``scale``/``translate`` in place."""
    for t in transforms or []:
        kind = t.get("type") if isinstance(t, dict) else None
        if kind == "identity":
            continue
        if kind not in ("scale", "translation") or kind not in t:
            raise PanoptemError(f"{where} has a coordinate transformation panoptem cannot read "
                                f"({t!r}); only scale and translation given as lists are "
                                "supported.")
        values = [float(v) for v in t[kind]]
        if len(values) != ndim:
            raise PanoptemError(f"{where}: a {kind} of {len(values)} values for {ndim} axes; "
                                "fix the image's OME-NGFF metadata.")
        for i, v in enumerate(values):
            if kind == "scale":
                scale[i] *= v
                translate[i] *= v
            else:
                translate[i] += v


def _multiscale(group, where: str) -> dict:
    import zarr

    multiscales = _ome_attrs(group).get("multiscales")
    if not isinstance(multiscales, list) or not multiscales or not isinstance(multiscales[0], dict):
        inside = sorted(group.keys()) if isinstance(group, zarr.Group) else []
        hint = (f" It holds: {', '.join(inside[:10])}{', ...' if len(inside) > 10 else ''}; "
                "give the path of an image (or array) inside it." if inside else "")
        raise PanoptemError(f"{where} is a zarr group without OME-NGFF 'multiscales' metadata, "
                            f"so it is not an image.{hint}")
    ms = multiscales[0]
    if not isinstance(ms.get("datasets"), list) or not ms["datasets"]:
        raise PanoptemError(f"{where} lists no datasets in its 'multiscales' metadata; fix the "
                            "image's OME-NGFF metadata.")
    return ms


def _level(group, ms: dict, level: int, where: str):
    """Level ``level`` of a multiscale image: (array, axes, full-ndim scale, translate)."""
    import zarr

    datasets = ms["datasets"]
    if isinstance(level, bool) or not isinstance(level, int | np.integer) \
            or not 0 <= level < len(datasets):
        paths = ", ".join(f"{i} ('{d.get('path')}')" for i, d in enumerate(datasets))
        raise PanoptemError(f"Level {level!r} is not in {where}: its levels are {paths}. "
                            "Give one of these level numbers.")
    ds = datasets[int(level)]
    array = group.get(str(ds.get("path"))) if ds.get("path") is not None else None
    if not isinstance(array, zarr.Array):
        raise PanoptemError(f"{where}: level {level} names the array '{ds.get('path')}', which "
                            "is not in the store; the image is incomplete or its metadata is "
                            "wrong.")
    axes = _axes(ms, array.ndim, where)
    scale, translate = [1.0] * array.ndim, [0.0] * array.ndim
    _transform(ds.get("coordinateTransformations"), array.ndim, scale, translate, where)
    _transform(ms.get("coordinateTransformations"), array.ndim, scale, translate, where)
    return array, axes, scale, translate


def open_levels(group) -> tuple[list, tuple[float, ...], tuple[float, ...]]:
    """All resolution levels of an NGFF image group, lazily, with level 0's placement.

    Parameters
    ----------
    group : zarr.Group
        An image or label image group with ``multiscales`` metadata (NGFF 0.4 or 0.5).

    Returns
    -------
    arrays : list of zarr.Array
        The levels, full resolution first (read from disk when indexed).
    scale, translate : tuple of float
        Voxel size and origin of level 0, one value per axis of the array.

    Raises
    ------
    PanoptemError
        When the group has no usable ``multiscales`` metadata or misses a level's array.
    """
    where = _where(group)
    ms = _multiscale(group, where)
    arrays = []
    for i in range(len(ms["datasets"])):
        array, _, scale, translate = _level(group, ms, i, where)
        arrays.append(array)
        if i == 0:
            placement = (tuple(scale), tuple(translate))
    return arrays, *placement


class SpaceView:
    """A lazy (z, y, x) view of a zarr array whose other axes (t, c) have size 1.

    Indexing reads only the requested region from the array; ``np.asarray`` reads all.

    Attributes
    ----------
    array : zarr.Array
        The array viewed.
    """

    def __init__(self, array, space_axes: tuple[int, int, int]) -> None:
        self.array = array
        self._space = tuple(space_axes)
        self.shape = tuple(int(array.shape[i]) for i in self._space)
        self.chunks = tuple(int(array.chunks[i]) for i in self._space)
        self.dtype = np.dtype(array.dtype)
        self.ndim = 3

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"SpaceView(shape={self.shape}, dtype={self.dtype}, of {self.array!r})"

    def _key(self, key) -> tuple:
        key = key if isinstance(key, tuple) else (key,)
        if sum(k is Ellipsis for k in key) > 1:
            raise IndexError("an index can only have a single ellipsis ('...')")
        if Ellipsis in key:
            i = key.index(Ellipsis)
            key = key[:i] + (slice(None),) * (3 - len(key) + 1) + key[i + 1:]
        if len(key) > 3:
            raise IndexError(f"too many indices for a 3D view: {len(key)}")
        key = key + (slice(None),) * (3 - len(key))
        full: list = [0] * self.array.ndim
        for axis, k in zip(self._space, key, strict=True):
            full[axis] = k
        return tuple(full)

    def __getitem__(self, key):
        return self.array[self._key(key)]

    def __array__(self, dtype=None, copy=None):
        data = self[...]
        return data if dtype is None else data.astype(dtype, copy=False)


def open_image(path, level: int = 0):
    """One resolution level of an OME-Zarr image (or a plain zarr array) as (z, y, x).

    Parameters
    ----------
    path : str or Path
        An NGFF image group (a root with ``multiscales``: NGFF 0.4 in zarr format 2, or
        0.5 in zarr format 3 with the metadata under ``ome``), or a zarr array.
    level : int
        Resolution level, 0 for full resolution. A plain array has only level 0.

    Returns
    -------
    array : zarr.Array or SpaceView
        The level, not loaded. When the image also has non-space axes (t, c) of size 1,
        a :class:`SpaceView` that drops them.
    scale : (z, y, x) floats
        Voxel size: the dataset's transformations, then the multiscale's, combined.
    translate : (z, y, x) floats
        Position of the first voxel, combined the same way.

    Raises
    ------
    PanoptemError
        When the path is not a zarr store, the group is not an NGFF image, the level is out
        of range (the message lists the levels), the image does not have three space axes,
        or a non-space axis has more than one entry (pick a channel).
    """
    import zarr

    path = Path(path)
    if not path.exists():
        raise PanoptemError(f"No zarr store at {path}; check the path.")
    try:
        node = zarr.open(str(path), mode="r")
    except Exception as err:
        raise PanoptemError(f"{path} is not a zarr store ({type(err).__name__}: {err}); give an "
                            "OME-Zarr image or a zarr array.") from None
    where = str(path)
    if isinstance(node, zarr.Array):
        if isinstance(level, bool) or level != 0:
            raise PanoptemError(f"{where} is a plain zarr array with one level (0); level "
                                f"{level!r} does not exist. Give level 0.")
        array, scale, translate = node, [1.0] * node.ndim, [0.0] * node.ndim
        axes = _axes({}, node.ndim, where)  # as NGFF 0.1: the last axes are t, c, z, y, x
    else:
        ms = _multiscale(node, where)
        array, axes, scale, translate = _level(node, ms, level, where)
    space = tuple(i for i, (_, kind) in enumerate(axes) if kind == "space")
    names = ", ".join(n for n, _ in axes)
    if len(space) != 3:
        raise PanoptemError(f"{where} has axes ({names}) with {len(space)} space axes; 3D "
                            "inference needs a volume with three (z, y, x). Use 2D inference "
                            "for single images.")
    for i, (n, _) in enumerate(axes):
        if i not in space and array.shape[i] != 1:
            raise PanoptemError(
                f"{where} has {array.shape[i]} entries along its axis '{n}' (axes {names}, "
                f"shape {tuple(array.shape)}); panoptem segments one channel of one time "
                "point. Pick one: save that channel as its own image or zarr array and give "
                "its path."
            )
    view = array if array.ndim == 3 else SpaceView(array, space)
    return (view, tuple(float(scale[i]) for i in space),
            tuple(float(translate[i]) for i in space))
