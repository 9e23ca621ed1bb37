"""Moving models between machines and out of the way: export, import and archive.

A ``.empanada`` file is the original's model archive: a zip holding the model's config
``<name>.yaml`` whose ``model`` and ``model_quantized`` are bare file names, the float
TorchScript file (``<name>.pth``) and, when the model has one, the quantized file
(``<name>_quantized.pth``). Archives written here have exactly that layout, so
empanada-napari imports them; archives written by empanada-napari (whose model file may keep
its original file name) import here.

Where this module differs from the original on purpose (nothing is lost):

* export downloads URL models through :func:`panoptem.registry.fetch_file` (TLS verified,
  checksum checked when the config has one, the download cache reused) and writes the
  archive atomically, refusing to replace an existing file unless asked to;
* import reads the zip directly (no ``tmp/`` folder next to the archive), checks the
  config and every file before anything is copied, verifies ``model_hash`` /
  ``model_quantized_hash`` when present, never overwrites a file in ``models/`` and leaves
  nothing behind when it fails;
* archive refuses built-in models (their configs stay inside the installed package), never
  overwrites a file in ``archived/``, and leaves in place a model file that another
  registered model still uses or that lies inside the installed package.

Folders (under :func:`panoptem.registry.home_dir`, ``~/.empanada`` by default):
``models/`` receives imported model files, ``archived/`` archived configs and files.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

import yaml

from panoptem import _download, registry
from panoptem._files import atomic_path, free_path, writable_folder, write_atomic
from panoptem.errors import PanoptemError
from panoptem.progress import Progress, ensure_progress

__all__ = [
    "ARCHIVE_SUFFIX",
    "models_dir",
    "archived_dir",
    "archive_path",
    "export_model",
    "import_model",
    "archive_model",
]

#: File name suffix of a model archive (the original's).
ARCHIVE_SUFFIX = ".empanada"
_CHUNK = 1 << 20
_PACKAGE_DIR = Path(__file__).resolve().parent


def models_dir() -> Path:
    """Folder of imported model files: ``home_dir() / "models"`` (created when written)."""
    return registry.home_dir() / "models"


def archived_dir() -> Path:
    """Folder of archived configs and model files: ``home_dir() / "archived"``."""
    return registry.home_dir() / "archived"


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------
def _is_url(value) -> bool:
    return isinstance(value, str) and _download.is_url(value)


def _copy_stream(src, dst, progress: Progress, hasher=None) -> int:
    """Copy file object ``src`` into ``dst`` in chunks, advancing ``progress`` by bytes."""
    copied = 0
    while chunk := src.read(_CHUNK):
        dst.write(chunk)
        if hasher is not None:
            hasher.update(chunk)
        copied += len(chunk)
        progress.advance(len(chunk))
    return copied


def _dump_yaml(config: dict) -> bytes:
    return yaml.safe_dump(config, sort_keys=False, allow_unicode=True).encode("utf-8")


# --------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------
def archive_path(name: str, out_path: str | os.PathLike, overwrite: bool = False) -> Path:
    """The archive file :func:`export_model` writes for ``out_path`` (a folder, or a file
    name ending in ``.empanada``), checked before any work: the folder is created and must
    be writable, and an existing archive is an error unless ``overwrite``."""
    out = Path(out_path).expanduser()
    if out.suffix.lower() == ARCHIVE_SUFFIX:
        folder = out.parent
    else:
        if out.exists() and not out.is_dir():
            raise PanoptemError(
                f"Export path {out} is a file: give a folder (the archive is written as "
                f"<folder>/{name}{ARCHIVE_SUFFIX}) or a file name ending in {ARCHIVE_SUFFIX}."
            )
        folder, out = out, out / f"{name}{ARCHIVE_SUFFIX}"
    writable_folder(folder, "export folder")
    if out.exists() and not overwrite:
        raise PanoptemError(
            f"{out} already exists and is kept: choose another folder, or delete or "
            "rename that file first (from Python, overwrite=True replaces it)."
        )
    return out.absolute()


def export_model(
    name: str,
    out_path: str | os.PathLike,
    *,
    progress: Progress | None = None,
    overwrite: bool = False,
) -> Path:
    """Write registered model ``name`` into one ``.empanada`` archive file.

    Parameters
    ----------
    name : str
        A name from :func:`panoptem.registry.list_models` (built-in or registered).
    out_path : str or PathLike
        A folder (the archive becomes ``<folder>/<name>.empanada``, as in the original;
        the folder is created if missing) or a file name ending in ``.empanada``.
    progress : Progress, optional
        Download progress (model URLs not yet in the cache) and a "Writing <file>" stage
        counted in bytes; a cancel request stops the export and removes the partial file.
    overwrite : bool
        Replace an existing archive of the same name; by default that is an error.

    Returns
    -------
    Path
        The archive written.

    Raises
    ------
    PanoptemError
        Unknown model, a model file that is missing or cannot be downloaded, an existing
        archive (without ``overwrite``), an unwritable folder.

    Notes
    -----
    The archive holds ``<name>.yaml`` (the config with ``model: <name>.pth`` and
    ``model_quantized: <name>_quantized.pth`` or null, every other key unchanged),
    ``<name>.pth`` and, when the model has a quantized file, ``<name>_quantized.pth``.
    Model URLs are downloaded into the model cache (or taken from it) first.
    """
    progress = ensure_progress(progress)
    config = registry.get_config(name)
    target = archive_path(name, out_path, overwrite)

    model_file = registry.fetch_file(config["model"], config.get("model_hash"), progress)
    quant_file = None
    if config.get("model_quantized"):
        quant_file = registry.fetch_file(
            config["model_quantized"], config.get("model_quantized_hash"), progress
        )

    members = [(f"{name}.pth", model_file)]
    if quant_file is not None:
        members.append((f"{name}_quantized.pth", quant_file))
    packed = dict(config)
    packed["model"] = members[0][0]
    packed["model_quantized"] = members[1][0] if quant_file is not None else None

    total = sum(path.stat().st_size for _, path in members)
    progress.stage(f"Writing {target.name}", total)
    try:
        # .pth files are zips already: storing them uncompressed is as small and much faster
        with atomic_path(target) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
            zf.writestr(f"{name}.yaml", _dump_yaml(packed))
            for arcname, path in members:
                with open(path, "rb") as src, zf.open(arcname, "w", force_zip64=True) as dst:
                    _copy_stream(src, dst, progress)
    except OSError as exc:
        raise PanoptemError(
            f"Could not write {target} ({exc}): check free space and that the folder is "
            "writable."
        ) from None
    return target


# --------------------------------------------------------------------------------------
# Import
# --------------------------------------------------------------------------------------
def _corrupt(path: Path, detail: str) -> PanoptemError:
    return PanoptemError(
        f"{path} is not a usable model archive: {detail}. Export the model again (Export a "
        "model / panoptem models export) and copy the new file."
    )


@contextmanager
def _open_zip(path: Path) -> Iterator[zipfile.ZipFile]:
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise PanoptemError(f"Model archive {path} {what}: choose a {ARCHIVE_SUFFIX} file.")
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError) as exc:
        raise _corrupt(path, f"it is not a readable zip file ({exc})") from None
    except OSError as exc:
        raise PanoptemError(f"Cannot read {path} ({exc}).") from None
    with zf:
        yield zf


def _files(zf: zipfile.ZipFile) -> dict[str, zipfile.ZipInfo]:
    """Member path -> info for the plain files of the archive (no folders, no mac forks)."""
    out = {}
    for info in zf.infolist():
        parts = PurePosixPath(info.filename).parts
        if info.is_dir() or not parts or "__MACOSX" in parts or parts[-1].startswith("._"):
            continue
        out[info.filename] = info
    return out


def _find_config(path: Path, files: dict[str, zipfile.ZipInfo]) -> str:
    yamls = [m for m in files if m.lower().endswith(".yaml")]
    if not yamls:
        raise _corrupt(path, "it holds no .yaml model config")
    if len(yamls) == 1:
        return yamls[0]
    wanted = f"{path.stem}.yaml"
    same = [m for m in yamls if PurePosixPath(m).name == wanted]
    if len(same) == 1:
        return same[0]
    raise _corrupt(
        path, f"it holds several configs ({', '.join(sorted(yamls))}) and none is named {wanted}"
    )


def _member(files: dict[str, zipfile.ZipInfo], folder: PurePosixPath, name: str) -> str | None:
    key = str(folder / name) if str(folder) != "." else name
    return key if key in files else None


def _locate_models(
    path: Path, files: dict[str, zipfile.ZipInfo], cfg_member: str, config: dict
) -> tuple[str, str | None, str | None]:
    """(float member, quantized member or None, quantized URL kept as it is or None)."""
    folder = PurePosixPath(cfg_member).parent
    stem = PurePosixPath(cfg_member).stem
    quant_member = quant_url = None
    mq = config.get("model_quantized")
    if _is_url(mq):
        quant_url = mq.strip()
    elif mq:
        quant_member = _member(files, folder, PurePosixPath(str(mq).replace("\\", "/")).name)
        if quant_member is None:
            quant_member = _member(files, folder, f"{stem}_quantized.pth")
        if quant_member is None:
            raise _corrupt(path, f"its config names the quantized model file '{mq}', which "
                                 "the archive does not contain")

    candidates = []
    if not _is_url(config["model"]):
        candidates.append(PurePosixPath(str(config["model"]).replace("\\", "/")).name)
    candidates += [f"{stem}.pth", f"{path.stem}.pth"]
    for candidate in candidates:
        member = _member(files, folder, candidate)
        if member is not None and member != quant_member:
            return member, quant_member, quant_url
    # the original's fallback: the one remaining model-like file
    rest = [m for m in files if m != quant_member and m != cfg_member
            and PurePosixPath(m).suffix.lower() in (".pth", ".pt")]
    if len(rest) == 1:
        return rest[0], quant_member, quant_url
    if not rest:
        raise _corrupt(path, f"it holds no model file (looked for {', '.join(candidates)})")
    raise _corrupt(path, f"it holds several model files ({', '.join(sorted(rest))}) and its "
                         f"config names none of them ('model: {config['model']}')")


def _extract(zf: zipfile.ZipFile, archive: Path, member: str, target: Path,
             known_hash: str | None, progress: Progress) -> None:
    """Copy one member to ``target`` (atomically), verifying the zip CRC and ``known_hash``."""
    hasher = None
    if known_hash:
        alg = _download.check_hash_spec(known_hash)
        hasher = hashlib.new(alg)
    try:
        with atomic_path(target) as tmp:
            with open(tmp, "wb") as dst, zf.open(member) as src:
                _copy_stream(src, dst, progress, hasher)
            with open(tmp, "rb") as f:
                magic = f.read(4)
            if magic != b"PK\x03\x04":
                raise _corrupt(archive, f"'{member}' is not a TorchScript model file")
            if hasher is not None:
                expected = known_hash.rpartition(":")[2].lower()
                if hasher.hexdigest() != expected:
                    raise _corrupt(archive, f"'{member}' does not match the checksum "
                                            f"{known_hash} in its config")
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise _corrupt(archive, f"'{member}' is damaged ({exc})") from None
    except OSError as exc:
        raise PanoptemError(
            f"Could not copy '{member}' from {archive} into {target.parent} ({exc}): check "
            f"free space, or point {registry.HOME_ENV} to a writable folder."
        ) from None


def import_model(
    archive_path: str | os.PathLike,
    name: str | None = None,
    *,
    progress: Progress | None = None,
) -> str:
    """Register the model inside a ``.empanada`` archive (panoptem's or the original's).

    The model files are copied to ``models_dir() / "<name>.pth"`` (and
    ``"<name>_quantized.pth"``), then the archive's config is registered pointing to them.

    Parameters
    ----------
    archive_path : str or PathLike
        The ``.empanada`` file.
    name : str, optional
        Name to register the model under; default: the name stored in the archive (its
        config's file stem). A name already in use gets ``"New"`` appended, as in
        :func:`panoptem.registry.register_model`, so nothing is overwritten.
    progress : Progress, optional
        One "Importing <file>" stage per model file, counted in bytes; a cancel request
        stops the import and leaves nothing behind.

    Returns
    -------
    str
        The name the model was registered under.

    Raises
    ------
    PanoptemError
        Missing file, not a zip, no or several configs, an invalid config, a missing or
        damaged model file, a checksum mismatch, an unusable name, an unwritable model
        folder. Nothing is copied or registered then.
    """
    progress = ensure_progress(progress)
    archive = Path(archive_path).expanduser().absolute()
    with _open_zip(archive) as zf:
        files = _files(zf)
        cfg_member = _find_config(archive, files)
        try:
            config = yaml.safe_load(zf.read(cfg_member))
        except yaml.YAMLError as exc:
            raise _corrupt(archive, f"its config '{cfg_member}' is not valid YAML "
                                    f"({str(exc).splitlines()[0]})") from None
        except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
            raise _corrupt(archive, f"its config '{cfg_member}' is damaged ({exc})") from None
        if not isinstance(config, dict) or not config.get("model"):
            raise _corrupt(archive, f"its config '{cfg_member}' has no 'model' entry")
        float_member, quant_member, quant_url = _locate_models(
            archive, files, cfg_member, config
        )
        if name is None or not str(name).strip():
            name = PurePosixPath(cfg_member).stem
        with tempfile.TemporaryDirectory(prefix="panoptem-import-") as tmp_dir:
            # validate the config (and the name) before any file is copied
            tmp_cfg = Path(tmp_dir) / "config.yaml"
            tmp_cfg.write_bytes(_dump_yaml(config))
            registry.read_config(tmp_cfg)
            folder = models_dir()
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise PanoptemError(
                    f"Cannot create {folder} ({exc}): make it writable or point "
                    f"{registry.HOME_ENV} to a writable folder."
                ) from None
            final = registry.free_model_name(name, folder)
            jobs = [(float_member, folder / f"{final}.pth", config.get("model_hash"))]
            if quant_member is not None:
                jobs.append((quant_member, folder / f"{final}_quantized.pth",
                             config.get("model_quantized_hash")))
            written: list[Path] = []
            try:
                for member, target, known_hash in jobs:
                    progress.stage(f"Importing {PurePosixPath(member).name}",
                                   files[member].file_size)
                    _extract(zf, archive, member, target, known_hash, progress)
                    written.append(target)
                quantized = str(written[1]) if len(written) > 1 else quant_url
                registered = registry.register_model(
                    final, tmp_cfg, model=str(written[0]), quantized_model=quantized
                )
            except BaseException:
                for path in written:
                    path.unlink(missing_ok=True)
                raise
    if registered != final:  # another process registered the same name meanwhile
        _rename_files(registered, final, written)
    return registered


def _rename_files(registered: str, final: str, written: list[Path]) -> None:
    """Keep ``models/<name>.pth`` named after the registered name (rare race only)."""
    config_path = registry.config_dir() / f"{registered}.yaml"
    config = registry.read_config(config_path)
    for key, path in zip(("model", "model_quantized"), written, strict=False):
        new = free_path(path.parent / path.name.replace(final, registered, 1))
        os.replace(path, new)
        config[key] = str(new)
    write_atomic(config_path, _dump_yaml(config))


# --------------------------------------------------------------------------------------
# Archive
# --------------------------------------------------------------------------------------
def _local_file(ref) -> Path | None:
    """The existing local file a config entry names, if it is not a URL."""
    if not isinstance(ref, str) or not ref.strip() or _is_url(ref) or "://" in ref:
        return None
    path = Path(ref).expanduser()
    return path.absolute() if path.is_file() else None


def _in_package(path: Path) -> bool:
    return path.resolve().is_relative_to(_PACKAGE_DIR)


def _used_elsewhere(name: str) -> set[Path]:
    """Local model files referenced by registered models other than ``name``."""
    used: set[Path] = set()
    for other in registry.list_models():
        if other == name:
            continue
        try:
            config = registry.get_config(other)
        except PanoptemError:
            continue  # a broken config references nothing usable
        for key in ("model", "model_quantized"):
            path = _local_file(config.get(key))
            if path is not None:
                used.add(path.resolve())
    return used


def archive_model(name: str) -> Path:
    """Move a user-registered model out of the model list into ``archived_dir()``.

    The config YAML and the model's local files (float and quantized) are moved into
    ``~/.empanada/archived/``; nothing is deleted. Downloaded files (URL models) stay in
    the shared download cache, and a local file stays where it is if another registered
    model uses it too or if it lies inside the installed package. When files move, the
    archived config is rewritten to point to their new place, so it can be registered
    again as it is. A name already used in ``archived/`` gets ``_1``, ``_2``, ... so
    nothing there is overwritten.

    Parameters
    ----------
    name : str
        A user-registered model (a config in :func:`panoptem.registry.config_dir`).

    Returns
    -------
    Path
        The archived config file.

    Raises
    ------
    PanoptemError
        Built-in model (built-in configs ship inside panoptem and are never moved), unknown
        model, a file that cannot be moved.
    """
    if not isinstance(name, str) or name not in registry.list_models():
        registry.get_config(str(name))  # raises the "unknown model" message
    config_path = registry.config_dir() / f"{name}.yaml"
    if not config_path.is_file():
        raise PanoptemError(
            f"'{name}' is a built-in model: its config ships inside panoptem and cannot be "
            "archived. Only models you registered, imported or trained can be."
        )
    try:
        config = registry.read_config(config_path)
    except PanoptemError:
        config = None  # a broken config is archived as it is

    folder = archived_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PanoptemError(f"Cannot create {folder} ({exc}): make it writable.") from None

    moves: dict[Path, tuple[Path, Path]] = {}  # resolved file -> (file, place in archived/)
    archived = dict(config) if config is not None else None
    if config is not None:
        shared = _used_elsewhere(name)
        for key in ("model", "model_quantized"):
            path = _local_file(config.get(key))
            if path is None or path.resolve() in shared or _in_package(path):
                continue
            real = path.resolve()
            if real not in moves:
                taken = {dst for _, dst in moves.values()}
                moves[real] = (path, free_path(folder / path.name, taken))
            archived[key] = str(moves[real][1])
    yaml_target = free_path(folder / config_path.name)

    done: list[tuple[Path, Path]] = []
    try:
        for src, dst in moves.values():
            shutil.move(str(src), str(dst))
            done.append((src, dst))
        if moves:
            write_atomic(yaml_target, _dump_yaml(archived))
            config_path.unlink()
        else:
            shutil.move(str(config_path), str(yaml_target))
    except OSError as exc:
        for src, dst in reversed(done):
            try:
                shutil.move(str(dst), str(src))
            except OSError:
                pass
        if moves and yaml_target.exists() and config_path.exists():
            yaml_target.unlink(missing_ok=True)
        raise PanoptemError(
            f"Could not archive model '{name}' ({exc}); it is still registered. Check that "
            f"{folder} and the model files are writable."
        ) from None
    return yaml_target
