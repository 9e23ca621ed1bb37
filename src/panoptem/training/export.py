"""Saving a trained or finetuned model as a registered model (reference §7.4-7.5).

The model is exported to a fused TorchScript ``.pth`` with the released files' interface,
and a registry YAML in the original's format is written beside it and registered, so the
model appears in every model list (and runs in the original plugin too).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from panoptem import registry
from panoptem.errors import PanoptemError
from panoptem.models import export_torchscript
from panoptem.models.export import _JIT_DEPRECATION

__all__ = ["ExportedModel", "padding_factor_for", "export_trained_model"]


def padding_factor_for(arch: str) -> int:
    """Patch divisibility an architecture needs: 16 for Panoptic-DeepLab (output stride 16),
    128 for the BiFPN models (P7 has stride 128)."""
    return 128 if "BiFPN" in arch else 16


@dataclass
class ExportedModel:
    name: str
    model_path: Path
    config_path: Path


def export_trained_model(model, name: str, model_dir, *, arch: str, class_names: dict,
                         labels: list, thing_list: list, norms: dict, description: str = "",
                         finetune: dict | None = None, padding_factor: int | None = None,
                         register: bool = True) -> ExportedModel:
    """Export ``model`` to ``<model_dir>/<name>.pth`` + ``<name>.yaml`` and register it.

    Parameters
    ----------
    model : a panoptem model (nn.Module), exported in eval mode with conv+BN fused, or a
        finetuned TorchScript module (saved as it is, in eval mode).
    arch : its architecture name, for the padding factor.
    class_names, labels, thing_list, norms : the registry keys (norms as fractions of 255).
    finetune : the ``FINETUNE`` block; the built-in MitoNet_v1 recipe when None.
    padding_factor : overrides the architecture's (a finetuned model keeps its config's).

    Returns
    -------
    ExportedModel with the registered name (``New`` appended if the name was taken).
    """
    if not name or any(c in name for c in '/\\:*?"<>|'):
        raise PanoptemError(f"Model name {name!r} is not usable as a file name; choose another.")
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    pth = model_dir / f"{name}.pth"
    was_training = model.training
    if isinstance(model, torch.jit.ScriptModule):  # a finetuned released file: already fused
        model.eval()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_JIT_DEPRECATION, category=DeprecationWarning)
            torch.jit.save(model, str(pth))
    else:
        export_torchscript(model, pth)
    model.train(was_training)
    if finetune is None:
        finetune = copy.deepcopy(registry.get_config("MitoNet_v1")["FINETUNE"])
        finetune["engine_params"]["thing_list"] = list(thing_list)
    config = {
        "class_names": {int(k): str(v) for k, v in class_names.items()},
        "labels": [int(c) for c in labels],
        "thing_list": [int(c) for c in thing_list],
        "model": str(pth.resolve()),
        "model_quantized": None,
        "padding_factor": int(padding_factor or padding_factor_for(arch)),
        "norms": {"mean": float(norms["mean"]), "std": float(norms["std"])},
        "description": description or f"{arch} trained with panoptem.",
        "FINETUNE": finetune,
    }
    cfg_path = model_dir / f"{name}.yaml"
    cfg_path.write_text(yaml.safe_dump(config, sort_keys=False))
    final = registry.register_model(name, cfg_path, model=pth) if register else name
    return ExportedModel(final, pth, cfg_path)
