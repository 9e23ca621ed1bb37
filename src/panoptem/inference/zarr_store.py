"""Zarr output of 3D inference, laid out as the original's (reference §6.5).

One zarr group per run with one array per class (named by the class name) and, when
asked, the panoptic stacks ``panoptic_xy``, ``panoptic_xz``, ``panoptic_yz``. Chunks are
``(c, c, c)`` from one integer or ``(z, y, x)`` from three. Every array is written under
``<name>.partial`` and renamed to ``<name>`` only once complete, so a cancelled or failed
run never leaves an array that looks complete; temporary arrays start with a dot and are
removed at the end.

When a run completes, the group's ``panoptem`` attribute (:data:`INFO_ATTR`) records what
napari needs to show the store as the 3D widget shows its results (image name, scale,
translate; see :class:`StoreInfo`) and the run's model and parameters, whether the run
came from the widget, the command line or a script. panoptem's reader reads it back.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from panoptem.errors import PanoptemError

__all__ = ["parse_chunks", "ZarrOutput", "StoreInfo", "INFO_ATTR"]

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


def parse_chunks(text, shape=None) -> tuple[int, int, int]:
    """"256" -> (256, 256, 256); "32, 256, 256" -> (32, 256, 256); clipped to ``shape``."""
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
            f"Chunk size '{text}' does not parse: give one whole number (e.g. 256) or three "
            "separated by commas (z, y, x), all at least 1."
        )
    chunks = tuple(int(p) for p in parts) * (3 if len(parts) == 1 else 1)
    if shape is not None:
        chunks = tuple(max(1, min(c, s)) for c, s in zip(chunks, shape, strict=True))
    return chunks


class ZarrOutput:
    """A zarr group on disk that receives the arrays of one 3D run."""

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

    def create(self, name: str, shape, dtype, chunks=None):
        """A new array ``name.partial`` (``name`` starting with '.' is temporary)."""
        full = name if name.startswith(".") else name + ".partial"
        self.discard(full)
        return self.group.create_array(
            full, shape=tuple(shape), dtype=dtype, fill_value=0,
            chunks=tuple(chunks) if chunks is not None else parse_chunks(self.chunks, shape),
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

    def write_info(self, info: StoreInfo, **run) -> None:
        """Record ``info`` and the run's model and parameters (``run``) in the group."""
        self.group.attrs[INFO_ATTR] = {**info.as_attrs(), **run}

    def discard(self, name: str) -> None:
        target = self.path / name
        if target.exists():
            shutil.rmtree(target)

    def cleanup(self) -> None:
        """Remove temporary and partial arrays (after success, failure or cancel)."""
        for child in self.path.iterdir():
            if child.is_dir() and (child.name.startswith(".") or child.name.endswith(".partial")):
                shutil.rmtree(child)
