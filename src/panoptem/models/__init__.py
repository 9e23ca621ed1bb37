"""Neural-network architectures compatible with empanada's models.

Build from a training-YAML style config with :func:`build_model`; every model's state dict
uses the original empanada parameter names and shapes, so original checkpoints load
without renaming. Export with :func:`export_torchscript`.
"""

from panoptem.models.base import PanopticBase
from panoptem.models.build import MODEL_ARCHS, build_model, count_parameters
from panoptem.models.encoders.resnet import ENCODERS, load_encoder_weights
from panoptem.models.panoptic_bifpn import PanopticBiFPN, PanopticBiFPNPR
from panoptem.models.panoptic_deeplab import PanopticDeepLab, PanopticDeepLabPR
from panoptem.models.torchscript import export_torchscript, script_model

__all__ = [
    "MODEL_ARCHS",
    "ENCODERS",
    "build_model",
    "count_parameters",
    "export_torchscript",
    "script_model",
    "load_encoder_weights",
    "PanopticBase",
    "PanopticDeepLab",
    "PanopticDeepLabPR",
    "PanopticBiFPN",
    "PanopticBiFPNPR",
]
