"""Outputs of 3D inference: numpy arrays in memory or a zarr group laid out as the
original's (reference §6.5).

:class:`VolumeOutput` is what :meth:`~panoptem.inference.volume.Engine3D.segment` writes
to: it creates the result and temporary arrays, commits the finished ones, records the
run's information and removes what is left over, and decides how arrays are cut into
blocks. :class:`MemoryOutput` keeps numpy arrays; :class:`ZarrOutput` writes a zarr group.

A zarr output is one zarr group per run with one array per class (named by the class
name) and, when asked, the panoptic stacks ``panoptic_xy``, ``panoptic_xz``,
``panoptic_yz``. Chunks are ``(c, c, c)`` from one integer or ``(z, y, x)`` from three.
Every array is written under ``<name>.partial`` and renamed to ``<name>`` only once
complete, so a cancelled or failed run never leaves an array that looks complete;
temporary arrays start with a dot and are removed at the end.

When a run completes, the group's ``panoptem`` attribute (:data:`INFO_ATTR`) records what
napari needs to show the store as the 3D widget shows its results (image name, scale,
translate; see :class:`StoreInfo`) and the run's model and parameters, whether the run
came from the widget, the command line or a script. panoptem's reader reads it back.
"""

from __future__ import annotations

import os
import shutil
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from panoptem._params import whole_count
from panoptem.errors import PanoptemError

__all__ = ["parse_chunks", "VolumeOutput", "MemoryOutput", "ZarrOutput", "StoreInfo",
           "INFO_ATTR"]

#: Group attribute holding the :class:`StoreInfo` and the run's parameters.
INFO_ATTR = "panoptem"


@dataclass(frozen=True)
class StoreInfo:
    """How the arrays of a zarr output are shown in napari.

    Attributes
    ----------
    image : str
        Name of the segmented image; layers are ``<image>-<class>-prediction`` and
        ``<image>-panoptic-stack-<axis>``.
    scale, translate : (z, y, x) floats
        The image layer's scale and translate (voxel size and origin).
    """

    image: str
    scale: tuple = (1.0, 1.0, 1.0)
    translate: tuple = (0.0, 0.0, 0.0)

    def as_attrs(self) -> dict:
        return {"image": str(self.image), "scale": [float(s) for s in self.scale],
                "translate": [float(t) for t in self.translate]}


def parse_chunks(text, shape=None, what: str = "Chunk size") -> tuple[int, int, int]:
    """"256" -> (256, 256, 256); "32, 256, 256" -> (32, 256, 256); clipped to ``shape``.
    ``what`` names the setting in the error for what does not parse."""
    if isinstance(text, int):
        parts = [text]
    elif isinstance(text, tuple | list):
        parts = list(text)
    else:
        try:
            parts = [int(p) for p in str(text).replace(" ", "").split(",") if p != ""]
        except ValueError:
            parts = []
    if len(parts) not in (1, 3) or any(int(p) < 1 for p in parts):
        raise PanoptemError(
            f"{what} '{text}' does not parse: give one whole number (e.g. 256) or three "
            "separated by commas (z, y, x), all at least 1."
        )
    chunks = tuple(int(p) for p in parts) * (3 if len(parts) == 1 else 1)
    if shape is not None:
        chunks = tuple(max(1, min(c, s)) for c, s in zip(chunks, shape, strict=True))
    return chunks


def _image_name(store, model: str) -> str:
    """``<image>`` of a store named ``<image>_<model>.zarr`` (the widget's naming)."""
    store = Path(store)
    stem = store.name[: -len(".zarr")] if store.name.lower().endswith(".zarr") else store.name
    if model and stem.endswith(f"_{model}") and len(stem) > len(model) + 1:
        return stem[: -len(model) - 1]
    return stem


class VolumeOutput(ABC):
    """Where the arrays of one 3D run go.

    A run creates every array with :meth:`create`, fills it, and hands the finished ones
    over with :meth:`commit`; names starting with a dot are temporary and never
    committed. When the run completes it records its information with
    :meth:`write_info`; :meth:`cleanup` runs at the end whether it completed, failed or
    was cancelled.

    Attributes
    ----------
    path : Path or None
        Where the output lives on disk; None for outputs kept in memory.
    """

    path: Path | None = None

    @abstractmethod
    def chunks_for(self, shape) -> tuple[int, int, int]:
        """The (z, y, x) blocks in which an array of ``shape`` is created and processed."""

    @abstractmethod
    def create(self, name: str, shape, dtype, chunks=None):
        """A new zero-filled array ``name`` of ``shape`` and ``dtype``.

        Parameters
        ----------
        name : str
            The array's name; a name starting with '.' is temporary.
        shape : (z, y, x) ints
        dtype : numpy dtype or its name
        chunks : (z, y, x) ints, optional
            Storage chunks; default :meth:`chunks_for` of ``shape``.
        """

    @abstractmethod
    def commit(self, name: str):
        """The finished array ``name`` (created by :meth:`create`), as the result keeps it."""

    def default_info(self, model: str) -> StoreInfo:
        """The :class:`StoreInfo` recorded when a run gives none (``model``: the model's
        name); a placeholder image name, as an output in memory has nothing to name it by."""
        return StoreInfo("image")

    @abstractmethod
    def write_info(self, info: StoreInfo, **run) -> None:
        """Record ``info`` and the run's model and parameters (``run``) once it completes."""

    @abstractmethod
    def cleanup(self) -> None:
        """Drop temporary and uncommitted arrays (after success, failure or cancel)."""


