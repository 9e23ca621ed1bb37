"""The panoptic loss on hand-made cases and on a model's train-mode output."""

import math

import pytest
import torch

from panoptem.models import build_model
from panoptem.training.losses import BootstrapCE, OffsetL1, PanopticLoss, PointRendLoss
from testutils import SMALL_ARCH


def test_bootstrap_ce_keeps_hardest_pixels():
    logits = torch.tensor([[[[10.0, -10.0, 0.0, 0.0]]]])
    target = torch.tensor([[[[1.0, 1.0, 1.0, 0.0]]]])
    per_pixel = torch.tensor(
        [math.log1p(math.exp(-10)), math.log1p(math.exp(10)), math.log(2), math.log(2)]
    )
    assert BootstrapCE(0.25)(logits, target).item() == pytest.approx(
        per_pixel.max().item(), rel=1e-5
    )
    assert BootstrapCE(1.0)(logits, target).item() == pytest.approx(
        per_pixel.mean().item(), rel=1e-5
    )
    # several classes: cross-entropy against class indices
    multi = torch.zeros(1, 3, 1, 2)
    multi[0, 2, 0, 0] = 5.0
    assert (
        BootstrapCE(1.0)(multi, torch.tensor([[[2, 0]]])).item()
        < BootstrapCE(1.0)(multi, torch.tensor([[[0, 2]]])).item()
    )


def test_offset_l1_counts_foreground_only():
    pred = torch.zeros(1, 2, 2, 2)
    target = torch.ones(1, 2, 2, 2)
    sem = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    assert OffsetL1()(pred, target, sem).item() == pytest.approx(2.0)  # |1|+|1| over one pixel
    assert OffsetL1()(pred, target, torch.zeros_like(sem)).item() == 0.0


def test_pointrend_loss_samples_labels_at_points():
    sem = torch.zeros(1, 1, 4, 4)
    sem[..., :, 2:] = 1.0  # right half foreground
    coords = torch.tensor([[[0.9, 0.5], [0.1, 0.5]]])  # (x, y): one right, one left
    good = torch.tensor([[[10.0, -10.0]]])
    bad = -good
    assert PointRendLoss()(good, coords, sem) < 1e-3 < PointRendLoss()(bad, coords, sem)


def test_panoptic_loss_on_model_output_backpropagates():
    torch.manual_seed(0)
    model = build_model(SMALL_ARCH).train()
    x = torch.randn(2, 1, 64, 64)
    out = model(x)
    target = {
        "sem": (torch.rand(2, 1, 64, 64) > 0.5).float(),
        "ctr_hmp": torch.rand(2, 1, 64, 64),
        "offsets": torch.randn(2, 2, 64, 64),
    }
    total, parts = PanopticLoss()(out, target)
    assert set(parts) == {"ce", "mse", "l1", "pointrend"}
    expected = parts["ce"] + 200 * parts["mse"] + 0.01 * parts["l1"] + parts["pointrend"]
    assert total.item() == pytest.approx(expected, rel=1e-5)
    total.backward()
    assert model.semantic_head.head[-1].weight.grad is not None
