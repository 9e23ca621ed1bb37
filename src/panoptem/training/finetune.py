"""Finetuning a registered model on a dataset folder (the "Finetune a model" job).

As the original: the model's own TorchScript file is trained (so any released or
user-trained model can be finetuned without its source), with the config's ``FINETUNE``
recipe (loss weights, dataset weighting), the original's augmentations at the chosen patch
size, and then saved with a registry YAML and registered under the new name.
"""

from __future__ import annotations

import io
import time
import warnings
from pathlib import Path

import torch

from panoptem import registry
from panoptem._files import atomic_path, free_path, writable_folder
from panoptem.errors import PanoptemError
from panoptem.models.torchscript import JIT_DEPRECATION
from panoptem.progress import Progress
from panoptem.training.augment import augmentations_from_config, default_augmentations
from panoptem.training.config import load_training_config
from panoptem.training.datasets import DatasetClasses, check_batch, find_pairs
from panoptem.training.loop import keep_checkpoint_on_cancel, train
from panoptem.training.publish import publish_model
from panoptem.training.train import TrainedModel, finetune_block, validation_metrics

__all__ = ["finetune_model", "model_classes"]


def finetune_model(model_name: str, train_dir, model_dir, *, name: str = "FinetunedModel",
                   iterations: int = 100, patch_size: int = 256, finetune_layer: str = "none",
                   batch_size: int = 16, device="cpu", seed: int = 0, config=None,
                   eval_dir=None, eval_every: int = 0,
                   progress: Progress | None = None) -> TrainedModel:
    """Finetune ``model_name`` on ``train_dir`` and register the result as ``name``.

    Any registered model can be finetuned: the dataset class and label divisor come from its
    config (``FINETUNE.dataset_class``, ``dataset_params`` / ``engine_params.label_divisor``;
    otherwise one class gives SingleClassInstanceDataset and several PanopticDataset with
    divisor 1000), as in the original.

    Parameters
    ----------
    train_dir : folder in the original's layout ``<dir>/<source>/images|masks/<file>``.
    model_dir : where ``<name>.pth`` and ``<name>.yaml`` are written.
    eval_dir : optional validation folder (same layout): foreground IoU, F1@0.5 and PQ are
        measured every ``eval_every`` iterations (0: at the end only) and returned.
    iterations, patch_size, finetune_layer : the widget's "Iterations", "Patch size" and
        "Finetunable layers".
    config : the widget's "Custom config": a finetuning YAML (see
        ``custom_configs/custom_finetuning.yaml``; ``BASE:`` works) or its dict, whose
        ``TRAIN`` section may set the augmentations, ``schedule_params`` (max_lr,
        pct_start), ``optimizer_params`` (weight_decay), ``dataset_params``
        (weight_gamma) and ``criterion_params``; the arguments above keep precedence.
    """
    writable_folder(model_dir, "model folder")  # refused before any work, not after training
    cfg = registry.get_config(model_name)
    factor = int(cfg.get("padding_factor") or 16)
    if patch_size < factor or patch_size % factor:
        raise PanoptemError(f"Patch size must be a multiple of {factor} for {model_name} (its "
                            f"padding factor, see Get model info); got {patch_size}.")
    pairs = find_pairs(train_dir)
    check_batch(pairs, batch_size, train_dir)
    finetune_cfg = cfg.get("FINETUNE", {})
    classes = model_classes(cfg)
    wanted = finetune_cfg.get("dataset_class")
    if wanted not in (None, classes.dataset_class):
        raise PanoptemError(
            f"The config of {model_name} asks for FINETUNE.dataset_class {wanted}, but the model "
            f"has {len(classes.labels)} class(es), which needs {classes.dataset_class}; correct "
            "the config."
        )
    path = registry.fetch_file(cfg["model"], cfg.get("model_hash"), progress=progress)
    try:
        with warnings.catch_warnings():  # TorchScript *is* the released format
            warnings.filterwarnings("ignore", message=JIT_DEPRECATION, category=DeprecationWarning)
            module = torch.jit.load(str(path), map_location=torch.device(device))
    except RuntimeError as err:
        raise PanoptemError(f"{path} is not a TorchScript model ({err}); download or export it again.") from None
    custom = {}
    if config is not None:
        custom = (config if isinstance(config, dict) else load_training_config(config)).get("TRAIN") or {}
    gamma = (custom.get("dataset_params") or finetune_cfg.get("dataset_params") or {}).get("weight_gamma", 0.7)
    transforms = (augmentations_from_config(custom["augmentations"], patch_size, seed)
                  if custom.get("augmentations") else default_augmentations(patch_size, seed))
    schedule = custom.get("schedule_params") or {}
    dataset = classes.dataset(pairs, transforms=transforms, norms=cfg["norms"],
                              weight_gamma=gamma, seed=seed)

    def evaluate(m):
        # on a copy: a TorchScript module run under inference mode keeps inference tensors
        # in its executor's state, which the next training step cannot backpropagate through
        return validation_metrics(_copy(m, device), cfg, eval_dir, device)

    checkpoint_path = free_path(Path(model_dir) / f"{name}_checkpoint.pth")

    def checkpoint(m, iteration: int) -> None:  # the TorchScript file as it is now
        with atomic_path(checkpoint_path) as tmp, warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=JIT_DEPRECATION, category=DeprecationWarning)
            torch.jit.save(m, str(tmp))

    start = time.perf_counter()
    with keep_checkpoint_on_cancel(checkpoint_path):
        result = train(
            module, dataset, iterations=iterations, batch_size=batch_size, device=device,
            seed=seed, max_lr=float(schedule.get("max_lr") or 0.003),
            pct_start=float(schedule.get("pct_start") or 0.3),
            weight_decay=float((custom.get("optimizer_params") or {}).get("weight_decay", 0.1)),
            finetune_layer=finetune_layer,
            criterion_params=custom.get("criterion_params") or finetune_cfg.get("criterion_params"),
            evaluate=evaluate if eval_dir else None, eval_every=eval_every,
            checkpoint=checkpoint, save_every=max(1, iterations // 5), progress=progress)
    seconds = time.perf_counter() - start
    published = publish_model(
        module, name, model_dir, arch="finetuned", class_names=cfg["class_names"],
        labels=cfg["labels"], thing_list=cfg["thing_list"], norms=cfg["norms"],
        description=f"{model_name} finetuned with panoptem on {train_dir} for {iterations} iterations.",
        finetune=finetune_cfg or finetune_block(classes, gamma),
        padding_factor=cfg["padding_factor"])
    return TrainedModel(published, result.losses, result.evaluations, seconds)


def _copy(module: torch.jit.ScriptModule, device) -> torch.jit.ScriptModule:
    """An independent copy of a TorchScript module, in eval mode."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=JIT_DEPRECATION, category=DeprecationWarning)
        torch.jit.save(module, buffer)
        buffer.seek(0)
        return torch.jit.load(buffer, map_location=torch.device(device)).eval()


def model_classes(config: dict) -> DatasetClasses:
    """The dataset classes a registered model was trained with, from its config."""
    finetune = config.get("FINETUNE") or {}
    divisor = ((finetune.get("dataset_params") or {}).get("label_divisor")
               or (finetune.get("engine_params") or {}).get("label_divisor"))
    return DatasetClasses.checked(config["class_names"], config["labels"],
                                  config["thing_list"], divisor)
