"""Panoptic-DeepLab (Cheng et al., 2020) with an optional PointRend semantic head."""

from __future__ import annotations

import torch

from panoptem.models.base import PanopticBase
from panoptem.models.decoders.panoptic_deeplab import PanopticDeepLabDecoder
from panoptem.models.encoders.resnet import build_resnet
from panoptem.models.heads import PanopticDeepLabHead
from panoptem.models.point_rend import PointRendSemSegHead, split_point_rend_kwargs

__all__ = ["PanopticDeepLab", "PanopticDeepLabPR"]


class PanopticDeepLab(PanopticBase):
    """Panoptic-DeepLab: ResNet encoder, semantic (+ optional instance) decoder, three heads.

    Parameters
    ----------
    encoder : str
        ResNet name (see :data:`panoptem.models.ENCODERS`).
    num_classes : int
        Semantic output channels (1 for a single class, else classes + 1).
    stage4_stride : {16, 32}
        Output stride of the encoder's last stage (16 = dilated ``layer4``).
    decoder_channels : int
        Channels of the decoder outputs and heads.
    low_level_stages : list of int
        Encoder maps fused by the decoders, coarsest first (1 = ``layer1``, stride 4).
    low_level_channels_project : list of int
        Projection channels for those maps (instance decoder: times ``ins_ratio``).
    atrous_rates : list of int
        ASPP dilation rates (three).
    aspp_channels : int or None
        ASPP channels (None: ``decoder_channels``).
    aspp_dropout : float or (float, float)
        ASPP dropout, or (semantic, instance) pair.
    ins_decoder : bool
        Separate decoder for the centre/offset heads (else they read the semantic features).
    ins_ratio : float
        Scale of the instance decoder's projection channels.

    Notes
    -----
    The defaults are the original class defaults; MitoNet_v1 overrides them (see
    ``pdl_model.yaml``). Call interface and output shapes: :class:`PanopticBase`.
    State-dict keys: ``encoder.*``, ``semantic_decoder.*``, ``instance_decoder.*``,
    ``semantic_head.*``, ``ins_center.*``, ``ins_xy.*`` (+ ``semantic_pr.*``).
    """

    def __init__(
        self,
        encoder="resnet50",
        num_classes=1,
        stage4_stride=16,
        decoder_channels=256,
        low_level_stages=(3, 2, 1),
        low_level_channels_project=(128, 64, 32),
        atrous_rates=(2, 4, 6),
        aspp_channels=None,
        aspp_dropout=0.1,
        ins_decoder=False,
        ins_ratio=0.5,
    ):
        super().__init__()
        self.decoder_channels = int(decoder_channels)
        self.num_classes = int(num_classes)
        self.encoder = build_resnet(encoder, output_stride=int(stage4_stride))
        if isinstance(aspp_dropout, (int, float)):
            sem_p = ins_p = float(aspp_dropout)
        else:
            sem_p, ins_p = (float(p) for p in aspp_dropout)

        widths = self.encoder.widths
        stages = [int(s) for s in low_level_stages]
        low_channels = [widths[s - 1] for s in stages]
        deepest = widths[-1]
        self.semantic_decoder = PanopticDeepLabDecoder(
            deepest,
            decoder_channels,
            stages,
            low_channels,
            [int(c) for c in low_level_channels_project],
            atrous_rates,
            aspp_channels,
            sem_p,
        )
        if ins_decoder:
            self.instance_decoder = PanopticDeepLabDecoder(
                deepest,
                decoder_channels,
                stages,
                low_channels,
                [int(c * ins_ratio) for c in low_level_channels_project],
                atrous_rates,
                aspp_channels,
                ins_p,
            )
        else:
            self.instance_decoder = None
        self.semantic_head = PanopticDeepLabHead(decoder_channels, num_classes)
        self.ins_center = PanopticDeepLabHead(decoder_channels, 1)
        self.ins_xy = PanopticDeepLabHead(decoder_channels, 2)
        self._init_heads_placeholder()

    def _decode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.encoder(x)
        semantic_x = self.semantic_decoder(features)
        if self.training:
            # The original runs the semantic head once more per training step (its output
            # unused), so that head's BatchNorm running statistics get two momentum updates
            # per batch. Kept for identical training; no effect on the outputs or gradients.
            with torch.no_grad():
                self.semantic_head(semantic_x)
        if self.instance_decoder is not None:
            instance_x = self.instance_decoder(features)
        else:
            instance_x = semantic_x
        return semantic_x, instance_x

    def fuse_model(self) -> None:
        """Fold BatchNorm/ReLU into convolutions where the original export does (eval only).

        Encoder (stem and every block), each decoder's ASPP branches and projection and the
        low-level projections, and the PointRend MLP layers (Conv1d + ReLU). The separable
        convolutions and the heads stay unfused, as in the released files.
        """
        self.encoder.fuse_model()
        self.semantic_decoder.fuse_model()
        if self.instance_decoder is not None:
            self.instance_decoder.fuse_model()
        if self.semantic_pr is not None:
            self.semantic_pr.fuse_model()


class PanopticDeepLabPR(PanopticDeepLab):
    """:class:`PanopticDeepLab` whose semantic logits are refined by PointRend (MitoNet_v1).

    Extra parameters (``num_fc``, ``train_num_points``, ``oversample_ratio``,
    ``importance_sample_ratio``, ``subdivision_steps``, ``subdivision_num_points``) configure
    :class:`~panoptem.models.point_rend.PointRendSemSegHead`; the other keyword arguments go
    to :class:`PanopticDeepLab`.
    """

    def __init__(self, **kwargs):
        point_rend = split_point_rend_kwargs(kwargs)
        super().__init__(**kwargs)
        self.semantic_pr = PointRendSemSegHead(self.decoder_channels, self.num_classes, **point_rend)
