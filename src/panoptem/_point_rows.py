"""PointRend's point head on points as rows, for the channels-last CPU model.

The file's point head keeps its points as a 1-D signal, ``(N, channels, points)``, and
concatenates the coarse logits to every layer's input along the channels. On a CPU with
channels-last oneDNN convolutions (:mod:`panoptem._conv_graph`) that layout costs twice:
oneDNN re-orders each layer's input and output to its blocked layout and back, and the
features are sampled by ``grid_sample``, which gathers one channel at a time. Here the
points are rows, ``(points, channels)``, which is the channels-last layout of a
``(1, channels, 1, points)`` image:

- the features (or, where the map has fewer pixels than there are points, their
  projection by the first layer, as :mod:`panoptem._point_head_graph` does) are sampled
  with ``embedding_bag``: each point is the weighted sum of the rows of its four
  neighbouring pixels, with the weights of ``grid_sample``'s bilinear sampling
  (``align_corners=False``, zeros outside the map);
- each layer is a 1 x 1 convolution of the rows seen as that image, which the
  channels-last conversion makes a ``mkldnn::_convolution_pointwise`` call with the ReLU
  fused, reading and writing rows as they are.

MitoNet_v1 at 256 x 256 on one thread (2 cores, AMD EPYC, AVX-512): 177-182 against
185-193 ms per forward pass; at 64 x 256, 65-67 against 72-75 ms. The outputs equal the
file's to float32 rounding (within 1e-5 on the logits).

:func:`rows_head` is TorchScript source: :func:`replacement` scripts and inlines it into the
IR that replaces the file's point head. Its arguments are the pattern's inputs in
:mod:`panoptem._point_head_graph`, in that order; ``mode``, ``pad`` and ``ac`` must be
bilinear, zeros and False (the rewrite checks) and the rest of the convolution arguments
are point-wise (checked there too).
"""

from __future__ import annotations

import functools

import torch
from torch.nn import functional as F

__all__ = ["rows_head", "replacement"]


def _rows_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """ReLU of the 1 x 1 convolution of rows ``x`` (points, channels) with a 1-D kernel
    ``weight`` (out, channels, 1): rows (points, out)."""
    n, c = x.shape[0], x.shape[1]
    y = F.conv2d(x.view(1, 1, n, c).permute(0, 3, 1, 2), weight.unsqueeze(3), bias)
    return torch.relu(y).permute(0, 2, 3, 1).reshape(n, weight.shape[0])


def rows_head(features: torch.Tensor, grid: torch.Tensor, mode: int, pad: int, ac: bool,
              sq: int, coarse: torch.Tensor, dim: int, w0: torch.Tensor, b0: torch.Tensor,
              w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
              wp: torch.Tensor, bp: torch.Tensor, s: list[int], p: list[int],
              g: int) -> torch.Tensor:
    """The point head's logits (N, classes, points) for ``features`` (N, C, h, w) sampled at
    ``grid`` (N, points, 1, 2) in [-1, 1], and the coarse logits there (N, classes,
    points), with three layers of ``fc`` channels (``w0`` (fc, C + classes, 1) ...) and
    a predictor ``wp`` (classes, fc + classes, 1)."""
    b, h, w = features.shape[0], features.shape[2], features.shape[3]
    n = grid.shape[1]
    fc = w0.shape[0]
    k = w1.shape[1] - fc  # classes
    c = w0.shape[1] - k  # feature channels
    # the four taps of each point, as grid_sample unnormalises (align_corners=False); the
    # same as panoptem.models.point_rend.bilinear_taps, which the loading layer may not
    # import (the import-linter contracts in pyproject.toml)
    ix = (grid[:, :, 0, 0] + 1.0) * (w * 0.5) - 0.5
    iy = (grid[:, :, 0, 1] + 1.0) * (h * 0.5) - 0.5
    x0 = torch.floor(ix)
    y0 = torch.floor(iy)
    fx = ix - x0
    fy = iy - y0
    gx = 1.0 - fx
    gy = 1.0 - fy
    xi = x0.long()
    yi = y0.long()
    xs = torch.stack([xi, xi + 1, xi, xi + 1], 2)
    ys = torch.stack([yi, yi, yi + 1, yi + 1], 2)
    inside = (xs >= 0) & (xs < w) & (ys >= 0) & (ys < h)  # zeros outside the map
    weights = (torch.stack([gx * gy, fx * gy, gx * fy, fx * fy], 2)
               * inside.to(gx.dtype)).reshape(b * n * 4)
    first = (torch.arange(b, device=grid.device) * (h * w)).view(b, 1, 1)  # image's row 0
    taps = (ys.clamp(0, h - 1) * w + xs.clamp(0, w - 1) + first).reshape(b * n * 4)
    bags = torch.arange(0, b * n * 4, 4, device=grid.device)
    crow = coarse.permute(0, 2, 1).reshape(b * n, k)
    if h * w < n:  # project first: W_f sample(F) == sample(W_f F)
        proj = F.conv2d(features, w0[:, :c].unsqueeze(3))
        rows = proj.permute(0, 2, 3, 1).reshape(b * h * w, fc)
        y = torch.embedding_bag(rows, taps, bags, False, 0, False, weights, False, None)[0]
        y = torch.relu(y + F.linear(crow, w0[:, c:, 0], b0))
    else:
        rows = features.contiguous(memory_format=torch.channels_last)
        rows = rows.permute(0, 2, 3, 1).reshape(b * h * w, c)
        fine = torch.embedding_bag(rows, taps, bags, False, 0, False, weights, False, None)[0]
        y = _rows_conv(torch.cat([fine, crow], 1), w0, b0)
    y = _rows_conv(torch.cat([y, crow], 1), w1, b1)
    y = _rows_conv(torch.cat([y, crow], 1), w2, b2)
    out = F.linear(torch.cat([y, crow], 1), wp[:, :, 0], bp)
    return out.view(b, n, k).permute(0, 2, 1).contiguous()


@functools.cache
def replacement() -> str:
    """:func:`rows_head` as TorchScript IR, calls inlined: the replacement graph of
    :func:`panoptem._point_head_graph.rewrite_point_heads` with ``rows=True``."""
    graph = torch.jit.script(rows_head).graph.copy()
    torch._C._jit_pass_inline(graph)
    torch._C._jit_pass_constant_propagation(graph)
    torch._C._jit_pass_dce(graph)
    return str(graph)
