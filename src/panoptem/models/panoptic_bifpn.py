"""Panoptic BiFPN (the MitoNet_v1_mini family) with an optional PointRend semantic head."""

from __future__ import annotations

import torch

from panoptem.models.base import PanopticBase
from panoptem.models.blocks import Resample2d
from panoptem.models.decoders.bifpn import BiFPN, BiFPNDecoder
from panoptem.models.encoders.resnet import build_resnet
from panoptem.models.heads import PanopticDeepLabHead
from panoptem.models.point_rend import PointRendSemSegHead, split_point_rend_kwargs

__all__ = ["PanopticBiFPN", "PanopticBiFPNPR"]


class PanopticBiFPN(PanopticBase):
    """ResNet encoder (output stride 32), BiFPN + upsampling decoder(s), three heads.

    Parameters
    ----------
    encoder : str
        ResNet name (see :data:`panoptem.models.ENCODERS`). The original's default,
        ``regnety_6p4gf``, is not available; MitoNet_v1_mini uses ``resnet50``.
    num_classes : int
        Semantic output channels.
    fpn_dim : int
        Channels inside the pyramid and decoder (128 in ``bifpn_model.yaml``; the released
        MitoNet_v1_mini has 160).
    fpn_layers : int
        Number of BiFPN layers.
    ins_decoder : bool
        Separate BiFPN + decoder for the centre/offset heads.
    depthwise : bool
        Separable 3 x 3 conv + BN + SiLU after BiFPN fusions (else 3 x 3 conv + BN + ReLU).

    Notes
    -----
    ``p2_resample`` (1 x 1 conv + BN) maps ``layer1`` (stride 4) to fpn_dim; it is shared
    by both branches. Inputs must be multiples of 128 (P7 is at 1/128). Call interface and
    output shapes: :class:`~panoptem.models.base.PanopticBase`.
    """

    def __init__(
        self,
        encoder="resnet50",
        num_classes=1,
        fpn_dim=160,
        fpn_layers=3,
        ins_decoder=False,
        depthwise=True,
    ):
        super().__init__()
        self.encoder = build_resnet(encoder, output_stride=32)
        widths = self.encoder.widths
        self.p2_resample = Resample2d(widths[0], fpn_dim)
        self.num_classes = int(num_classes)
        self.fpn_dim = int(fpn_dim)
        self.semantic_fpn = BiFPN(widths[1:], fpn_dim, fpn_layers, depthwise=depthwise)
        self.semantic_decoder = BiFPNDecoder(fpn_dim)
        if ins_decoder:
            self.instance_fpn = BiFPN(widths[1:], fpn_dim, fpn_layers, depthwise=depthwise)
            self.instance_decoder = BiFPNDecoder(fpn_dim)
        else:
            self.instance_fpn = None
            self.instance_decoder = None
        self.semantic_head = PanopticDeepLabHead(fpn_dim, num_classes)
        self.ins_center = PanopticDeepLabHead(fpn_dim, 1)
        self.ins_xy = PanopticDeepLabHead(fpn_dim, 2)
        self._init_heads_placeholder()

    def _decode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.encoder(x)
        p2 = self.p2_resample(features[1])
        levels = features[2:]  # P3..P5
        semantic_pyr = [p2] + self.semantic_fpn(levels)
        semantic_x = self.semantic_decoder(semantic_pyr[::-1])
        instance_x = semantic_x
        if self.instance_fpn is not None and self.instance_decoder is not None:
            instance_pyr = [p2] + self.instance_fpn(levels)
            instance_x = self.instance_decoder(instance_pyr[::-1])
        return semantic_x, instance_x

    def fuse_model(self) -> None:
        """Fold BatchNorm/ReLU into the encoder convolutions (the original fuses only these)."""
        self.encoder.fuse_model()


class PanopticBiFPNPR(PanopticBiFPN):
    """:class:`PanopticBiFPN` with PointRend semantic refinement (MitoNet_v1_mini).

    PointRend keyword arguments as in
    :class:`~panoptem.models.panoptic_deeplab.PanopticDeepLabPR`.
    """

    def __init__(self, **kwargs):
        point_rend = split_point_rend_kwargs(kwargs)
        super().__init__(**kwargs)
        self.semantic_pr = PointRendSemSegHead(self.fpn_dim, self.num_classes, **point_rend)
