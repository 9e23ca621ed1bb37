"""panoptem's napari settings (File > Preferences > panoptem), read by every widget.

The manifest declares two settings under ``contributions.configurations``:

``models.model_home``
    Folder of downloaded model files and registered configs. Empty (the default) keeps
    ``$PANOPTEM_HOME`` or ``~/.empanada``. When set, :func:`apply_model_home` exports it as
    ``PANOPTEM_HOME`` for this napari session, so the registry, the loader and the command
    line run from napari's console all use the same folder.
``inference.device``
    ``auto`` (GPU when CUDA is available, as the original), ``cpu`` or ``cuda``: the
    starting value of the widgets' "Use GPU" box.

When the plugin is not installed (npe2 does not know it, e.g. a source tree on
``sys.path``), the defaults apply.
"""

from __future__ import annotations

import os
from pathlib import Path

from panoptem.registry import HOME_ENV

__all__ = ["model_home", "apply_model_home", "default_device", "default_use_gpu"]

PLUGIN = "panoptem"


def _settings():
    try:
        from napari.settings import get_plugin_settings

        return get_plugin_settings(PLUGIN)
    except (ImportError, KeyError):  # napari < 0.9, or panoptem not installed as a plugin
        return None


def model_home() -> str:
    """The model folder set in napari's preferences ("" when not set)."""
    s = _settings()
    return str(s.models.model_home).strip() if s is not None else ""


def apply_model_home() -> None:
    """Export the preferences' model folder as ``PANOPTEM_HOME`` (no change when empty)."""
    home = model_home()
    if home:
        os.environ[HOME_ENV] = str(Path(home).expanduser())


def default_device() -> str:
    """``auto``, ``cpu`` or ``cuda`` from napari's preferences."""
    s = _settings()
    return str(s.inference.device) if s is not None else "auto"


def default_use_gpu() -> bool:
    """Starting value of "Use GPU": the preference, with ``auto`` meaning CUDA is present."""
    choice = default_device()
    if choice == "cpu":
        return False
    import torch

    return choice == "cuda" or torch.cuda.is_available()
