"""Static int8 quantization for CPU inference (the ``model_quantized`` file of a config).

The ResNet encoder runs in int8 with per-channel weights and activation ranges
calibrated on real images, and so do the convolution branches of Panoptic-DeepLab's ASPPs
(in MitoNet_v1 they hold about as much arithmetic as the encoder), the separable
conv-BN-ReLU blocks of the decoders and heads (the stride-4 work) and, in BiFPN models, the
pyramid's resamplings and conv-BN-SiLU blocks, and its decoders' upsamplings (transposed
convolutions, as 1 x 1 convolutions and a pixel shuffle); the heads' final convolutions,
the ASPP pooling and projection and the SiLUs stay in float.
panoptem uses PyTorch's FX graph mode on those parts (the conv + BatchNorm + ReLU folding,
observers and int8 kernels come from PyTorch) and traces them once converted.
PointRend's point MLP becomes an :class:`Int8PointHead`: int8 weights, activations
quantized per call, points as rows (as int8 1-D convolutions it gained nothing, because
they copy their input and output to and from a 2-D layout). The whole model is then
scripted, so the file has the released interface ``m(x, render_steps, interpolate_ins)``
and runs through the same engine as the float file. Both architectures (Panoptic-DeepLab
and BiFPN, with or without PointRend) are supported.

The int8 kernels are CPU-only and tied to the backend the file was calibrated for (x86 /
fbgemm on Intel and AMD, qnnpack on ARM); :mod:`panoptem.loading` falls back to the float
file when a quantized file does not load or run here.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from panoptem.errors import PanoptemError
from panoptem.models.point_rend import PointRendSemSegHead, bilinear_taps, sample_rows
from panoptem.models.torchscript import JIT_DEPRECATION, script_model
from panoptem.progress import Progress, ensure_progress

__all__ = ["quantize_model", "calibration_tensors", "save_quantized", "model_from_torchscript",
           "Int8PointHead"]

# torch >= 2.10 marks torch.ao.quantization deprecated in favour of torchao (a further
# dependency of several hundred MB); the APIs below still work in 2.13 and are silenced here
_QUIET = (
    (DeprecationWarning, r"torch\.ao\.quantization is deprecated"),
    (UserWarning, r"Please use quant_min and quant_max"),
    (UserWarning, r"torch\.quantize_per_tensor, torch\.quantize_per_channel"),
    (UserWarning, r".*_check_is_valid_config_dict.*|.*QConfigMapping.*"),
    (DeprecationWarning, JIT_DEPRECATION),
    (UserWarning, r"must run observer before calling calculate_qparams"),
    (torch.jit.TracerWarning, r".*"),
)


class _quiet(warnings.catch_warnings):  # noqa: N801 - used as a context manager
    def __enter__(self):
        out = super().__enter__()
        for category, message in _QUIET:
            warnings.filterwarnings("ignore", message=message, category=category)
        return out


def _backend() -> str:
    engines = torch.backends.quantized.supported_engines
    for name in ("x86", "fbgemm", "qnnpack"):
        if name in engines:
            return name
    raise PanoptemError("This PyTorch build has no quantized CPU backend, so int8 export is impossible.")


def calibration_tensors(images: Iterable[np.ndarray], norms: dict, size: int = 512,
                        multiple: int = 16, limit: int = 16) -> list[torch.Tensor]:
    """Normalised (1, 1, h, w) crops of 8-bit images for calibration.

    Each image gives one central crop of at most ``size`` pixels a side, rounded down to
    ``multiple`` (the model's padding factor); at most ``limit`` images are used.
    """
    out = []
    mean, std = float(norms["mean"]), float(norms["std"])
    for img in images:
        if len(out) >= limit:
            break
        img = np.asarray(img)
        h, w = (min(s, size) // multiple * multiple for s in img.shape[:2])
        if h == 0 or w == 0:
            continue
        y0, x0 = (img.shape[0] - h) // 2, (img.shape[1] - w) // 2
        crop = img[y0:y0 + h, x0:x0 + w].astype(np.float32) / 255.0
        out.append(torch.from_numpy((crop - mean) / std)[None, None])
    if not out:
        raise PanoptemError(f"No calibration image is at least {multiple} pixels a side; give real training images.")
    return out


def quantize_model(model: nn.Module, calibration: list[torch.Tensor],
                   already_fused: bool = False, progress: Progress | None = None) -> torch.jit.ScriptModule:
    """Return a scripted copy of ``model`` whose encoder, decoder blocks and point MLP run in int8.

    Parameters
    ----------
    model : a panoptem model (from :func:`panoptem.models.build_model`), weights loaded.
    calibration : normalised (1, 1, H, W) float tensors (see :func:`calibration_tensors`);
        the full model is run on each so that the encoder sees real activations.
    already_fused : the model's ``fuse_model()`` was already called (e.g. a model rebuilt
        from an exported TorchScript file's weights, see :func:`model_from_torchscript`).
    """
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    if not calibration:
        raise PanoptemError("Quantization needs at least one calibration image.")
    backend = _backend()
    torch.backends.quantized.engine = backend
    work = copy.deepcopy(model).cpu().eval()
    example = calibration[0]
    with _quiet(), torch.no_grad():
        if not already_fused:
            work.fuse_model()  # folds BN where the float export does
        qconfig = get_default_qconfig_mapping(backend)
        prepared = prepare_fx(work.encoder, qconfig, (example,))
        work.encoder = prepared
        branches = _prepare_aspp_branches(work, qconfig, prepare_fx)
        branches += _prepare_conv_bn_blocks(work, qconfig, prepare_fx)
        branches += _prepare_upsamplings(work, qconfig, prepare_fx)
        progress = ensure_progress(progress)
        progress.stage("calibrating int8", len(calibration))
        for x in calibration:
            progress.check()
            work(x, 2, True)
            progress.advance()
        converted = convert_fx(prepared)
        work.encoder = torch.jit.trace(converted, example, strict=False, check_trace=False)
        for parent, name, inputs in branches:
            part = convert_fx(getattr(parent, name))
            setattr(parent, name, torch.jit.trace(part, inputs, strict=False, check_trace=False))
        _int8_point_heads(work)
        _channels_last_aspp_projections(work)
        return script_model(work)


def _prepare_aspp_branches(model: nn.Module, qconfig, prepare_fx) -> list[tuple]:
    """Observe the convolution branches of every ASPP (Panoptic-DeepLab decoders) for int8.

    In MitoNet_v1 the two ASPPs, on the 2048-channel stride-16 map, hold about as much of the
    arithmetic as the encoder, so an int8 encoder alone speeds the model up by far less than
    it speeds up BiFPN models. Each 1 x 1 and atrous 3 x 3 branch (conv + folded BN + ReLU)
    gets int8 weights and calibrated activation ranges; the image-pooling branch (whose
    output size follows the input) and the projection stay in float. Returns
    ``(parent, child name, example inputs)`` of each prepared branch.
    """
    from panoptem.models.decoders.panoptic_deeplab import ASPP, ASPPPooling

    prepared = []
    for aspp in [m for m in model.modules() if isinstance(m, ASPP)]:
        for i, branch in enumerate(aspp.convs):
            if isinstance(branch, ASPPPooling):
                continue
            conv = next(m for m in branch.modules() if isinstance(m, nn.Conv2d))
            inputs = (torch.zeros(1, conv.in_channels, 8, 8),)
            aspp.convs[i] = prepare_fx(branch, qconfig, inputs)
            prepared.append((aspp.convs, str(i), inputs))
    return prepared


def _int8_block(block: nn.Module) -> bool:
    """Whether ``block`` is a convolution + BatchNorm (+ ReLU or SiLU) block left unfolded:
    ``Sequential(SeparableConv2d or Conv2d, BatchNorm2d[, ReLU or SiLU])``."""
    from panoptem.models.blocks import SeparableConv2d

    return (isinstance(block, nn.Sequential) and len(block) in (2, 3)
            and isinstance(block[0], (SeparableConv2d, nn.Conv2d))
            and isinstance(block[1], nn.BatchNorm2d)
            and (len(block) == 2 or isinstance(block[2], (nn.ReLU, nn.SiLU))))


def _prepare_conv_bn_blocks(model: nn.Module, qconfig, prepare_fx) -> list[tuple]:
    """Observe every convolution-BN block of the decoders and heads for int8.

    These are the separable conv-BN-ReLU blocks (5 x 5 depthwise, 1 x 1 pointwise, BN,
    ReLU) of both architectures' decoders and heads, which hold most of the float arithmetic
    left at stride 4 once the encoder is int8, and in BiFPN models also the 1 x 1 conv-BN
    resamplings and the separable conv-BN-SiLU blocks of the pyramid (their SiLU stays
    float). Converted, BN is folded into the convolution and a block runs about 3x faster
    (fbgemm, 272 -> 256 channels at 256 x 256). The heads' final 1 x 1 convolutions (the
    logits, centres and offsets themselves) stay in float; the BiFPN decoders' transposed
    convolutions are left to :func:`_prepare_upsamplings`. A block shared by several levels
    (BiFPN's) gets one copy per level, calibrated on that level. Returns ``(parent, child name, example inputs)``
    of each block.
    """
    from torch.fx import GraphModule

    from panoptem.models.blocks import SeparableConv2d

    found = []
    stack = [model]
    while stack:  # prepared parts (the encoder, ASPP branches) are GraphModules: not entered
        parent = stack.pop()
        # _modules, not named_children(): that yields a block shared by several levels once
        for name, child in parent._modules.items():
            if child is None:
                continue
            if _int8_block(child):
                found.append((parent, name, child))
            elif not isinstance(child, GraphModule):
                stack.append(child)
    prepared = []
    for parent, name, block in found:
        first = block[0].sepconv[0] if isinstance(block[0], SeparableConv2d) else block[0]
        inputs = (torch.zeros(1, first.in_channels, 8, 8),)
        setattr(parent, name, prepare_fx(copy.deepcopy(block), qconfig, inputs))
        prepared.append((parent, name, inputs))
    return prepared


def _upsampling_block(block: nn.Module) -> bool:
    """Whether ``block`` is ``Sequential(ConvTranspose2d, BatchNorm2d[, ReLU])`` whose
    transposed convolution has kernel = stride, no padding, dilation or groups: each input
    pixel then makes its own ``k x k`` output pixels."""
    if not (isinstance(block, nn.Sequential) and len(block) in (2, 3)
            and isinstance(block[0], nn.ConvTranspose2d) and isinstance(block[1], nn.BatchNorm2d)
            and (len(block) == 2 or isinstance(block[2], nn.ReLU))):
        return False
    up = block[0]
    k = up.kernel_size[0]
    return (up.kernel_size == (k, k) and up.stride == (k, k) and up.padding == (0, 0)
            and up.output_padding == (0, 0) and up.dilation == (1, 1) and up.groups == 1
            and up.padding_mode == "zeros")


class Int8Upsampling(nn.Module):
    """A transposed convolution with kernel = stride = ``k`` + BatchNorm (+ ReLU) as a
    1 x 1 convolution to ``k * k`` times the channels, BN folded in, then a pixel shuffle.

    The two are equal: output pixel ``(k y + dy, k x + dx)`` of channel ``c`` is input pixel
    ``(y, x)`` times the weights ``[:, c, dy, dx]``, which the 1 x 1 convolution computes as
    its channel ``c k^2 + dy k + dx``, the channel :func:`~torch.nn.functional.pixel_shuffle`
    moves there. As a convolution the block can run in int8 (``conv`` is prepared and
    converted like the other blocks), which fbgemm's transposed convolution gains nothing
    from: in MitoNet_v1_mini's decoders (320 -> 160 channels, 32 x 32 -> 64 x 64) the block
    took 2.3 ms in float channels-last and 0.8 ms as an int8 convolution and a float shuffle
    (fbgemm's int8 transposed convolution alone: 1.9 ms).
    """

    def __init__(self, block: nn.Sequential) -> None:
        super().__init__()
        up, bn = block[0], block[1]
        k = up.kernel_size[0]
        with torch.no_grad():
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            shift = bn.bias - bn.running_mean * scale
            if up.bias is not None:
                shift = shift + up.bias * scale
            # (in, out, k, k) -> (out, k, k, in): output channel c k^2 + dy k + dx
            weight = (up.weight.permute(1, 2, 3, 0) * scale[:, None, None, None]).reshape(-1, up.in_channels)
            conv = nn.Conv2d(up.in_channels, weight.shape[0], 1)
            conv.weight.copy_(weight[:, :, None, None])
            conv.bias.copy_(shift.repeat_interleave(k * k))
        self.conv = nn.Sequential(conv, nn.ReLU()) if len(block) == 3 else nn.Sequential(conv)
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(self.conv(x), self.k)


def _prepare_upsamplings(model: nn.Module, qconfig, prepare_fx) -> list[tuple]:
    """Replace every transposed-convolution upsampling block (:func:`_upsampling_block`, the
    BiFPN decoders' ``conv_transpose_bn_act``) by an :class:`Int8Upsampling` whose
    convolution is observed for int8. Returns ``(parent, child name, example inputs)`` of
    each convolution."""
    from torch.fx import GraphModule

    found = [(parent, name, child) for parent in model.modules() if not isinstance(parent, GraphModule)
             for name, child in parent._modules.items() if _upsampling_block(child)]
    prepared = []
    for parent, name, block in found:
        upsampling = Int8Upsampling(block)
        inputs = (torch.zeros(1, block[0].in_channels, 8, 8),)
        upsampling.conv = prepare_fx(upsampling.conv, qconfig, inputs)
        setattr(parent, name, upsampling)
        prepared.append((upsampling, "conv", inputs))
    return prepared


# Points per pass through Int8PointHead's layers. One pass over all 8192 points of a render
# step made each layer's output 5 MB (MitoNet_v1_mini, 160 channels), a fresh allocation
# paid in page faults (1309 per step) and cache misses; in chunks of 2048 the layers of a
# step took 3.0 ms instead of 5.7 (1024: 3.2 ms; 512: 3.6 ms).
POINTS_PER_CHUNK = 2048


class Int8PointHead(nn.Module):
    """PointRend's point MLP (:class:`~panoptem.models.point_rend.StandardPointHead`) with
    int8 weights, on points as rows.

    Each layer's weights are split into the part that reads the previous layer (or the
    sampled features) and the part that reads the coarse logits. The first runs as an int8
    matrix product with activations quantized per call (``quantized::linear_dynamic``,
    about 3x faster than the float 1-D convolution at 8192 points), the second, and the
    final predictor, stay in float. Features and logits are sampled straight into rows
    (:func:`~panoptem.models.point_rend.sample_rows`), so nothing is transposed or
    concatenated. The points run through the layers :data:`POINTS_PER_CHUNK` at a time, each
    chunk's activations quantized on their own (so an image's result does not depend on the
    others in its batch).

    Where the feature map has fewer pixels than there are points, the first layer runs on
    the map's pixels and its result is sampled (both are linear; its bias is added after
    sampling, as sampling weighs pixels outside the map with zeros), as the prepared float
    model does (:mod:`panoptem._point_head_graph`). MitoNet_v1's 256 x 256 slices have a
    64 x 64 map for 8192 points per step.
    """

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

        convs = [next(m for m in layer.modules() if isinstance(m, nn.Conv1d)) for layer in head.fc_layers]
        classes = head.predictor.out_channels
        self.chunk = POINTS_PER_CHUNK
        self.layers = nn.ModuleList()
        coarse = []
        with torch.no_grad():
            for conv in convs:
                weight = conv.weight[:, :, 0]
                inner = weight[:, :-classes].contiguous()
                linear = DynamicLinear(inner.shape[1], inner.shape[0], dtype=torch.qint8)
                scales = inner.abs().amax(dim=1).clamp_min(1e-12) / 127.0
                packed = torch.quantize_per_channel(inner, scales, torch.zeros_like(scales, dtype=torch.long),
                                                    0, torch.qint8)
                if len(self.layers):
                    linear.set_weight_bias(packed, conv.bias.detach().clone())
                else:  # the first may run on a map's pixels: its bias is added after sampling
                    linear.set_weight_bias(packed, None)
                    self.register_buffer("first_bias", conv.bias.detach().clone())
                self.layers.append(linear)
                coarse.append(weight[:, -classes:].t())
            predictor = head.predictor.weight[:, :, 0]
        # (layer, class, output): row c is what coarse logit c adds to each output
        self.register_buffer("coarse_weights", torch.stack(coarse).contiguous())
        self.register_buffer("predictor_inner", predictor[:, :-classes].contiguous())
        self.register_buffer("predictor_coarse", predictor[:, -classes:].t().contiguous())
        self.register_buffer("predictor_bias", head.predictor.bias.detach().clone())

    def forward(self, fine: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        """Refined logits (P, C) of points given as rows: ``fine`` (P, nin), ``coarse`` (P, C)."""
        return self._after_first(self.layers[0](fine), coarse)

    def _after_first(self, first: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        """The logits from the first layer's features part ``first`` (P, fc_dim, without
        its bias) on: its bias, the coarse logits' part of each layer, the ReLUs, the later
        layers."""
        # the coarse logits' part is added class by class, elementwise: as a matrix product
        # with C = 1 columns (which TorchScript splits into mm + add) it took 4x longer
        classes = coarse.shape[1]
        x = first.add_(self.first_bias)
        for i, layer in enumerate(self.layers):
            if i > 0:
                x = layer(x)
            for c in range(classes):
                x.addcmul_(coarse[:, c:c + 1], self.coarse_weights[i, c])
            x = torch.relu_(x)
        out = F.linear(x, self.predictor_inner, self.predictor_bias)
        for c in range(classes):
            out.addcmul_(coarse[:, c:c + 1], self.predictor_coarse[c])
        return out

    def predict(self, features: torch.Tensor, coarse: torch.Tensor,
                point_coords: torch.Tensor) -> torch.Tensor:
        """As :meth:`StandardPointHead.predict`: logits (N, C, P) at ``point_coords``."""
        h, w = features.shape[-2], features.shape[-1]
        taps, tap_weights = bilinear_taps(point_coords, h, w)
        if coarse.shape[-2:] == features.shape[-2:]:
            coarse_taps, coarse_tap_weights = taps, tap_weights
        else:
            coarse_taps, coarse_tap_weights = bilinear_taps(point_coords, coarse.shape[-2], coarse.shape[-1])
        points = point_coords.shape[1]
        project = h * w < points
        out = []
        for i in range(point_coords.shape[0]):
            coarse_rows = sample_rows(coarse, coarse_taps, coarse_tap_weights, i)
            # the rows the points are sampled from: the map's pixels, or their projection by
            # the first layer
            table = features[i].permute(1, 2, 0).reshape(h * w, -1).contiguous()
            if project:
                table = self.layers[0](table)
            parts = []
            for start in range(0, points, self.chunk):
                end = min(start + self.chunk, points)
                rows = F.embedding_bag(taps[i, start:end], table, per_sample_weights=tap_weights[i, start:end],
                                       mode="sum")
                coarse_part = coarse_rows[start:end]
                parts.append(self._after_first(rows, coarse_part) if project else self(rows, coarse_part))
            out.append(torch.cat(parts).t())
        return torch.stack(out)


def _int8_point_heads(model: nn.Module) -> None:
    """Give every PointRend head of ``model`` an :class:`Int8PointHead` (no calibration:
    its activations are quantized per call)."""
    for pr in [m for m in model.modules() if isinstance(m, PointRendSemSegHead)]:
        pr.point_head = Int8PointHead(pr.point_head)


class ChannelsLastInput(nn.Module):
    """``module`` run on its input in channels-last (NHWC) memory format.

    In an int8 Panoptic-DeepLab model the ASPP branches hand over channels-last tensors (the
    layout of the int8 kernels), but the image-pooling branch does not, so their
    concatenation was made NCHW, and so was the float projection's output. The bilinear
    resize of that (16 x 16 to 64 x 64, 256 channels) took 3.6 ms against 0.11 ms
    channels-last, and the next int8 block copied the concatenated map back to
    channels-last (2.1 ms). With channels-last input the projection (still float, in the
    same kernel) returns channels-last, which removes both. The layout changes no value.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.contiguous(memory_format=torch.channels_last))