class MemoryOutput(VolumeOutput):
    """Numpy arrays in memory.

    Parameters
    ----------
    slab : int
        Depth (along z) of the slabs in which arrays are processed; the blocks span whole
        slices.

    Attributes
    ----------
    info : StoreInfo or None
        What :meth:`write_info` recorded, None before.
    run : dict
        The run's model and parameters recorded by :meth:`write_info`.
    """

    def __init__(self, slab: int = 64) -> None:
        self.slab = whole_count("The slab depth", slab, lo=1)
        self.info: StoreInfo | None = None
        self.run: dict = {}
        self._pending: dict = {}

    def chunks_for(self, shape) -> tuple[int, int, int]:
        """``(min(slab, z), y, x)``."""
        return (min(self.slab, int(shape[0])), *(int(s) for s in shape[1:]))

    def create(self, name: str, shape, dtype, chunks=None) -> np.ndarray:
        """A new zero-filled numpy array; ``chunks`` does not apply. Arrays not temporary
        are held until :meth:`commit`."""
        arr = np.zeros(tuple(shape), dtype)
        if not name.startswith("."):
            self._pending[name] = arr
        return arr

    def commit(self, name: str) -> np.ndarray:
        """The array created as ``name`` (no longer held here)."""
        try:
            return self._pending.pop(name)
        except KeyError:
            raise KeyError(f"No array {name!r} to commit: it was not created, is temporary or "
                           "was committed already.") from None

    def write_info(self, info: StoreInfo, **run) -> None:
        """Keep ``info`` and ``run`` in :attr:`info` and :attr:`run`."""
        self.info = info
        self.run = dict(run)

    def cleanup(self) -> None:
        """Drop arrays created but not committed."""
        self._pending.clear()


class ZarrOutput(VolumeOutput):
    """A zarr group on disk that receives the arrays of one 3D run.

    Parameters
    ----------
    path : str or Path
        The zarr group (created when missing).
    chunks : int, str or (z, y, x) ints
        Chunk size as :func:`parse_chunks` reads it (clipped to each array's shape).
    """

    def __init__(self, path, chunks=256) -> None:
        import zarr

        self.path = Path(path)
        self.chunks = chunks
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.group = zarr.open_group(str(self.path), mode="a")
            probe = self.path / ".panoptem_write_test"
            probe.write_bytes(b"")
            probe.unlink()
        except (OSError, ValueError) as err:
            raise PanoptemError(
                f"Cannot write the zarr output at {self.path} ({err}); choose a folder you can "
                "write to."
            ) from None

    def chunks_for(self, shape) -> tuple[int, int, int]:
        """The store's chunks (``chunks`` clipped to ``shape``)."""
        return parse_chunks(self.chunks, shape)

    def create(self, name: str, shape, dtype, chunks=None):
        """A new array ``name.partial`` (``name`` starting with '.' is temporary)."""
        full = name if name.startswith(".") else name + ".partial"
        self.discard(full)
        return self.group.create_array(
            full, shape=tuple(shape), dtype=dtype, fill_value=0,
            chunks=tuple(chunks) if chunks is not None else self.chunks_for(shape),
        )

    def commit(self, name: str):
        """Rename ``name.partial`` to ``name`` (replacing an older ``name``); the array is
        returned writable where the folder allows it, so proofreading edits are saved."""
        import zarr

        final = self.path / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(self.path / (name + ".partial"), final)
        return zarr.open_array(str(final), mode="r+" if os.access(final, os.W_OK) else "r")

    def default_info(self, model: str) -> StoreInfo:
        """The store's name without ``_<model>.zarr`` as image name, unit scale, zero
        translate."""
        return StoreInfo(_image_name(self.path, model))

    def write_info(self, info: StoreInfo, **run) -> None:
        """Record ``info`` and the run's model and parameters (``run``) in the group."""
        self.group.attrs[INFO_ATTR] = {**info.as_attrs(), **run}

    def discard(self, name: str) -> None:
        """Remove the array ``name`` (the name on disk) if present."""
        target = self.path / name
        if target.exists():
            shutil.rmtree(target)

    def cleanup(self) -> None:
        """Remove temporary and partial arrays (after success, failure or cancel)."""
        for child in self.path.iterdir():
            if child.is_dir() and (child.name.startswith(".") or child.name.endswith(".partial")):
                shutil.rmtree(child)
