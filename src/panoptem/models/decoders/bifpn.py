"""Bidirectional feature pyramid (BiFPN, EfficientDet) and its upsampling decoder.

Pyramid levels are named by stride: P3..P5 come from the encoder (1/8, 1/16, 1/32), P6 and
P7 (1/64, 1/128) are added here, so inputs must be multiples of 128.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from panoptem.models.blocks import (
    Resample2d,
    conv_bn_act,
    conv_transpose_bn_act,
    init_glorot,
    separable_conv_bn_act,
)

__all__ = ["BiFPN", "BiFPNDecoder"]


def _up2(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2.0, mode="nearest")


def _down2(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)


def _after_combine_block(fpn_dim: int, depthwise: bool) -> nn.Sequential:
    if depthwise:
        return separable_conv_bn_act(fpn_dim, fpn_dim, 3, activation=nn.SiLU(inplace=True))
    return conv_bn_act(fpn_dim, fpn_dim, 3)


def _normalised(weights: torch.Tensor, eps: float) -> torch.Tensor:
    w = F.relu(weights)
    return w / (w.sum() + eps)


class _FPNPass(nn.Module):
    """Shared parts of a top-down or bottom-up pass.

    ``resamplings`` (one :class:`Resample2d` per input channel count), ``after_combines``
    (the **same** conv block instance repeated once per level, i.e. shared weights) and the
    fusion ``weights`` (length ``len(nins) + 1``, indexed with a sliding window; ReLU'd and
    normalised by their sum + ``eps``).
    """

    def __init__(self, nins: list[int], fpn_dim: int, depthwise: bool) -> None:
        super().__init__()
        self.resamplings = nn.ModuleList([Resample2d(n, fpn_dim) for n in nins])
        block = _after_combine_block(fpn_dim, depthwise)
        self.after_combines = nn.ModuleList([block for _ in nins])
        self.weights = nn.Parameter(torch.ones(len(nins) + 1))
        self.eps = 1e-4


class TopDownFPN(_FPNPass):
    """Top-down pass. ``forward([P7, P6, ..., P3])`` -> ``[P7, td6, ..., td3]`` (fpn_dim)."""

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        w = _normalised(self.weights, self.eps)
        out = [features[0]]
        for i, (resample, combine) in enumerate(
            zip(self.resamplings, self.after_combines)  # noqa: B905 (TorchScript has no strict=)
        ):
            w1 = w[i]
            w2 = w[i + 1]
            fused = w1 * _up2(out[-1]) + w2 * resample(features[i + 1])
            out.append(combine(fused / (w1 + w2 + self.eps)))
        return out


class BottomUpFPN(_FPNPass):
    """Bottom-up pass.

    ``forward(pyramid [P4..P7], top_down [td3, td4, ..., P7])`` -> ``[td3, out4, ..., out7]``.
    Inner levels fuse three maps (down-sampled finer output, resampled input, top-down map);
    the coarsest fuses two.
    """

    def forward(
        self, features: list[torch.Tensor], top_down: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        w = _normalised(self.weights, self.eps)
        out = [top_down[0]]
        last = len(self.resamplings) - 1
        for i, (resample, combine) in enumerate(
            zip(self.resamplings, self.after_combines)  # noqa: B905 (TorchScript has no strict=)
        ):
            lateral = resample(features[i])
            if i < last:
                w1 = w[i]
                w2 = w[i + 1]
                w3 = w[i + 2]
                fused = w1 * _down2(out[-1]) + w2 * lateral + w3 * top_down[i + 1]
                fused = fused / (w1 + w2 + w3 + self.eps)
            else:
                w1 = w[i]
                w2 = w[i + 1]
                fused = (w1 * _down2(out[-1]) + w2 * lateral) / (w1 + w2 + self.eps)
            out.append(combine(fused))
        return out


class BiFPNLayer(nn.Module):
    """One top-down + bottom-up BiFPN layer: [P3..P7] (channels ``nins``) -> 5 x fpn_dim."""

    def __init__(self, nins: list[int], fpn_dim: int, depthwise: bool = True) -> None:
        super().__init__()
        self.top_down_fpn = TopDownFPN(nins[::-1][1:], fpn_dim, depthwise)
        self.bottom_up_fpn = BottomUpFPN(nins[1:], fpn_dim, depthwise)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        top_down = self.top_down_fpn(features[::-1])
        return self.bottom_up_fpn(features[1:], top_down[::-1])


class BiFPN(nn.Module):
    """BiFPN over encoder maps P3..P5.

    Parameters
    ----------
    nins : list of int
        Channels of P3, P4, P5.
    fpn_dim : int
        Channels inside the pyramid.
    num_layers : int
        Number of stacked :class:`BiFPNLayer` (``bifpns.i``).
    depthwise : bool
        Separable 3 x 3 conv + BN + SiLU after each fusion (else 3 x 3 conv + BN + ReLU).

    Notes
    -----
    ``forward([P3, P4, P5])`` -> ``[P3', ..., P7']``, each (N, fpn_dim, H/s, W/s) for
    s = 8 .. 128. P6 = maxpool-down(``p6_resample``(P5)), P7 = maxpool-down(P6).
    """

    def __init__(
        self, nins: list[int], fpn_dim: int, num_layers: int = 3, depthwise: bool = True
    ) -> None:
        super().__init__()
        nins = [int(n) for n in nins]
        self.p6_resample = Resample2d(nins[-1], fpn_dim)
        level_nins = nins + [fpn_dim, fpn_dim]
        self.bifpns = nn.ModuleList()
        for i in range(num_layers):
            layer_nins = level_nins if i == 0 else [fpn_dim] * len(level_nins)
            self.bifpns.append(BiFPNLayer(layer_nins, fpn_dim, depthwise))

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        p6 = _down2(self.p6_resample(features[-1]))
        p7 = _down2(p6)
        pyramid = features + [p6, p7]
        for layer in self.bifpns:
            pyramid = layer(pyramid)
        return pyramid


class BiFPNDecoder(nn.Module):
    """Upsampling decoder from P7 to P2.

    ``upsamplings.i`` = ConvTranspose 2 x 2 / 2 + BN + ReLU (first from fpn_dim, later from
    2 * fpn_dim), each followed by concatenation with the next finer level; ``fusion`` =
    5 x 5 separable conv + BN + ReLU (2 * fpn_dim -> fpn_dim).

    ``forward([P7, P6, P5, P4, P3, P2])`` -> (N, fpn_dim, H/4, W/4).
    """

    def __init__(self, fpn_dim: int, n_fpn_scales: int = 5) -> None:
        super().__init__()
        self.n_fpn_scales = n_fpn_scales
        self.upsamplings = nn.ModuleList(
            [
                conv_transpose_bn_act(fpn_dim if i == 0 else 2 * fpn_dim, fpn_dim, 2)
                for i in range(n_fpn_scales)
            ]
        )
        self.fusion = separable_conv_bn_act(2 * fpn_dim, fpn_dim, 5)
        self.apply(init_glorot)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = features[0]
        for i, upsample in enumerate(self.upsamplings):
            x = torch.cat([upsample(x), features[i + 1]], dim=1)
        return self.fusion(x)
