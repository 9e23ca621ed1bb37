"""Small building blocks shared by the encoders, decoders and heads.

The attribute names and the order in which sub-modules are registered are chosen so that
state-dict keys equal those of the original empanada models (for example a separable
convolution stores its two convolutions as ``sepconv.0`` and ``sepconv.1``, and a
conv-BN-activation block is a plain ``nn.Sequential`` with children ``0``, ``1``, ``2``).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.ao.quantization import fuse_modules

__all__ = [
    "SeparableConv2d",
    "Resample2d",
    "conv_bn_act",
    "separable_conv_bn_act",
    "conv_transpose_bn_act",
    "fuse_sequential",
    "init_small_normal",
    "init_glorot",
]


class SeparableConv2d(nn.Module):
    """Depthwise k x k convolution followed by a pointwise 1 x 1 convolution.

    Parameters
    ----------
    nin, nout : int
        Input and output channels.
    kernel_size : int
        Size of the depthwise kernel; padding ``(kernel_size - 1) // 2`` keeps the size
        when ``stride`` is 1.
    stride : int
        Stride of the depthwise convolution.
    bias : bool
        Whether both convolutions have a bias.

    Notes
    -----
    Input (N, nin, H, W) -> output (N, nout, H / stride, W / stride).
    """

    def __init__(
        self, nin: int, nout: int, kernel_size: int = 3, stride: int = 1, bias: bool = True
    ) -> None:
        super().__init__()
        pad = (kernel_size - 1) // 2
        depthwise = nn.Conv2d(
            nin, nin, kernel_size, stride=stride, padding=pad, groups=nin, bias=bias
        )
        pointwise = nn.Conv2d(nin, nout, 1, bias=bias)
        self.sepconv = nn.Sequential(depthwise, pointwise)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sepconv(x)


def _with_activation(layers: list[nn.Module], activation: nn.Module | None) -> nn.Sequential:
    if activation is not None:
        layers.append(activation)
    return nn.Sequential(*layers)


def conv_bn_act(
    nin: int,
    nout: int,
    kernel_size: int,
    stride: int = 1,
    groups: int = 1,
    activation: nn.Module | None = None,
    relu: bool = True,
) -> nn.Sequential:
    """Convolution (no bias) + BatchNorm + optional activation, as ``Sequential(0, 1[, 2])``.

    ``activation`` wins over ``relu``; with neither, the block ends at the BatchNorm.
    Shapes: (N, nin, H, W) -> (N, nout, H / stride, W / stride).
    """
    if activation is None and relu:
        activation = nn.ReLU(inplace=True)
    conv = nn.Conv2d(
        nin,
        nout,
        kernel_size,
        stride=stride,
        padding=(kernel_size - 1) // 2,
        groups=groups,
        bias=False,
    )
    return _with_activation([conv, nn.BatchNorm2d(nout)], activation)


def separable_conv_bn_act(
    nin: int,
    nout: int,
    kernel_size: int,
    stride: int = 1,
    activation: nn.Module | None = None,
    relu: bool = True,
) -> nn.Sequential:
    """:class:`SeparableConv2d` (no bias) + BatchNorm + optional activation (ReLU default).

    Shapes: (N, nin, H, W) -> (N, nout, H / stride, W / stride).
    """
    if activation is None and relu:
        activation = nn.ReLU(inplace=True)
    sep = SeparableConv2d(nin, nout, kernel_size, stride, bias=False)
    return _with_activation([sep, nn.BatchNorm2d(nout)], activation)


def conv_transpose_bn_act(nin: int, nout: int, kernel_size: int) -> nn.Sequential:
    """Transposed convolution (kernel = stride = ``kernel_size``, no bias) + BN + ReLU.

    Shapes: (N, nin, H, W) -> (N, nout, H * kernel_size, W * kernel_size).
    """
    up = nn.ConvTranspose2d(nin, nout, kernel_size, stride=kernel_size, bias=False)
    return nn.Sequential(up, nn.BatchNorm2d(nout), nn.ReLU(inplace=True))


class Resample2d(nn.Module):
    """1 x 1 conv + BN that changes channels and/or stride; identity when neither changes.

    The layer is stored as ``conv`` (``conv.0`` convolution, ``conv.1`` BatchNorm).
    Shapes: (N, nin, H, W) -> (N, nout, H / stride, W / stride).
    """

    def __init__(self, nin: int, nout: int, stride: int = 1) -> None:
        super().__init__()
        if nin != nout or stride > 1:
            self.conv: nn.Module = conv_bn_act(nin, nout, 1, stride=stride, relu=False)
        else:
            self.conv = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def fuse_sequential(seq: nn.Module, names: list[str]) -> None:
    """Fold ``names`` (conv, BN and/or ReLU children of ``seq``) into one module, in place.

    Only valid in eval mode: BatchNorm running statistics are folded into the conv.
    """
    fuse_modules(seq, names, inplace=True)


def init_small_normal(m: nn.Module) -> None:
    """Conv2d weights ~ N(0, 0.001); BatchNorm weight 1, bias 0 (use with ``Module.apply``)."""
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, std=0.001)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def _glorot_uniform_(w: torch.Tensor, groups: int = 1) -> None:
    # uniform variance scaling with the average of fan-in and fan-out (EfficientDet style)
    receptive = w[0][0].numel() if w.dim() > 2 else 1
    fan_in = w.size(1) * receptive
    fan_out = (w.size(0) * receptive) // groups
    limit = math.sqrt(3.0 / max(1.0, (fan_in + fan_out) / 2.0))
    with torch.no_grad():
        w.uniform_(-limit, limit)


def init_glorot(m: nn.Module) -> None:
    """EfficientDet-style init for the BiFPN decoder (use with ``Module.apply``)."""
    if isinstance(m, SeparableConv2d):
        dw, pw = m.sepconv[0], m.sepconv[1]
        _glorot_uniform_(dw.weight, groups=dw.groups)
        _glorot_uniform_(pw.weight)
    elif isinstance(m, nn.Conv2d):
        _glorot_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
