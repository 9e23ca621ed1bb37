"""Training a model from scratch from a training config (the "Train a model" job).

The config is the original's template format (``custom_configs/custom_training_pdl.yaml``
or ``custom_training_bifpn.yaml``, with ``BASE:`` inheritance): ``DATASET`` (classes,
norms), ``MODEL`` (the architecture, as :func:`panoptem.models.build_model` takes it),
``TRAIN`` (data, schedule, augmentations, encoder pretraining, loss) and ``EVAL``. Keys
left null are filled from the arguments, as the original's widget fills them.

panoptem adds ``TRAIN.iterations`` and ``TRAIN.patch_size`` (the widget's "Iterations" and
"Patch size") and ``EVAL.eval_every`` (iterations between validations). The result is a
fused TorchScript ``.pth`` plus a registry YAML, registered, and on request its int8
quantized version (:mod:`panoptem.models.quantize`).
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from panoptem import registry
from panoptem._files import free_path, writable_folder
from panoptem.errors import PanoptemError
from panoptem.progress import Progress, ensure_progress
from panoptem.training.augment import augmentations_from_config
from panoptem.training.config import load_training_config, training_template
from panoptem.training.datasets import (
    DEFAULT_NORMS,
    DatasetClasses,
    check_batch,
    find_pairs,
    image_norms,
    read_image_8bit,
    read_mask,
)
from panoptem.training.loop import keep_checkpoint_on_cancel, save_checkpoint, train
from panoptem.training.publish import PublishedModel, calibration_from_pairs, publish_model

__all__ = ["CEM_WEIGHTS_URL", "TrainedModel", "train_model", "validation_metrics", "finetune_block"]

#: The CEM1.5M SwAV-pretrained ResNet50 published with empanada (reference §7.6).
CEM_WEIGHTS_URL = ("https://zenodo.org/record/6453160/files/"
                   "cem1.5m_swav_resnet50_200ep_balanced.pth.tar?download=1")

@dataclass
class TrainedModel:
    """What a training run produced: the registered model and its history."""

    exported: PublishedModel
    losses: list = field(default_factory=list)
    evaluations: list = field(default_factory=list)
    seconds: float = 0.0
    quantized_path: Path | None = None


def _require(value, what: str):
    if value is None:
        raise PanoptemError(f"The training config has no {what}; set it in the config or give it "
                            "as an argument.")
    return value


def _fetch_cem_weights(encoder: str, progress) -> Path:
    """The CEM1.5M ResNet50 file (downloaded once), before any training work."""
    if encoder != "resnet50":
        raise PanoptemError(f"CEM pretrained weights exist only for resnet50; the config's encoder is "
                            f"{encoder}. Set TRAIN.encoder_pretraining to null or use resnet50.")
    return registry.fetch_file(CEM_WEIGHTS_URL, progress=progress)


def _load_cem_weights(model: torch.nn.Module, path: Path) -> dict:
    """Load the CEM1.5M ResNet50 into the encoder; returns its norms."""
    from panoptem.models import load_encoder_weights

    try:
        checkpoint = torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same advice
        raise PanoptemError(f"{path} is not a readable checkpoint ({err}); delete it so it is "
                            f"downloaded again from {CEM_WEIGHTS_URL}.") from None
    norms = load_encoder_weights(model, checkpoint)
    return norms or dict(DEFAULT_NORMS)


def finetune_block(classes: DatasetClasses, weight_gamma: float = 0.7) -> dict:
    """The ``FINETUNE`` block of a trained model's config: MitoNet_v1's recipe with this
    model's dataset class, classes and label divisor, so finetuning it later picks them."""
    block = copy.deepcopy(registry.get_config("MitoNet_v1")["FINETUNE"])
    block["dataset_class"] = classes.dataset_class
    params = {"weight_gamma": weight_gamma}
    if classes.dataset_class == "PanopticDataset":
        params.update(labels=classes.labels, thing_list=classes.thing_list,
                      label_divisor=classes.label_divisor)
    block["dataset_params"] = params
    block["engine_params"].update(thing_list=classes.thing_list,
                                  label_divisor=classes.label_divisor)
    return block


def validation_metrics(model, config: dict, eval_dir, device="cpu") -> dict:
    """Segment every image of ``eval_dir`` (dataset layout) with ``model`` in eval mode and
    return the mean foreground IoU, F1@0.5 and PQ against the masks."""
    from panoptem.evaluation import evaluate
    from panoptem.inference.engine import Engine2D, Params2D
    from panoptem.loading import LoadedModel

    loaded = LoadedModel(model, config, torch.device(device), False)
    engine = Engine2D(loaded, device=device)
    rows = []
    for image_path, mask_path, _ in find_pairs(eval_dir):
        labels = engine.segment(read_image_8bit(image_path), Params2D())
        m = evaluate(labels, read_mask(mask_path))
        rows.append((m.fg_iou, m.f1, m.pq))
    iou, f1, pq = np.mean(rows, axis=0)
    return {"iou": float(iou), "f1": float(f1), "pq": float(pq)}


