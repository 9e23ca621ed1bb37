"""Cutting a large 2D image into square tiles, and putting tiles back together.

The layout on disk is the original's (empanada-napari "Create Tiles" / "Merge Tiles"), so
tiles made by either program merge in the other::

    <out_dir>/im/<y>_<x>.tif     image tiles, tile_size x tile_size, zero-padded at the
                                 bottom and right edges; y, x = pixel offset of the tile
    <out_dir>/msk/<y>_<x>.tif    mask tiles, the same grid (only when a mask was given)
    <out_dir>/metadata.tif       a 1 x 1 uint8 image whose ImageDescription is JSON:
                                 {"original_image_shape": [H, W],
                                  "padded_image_shape": [Hp, Wp],
                                  "mask_available": bool}
                                 panoptem adds "tile_size", "image_dtype", "mask_dtype";
                                 readers must not need them (the original writes none).

Invariant: the tiles form a regular grid that covers the padded image exactly once, tile
``(y, x)`` holding ``padded[y:y + T, x:x + T]`` with ``Hp = ceil(H / T) * T`` (likewise for
W) and zeros outside the original image. Merging writes every pixel of the original once,
from the one tile that owns it, and drops the padding.

Differences from the original: values keep their dtype both ways (the original's merge
forces uint8 images and uint16 masks), so create -> merge is an exact round trip; nothing is
overwritten (tiles are refused in a folder that already holds tiles; a merged ``im.tif``
that exists makes the new one ``im_1.tif``); input files are opened read-only; bands of tile
rows are read at a time, so memory stays near ``tile_size x width`` per band plus, for
merging, nothing but a memory-mapped output file.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np

from panoptem._files import atomic_path, writable_folder
from panoptem.errors import PanoptemError, describe
from panoptem.progress import Progress, ensure_progress

__all__ = ["create_tiles", "merge_tiles", "read_tile_metadata", "METADATA_NAME"]

#: The metadata file beside ``im/`` and ``msk/``.
METADATA_NAME = "metadata.tif"
_TIF_SUFFIXES = (".tif", ".tiff")


# --------------------------------------------------------------------------------------
# reading the inputs
# --------------------------------------------------------------------------------------
@contextmanager
def _open_2d(path: str | os.PathLike, what: str) -> Iterator:
    """Open a 2D image for reading in bands: memory-mapped when the file allows it,
    otherwise chunk by chunk through tifffile's zarr view, otherwise read whole.

    The yielded array has the file's dtype; leading length-1 axes are dropped. Raises a
    PanoptemError for a missing or unreadable file and for anything but one 2D channel.
    """
    import tifffile

    path = Path(path).expanduser()
    if not path.is_file():
        raise PanoptemError(f"No such file: {path}; choose the {what} (a 2D .tif).")
    store = None
    try:
        if path.suffix.lower() not in _TIF_SUFFIXES:
            from panoptem.io import read_image

            arr = read_image(path)
        else:
            try:
                arr = tifffile.memmap(path, mode="r")
            except Exception:  # compressed or tiled: not memory-mappable
                arr = None
            if arr is None:
                try:
                    import zarr

                    store = tifffile.imread(path, aszarr=True)
                    arr = zarr.open(store, mode="r")
                except Exception:
                    if store is not None:
                        store.close()
                        store = None
                    arr = tifffile.imread(path)
    except PanoptemError:
        raise
    except Exception as err:
        raise PanoptemError(
            f"Could not read the {what} {path} ({describe(err)}); choose a valid .tif file."
        ) from None
    try:
        shape = tuple(arr.shape)
        if not shape or 0 in shape:
            raise PanoptemError(
                f"Could not read the {what} {path} (no image data in it); choose a valid .tif file."
            )
        while len(shape) > 2 and shape[0] == 1:
            arr, shape = arr[0], shape[1:]
        if len(shape) == 3 and shape[-1] in (3, 4):
            raise PanoptemError(
                f"The {what} {path.name} is an RGB(A) image {shape}; Create Tiles cuts "
                "single-channel 2D images: save it as grayscale first."
            )
        if len(shape) != 2:
            raise PanoptemError(
                f"The {what} {path.name} has shape {shape}; Create Tiles cuts 2D images "
                "(height x width): save one 2D plane as its own .tif."
            )
        yield arr
    finally:
        if store is not None:
            store.close()


def _band(arr, y0: int, y1: int) -> np.ndarray:
    band = np.asarray(arr[y0:y1])
    return band.astype(np.uint8) if band.dtype.kind == "b" else band


def _tile_dtype(arr) -> np.dtype:
    """The dtype tiles are written in: the image's own (bool as uint8, which tif can hold)."""
    dtype = np.dtype(arr.dtype)
    return np.dtype(np.uint8) if dtype.kind == "b" else dtype


