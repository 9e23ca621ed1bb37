"""ResNet encoders with one input channel (torchvision-style V1.5 ResNets).

State-dict keys follow torchvision's names without the classifier: ``conv1``, ``bn1``,
``layer1`` .. ``layer4`` (each block: ``conv1``, ``bn1``, ``conv2``, ``bn2`` [, ``conv3``,
``bn3``] and ``downsample.0`` / ``downsample.1``). There is no ``fc`` layer.

Loading the "CEM pretrained" weights
------------------------------------
The CEM1.5M SwAV ResNet50 checkpoint (empanada's ``encoder_pretraining`` URL) is a dict with
``state_dict`` (torchvision ResNet50 keys with a 1-channel ``conv1``, no prefix, plus ``fc.*``)
and ``norms`` (mean, std). The original training code drops every key starting with ``fc``,
prefixes the rest with ``encoder.`` and loads them into the whole model with
``strict=False``. Equivalently::

    sd = {k: v for k, v in ckpt["state_dict"].items() if not k.startswith("fc")}
    model.encoder.load_state_dict(sd)            # or load_encoder_weights(model, ckpt)

:func:`load_encoder_weights` does exactly that and returns the stored norms.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from panoptem.errors import PanoptemError
from panoptem.models.blocks import fuse_sequential

__all__ = ["ResNet", "ENCODERS", "build_resnet", "load_encoder_weights"]


def _conv3x3(nin: int, nout: int, stride: int = 1, groups: int = 1, dilation: int = 1):
    return nn.Conv2d(
        nin,
        nout,
        3,
        stride=stride,
        padding=dilation,
        groups=groups,
        bias=False,
        dilation=dilation,
    )


def _conv1x1(nin: int, nout: int, stride: int = 1):
    return nn.Conv2d(nin, nout, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3 x 3 convolutions with a residual connection (ResNet18/34).

    Unlike the original, a dilation > 1 is accepted (both convolutions get it), so ResNet18/34
    also work with ``stage4_stride: 16``; parameter names and shapes do not change.
    """

    expansion = 1

    def __init__(self, nin, planes, stride=1, downsample=None, groups=1, base_width=64, dilation=1):
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock supports only groups=1 and base_width=64")
        self.conv1 = _conv3x3(nin, planes, stride, dilation=dilation)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes, dilation=dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)

    def fuse_model(self) -> None:
        fuse_sequential(self, ["conv1", "bn1", "relu"])
        fuse_sequential(self, ["conv2", "bn2"])
        if self.downsample is not None:
            fuse_sequential(self.downsample, ["0", "1"])


class Bottleneck(nn.Module):
    """1 x 1 reduce, 3 x 3 (stride and dilation here, V1.5), 1 x 1 expand (x4), residual."""

    expansion = 4

    def __init__(self, nin, planes, stride=1, downsample=None, groups=1, base_width=64, dilation=1):
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = _conv1x1(nin, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(width, width, stride, groups, dilation)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = _conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)

    def fuse_model(self) -> None:
        fuse_sequential(self, ["conv1", "bn1", "relu1"])
        fuse_sequential(self, ["conv2", "bn2", "relu2"])
        fuse_sequential(self, ["conv3", "bn3"])
        if self.downsample is not None:
            fuse_sequential(self.downsample, ["0", "1"])


class ResNet(nn.Module):
    """ResNet feature extractor returning five feature maps.

    Parameters
    ----------
    block : type
        :class:`BasicBlock` or :class:`Bottleneck`.
    layers : list of int
        Number of blocks in ``layer1`` .. ``layer4``.
    groups, width_per_group : int
        ResNeXt / wide-ResNet settings (1 and 64 for plain ResNets).
    in_channels : int
        Input channels (1 for EM images).
    output_stride : {16, 32}
        16 makes ``layer4`` stride 1 with dilation 2 in every block.

    Attributes
    ----------
    widths : list of int
        Output channels of ``layer1`` .. ``layer4`` (e.g. [256, 512, 1024, 2048] for ResNet50).

    Notes
    -----
    ``forward(x)`` with x of shape (N, in_channels, H, W) returns
    ``[p1, p2, p3, p4, p5]``: the stem after max-pooling (N, base_planes, H/4, W/4), ``layer1``
    (N, widths[0], H/4, W/4), ``layer2`` (H/8), ``layer3`` (H/16) and ``layer4``
    (H/16 or H/32 depending on ``output_stride``).
    """

    def __init__(
        self, block, layers, groups=1, width_per_group=64, in_channels=1, output_stride=32,
        base_planes=64,
    ):
        super().__init__()
        if output_stride not in (16, 32):
            raise ValueError(f"output_stride must be 16 or 32, not {output_stride}")
        self.groups = groups
        self.base_width = width_per_group
        b = int(base_planes)
        self.inplanes = b
        self.widths: list[int] = []
        self.conv1 = nn.Conv2d(in_channels, b, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(b)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, b, layers[0])
        self.layer2 = self._make_layer(block, 2 * b, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 4 * b, layers[2], stride=2)
        dilated = output_stride == 16
        self.layer4 = self._make_layer(
            block, 8 * b, layers[3], stride=1 if dilated else 2, dilation=2 if dilated else 1
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block, planes, blocks, stride=1, dilation=1) -> nn.Sequential:
        nout = planes * block.expansion
        downsample = None
        if stride != 1 or self.inplanes != nout:
            downsample = nn.Sequential(_conv1x1(self.inplanes, nout, stride), nn.BatchNorm2d(nout))
        layers = [
            block(self.inplanes, planes, stride, downsample, self.groups, self.base_width, dilation)
        ]
        self.inplanes = nout
        self.widths.append(nout)
        for _ in range(1, blocks):
            layers.append(
                block(
                    nout, planes, groups=self.groups, base_width=self.base_width, dilation=dilation
                )
            )
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        p1 = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        p2 = self.layer1(p1)
        p3 = self.layer2(p2)
        p4 = self.layer3(p3)
        p5 = self.layer4(p4)
        return [p1, p2, p3, p4, p5]

    def fuse_model(self) -> None:
        """Fold BatchNorm (and ReLU) into the convolutions, in place (eval mode only)."""
        fuse_sequential(self, ["conv1", "bn1", "relu"])
        for m in self.modules():
            if isinstance(m, (BasicBlock, Bottleneck)):
                m.fuse_model()


