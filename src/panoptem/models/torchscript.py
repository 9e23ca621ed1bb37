"""Writing a model as TorchScript, the way the released empanada ``.pth`` files were made.

The file format of every model panoptem runs (the original's released files and
panoptem's own). Not to be confused with :mod:`panoptem.training.publish` (a trained model
saved and registered) or :mod:`panoptem.model_archive` (the ``.empanada`` archive).
"""

from __future__ import annotations

import copy
import os
import warnings

import torch
from torch import nn

__all__ = ["export_torchscript", "script_model", "JIT_DEPRECATION"]

# torch >= 2.10 flags TorchScript as deprecated; the released model format *is* TorchScript,
# so the notice is not actionable for users of this function.
JIT_DEPRECATION = r"`torch\.jit\.\w+` is deprecated"


def script_model(model: nn.Module) -> torch.jit.ScriptModule:
    """``torch.jit.script`` the model without TorchScript's deprecation notice."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=JIT_DEPRECATION, category=DeprecationWarning)
        return torch.jit.script(model)


def export_torchscript(
    model: nn.Module, path: str | os.PathLike, fuse: bool = True
) -> torch.jit.ScriptModule:
    """Script a model and save it like the released MitoNet files.

    A copy of ``model`` is put in eval mode, conv + BatchNorm (+ ReLU) are folded where the
    original export's ``fuse_model`` folds them (ResNet encoder; for Panoptic-DeepLab also
    the ASPP and low-level projections and the PointRend MLP), then it is scripted and
    written with ``torch.jit.save``. ``model`` itself is not changed.

    Parameters
    ----------
    model : nn.Module
        A panoptem model (from :func:`~panoptem.models.build_model`).
    path : str or PathLike
        Output file (conventionally ``.pth``).
    fuse : bool
        Fold BatchNorm into the convolutions (default True, as the original does).

    Returns
    -------
    torch.jit.ScriptModule
        The scripted (eval-mode) module that was saved. Loaded back with
        ``torch.jit.load`` it is called as ``m(x, render_steps, interpolate_ins)``.
    """
    export = copy.deepcopy(model).eval()
    if fuse and hasattr(export, "fuse_model"):
        with torch.no_grad():
            export.fuse_model()
    scripted = script_model(export)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=JIT_DEPRECATION, category=DeprecationWarning)
        torch.jit.save(scripted, os.fspath(path))
    return scripted
