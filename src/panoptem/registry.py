"""The model registry: built-in and user model configs, and the model files they name.

A model is known by the stem of its config file, a YAML in empanada-napari's format (keys
``class_names``, ``labels``, ``thing_list``, ``model``, ``model_quantized``, ``norms``,
``padding_factor``, ``description``, ``FINETUNE``). Built-in configs ship in
``panoptem/configs``; user configs live in :func:`config_dir` (``~/.empanada/configs`` by
default, the folder empanada-napari uses, so models registered with the original appear
here too). A user config with the same stem as a built-in one replaces it.

Model files are TorchScript ``.pth`` files given as a local path or an http(s) URL. URLs are
downloaded once into :func:`home_dir` under the last part of the URL path (as the original
does, so its downloads are reused). Two optional keys that the original ignores,
``model_hash`` and ``model_quantized_hash`` (``"sha256:<hex>"``), make panoptem verify the
downloads.

Environment variables
---------------------
``PANOPTEM_HOME``
    Folder for downloaded model files and (under ``configs/``) user configs; default
    ``~/.empanada``.
``PANOPTEM_OFFLINE``
    ``1`` forbids network access: a model file that is not cached yet fails at once with a
    message saying where to place it by hand.

Nothing is created or changed at import time; folders are created only when writing.
Loading a model onto a device is :mod:`panoptem.loading`'s job, one layer above this one.
"""

from __future__ import annotations

import os
import textwrap
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from panoptem import _download
from panoptem._files import write_atomic
from panoptem.errors import PanoptemError
from panoptem.progress import Progress

__all__ = [
    "HOME_ENV",
    "REQUIRED_KEYS",
    "ModelInfo",
    "home_dir",
    "config_dir",
    "builtin_config_dir",
    "list_models",
    "get_config",
    "read_config",
    "validate_config",
    "free_model_name",
    "register_model",
    "model_info",
    "fetch_file",
]

#: Environment variable that moves the model cache and user config folder.
HOME_ENV = "PANOPTEM_HOME"
#: Keys every model config must have.
REQUIRED_KEYS = ("model", "norms", "padding_factor", "class_names", "labels", "thing_list")

_BUILTIN_DIR = Path(__file__).resolve().parent / "configs"


# --------------------------------------------------------------------------------------
# Folders
# --------------------------------------------------------------------------------------
def home_dir() -> Path:
    """Folder of downloaded model files: ``$PANOPTEM_HOME`` if set, else ``~/.empanada``.

    Not created here; it is created when the first file is written into it.
    """
    env = os.environ.get(HOME_ENV, "").strip()
    return Path(env).expanduser().absolute() if env else Path.home() / ".empanada"


def config_dir() -> Path:
    """Folder of user-registered model configs: ``home_dir() / "configs"``."""
    return home_dir() / "configs"


def builtin_config_dir() -> Path:
    """Folder of the configs shipped with panoptem (read-only)."""
    return _BUILTIN_DIR