def _channels_last_aspp_projections(model: nn.Module) -> None:
    """Run every ASPP projection of ``model`` on channels-last input (:class:`ChannelsLastInput`)."""
    from panoptem.models.decoders.panoptic_deeplab import ASPP

    for aspp in [m for m in model.modules() if isinstance(m, ASPP)]:
        aspp.project = ChannelsLastInput(aspp.project)


def save_quantized(module: torch.jit.ScriptModule, path) -> None:
    """``torch.jit.save`` without TorchScript's deprecation notice."""
    with _quiet():
        torch.jit.save(module, os.fspath(path))


def model_from_torchscript(path, arch_config: dict) -> nn.Module:
    """Rebuild the fused float model of a TorchScript file exported by panoptem.

    ``arch_config`` is the MODEL section it was built from. The model is built, fused as
    the export fuses it, and given the file's weights (names and shapes must match), so it
    can be quantized with ``already_fused=True``.
    """
    from panoptem.models import build_model

    model = build_model(arch_config).eval()
    with torch.no_grad():
        model.fuse_model()
    with _quiet():
        scripted = torch.jit.load(os.fspath(path), map_location="cpu")
    try:
        model.load_state_dict(scripted.state_dict())
    except RuntimeError as err:
        raise PanoptemError(f"{path} was not exported from this architecture ({err}).") from None
    return model
