"""Prediction heads."""

from __future__ import annotations

import torch
from torch import nn

from panoptem.models.blocks import init_small_normal, separable_conv_bn_act

__all__ = ["PanopticDeepLabHead"]


class PanopticDeepLabHead(nn.Module):
    """5 x 5 separable conv + BN + ReLU (nin -> nin), then a 1 x 1 conv with bias to ``nout``.

    Stored as ``head.0`` (separable block) and ``head.1`` (final conv). No output activation.
    Shapes: (N, nin, h, w) -> (N, nout, h, w).
    """

    def __init__(self, nin: int, nout: int) -> None:
        super().__init__()
        self.head = nn.Sequential(
            separable_conv_bn_act(nin, nin, 5),
            nn.Conv2d(nin, nout, 1, bias=True),
        )
        self.apply(init_small_normal)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)
