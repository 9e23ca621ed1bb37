"""One training loop for finetuning and for training from scratch (reference §7.4-7.5).

The unit of work is the iteration (one batch). Batches are drawn with replacement by a
weighted sampler (the dataset's per-source weights, uniform when it has none), so any
number of iterations works, however small the dataset. Optimiser AdamW with weight decay
0.1 on weights and none on biases and normalisation parameters; OneCycle learning rate
(max 0.003, 30 % warm-up) over the run; mixed precision on CUDA; the PanopticLoss.
Encoder layers are frozen according to ``finetune_layer`` (SPEC §5.8): ``none`` freezes the
whole encoder, ``stage4`` .. ``stage1`` unfreeze ResNet ``layer4`` .. ``layer1`` upwards,
``all`` trains everything. Progress: one step per iteration; a cancel stops between
iterations.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, WeightedRandomSampler

from panoptem._files import atomic_path
from panoptem.errors import Cancelled, PanoptemError
from panoptem.progress import Progress, ensure_progress
from panoptem.training.losses import PanopticLoss

__all__ = ["FINETUNE_LAYERS", "TrainResult", "set_trainable", "param_groups", "train", "save_checkpoint",
           "keep_checkpoint_on_cancel"]

FINETUNE_LAYERS = ("none", "stage4", "stage3", "stage2", "stage1", "all")


def set_trainable(model: torch.nn.Module, finetune_layer: str = "all") -> list[str]:
    """Freeze encoder parameters according to ``finetune_layer``; return the trainable names.

    Decoder, heads and PointRend always train. ``stageN`` unfreezes ``encoder.layerN`` and
    every later stage; ``all`` also unfreezes the stem.
    """
    if finetune_layer not in FINETUNE_LAYERS:
        raise PanoptemError(f"Finetunable layers must be one of {', '.join(FINETUNE_LAYERS)}; got {finetune_layer!r}.")
    first = {"stage4": 4, "stage3": 3, "stage2": 2, "stage1": 1}.get(finetune_layer)
    open_layers = tuple(f"encoder.layer{i}." for i in range(first, 5)) if first else ()
    trainable = []
    for name, p in model.named_parameters():
        is_encoder = name.startswith("encoder.")
        p.requires_grad = (not is_encoder or finetune_layer == "all"
                           or (bool(open_layers) and name.startswith(open_layers)))
        if p.requires_grad:
            trainable.append(name)
    return trainable


def param_groups(model: torch.nn.Module, weight_decay: float = 0.1) -> list[dict]:
    """AdamW groups: decay on weight tensors, none on biases and norm parameters (1-D)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


@dataclass
class TrainResult:
    """Loss per iteration (total and parts) and validation metrics per evaluation."""

    losses: list = field(default_factory=list)
    parts: list = field(default_factory=list)
    evaluations: list = field(default_factory=list)


def _to(batch: dict, device) -> dict:
    # non-blocking only to CUDA, from the loader's pinned memory: a non-blocking copy from
    # pageable memory to MPS may read its source after it is freed
    fast = torch.device(device).type == "cuda"
    return {k: (v.to(device, non_blocking=fast) if torch.is_tensor(v) else v) for k, v in batch.items()}