def _check_tile_size(tile_size) -> int:
    try:
        size = float(tile_size)
    except (TypeError, ValueError):
        size = math.nan
    if not math.isfinite(size) or size < 1 or size != int(size):
        raise PanoptemError(
            f"Tile size must be a whole number of pixels of at least 1, not {tile_size!r}."
        )
    return int(size)


# --------------------------------------------------------------------------------------
# Create Tiles
# --------------------------------------------------------------------------------------
def create_tiles(
    image_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    tile_size: int = 512,
    mask_path: str | os.PathLike | None = None,
    progress: Progress | None = None,
) -> Path:
    """Cut a large 2D image (and optionally its mask) into square zero-padded tiles.

    Parameters
    ----------
    image_path : path
        A 2D (height x width) tif of any integer or float dtype. It is memory-mapped when
        it is stored uncompressed, else read chunk by chunk; it is never modified.
    out_dir : path
        Folder that receives ``im/``, ``msk/`` (with a mask) and ``metadata.tif``; created
        if needed. It must not hold tiles already (``im/``, ``msk/`` or ``metadata.tif``).
    tile_size : int, default 512
        Side of the square tiles in pixels (>= 1). The image is padded with zeros at the
        bottom and right to a multiple of it.
    mask_path : path, optional
        A 2D tif of the image's shape (labels or a mask), tiled on the same grid.
    progress : Progress, optional
        Receives one step per tile (stage "cutting tiles"); a cancel stops between tiles
        and leaves nothing in ``out_dir``.

    Returns
    -------
    Path
        ``out_dir``.

    Raises
    ------
    PanoptemError
        Before anything is written: an image that is not 2D, a mask of another shape, a
        tile size below 1, an unreadable file, an ``out_dir`` that holds tiles or that
        cannot be written.
    """
    import tifffile

    size = _check_tile_size(tile_size)
    out = Path(out_dir).expanduser()
    progress = ensure_progress(progress)
    if mask_path is not None and str(mask_path).strip() in ("", "."):
        mask_path = None
    with ExitStack() as stack:
        image = stack.enter_context(_open_2d(image_path, "image"))
        mask = stack.enter_context(_open_2d(mask_path, "mask")) if mask_path is not None else None
        h, w = image.shape
        if mask is not None and tuple(mask.shape) != (h, w):
            raise PanoptemError(
                f"The mask has shape {tuple(mask.shape)} but the image {(h, w)}; choose the "
                "mask made for this image (the same height and width)."
            )
        for name in ("im", "msk", METADATA_NAME):
            if (out / name).exists():
                raise PanoptemError(
                    f"{out} already holds tiles ({name} exists); choose an empty folder for "
                    "the new tiles, or move the old ones away."
                )
        writable_folder(out, "folder for the tiles")
        hp, wp = math.ceil(h / size) * size, math.ceil(w / size) * size
        metadata = {
            "original_image_shape": [h, w],
            "padded_image_shape": [hp, wp],
            "mask_available": mask is not None,
            "tile_size": size,
            "image_dtype": _tile_dtype(image).name,
            "mask_dtype": _tile_dtype(mask).name if mask is not None else None,
        }
        sources = [("im", image)] + ([("msk", mask)] if mask is not None else [])
        work = Path(tempfile.mkdtemp(prefix=".panoptem-tiles-", dir=out))
        try:
            for name, _ in sources:
                (work / name).mkdir()
            progress.stage("cutting tiles", (hp // size) * (wp // size))
            for y in range(0, hp, size):
                bands = [(name, _band(src, y, min(y + size, h))) for name, src in sources]
                for x in range(0, wp, size):
                    for name, band in bands:
                        tile = np.zeros((size, size), dtype=band.dtype)
                        part = band[:, x : x + size]
                        tile[: part.shape[0], : part.shape[1]] = part
                        tifffile.imwrite(work / name / f"{y}_{x}.tif", tile, bigtiff=True)
                    progress.advance()
            for name, _ in sources:
                os.replace(work / name, out / name)
            with atomic_path(out / METADATA_NAME) as tmp:
                tifffile.imwrite(
                    tmp,
                    np.zeros((1, 1), dtype=np.uint8),
                    description=json.dumps(metadata),
                    bigtiff=True,
                )
        except BaseException:
            if not (out / METADATA_NAME).exists():
                for name, _ in sources:  # moved in by this call: im/ and msk/ were refused
                    shutil.rmtree(out / name, ignore_errors=True)
            raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return out


# --------------------------------------------------------------------------------------
# Merge Tiles
# --------------------------------------------------------------------------------------
def read_tile_metadata(tile_dir: str | os.PathLike) -> dict:
    """The JSON description of ``<tile_dir>/metadata.tif`` (the original's or panoptem's).

    Returns a dict with at least ``original_image_shape`` and ``padded_image_shape`` (as
    tuples of two ints) and ``mask_available`` (False when absent).
    """
    import tifffile

    folder = Path(tile_dir).expanduser()
    path = folder / METADATA_NAME
    if not folder.is_dir():
        raise PanoptemError(f"No such folder: {folder}; choose the folder Create Tiles wrote.")
    if not path.is_file():
        raise PanoptemError(
            f"No {METADATA_NAME} in {folder}; choose the folder that Create Tiles wrote (it "
            f"holds im/, msk/ and {METADATA_NAME})."
        )
    meta = None
    try:
        with tifffile.TiffFile(path) as tif:
            for tag in tif.pages[0].tags:
                if tag.name != "ImageDescription":
                    continue
                try:
                    value = json.loads(tag.value)
                except (TypeError, ValueError):
                    continue
                if isinstance(value, dict) and "original_image_shape" in value:
                    meta = value
                    break
    except Exception as err:
        raise PanoptemError(
            f"Could not read {path} ({describe(err)}); make the tiles again."
        ) from None
    if meta is None or "padded_image_shape" not in meta:
        raise PanoptemError(
            f"{path} holds no tile metadata (original_image_shape, padded_image_shape); "
            "choose the folder that Create Tiles wrote."
        )
    try:
        orig = tuple(int(v) for v in meta["original_image_shape"])
        padded = tuple(int(v) for v in meta["padded_image_shape"])
    except (TypeError, ValueError):
        orig = padded = ()
    if len(orig) != 2 or len(padded) != 2 or any(p < o for o, p in zip(orig, padded, strict=True)):
        raise PanoptemError(
            f"{path} has unusable shapes {meta['original_image_shape']} / "
            f"{meta['padded_image_shape']}; make the tiles again."
        )
    return {
        **meta,
        "original_image_shape": orig,
        "padded_image_shape": padded,
        "mask_available": bool(meta.get("mask_available", False)),
    }


def _tile_file(folder: Path, y: int, x: int) -> Path | None:
    for suffix in _TIF_SUFFIXES:
        path = folder / f"{y}_{x}{suffix}"
        if path.is_file():
            return path
    return None


def _survey(folder: Path, padded: tuple[int, int], size: int) -> tuple[dict, np.dtype]:
    """Every grid tile of ``folder`` with its file, checked for presence, shape and dtype
    (headers only), and the dtype that holds all of them."""
    import tifffile

    files, dtypes = {}, set()
    for y in range(0, padded[0], size):
        for x in range(0, padded[1], size):
            path = _tile_file(folder, y, x)
            if path is None:
                raise PanoptemError(
                    f"The tile {folder.name}/{y}_{x}.tif is missing in {folder.parent}; every "
                    "tile Create Tiles wrote is needed to merge."
                )
            try:
                with tifffile.TiffFile(path) as tif:
                    series = tif.series[0]
                    shape, dtype = tuple(series.shape), np.dtype(series.dtype)
            except Exception as err:
                raise PanoptemError(f"Could not read the tile {path} ({describe(err)}).") from None
            while len(shape) > 2 and shape[0] == 1:
                shape = shape[1:]
            if shape != (size, size):
                raise PanoptemError(
                    f"The tile {folder.name}/{path.name} has shape {shape}, the other tiles "
                    f"{(size, size)}; tiles must keep the size Create Tiles gave them."
                )
            files[(y, x)] = path
            dtypes.add(dtype)
    dtype = np.dtype(np.result_type(*sorted(dtypes, key=str)))
    return files, (np.dtype(np.uint8) if dtype.kind == "b" else dtype)


def _tile_size(meta: dict, folder: Path) -> int:
    """The tile size: from the metadata (panoptem), else the first tile (the original)."""
    import tifffile

    if "tile_size" in meta:
        return _check_tile_size(meta["tile_size"])
    first = _tile_file(folder, 0, 0)
    if first is None:
        raise PanoptemError(
            f"The tile {folder.name}/0_0.tif is missing in {folder.parent}; every tile Create "
            "Tiles wrote is needed to merge."
        )
    try:
        with tifffile.TiffFile(first) as tif:
            shape = tuple(tif.series[0].shape)
    except Exception as err:
        raise PanoptemError(f"Could not read the tile {first} ({describe(err)}).") from None
    return int(shape[-1])


def _merged_names(out: Path, with_mask: bool) -> tuple[Path, Path | None]:
    """``im.tif`` (and ``msk.tif``), or the first ``im_<n>.tif`` (``msk_<n>.tif``) free
    together, so an earlier merge is never overwritten and the pair keeps one number."""
    n = 0
    while True:
        tail = f"_{n}" if n else ""
        image, mask = out / f"im{tail}.tif", out / f"msk{tail}.tif"
        if not image.exists() and not (with_mask and mask.exists()):
            return image, (mask if with_mask else None)
        n += 1


def merge_tiles(
    tile_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    progress: Progress | None = None,
) -> tuple[Path, Path | None]:
    """Put the tiles of :func:`create_tiles` (or of the original's Create Tiles) together.

    Parameters
    ----------
    tile_dir : path
        The folder holding ``metadata.tif``, ``im/`` and, when the metadata says a mask is
        available, ``msk/``. Tiles may be ``.tif`` or ``.tiff``; edited tiles may have
        another dtype than the rest (the merged image takes one that holds them all).
    out_dir : path
        Folder for the merged files (created if needed).
    progress : Progress, optional
        One step per tile (stages "merging image tiles", "merging mask tiles"); a cancel
        stops between tiles and leaves no merged file behind.

    Returns
    -------
    (Path, Path or None)
        The merged image ``im.tif`` and mask ``msk.tif`` (None without a mask), both of
        the original image's height and width and of the tiles' dtype. When ``im.tif``
        (or ``msk.tif``) exists the pair is named ``im_1.tif`` / ``msk_1.tif``, ....

    Raises
    ------
    PanoptemError
        Before anything is written: no ``metadata.tif``, a missing or unreadable tile, a
        tile of another size, an output folder that cannot be written.
    """
    import tifffile

    folder = Path(tile_dir).expanduser()
    meta = read_tile_metadata(folder)
    orig, padded = meta["original_image_shape"], meta["padded_image_shape"]
    size = _tile_size(meta, folder / "im")
    if padded[0] % size or padded[1] % size:
        raise PanoptemError(
            f"The tiles are {size} px but the padded image {padded} is no multiple of that; "
            "tiles must keep the size Create Tiles gave them."
        )
    kinds = ["im"] + (["msk"] if meta["mask_available"] else [])
    surveys = {kind: _survey(folder / kind, padded, size) for kind in kinds}
    out = writable_folder(out_dir, "folder for the merged image")
    targets = dict(zip(("im", "msk"), _merged_names(out, "msk" in kinds), strict=True))
    description = json.dumps(
        {
            "original_image_shape": list(orig),
            "padded_image_shape": list(padded),
            "mask_available": meta["mask_available"],
        }
    )
    progress = ensure_progress(progress)
    written: list[Path] = []
    try:
        for kind in kinds:
            files, dtype = surveys[kind]
            progress.stage(
                "merging image tiles" if kind == "im" else "merging mask tiles", len(files)
            )
            with atomic_path(targets[kind]) as tmp:
                merged = tifffile.memmap(
                    tmp,
                    shape=orig,
                    dtype=dtype,
                    bigtiff=True,
                    description=description,
                    photometric="minisblack",
                )
                try:
                    for (y, x), path in files.items():
                        if y < orig[0] and x < orig[1]:
                            tile = tifffile.imread(path)
                            tile = tile.reshape(tile.shape[-2:])
                            h, w = min(size, orig[0] - y), min(size, orig[1] - x)
                            merged[y : y + h, x : x + w] = tile[:h, :w]
                        progress.advance()
                    merged.flush()
                finally:
                    del merged
            written.append(targets[kind])
    except BaseException:
        for path in written:  # the image of a pair whose mask was not finished
            path.unlink(missing_ok=True)
        raise
    return targets["im"], targets["msk"]
