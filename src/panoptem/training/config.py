"""Training and finetuning configs: YAML files in the original's template format.

A config may inherit from another with a top-level ``BASE:`` key naming a YAML file
(relative to the inheriting file, or absolute). The base is read first (recursively) and
the inheriting file's values are merged into it: mappings merge key by key, anything else
(lists included) replaces the base's value. ``null`` values are left for the caller to fill
(the widgets and CLI put their own values there, as the original does).
"""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

from panoptem.errors import PanoptemError

__all__ = ["load_training_config", "merge_configs", "TEMPLATES", "TEMPLATE_DIR",
           "ARCHITECTURES", "training_template"]

#: The templates, shipped in the package (the repository's custom_configs/ links to them,
#: where users of the original look for them).
TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
TEMPLATES = ("custom_finetuning.yaml", "custom_training_pdl.yaml", "custom_training_bifpn.yaml")

#: The Train widget's "Model architecture" choices and the template each starts from.
ARCHITECTURES = {"PanopticDeepLab": "custom_training_pdl.yaml",
                 "PanopticBiFPN": "custom_training_bifpn.yaml"}


def training_template(architecture: str = "PanopticDeepLab") -> dict:
    """The training config of a "Model architecture" choice (its template, BASE resolved)."""
    if architecture not in ARCHITECTURES:
        raise PanoptemError(f"Model architecture must be one of {', '.join(ARCHITECTURES)}; "
                            f"got {architecture!r}.")
    return load_training_config(TEMPLATE_DIR / ARCHITECTURES[architecture])


def merge_configs(base: dict, override: dict) -> dict:
    """Recursive merge: mappings key by key, other values from ``override``."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_configs(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_training_config(path, _seen: tuple = ()) -> dict:
    """Read a training config, resolving ``BASE:`` inheritance.

    Raises PanoptemError for a missing file, invalid YAML, a document that is not a mapping,
    or a cycle of BASE references, naming the file.
    """
    path = Path(path).expanduser().resolve()
    if path in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, path))
        raise PanoptemError(f"The BASE references form a cycle: {chain}; remove one of them.")
    if not path.is_file():
        raise PanoptemError(f"Config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise PanoptemError(f"{path} is not valid YAML ({err}); fix the file.") from None
    if not isinstance(data, dict):
        raise PanoptemError(f"{path} must hold a mapping of keys (got {type(data).__name__}).")
    base = data.pop("BASE", None)
    if base is None:
        return data
    base_path = Path(base).expanduser()
    if not base_path.is_absolute():
        base_path = path.parent / base_path
    return merge_configs(load_training_config(base_path, (*_seen, path)), data)