# --------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------
def _yaml_files(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        return {}
    return {p.name[: -len(".yaml")]: p for p in sorted(folder.glob("*.yaml")) if p.is_file()}


#: The order of the built-in models in every list and drop-down: the original's models as
#: its documentation lists them (MitoNet_v1 first, the one every tutorial starts with), then
#: panoptem's bundled offline model. Built-ins missing here follow, sorted.
BUILTIN_ORDER = ("MitoNet_v1", "MitoNet_v1_mini", "NucleoNet_base_v2",
                 "DropNet_base_v1", "panoptem_mito_small")

#: The model that ships with panoptem and needs no download.
OFFLINE_MODEL = "panoptem_mito_small"


def _builtin_rank(name: str) -> tuple[int, str]:
    order = BUILTIN_ORDER.index(name) if name in BUILTIN_ORDER else len(BUILTIN_ORDER)
    return order, name


def _config_paths() -> dict[str, Path]:
    """Model name -> config file: built-ins in :data:`BUILTIN_ORDER`, then user-only
    configs (sorted)."""
    builtin = _yaml_files(_BUILTIN_DIR)
    user = _yaml_files(config_dir())
    paths = {name: user.get(name, builtin[name]) for name in sorted(builtin, key=_builtin_rank)}
    paths.update((name, path) for name, path in sorted(user.items()) if name not in builtin)
    return paths


def list_models() -> list[str]:
    """Names of every available model.

    MitoNet_v1 comes first, then the original's other built-ins, then panoptem's bundled
    offline model (:data:`BUILTIN_ORDER`), then user-registered models (sorted). A user
    config whose name equals a built-in one replaces it and is listed once, in the
    built-in's place. The folder is read at every call, so newly registered models show up
    immediately.
    """
    return list(_config_paths())


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def validate_config(config: Any, source: str) -> dict:
    """Check the structure of a model config; return it. ``source`` names it in messages."""
    fix = "Fix the file (the built-in MitoNet_v1.yaml shows the expected format)."

    def fail(problem: str) -> PanoptemError:
        return PanoptemError(f"Model config {source}: {problem}. {fix}")

    if not isinstance(config, dict):
        raise fail(f"expected a mapping of keys to values, found {type(config).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in config]
    if missing:
        raise fail(f"missing required key(s) {', '.join(missing)}")
    if not isinstance(config["model"], str) or not config["model"].strip():
        raise fail("'model' must be the URL or path of a TorchScript .pth file")
    mq = config.get("model_quantized")
    if mq is not None and (not isinstance(mq, str) or not mq.strip()):
        raise fail("'model_quantized' must be a URL, a path or null")
    norms = config["norms"]
    if not (
        isinstance(norms, dict)
        and _is_number(norms.get("mean"))
        and _is_number(norms.get("std"))
        and norms["std"] > 0
    ):
        raise fail("'norms' must have a numeric 'mean' and a positive numeric 'std'")
    if not _is_int(config["padding_factor"]) or config["padding_factor"] < 1:
        raise fail(f"'padding_factor' must be a positive integer, got {config['padding_factor']!r}")
    if not isinstance(config["class_names"], dict) or not config["class_names"]:
        raise fail("'class_names' must map class ids to names, e.g. {1: mito}")
    for key in ("labels", "thing_list"):
        value = config[key]
        if not isinstance(value, list) or not all(_is_int(v) for v in value):
            raise fail(f"'{key}' must be a list of integer class ids, got {value!r}")
    if not config["labels"]:
        raise fail("'labels' must list at least one class id")
    for key in ("model_hash", "model_quantized_hash"):
        if config.get(key) is not None:
            try:
                _download.check_hash_spec(config[key])
            except PanoptemError as exc:
                raise fail(f"'{key}': {exc}") from None
    finetune = config.get("FINETUNE")
    if finetune is not None and not isinstance(finetune, dict):
        raise fail("'FINETUNE' must be a mapping")
    return config


def _load_yaml(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise PanoptemError(
            f"Model config {path} is not valid YAML{where}: {problem}. Fix or replace the file."
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PanoptemError(f"Model config {path} cannot be read ({exc}).") from None


def read_config(path: str | os.PathLike) -> dict:
    """Read and check a model-config YAML file.

    Parameters
    ----------
    path : str or PathLike
        A ``.yaml`` file in empanada's registry format.

    Returns
    -------
    dict
        The parsed config.

    Raises
    ------
    PanoptemError
        If the file is missing, is not YAML, or lacks required keys; the message names the
        file and the problem.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise PanoptemError(f"Model config {path} does not exist: check the path.")
    config = validate_config(_load_yaml(path), str(path))
    # a relative local model path is relative to the config's folder (how the bundled
    # model's files are found inside the installed package), never to the working folder
    for key in ("model", "model_quantized"):
        value = config.get(key)
        if isinstance(value, str) and value and not _download.is_url(value) and "://" not in value:
            local = Path(value).expanduser()
            if not local.is_absolute():
                config[key] = str((path.parent / local).resolve())
    return config


def get_config(name: str) -> dict:
    """The config of model ``name`` (a fresh copy each call).

    Raises
    ------
    PanoptemError
        Unknown name (the message lists the available ones), or a broken config file.
    """
    paths = _config_paths()
    if name not in paths:
        raise PanoptemError(
            f"Unknown model '{name}'. Available models: {', '.join(paths) or 'none'}. "
            "Use one of these names, or register the model first (the Register new model "
            "widget, `panoptem models register`, or register_model)."
        )
    return read_config(paths[name])


# --------------------------------------------------------------------------------------
# Registering
# --------------------------------------------------------------------------------------
def _model_source(value: str | os.PathLike, what: str, base_dirs: tuple[Path, ...]) -> str:
    """Check a model file reference; URLs are kept, local paths become absolute paths."""
    if isinstance(value, str) and _download.is_url(value):
        _download.cache_name(value)  # syntax check only; no network at registration
        return value.strip()
    if isinstance(value, str) and "://" in value:
        raise PanoptemError(
            f"{what} '{value}' uses an unsupported scheme: give an http(s) URL or a local path."
        )
    path = Path(value).expanduser()
    candidates = [path] if path.is_absolute() else [b / path for b in base_dirs]
    for candidate in candidates:
        if candidate.is_file():
            return str(candidate.absolute())
    tried = ", ".join(str(c.absolute()) for c in candidates)
    raise PanoptemError(
        f"{what} '{value}' is neither an http(s) URL nor an existing file (looked at: {tried}). "
        "Correct the path or URL."
    )


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise PanoptemError("The model name is empty: give the model a name.")
    name = name.strip()
    bad = set('/\\:*?"<>|') & set(name)
    if bad or name.startswith(".") or any(ord(c) < 32 for c in name):
        raise PanoptemError(
            f"The model name '{name}' cannot be used as a file name: leave out "
            '/ \\ : * ? " < > | and do not start it with a dot.'
        )
    return name


def free_model_name(name: str, folder: str | os.PathLike | None = None) -> str:
    """``name``, with "New" appended (as the original) until no registered model has it and,
    when ``folder`` is given, no ``<name>.pth``, ``<name>_quantized.pth`` or ``<name>.yaml``
    exists there: the name under which new model files can be written without replacing any.
    """
    name = _check_name(name)
    taken = set(list_models())
    folder = Path(folder) if folder is not None else None

    def used(n: str) -> bool:
        if n in taken:
            return True
        return folder is not None and any(
            (folder / f"{n}{end}").exists() for end in (".pth", "_quantized.pth", ".yaml"))

    while used(name):
        name += "New"
    return name


def _drop_stale_hash(config: dict, key: str, source: str) -> None:
    """Forget ``<key>_hash`` when ``source`` replaces the file it was the checksum of.

    The checksum stays when the source is the same, or is a local file with that checksum
    (e.g. an imported copy of the downloaded file); a different URL or file drops it.
    """
    known = config.get(f"{key}_hash")
    if not known or source == config.get(key):
        return
    if not _download.is_url(source) and Path(source).is_file():
        try:
            if _download.file_matches(Path(source), str(known))[0]:
                return
        except PanoptemError:  # a malformed checksum belongs to no file
            pass
    config.pop(f"{key}_hash", None)


def register_model(
    name: str,
    config_path: str | os.PathLike,
    model: str | os.PathLike | None = None,
    quantized_model: str | os.PathLike | None = None,
) -> str:
    """Register a model so that it appears in :func:`list_models`.

    Writes ``config_dir() / "<name>.yaml"``. As in the original, a name that is already
    taken gets ``"New"`` appended (repeatedly, until it is free), so nothing is overwritten.

    Parameters
    ----------
    name : str
        Model name (also the file stem of the written config).
    config_path : str or PathLike
        Model-config YAML (must end in ``.yaml``) in empanada's format.
    model : str or PathLike, optional
        Replaces the config's ``model``: an http(s) URL (only its syntax is checked; nothing
        is downloaded now) or an existing local file, stored as an absolute path.
    quantized_model : str or PathLike, optional
        Replaces the config's ``model_quantized`` in the same way.

    Returns
    -------
    str
        The name the model was registered under.

    Raises
    ------
    PanoptemError
        Empty or unusable name, config not ``.yaml`` / missing / invalid, model file missing.

    Warns
    -----
    UserWarning
        If the config's own ``model_quantized`` is neither a URL nor an existing file; it is
        then set to null so that the float model is used.
    """
    name = _check_name(name)
    config_path = Path(config_path).expanduser()
    if config_path.suffix.lower() != ".yaml":
        raise PanoptemError(
            f"The model config must be a .yaml file, got '{config_path}'. "
            "Choose the model's .yaml config (rename a .yml file to .yaml)."
        )
    if not config_path.is_file():
        raise PanoptemError(f"Model config {config_path} does not exist: check the path.")
    config = _load_yaml(config_path)
    if not isinstance(config, dict):
        validate_config(config, str(config_path))  # raises with a helpful message
    config = dict(config)
    here = (config_path.parent.absolute(), Path.cwd())

    if model is not None and str(model).strip():
        source = _model_source(model, "Model file", (Path.cwd(),))
        _drop_stale_hash(config, "model", source)
        config["model"] = source
    elif isinstance(config.get("model"), str) and config["model"].strip():
        config["model"] = _model_source(config["model"], f"'model' in {config_path}", here)
    if quantized_model is not None and str(quantized_model).strip():
        source = _model_source(quantized_model, "Quantized model file", (Path.cwd(),))
        _drop_stale_hash(config, "model_quantized", source)
        config["model_quantized"] = source
    elif isinstance(config.get("model_quantized"), str) and config["model_quantized"].strip():
        try:
            config["model_quantized"] = _model_source(
                config["model_quantized"], f"'model_quantized' in {config_path}", here
            )
        except PanoptemError as exc:
            warnings.warn(
                f"{exc} The quantized model is left out; the float model will be used.",
                UserWarning,
                stacklevel=2,
            )
            config["model_quantized"] = None
    config.setdefault("model_quantized", None)
    validate_config(config, str(config_path))

    taken = set(list_models())
    while name in taken:
        name += "New"
    out_dir = config_dir()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(out_dir / f"{name}.yaml",
                     yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    except OSError as exc:
        raise PanoptemError(
            f"Could not write the config into {out_dir} ({exc}). Make the folder writable "
            f"or set {HOME_ENV} to a writable folder."
        ) from None
    return name


# --------------------------------------------------------------------------------------
# Info
# --------------------------------------------------------------------------------------
@dataclass
class ModelInfo:
    """What a model config says about a model.

    Attributes
    ----------
    name : str
    description : str
        Free text from the config ('' when absent).
    padding_factor : int
        Image height and width are zero-padded up to a multiple of this (pixels).
    label_divisor : int or None
        ``FINETUNE.engine_params.label_divisor`` (used when finetuning), if present.
    class_names : dict[int, str]
    thing_list : list[int]
        Instance ("thing") classes; the other ``labels`` are semantic ("stuff") classes.
    labels : list[int]
    model, model_quantized : str or None
        URL or path of the float and the quantized TorchScript files.
    norms : dict
        ``{"mean": float, "std": float}`` as fractions of the maximum pixel value.
    """

    name: str
    description: str
    padding_factor: int
    label_divisor: int | None
    class_names: dict[int, str]
    thing_list: list[int]
    labels: list[int]
    model: str
    model_quantized: str | None
    norms: dict[str, float]

    @classmethod
    def from_config(cls, name: str, config: dict) -> ModelInfo:
        """Build from a (checked) config dict."""
        engine = (config.get("FINETUNE") or {}).get("engine_params") or {}
        divisor = engine.get("label_divisor") if isinstance(engine, dict) else None
        return cls(
            name=name,
            description=" ".join(str(config.get("description") or "").split()),
            padding_factor=int(config["padding_factor"]),
            label_divisor=int(divisor) if _is_int(divisor) else None,
            class_names=dict(config["class_names"]),
            thing_list=list(config["thing_list"]),
            labels=list(config["labels"]),
            model=config["model"],
            model_quantized=config.get("model_quantized"),
            norms=dict(config["norms"]),
        )

    def summary(self) -> str:
        """Readable multi-line text: description, padding, label divisor, classes, files."""
        classes = []
        for label in self.labels:
            kind = "instance" if label in self.thing_list else "semantic"
            classes.append(f"    {label}: {self.class_names.get(label, '?')} ({kind})")
        divisor = self.label_divisor if self.label_divisor is not None else "not given"
        lines = [
            f"Model: {self.name}",
            textwrap.fill(
                f"Description: {self.description or '(none)'}", width=88, subsequent_indent="  "
            ),
            f"Required patch divisibility (padding factor): {self.padding_factor} pixels; "
            "images are zero-padded to a multiple of it",
            f"Label divisor (finetuning): {divisor}",
            "Classes:",
            *classes,
            f"Normalisation: mean {self.norms.get('mean')}, std {self.norms.get('std')} "
            "(fractions of the maximum pixel value)",
            f"Model file: {self.model}",
            f"Quantized model file: {self.model_quantized or 'none'}",
        ]
        return "\n".join(lines)


def model_info(name: str) -> ModelInfo:
    """Information about registered model ``name`` (see :class:`ModelInfo`)."""
    return ModelInfo.from_config(name, get_config(name))


# --------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------
def fetch_file(
    url_or_path: str | os.PathLike,
    known_hash: str | None = None,
    progress: Progress | None = None,
) -> Path:
    """A local file for a model reference, downloading and caching URLs.

    Parameters
    ----------
    url_or_path : str or PathLike
        A local path (returned as it is if it exists) or an http(s) URL. A URL's file is
        kept in :func:`home_dir` under the last part of the URL path (query dropped).
    known_hash : str, optional
        ``"sha256:<hex>"`` checksum of the URL's file; checked on download and on a cached
        file (which is downloaded again if it differs). Not applied to local paths.
    progress : Progress, optional
        Download progress in bytes; a cancel request stops the download cleanly.

    Returns
    -------
    Path

    Raises
    ------
    PanoptemError
        Missing local file; offline (``PANOPTEM_OFFLINE=1``) with the file not cached; any
        network or HTTP failure; checksum mismatch. The message names the URL, the HTTP
        status if any, and the exact path where the file can be placed by hand.
    """
    if isinstance(url_or_path, str) and _download.is_url(url_or_path):
        return _download.download_cached(url_or_path.strip(), home_dir(), known_hash, progress)
    if isinstance(url_or_path, str) and "://" in url_or_path:
        raise PanoptemError(
            f"'{url_or_path}' uses an unsupported scheme: give an http(s) URL or a local path."
        )
    path = Path(url_or_path).expanduser()
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise PanoptemError(
            f"Model file {path} {what}. Correct the path (in the model config or the "
            "argument), or register the model again with the right file."
        )
    return path
