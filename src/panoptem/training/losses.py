"""The panoptic training loss (reference §7.6): semantic, centre heat map, offsets, PointRend.

``PanopticLoss = ce_weight * BootstrapCE + mse_weight * MSE(heat map)
+ l1_weight * L1(offsets on foreground) + pr_weight * PointRend point loss``, with the
original's defaults (1, 200, 0.01, 1; top 20 % of pixel losses).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BootstrapCE", "HeatmapMSE", "OffsetL1", "PointRendLoss", "PanopticLoss"]


def _pixel_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-pixel loss: BCE with logits for one channel, cross-entropy for several."""
    if logits.shape[1] == 1:
        target = target.float()
        if target.dim() == logits.dim() - 1:
            target = target.unsqueeze(1)
        return F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    if target.dim() == logits.dim():
        target = target.squeeze(1)
    return F.cross_entropy(logits, target.long(), reduction="none")


class BootstrapCE(nn.Module):
    """Mean of the ``top_k_percent`` largest per-pixel losses (hard-pixel mining)."""

    def __init__(self, top_k_percent: float = 0.2) -> None:
        super().__init__()
        self.top_k_percent = float(top_k_percent)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = _pixel_ce(logits, target).flatten()
        if self.top_k_percent >= 1.0:
            return loss.mean()
        k = max(1, int(self.top_k_percent * loss.numel()))
        return loss.topk(k).values.mean()


class HeatmapMSE(nn.Module):
    """Mean squared error of the centre heat map."""

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(pred, target)


class OffsetL1(nn.Module):
    """L1 of the offsets summed over foreground pixels, divided by their number (0 if none)."""

    def forward(self, pred: torch.Tensor, target: torch.Tensor, sem: torch.Tensor) -> torch.Tensor:
        fg = (sem > 0).float()
        if fg.dim() == pred.dim() - 1:
            fg = fg.unsqueeze(1)
        n = fg.sum()
        if n == 0:
            return pred.sum() * 0.0
        return (torch.abs(pred - target) * fg).sum() / n


class PointRendLoss(nn.Module):
    """Loss of the PointRend point logits against the target sampled at the points.

    ``point_coords`` (N, P, 2) hold (x, y) in [0, 1]; labels are read with nearest sampling.
    """

    def forward(self, sem_points: torch.Tensor, point_coords: torch.Tensor,
                sem: torch.Tensor) -> torch.Tensor:
        target = sem.float()
        if target.dim() == 3:
            target = target.unsqueeze(1)
        grid = (2.0 * point_coords - 1.0).unsqueeze(2)  # (N, P, 1, 2)
        labels = F.grid_sample(target, grid, mode="nearest", align_corners=False)[..., 0]  # (N, 1, P)
        if sem_points.shape[1] == 1:
            return F.binary_cross_entropy_with_logits(sem_points, labels)
        return F.cross_entropy(sem_points, labels[:, 0].long())


class PanopticLoss(nn.Module):
    """Weighted sum of the four parts; returns ``(total, {part name: float})``.

    ``output`` is the model's train-mode dict (``sem_logits``, ``ctr_hmp``, ``offsets`` and,
    for PointRend models, ``sem_points`` and ``point_coords``); ``target`` holds ``sem``,
    ``ctr_hmp`` and ``offsets`` as made by :mod:`panoptem.training.targets`.
    """

    def __init__(self, ce_weight: float = 1.0, mse_weight: float = 200.0, l1_weight: float = 0.01,
                 top_k_percent: float = 0.2, pr_weight: float = 1.0) -> None:
        super().__init__()
        self.ce_weight, self.mse_weight = ce_weight, mse_weight
        self.l1_weight, self.pr_weight = l1_weight, pr_weight
        self.ce = BootstrapCE(top_k_percent)
        self.mse = HeatmapMSE()
        self.l1 = OffsetL1()
        self.pr = PointRendLoss()

    def forward(self, output: dict, target: dict):
        parts = {
            "ce": self.ce(output["sem_logits"], target["sem"]),
            "mse": self.mse(output["ctr_hmp"], target["ctr_hmp"]),
            "l1": self.l1(output["offsets"], target["offsets"], target["sem"]),
        }
        total = (self.ce_weight * parts["ce"] + self.mse_weight * parts["mse"]
                 + self.l1_weight * parts["l1"])
        if "sem_points" in output and "point_coords" in output:
            parts["pointrend"] = self.pr(output["sem_points"], output["point_coords"], target["sem"])
            total = total + self.pr_weight * parts["pointrend"]
        return total, {k: float(v.detach()) for k, v in parts.items()}