def train(model: torch.nn.Module, dataset, *, iterations: int, batch_size: int = 16,
          max_lr: float = 0.003, pct_start: float = 0.3, weight_decay: float = 0.1,
          finetune_layer: str = "all", criterion_params: dict | None = None, device="cpu",
          amp: bool = True, workers: int = 0, seed: int = 0,
          evaluate: Callable[[torch.nn.Module], dict] | None = None, eval_every: int = 0,
          checkpoint: Callable[[torch.nn.Module, int], None] | None = None, save_every: int = 0,
          on_iteration: Callable[[int, float], None] | None = None,
          progress: Progress | None = None) -> TrainResult:
    """Train ``model`` in place for ``iterations`` batches of ``dataset``.

    Parameters
    ----------
    model : nn.Module or TorchScript module in train mode returning the train-mode dict
    dataset : torch Dataset of dicts with 'image' (1, H, W), 'sem', 'ctr_hmp', 'offsets';
        an optional ``weights`` attribute gives per-item sampling weights.
    evaluate : callable(model) -> dict of metrics, run every ``eval_every`` iterations and at
        the end (the model is put in eval mode around it).
    checkpoint : callable(model, iteration), run every ``save_every`` iterations and at the end.
    on_iteration : callable(iteration, loss) after every iteration (e.g. a loss log).

    ``progress`` counts iterations and its :meth:`~panoptem.progress.Progress.note` shows the
    loss and the last validation as they come.
    """
    if iterations < 1:
        raise PanoptemError(f"Iterations must be at least 1; got {iterations}.")
    if len(dataset) == 0:
        raise PanoptemError("The training dataset is empty; add image/mask pairs.")
    device = torch.device(device)
    prog = ensure_progress(progress)
    set_trainable(model, finetune_layer)
    model.to(device).train()
    gen = torch.Generator().manual_seed(seed)
    weights = getattr(dataset, "weights", None)
    weights = torch.as_tensor(weights if weights is not None else [1.0] * len(dataset), dtype=torch.double)
    sampler = WeightedRandomSampler(weights, num_samples=iterations * batch_size, replacement=True,
                                    generator=gen)
    # forking the process from a thread other than the main one (a napari worker: the GUI
    # and its threads are mid-flight) gives workers that can die at exit; spawn them instead
    context = None
    if workers > 0 and threading.current_thread() is not threading.main_thread():
        context = "spawn"
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                        drop_last=True, pin_memory=device.type == "cuda",
                        multiprocessing_context=context)
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay), lr=max_lr)
    # OneCycle divides by zero when the warm-up is exactly one step (e.g. 10 iterations at
    # 0.1); such runs get a two-step warm-up
    pct_start = float(pct_start)
    if abs(pct_start * iterations - 1.0) < 1e-9:
        pct_start = 2.0 / iterations
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, total_steps=iterations,
                                                   pct_start=pct_start)
    use_amp = amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    criterion = PanopticLoss(**(criterion_params or {}))
    result = TrainResult()
    prog.stage("training", iterations)
    for it, batch in enumerate(loader, start=1):
        batch = _to(batch, device)
        with torch.autocast(device_type=device.type, enabled=use_amp):
            output = model(batch["image"])
            loss, parts = criterion(output, batch)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        schedule.step()
        result.losses.append(float(loss.detach()))
        result.parts.append(parts)
        if on_iteration is not None:
            on_iteration(it, result.losses[-1])
        last = it == iterations
        if evaluate is not None and ((eval_every and it % eval_every == 0) or last):
            model.eval()
            with torch.no_grad():
                result.evaluations.append({"iteration": it, **evaluate(model)})
            model.train()
        if checkpoint is not None and ((save_every and it % save_every == 0) or last):
            checkpoint(model, it)
        prog.note(_read_out(result))
        prog.advance()
    return result


def _read_out(result: TrainResult) -> str:
    """The live read-out of a run: the loss, and the last validation when there is one."""
    text = f"loss {result.losses[-1]:.3f}"
    if result.evaluations:
        names = {"iou": "IoU", "f1": "F1", "pq": "PQ"}
        shown = [f"{names.get(k, k)} {v:.3f}" for k, v in result.evaluations[-1].items()
                 if k != "iteration" and isinstance(v, float)]
        text += (", validation " + " ".join(shown)) if shown else ""
    return text


def save_checkpoint(path, model: torch.nn.Module, arch_config: dict, norms: dict, iteration: int) -> Path:
    """Save ``{arch config, state_dict, norms, iteration}`` like the original's ``.pth.tar``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save({"config": arch_config, "state_dict": model.state_dict(), "norms": norms,
                    "iteration": iteration}, tmp)
    return path


@contextmanager
def keep_checkpoint_on_cancel(path: Path) -> Iterator[None]:
    """A cancel inside the block says where the last checkpoint is (when one was written)."""
    try:
        yield
    except Cancelled as err:
        if Path(path).exists():
            raise Cancelled(*err.args, kept=f"The last checkpoint is kept in {path}.") from None
        raise