def train_model(config=None, *, architecture: str = "PanopticDeepLab",
                train_dir=None, model_dir=None, name: str | None = None,
                iterations: int | None = None, patch_size: int | None = None,
                batch_size: int | None = None, eval_dir=None, device="cpu", seed: int = 0,
                quantize: bool = False, log_path=None, dataset_labels: str | None = None,
                label_divisor: int | None = None, use_cem: bool | None = None,
                finetune_layer: str | None = None, description: str | None = None,
                progress: Progress | None = None) -> TrainedModel:
    """Train the model a config describes and register it.

    Parameters
    ----------
    config : path of a training YAML or the dict it holds ("Custom config"); without one,
        the template of ``architecture`` ("PanopticDeepLab" or "PanopticBiFPN").
    train_dir : dataset folder ``<dir>/<source>/images|masks``; overrides ``TRAIN.train_dir``.
    model_dir : where ``<name>.pth`` / ``.yaml`` go; overrides ``TRAIN.model_dir``.
    name : the model's name; overrides ``model_name``.
    iterations, patch_size, batch_size : override ``TRAIN.iterations`` / ``patch_size`` /
        ``batch_size``.
    eval_dir : validation folder (same layout); overrides ``EVAL.eval_dir``.
    quantize : also write the int8 CPU model (calibrated on training images).
    log_path : a JSON-lines file getting the loss every 10 iterations and each validation.
    dataset_labels : the Train widget's "Dataset labels", one class per line
        ``id,name,instance|semantic``; overrides ``DATASET`` class_names/labels/thing_list.
    label_divisor : how multi-class masks encode classes (``class * divisor + k``);
        overrides ``DATASET.label_divisor`` (default 1000).
    use_cem : start the encoder from the CEM1.5M weights ("Use CEM pretrained weights");
        overrides ``TRAIN.encoder_pretraining``.
    finetune_layer : encoder stages to train ("Finetunable layers"); ``all`` whenever the
        encoder starts from random weights, as in the original.
    description : the model's description ("Description").

    The dataset class follows the classes as in the original (one class:
    SingleClassInstanceDataset, several: PanopticDataset with the label divisor), so no
    config edit is needed; a ``TRAIN.dataset_class`` that contradicts the classes is refused.
    """
    if config is None:
        cfg = training_template(architecture)
    else:
        cfg = copy.deepcopy(config) if isinstance(config, dict) else load_training_config(config)
    if description:
        cfg["description"] = description
    tcfg, dcfg, ecfg = cfg.setdefault("TRAIN", {}), cfg.setdefault("DATASET", {}), cfg.setdefault("EVAL", {})
    mcfg = dict(_require(cfg.get("MODEL"), "MODEL section"))
    name = _require(name or cfg.get("model_name"), "model name (model_name)")
    train_dir = Path(_require(train_dir or tcfg.get("train_dir"), "training folder (TRAIN.train_dir)"))
    model_dir = writable_folder(_require(model_dir or tcfg.get("model_dir"), "output folder (TRAIN.model_dir)"),
                                "model folder")
    name = registry.free_model_name(name, model_dir)  # the files of an earlier model stay
    eval_dir = eval_dir or ecfg.get("eval_dir")
    iterations = int(_require(iterations or tcfg.get("iterations"), "number of iterations (TRAIN.iterations)"))
    patch_size = int(patch_size or tcfg.get("patch_size") or 256)
    batch_size = int(batch_size or tcfg.get("batch_size") or 16)
    arch = _require(mcfg.get("arch"), "architecture (MODEL.arch)")
    from panoptem.training.publish import padding_factor_for

    if patch_size % padding_factor_for(arch):
        raise PanoptemError(f"Patch size must be a multiple of {padding_factor_for(arch)} for {arch}; "
                            f"got {patch_size}.")
    divisor = label_divisor or dcfg.get("label_divisor") or \
        (ecfg.get("engine_params") or {}).get("label_divisor")
    if dataset_labels:
        classes = DatasetClasses.from_text(dataset_labels, divisor)
    else:
        names = dcfg.get("class_names") or {1: "object"}
        labels = dcfg.get("labels") or sorted(int(k) for k in names)
        classes = DatasetClasses.checked(names, labels, dcfg.get("thing_list") or labels, divisor)
    class_names, labels, thing_list = classes.class_names, classes.labels, classes.thing_list
    wanted = tcfg.get("dataset_class")
    if wanted and wanted != classes.dataset_class:
        raise PanoptemError(
            f"TRAIN.dataset_class is {wanted} but the dataset has {len(labels)} class(es), which "
            f"needs {classes.dataset_class}; remove TRAIN.dataset_class (it follows the classes)."
        )
    if mcfg.get("num_classes") is None:
        mcfg["num_classes"] = 1 if len(labels) == 1 else len(labels) + 1
    if not thing_list:  # no instance class: no instance decoder (as the original)
        mcfg["ins_decoder"] = False
    prog = ensure_progress(progress)
    if use_cem is not None:
        tcfg["encoder_pretraining"] = "cem" if use_cem else None
    pretraining = tcfg.get("encoder_pretraining")
    if pretraining not in (None, "none", "random", "cem"):
        raise PanoptemError(f"TRAIN.encoder_pretraining must be cem or null; got {pretraining!r}.")
    if finetune_layer is not None:
        tcfg["finetune_layer"] = finetune_layer if pretraining == "cem" else "all"
    pairs = find_pairs(train_dir)  # before any work: enough pairs for one batch
    for extra in tcfg.get("additional_train_dirs") or []:
        pairs += find_pairs(extra)
    check_batch(pairs, batch_size, train_dir)
    cem_path = _fetch_cem_weights(mcfg.get("encoder"), prog) if pretraining == "cem" else None

    torch.manual_seed(seed)
    from panoptem.models import build_model

    model = build_model(mcfg)
    norms = dict(dcfg.get("norms") or {})
    if cem_path is not None:
        cem_norms = _load_cem_weights(model, cem_path)
        if norms.get("mean") is None:
            norms = cem_norms
    if norms.get("mean") is None or norms.get("std") is None:
        norms = image_norms(pairs)
    transforms = augmentations_from_config(tcfg.get("augmentations"), patch_size, seed)
    gamma = (tcfg.get("dataset_params") or {}).get("weight_gamma", 0.0)
    dataset = classes.dataset(pairs, transforms=transforms, norms=norms, seed=seed,
                              weight_gamma=gamma)

    infer_config = {"class_names": class_names, "labels": labels, "thing_list": thing_list,
                    "padding_factor": padding_factor_for(arch), "norms": norms}
    log = open(log_path, "a") if log_path else None  # noqa: SIM115 - closed in finally
    start = time.perf_counter()

    def evaluate(m):
        metrics = validation_metrics(m, infer_config, eval_dir, device)
        if log:
            log.write(json.dumps({"validation": metrics, "seconds": time.perf_counter() - start}) + "\n")
            log.flush()
        return metrics

    def log_loss(it: int, loss: float) -> None:
        if it % 10 == 0:
            log.write(json.dumps({"iteration": it, "loss": loss,
                                  "seconds": round(time.perf_counter() - start, 1)}) + "\n")
            log.flush()

    description = (cfg.get("description") or
                   f"{arch} ({mcfg.get('encoder')}) trained from scratch with panoptem on {train_dir} "
                   f"for {iterations} iterations.")
    cfg["MODEL"], cfg["model_name"], cfg["description"] = mcfg, name, description
    cfg["DATASET"].update(class_names=class_names, labels=labels, thing_list=thing_list, norms=norms)
    checkpoint_path = free_path(model_dir / f"{name}_checkpoint.pth.tar")

    def checkpoint(m, iteration: int) -> None:  # weights, config and norms, as the original
        save_checkpoint(checkpoint_path, m, cfg, norms, iteration)

    sched = tcfg.get("schedule_params") or {}
    try:
        with keep_checkpoint_on_cancel(checkpoint_path):
            result = train(
                model, dataset, iterations=iterations, batch_size=batch_size,
                max_lr=float(sched.get("max_lr") or 0.003),
                pct_start=float(sched.get("pct_start") or 0.3),
                weight_decay=float((tcfg.get("optimizer_params") or {}).get("weight_decay", 0.1)),
                finetune_layer=tcfg.get("finetune_layer") or "all",
                criterion_params=tcfg.get("criterion_params"), device=device,
                amp=bool(tcfg.get("amp", True)),
                workers=min(int(tcfg.get("workers") or 0), os.cpu_count() or 1),
                seed=seed, evaluate=evaluate if eval_dir else None,
                eval_every=int(ecfg.get("eval_every") or 0),
                checkpoint=checkpoint, save_every=max(1, iterations // 5),
                on_iteration=log_loss if log else None, progress=prog)
    finally:
        if log:
            log.close()
    seconds = time.perf_counter() - start
    model.eval()
    model.cpu()
    quantized = None
    if quantize:
        from panoptem.models.quantize import quantize_model

        quantized = quantize_model(model, calibration_from_pairs(mcfg, norms, pairs), progress=prog)
    exported = publish_model(model, name, model_dir, arch=arch, class_names=class_names,
                             labels=labels, thing_list=thing_list, norms=norms,
                             description=description, quantized=quantized,
                             finetune=finetune_block(classes, gamma))
    return TrainedModel(exported, result.losses, result.evaluations, seconds,
                        exported.model_path.with_name(f"{exported.model_path.stem}_quantized.pth")
                        if quantize else None)
