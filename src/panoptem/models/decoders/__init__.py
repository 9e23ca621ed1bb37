"""Decoders: Panoptic-DeepLab (ASPP + low-level fusion) and BiFPN."""

from panoptem.models.decoders.bifpn import BiFPN, BiFPNDecoder
from panoptem.models.decoders.panoptic_deeplab import ASPP, PanopticDeepLabDecoder

__all__ = ["ASPP", "PanopticDeepLabDecoder", "BiFPN", "BiFPNDecoder"]
