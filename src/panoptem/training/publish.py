"""Publishing a trained or finetuned model: saved, described and registered (reference
§7.4-7.5).

The model is written as a fused TorchScript ``.pth`` with the released files' interface
(:mod:`panoptem.models.torchscript`), a registry YAML in the original's format is written
beside it and registered, so the model appears in every model list (and runs in the
original plugin too). ``panoptem export CHECKPOINT`` is :func:`publish_checkpoint`.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from panoptem import registry
from panoptem._files import atomic_path, free_path, writable_folder, write_atomic
from panoptem.errors import PanoptemError
from panoptem.models import export_torchscript
from panoptem.models.torchscript import JIT_DEPRECATION
from panoptem.progress import Progress

__all__ = ["PublishedModel", "padding_factor_for", "publish_model", "load_checkpoint",
           "publish_checkpoint", "quantize_registered"]


def padding_factor_for(arch: str) -> int:
    """Patch divisibility an architecture needs: 16 for Panoptic-DeepLab (output stride 16),
    128 for the BiFPN models (P7 has stride 128)."""
    return 128 if "BiFPN" in arch else 16


@dataclass
class PublishedModel:
    name: str
    model_path: Path
    config_path: Path


def publish_model(model, name: str, model_dir, *, arch: str, class_names: dict,
                         labels: list, thing_list: list, norms: dict, description: str = "",
                         finetune: dict | None = None, padding_factor: int | None = None,
                         quantized=None, register: bool = True) -> PublishedModel:
    """Export ``model`` to ``<model_dir>/<name>.pth`` + ``<name>.yaml`` and register it.

    Parameters
    ----------
    model : a panoptem model (nn.Module), exported in eval mode with conv+BN fused, or a
        finetuned TorchScript module (saved as it is, in eval mode).
    arch : its architecture name, for the padding factor.
    class_names, labels, thing_list, norms : the registry keys (norms as fractions of 255).
    finetune : the ``FINETUNE`` block; the built-in MitoNet_v1 recipe when None.
    padding_factor : overrides the architecture's (a finetuned model keeps its config's).
    quantized : an int8 TorchScript module (see :mod:`panoptem.models.quantize`), saved as
        ``<name>_quantized.pth`` and set as the config's ``model_quantized``.

    Returns
    -------
    PublishedModel with the registered name: ``New`` is appended (as the original) while the
    name is registered or ``<name>.pth`` / ``_quantized.pth`` / ``.yaml`` exist in
    ``model_dir``, so the files of an earlier model are never replaced.
    """
    model_dir = writable_folder(model_dir, "model folder")
    name = registry.free_model_name(name, model_dir)
    pth = model_dir / f"{name}.pth"
    was_training = model.training
    with atomic_path(pth) as tmp:
        if isinstance(model, torch.jit.ScriptModule):  # a finetuned released file: fused
            model.eval()
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=JIT_DEPRECATION,
                                        category=DeprecationWarning)
                torch.jit.save(model, str(tmp))
        else:
            export_torchscript(model, tmp)
    model.train(was_training)
    if finetune is None:
        finetune = copy.deepcopy(registry.get_config("MitoNet_v1")["FINETUNE"])
        finetune["engine_params"]["thing_list"] = list(thing_list)
    config = {
        "class_names": {int(k): str(v) for k, v in class_names.items()},
        "labels": [int(c) for c in labels],
        "thing_list": [int(c) for c in thing_list],
        "model": str(pth.resolve()),
        "model_quantized": _save_quantized(quantized, model_dir / f"{name}_quantized.pth"),
        "padding_factor": int(padding_factor or padding_factor_for(arch)),
        "norms": {"mean": float(norms["mean"]), "std": float(norms["std"])},
        "description": description or f"{arch} trained with panoptem.",
        "FINETUNE": finetune,
    }
    cfg_path = write_atomic(model_dir / f"{name}.yaml", yaml.safe_dump(config, sort_keys=False))
    final = registry.register_model(name, cfg_path, model=pth) if register else name
    return PublishedModel(final, pth, cfg_path)


def _save_quantized(module, path: Path) -> str | None:
    if module is None:
        return None
    from panoptem.models.quantize import save_quantized

    with atomic_path(path) as tmp:
        save_quantized(module, tmp)
    return str(path.resolve())


def load_checkpoint(path) -> tuple[torch.nn.Module, dict]:
    """Rebuild the model of a training checkpoint (``<name>_checkpoint.pth.tar``).

    Returns the model (eval mode, weights loaded) and the training config stored with it.
    """
    from panoptem.models import build_model

    path = Path(path)
    if not path.is_file():
        raise PanoptemError(f"Checkpoint not found: {path}")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=False)
        cfg = state["config"]
        model = build_model(cfg["MODEL"])
        model.load_state_dict(state["state_dict"])
    except PanoptemError:
        raise
    except Exception as err:  # noqa: BLE001 - unreadable, foreign or mismatched checkpoints
        raise PanoptemError(f"{path} is not a panoptem training checkpoint ({type(err).__name__}: "
                            f"{err}); give the <name>_checkpoint.pth.tar written by training.") from None
    cfg.setdefault("DATASET", {})["norms"] = dict(state.get("norms") or cfg["DATASET"].get("norms"))
    return model.eval(), cfg


def _classes(cfg: dict) -> dict:
    d = cfg.get("DATASET") or {}
    class_names = {int(k): str(v) for k, v in (d.get("class_names") or {1: "object"}).items()}
    labels = [int(c) for c in (d.get("labels") or sorted(class_names))]
    return {"class_names": class_names, "labels": labels,
            "thing_list": [int(c) for c in (d.get("thing_list") or labels)], "norms": d["norms"]}


def _calibration(model_cfg: dict, norms: dict, calibration_dir):
    from panoptem.training.datasets import find_pairs

    return calibration_from_pairs(model_cfg, norms, find_pairs(calibration_dir))


def calibration_from_pairs(model_cfg: dict, norms: dict, pairs: list, limit: int = 16) -> list:
    """Up to ``limit`` normalised training images (spread over ``pairs``) to calibrate int8 on."""
    from panoptem.models.quantize import calibration_tensors
    from panoptem.training.datasets import read_image_8bit

    step = max(1, len(pairs) // limit)  # spread over the sources, not the first folder only
    images = (read_image_8bit(p[0]) for p in pairs[::step])
    return calibration_tensors(images, norms, multiple=padding_factor_for(model_cfg["arch"]), limit=limit)


def publish_checkpoint(checkpoint, model_dir, *, name: str | None = None, quantize: bool = False,
                      calibration_dir=None, description: str = "",
                      progress: Progress | None = None) -> PublishedModel:
    """Export a training checkpoint as a registered TorchScript model (``panoptem export``).

    With ``quantize`` the int8 version, calibrated on the images of ``calibration_dir``
    (dataset layout; the training images), is written and registered with it. A model
    folder that cannot be written is refused before any work.
    """
    writable_folder(model_dir, "model folder")
    model, cfg = load_checkpoint(checkpoint)
    keys = _classes(cfg)
    quantized = None
    if quantize:
        if calibration_dir is None:
            raise PanoptemError("Quantizing needs calibration images: give the training folder.")
        from panoptem.models.quantize import quantize_model

        quantized = quantize_model(model, _calibration(cfg["MODEL"], keys["norms"], calibration_dir),
                                   progress=progress)
    name = name or cfg.get("model_name") or Path(checkpoint).name.split("_checkpoint")[0]
    return publish_model(model, name, model_dir, arch=cfg["MODEL"]["arch"],
                         description=description or cfg.get("description") or "",
                         quantized=quantized, **keys)


def quantize_registered(name: str, calibration_dir, *, checkpoint=None, arch_config=None,
                        progress: Progress | None = None) -> Path:
    """Add an int8 version to the user-registered model ``name`` (``panoptem quantize``).

    The float weights come from the model's training ``checkpoint`` or, for a TorchScript
    file exported by panoptem, from the file itself rebuilt with ``arch_config`` (a training
    config, or its MODEL section, that built it). Calibration uses the images of
    ``calibration_dir`` (dataset layout; the training images). The quantized file is
    written beside the model's ``.pth`` and the registered config's ``model_quantized`` is
    set to it (a free name when that file exists: no file is replaced). Built-in models
    cannot be changed.
    """
    from panoptem.models.quantize import model_from_torchscript, quantize_model, save_quantized

    if (checkpoint is None) == (arch_config is None):
        raise PanoptemError("Give either the training checkpoint or the architecture config, not both.")
    cfg_path = registry.config_dir() / f"{name}.yaml"
    if not cfg_path.is_file():
        known = ", ".join(registry.list_models())
        raise PanoptemError(f"No user-registered model named {name!r} (built-in models cannot be "
                            f"changed); registered models: {known}.")
    registered = registry.read_config(cfg_path)
    model_path = Path(str(registered["model"]))
    if checkpoint is not None:
        model, cfg = load_checkpoint(checkpoint)
        arch = cfg["MODEL"]
    else:
        if not isinstance(arch_config, dict):
            from panoptem.training.config import load_training_config

            arch_config = load_training_config(arch_config)
        arch = arch_config.get("MODEL", arch_config)
        if not model_path.is_file():
            raise PanoptemError(f"The model file of {name} is not local ({model_path}); quantize from "
                                "its checkpoint instead.")
        model = model_from_torchscript(model_path, arch)
    module = quantize_model(model, _calibration(arch, registered["norms"], calibration_dir),
                            already_fused=checkpoint is None, progress=progress)
    folder = model_path.parent if model_path.is_file() else cfg_path.parent
    out = free_path(writable_folder(folder, "model folder") / f"{name}_quantized.pth")
    with atomic_path(out) as tmp:
        save_quantized(module, tmp)
    raw = yaml.safe_load(cfg_path.read_text())
    raw["model_quantized"] = str(out.resolve())
    write_atomic(cfg_path, yaml.safe_dump(raw, sort_keys=False))
    return out
