"""Writing files without losing anything: atomic writes, free names, outputs checked early.

Every place in panoptem that writes a file a user may care about (registry configs, model
archives, exported models, label images, zarr results) goes through these helpers:

* :func:`atomic_path` / :func:`write_atomic` write beside the target and rename only when
  the new file is complete, so a crash or cancel never leaves a half-written file under the
  final name, and an older file is replaced only by a complete new one.
* :func:`free_path` picks ``name_1.ext``, ``name_2.ext``, ... when a name is in use, so
  nothing is overwritten silently.
* :func:`writable_folder` and :func:`check_output` refuse an output that cannot be written
  (or that exists) with a one-line :class:`~panoptem.errors.PanoptemError`, before any
  work starts.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from panoptem.errors import PanoptemError

__all__ = ["atomic_path", "write_atomic", "free_path", "writable_folder", "check_output"]


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


#: The process's umask, read once at import (reading it means setting it for an instant).
_UMASK = _read_umask()


@contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it to ``target`` on success.

    The temporary file is removed when the block raises (including a cancel), and an
    existing ``target`` stays as it was. The new file gets the permissions of the file it
    replaces, or those of a newly created file (``0o666`` less the umask), not the
    owner-only ``0o600`` of a temporary file, so colleagues can read shared results.
    """
    target = Path(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, target.stat().st_mode & 0o777 if target.is_file() else 0o666 & ~_UMASK)
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_atomic(target: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` (text as UTF-8) to ``target`` atomically; return ``target``."""
    target = Path(target)
    with atomic_path(target) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return target


def free_path(path: str | os.PathLike, taken: set | frozenset = frozenset(),
              also_in=()) -> Path:
    """``path``, or ``<stem>_1<suffix>``, ``<stem>_2<suffix>``, ... if that name is in use.

    A name is in use when a file or folder of that name exists (beside ``path``, or in one
    of the folders ``also_in``, e.g. the masks folder beside an images folder) or it is in
    ``taken`` (paths chosen earlier in the same operation). The suffix is the last one
    only (``a.tar.gz`` -> ``a.tar_1.gz``).
    """
    path = Path(path)
    folders = [Path(f) for f in also_in]

    def used(p: Path) -> bool:
        return p.exists() or p in taken or any((f / p.name).exists() for f in folders)

    candidate, n = path, 0
    while used(candidate):
        n += 1
        candidate = path.with_name(f"{path.stem}_{n}{path.suffix}")
    return candidate


def writable_folder(folder: str | os.PathLike, what: str = "output folder") -> Path:
    """Create ``folder`` if needed and check that files can be written in it.

    Raises
    ------
    PanoptemError
        One line naming the folder, the reason and what to do.
    """
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise PanoptemError(f"The {what} {folder} is a file, not a folder; choose a folder.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".panoptem-write-test-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise PanoptemError(
            f"Cannot write to the {what} {folder} ({reason}); choose a folder you can write to."
        ) from None
    return folder


def check_output(path: str | os.PathLike, what: str = "output", overwrite: bool = False,
                 folder: bool = False, source: str | os.PathLike | None = None) -> Path:
    """Refuse, before any work, an output file or folder that cannot or may not be written.

    The parent folder is created if needed and must be writable; an existing ``path`` is an
    error unless ``overwrite`` (nothing a user made is replaced silently). A file output
    (not ``folder``) may not be an existing folder, and no output may be the input
    ``source`` it is made from.
    """
    path = Path(path).expanduser()
    if source is not None and path.exists() and path.resolve() == Path(source).expanduser().resolve():
        raise PanoptemError(f"The {what} {path} is the input itself; give another name.")
    if not folder and path.is_dir():
        raise PanoptemError(f"The {what} {path} is a folder; give a file name.")
    writable_folder(path.parent, what=f"folder of the {what}")
    if path.exists() and not overwrite:
        raise PanoptemError(
            f"The {what} {path} already exists; choose another name, move it away, or "
            "allow overwriting (--overwrite)."
        )
    return path
