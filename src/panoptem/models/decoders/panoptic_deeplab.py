"""Panoptic-DeepLab decoder: ASPP on the deepest map, then fusion with low-level maps."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from panoptem.models.blocks import (
    conv_bn_act,
    fuse_sequential,
    init_small_normal,
    separable_conv_bn_act,
)

__all__ = ["ASPP", "PanopticDeepLabDecoder"]


class ASPPPooling(nn.Module):
    """Image-level branch: global average pool, 1 x 1 conv (no bias), ReLU, upsample back.

    Stored as ``aspp_pooling.0`` (pool), ``.1`` (conv), ``.2`` (ReLU).
    Shapes: (N, nin, h, w) -> (N, nout, h, w).
    """

    def __init__(self, nin: int, nout: int) -> None:
        super().__init__()
        self.aspp_pooling = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(nin, nout, 1, bias=False), nn.ReLU()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = (x.shape[-2], x.shape[-1])
        return F.interpolate(self.aspp_pooling(x), size=size, mode="bilinear", align_corners=True)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling.

    Five branches in ``convs`` (1 x 1 conv-BN-ReLU; three 3 x 3 atrous conv-BN-ReLU with
    ``atrous_rates``; image pooling), concatenated and projected by ``project``
    (1 x 1 conv-BN-ReLU-Dropout). Shapes: (N, nin, h, w) -> (N, nout, h, w).
    """

    def __init__(self, nin: int, nout: int, atrous_rates=(2, 4, 6), dropout_p: float = 0.5):
        super().__init__()
        rates = [int(r) for r in atrous_rates]
        if len(rates) != 3:
            raise ValueError(f"ASPP needs exactly 3 atrous rates, got {rates}")
        branches: list[nn.Module] = [
            nn.Sequential(nn.Conv2d(nin, nout, 1, bias=False), nn.BatchNorm2d(nout), nn.ReLU())
        ]
        for r in rates:
            branches.append(
                nn.Sequential(
                    nn.Conv2d(nin, nout, 3, padding=r, dilation=r, bias=False),
                    nn.BatchNorm2d(nout),
                    nn.ReLU(),
                )
            )
        branches.append(ASPPPooling(nin, nout))
        self.convs = nn.ModuleList(branches)
        self.project = nn.Sequential(
            nn.Conv2d(5 * nout, nout, 1, bias=False),
            nn.BatchNorm2d(nout),
            nn.ReLU(),
            nn.Dropout(float(dropout_p)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs: list[torch.Tensor] = []
        for branch in self.convs:
            outs.append(branch(x))
        return self.project(torch.cat(outs, dim=1))

    def fuse_model(self) -> None:
        for branch in self.convs:
            if isinstance(branch, ASPPPooling):
                fuse_sequential(branch.aspp_pooling, ["1", "2"])
            else:
                fuse_sequential(branch, ["0", "1", "2"])
        fuse_sequential(self.project, ["0", "1", "2"])


class PanopticDeepLabDecoder(nn.Module):
    """ASPP on the last encoder map, then top-down fusion with low-level encoder maps.

    Parameters
    ----------
    nin : int
        Channels of the deepest encoder map.
    decoder_channels : int
        Output channels of every fusion step.
    low_level_stages : list of int
        Indices into the encoder's feature list (1 = ``layer1``, stride 4, ...), coarsest
        first.
    low_level_channels : list of int
        Channels of those encoder maps.
    low_level_channels_project : list of int
        Channels each low-level map is projected to (1 x 1 conv-BN-ReLU) before fusion.
    atrous_rates : list of int
        The three ASPP dilation rates.
    aspp_channels : int or None
        ASPP output channels (None: ``decoder_channels``).
    aspp_dropout : float
        Dropout after the ASPP projection.

    Notes
    -----
    ``forward(features)`` takes the encoder's list and returns (N, decoder_channels, h, w)
    at the resolution of the last low-level stage (stride 4 for ``[..., 1]``). Each step:
    project the low-level map, resize the running map to it (bilinear, align_corners=True),
    concatenate and fuse with a 5 x 5 separable conv-BN-ReLU.
    """

    def __init__(
        self,
        nin,
        decoder_channels,
        low_level_stages,
        low_level_channels,
        low_level_channels_project,
        atrous_rates,
        aspp_channels=None,
        aspp_dropout=0.5,
    ):
        super().__init__()
        if aspp_channels is None:
            aspp_channels = decoder_channels
        self.aspp = ASPP(nin, aspp_channels, atrous_rates, aspp_dropout)
        self.low_level_stages: list[int] = [int(s) for s in low_level_stages]
        self.project = nn.ModuleList()
        self.fuse = nn.ModuleList()
        running = aspp_channels
        for nlow, nproj in zip(low_level_channels, low_level_channels_project, strict=True):
            self.project.append(conv_bn_act(nlow, nproj, 1))
            self.fuse.append(separable_conv_bn_act(running + nproj, decoder_channels, 5))
            running = decoder_channels
        self.apply(init_small_normal)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = self.aspp(features[-1])
        for i, (proj, fuse) in enumerate(
            zip(self.project, self.fuse)  # noqa: B905 (TorchScript has no strict=)
        ):
            low = proj(features[self.low_level_stages[i]])
            x = F.interpolate(
                x, size=(low.shape[-2], low.shape[-1]), mode="bilinear", align_corners=True
            )
            x = fuse(torch.cat((x, low), dim=1))
        return x

    def fuse_model(self) -> None:
        """Fold BN/ReLU into the ASPP convolutions and the low-level projections."""
        self.aspp.fuse_model()
        for proj in self.project:
            fuse_sequential(proj, ["0", "1", "2"])