# name -> (block, layers, groups, width_per_group[, base_planes])
ENCODERS: dict[str, tuple] = {
    # panoptem's own: ResNet-18 at half width (stem 32, stages 32..256 channels, 2.8 M
    # parameters); small and fast enough to train on a laptop CPU (the bundled model's)
    "resnet18_half": (BasicBlock, [2, 2, 2, 2], 1, 64, 32),
    "resnet18": (BasicBlock, [2, 2, 2, 2], 1, 64),
    "resnet34": (BasicBlock, [3, 4, 6, 3], 1, 64),
    "resnet50": (Bottleneck, [3, 4, 6, 3], 1, 64),
    "resnet101": (Bottleneck, [3, 4, 23, 3], 1, 64),
    "resnet152": (Bottleneck, [3, 8, 36, 3], 1, 64),
    "resnext50_32x4d": (Bottleneck, [3, 4, 6, 3], 32, 4),
    "resnext101_32x8d": (Bottleneck, [3, 4, 23, 3], 32, 8),
    "wide_resnet50_2": (Bottleneck, [3, 4, 6, 3], 1, 128),
    "wide_resnet101_2": (Bottleneck, [3, 4, 23, 3], 1, 128),
}


def build_resnet(name: str, output_stride: int = 32, in_channels: int = 1) -> ResNet:
    """Build the encoder called ``name`` (a key of :data:`ENCODERS`)."""
    block, layers, groups, width, *base = ENCODERS[name]
    return ResNet(
        block,
        layers,
        groups=groups,
        width_per_group=width,
        in_channels=in_channels,
        output_stride=output_stride,
        base_planes=base[0] if base else 64,
    )


def load_encoder_weights(model: nn.Module, checkpoint: dict) -> dict | None:
    """Load pretrained encoder weights (e.g. CEM1.5M SwAV ResNet50) into ``model.encoder``.

    Parameters
    ----------
    model : nn.Module
        A model with an ``encoder`` attribute (any panoptem architecture).
    checkpoint : dict
        Either ``{"state_dict": ..., "norms": (mean, std)}`` as stored by empanada, or a bare
        state dict. Keys are torchvision ResNet names without prefix (``conv1.weight``,
        ``layer1.0.conv1.weight``, ...); leading ``module.`` / ``encoder.`` are stripped. ``fc.*``
        keys are dropped, as the original does.

    Returns
    -------
    dict or None
        ``{"mean": m, "std": s}`` when the checkpoint holds ``norms``, else None.

    Notes
    -----
    Like the original (which loads with ``strict=False``), keys the encoder lacks are
    ignored; unlike it, a shape mismatch still raises (RuntimeError), and a checkpoint none
    of whose keys match raises :class:`~panoptem.errors.PanoptemError`.
    """
    sd = checkpoint.get("state_dict", checkpoint)
    cleaned = {}
    for k, v in sd.items():
        for prefix in ("module.", "encoder."):
            k = k[len(prefix) :] if k.startswith(prefix) else k
        if not k.startswith("fc"):
            cleaned[k] = v
    own = model.encoder.state_dict()
    if not any(k in own for k in cleaned):
        raise PanoptemError(
            "None of the checkpoint's keys match the encoder's parameter names; expected "
            "torchvision ResNet names such as 'conv1.weight' and 'layer1.0.conv1.weight'. "
            "Use a ResNet checkpoint that matches the configured encoder."
        )
    model.encoder.load_state_dict(cleaned, strict=False)
    norms = checkpoint.get("norms") if "state_dict" in checkpoint else None
    if norms is None:
        return None
    return {"mean": float(norms[0]), "std": float(norms[1])}
