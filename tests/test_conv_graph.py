"""Channels-last oneDNN convolutions in a frozen float model (panoptem._conv_graph)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from modelfiles import JIT_DEPRECATION
from panoptem import loading
from panoptem._conv_graph import channels_last_convolutions
from panoptem._point_head_graph import onednn_point_convolutions, rewrite_point_heads

pytestmark = [pytest.mark.filterwarnings(JIT_DEPRECATION), pytest.mark.usefixtures("home")]
needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(),
                                  reason="this torch build has no oneDNN")

_CONVERTED = "mkldnn::_convolution_pointwise"
_PACKED = "prim::ConstantMKLDNNTensor"


def _nodes(module, kind: str) -> int:
    return len(module.graph.findAllNodes(kind, True))


def _normalised(image) -> torch.Tensor:
    x = torch.from_numpy(image.astype("float32") / 255.0)
    return ((x - 0.57571) / 0.12765)[None, None]


def _image_kernels(module, *args) -> dict[str, int]:
    """How often each convolution kernel ran on an image (not on PointRend's point rows,
    1 pixel high) in one call."""
    with torch.inference_mode(), torch.profiler.profile(record_shapes=True) as prof:
        module(*args)
    counts: dict[str, int] = {}
    for e in prof.events():
        shape = next((s for s in e.input_shapes if s), [])  # oneDNN's lists empty ones first
        if "conv" in e.name and len(shape) == 4 and shape[2] > 1:
            counts[e.name] = counts.get(e.name, 0) + 1
    return counts


@needs_onednn
def test_bundled_model_converted_gives_the_files_outputs(lucchi_image):
    """Every 2-D convolution of the bundled model becomes a channels-last oneDNN one, those
    with kernels larger than 1 x 1 with packed weights, and ReLUs that follow a convolution
    are fused into it; on a real EM crop the outputs are the file's."""
    plain = loading.load_model("panoptem_mito_small", optimize=False).module
    frozen = torch.jit.freeze(plain.eval())
    rewrite_point_heads(frozen)
    onednn_point_convolutions(frozen)
    convs = frozen.graph.findAllNodes("aten::conv2d", True)
    spatial = sum(n.inputsAt(1).toIValue().shape[-1] > 1 for n in convs)
    fusable = sum(len(n.output().uses()) == 1
                  and n.output().uses()[0].user.kind() in ("aten::relu", "aten::relu_")
                  for n in convs)
    relus = _nodes(frozen, "aten::relu") + _nodes(frozen, "aten::relu_")
    assert spatial > 10 and fusable > 10

    assert channels_last_convolutions(frozen) == len(convs)
    assert _nodes(frozen, "aten::conv2d") == 0 and _nodes(frozen, _CONVERTED) == len(convs)
    assert _nodes(frozen, _PACKED) == spatial
    assert _nodes(frozen, "aten::relu") + _nodes(frozen, "aten::relu_") == relus - fusable

    x = _normalised(lucchi_image[:256, :256])
    with torch.inference_mode():
        want, got = plain(x, 2, True), frozen(x, 2, True)
    for key in ("sem_logits", "ctr_hmp", "offsets"):
        assert torch.allclose(want[key], got[key], atol=1e-4), key
    assert ((want["sem_logits"] > 0) == (got["sem_logits"] > 0)).float().mean() > 0.999
    # every image convolution ran in the channels-last kernel; the file's ran elsewhere
    assert set(_image_kernels(frozen, x, 2, True)) == {_CONVERTED}
    assert set(_image_kernels(plain, x, 2, True)) >= {"aten::mkldnn_convolution"}


class _Convs(nn.Module):
    """Strided, dilated, depthwise and 1 x 1 convolutions, with and without bias, a ReLU
    that can be fused and one that cannot (the convolution's output is used twice)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.strided = nn.Conv2d(3, 16, 3, stride=2, padding=2, dilation=2)
        self.depthwise = nn.Conv2d(16, 16, 5, padding=2, groups=16, bias=False)
        self.pointwise = nn.Conv2d(16, 8, 1)
        self.last = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.strided(x))  # fused
        y = self.depthwise(y)
        z = self.pointwise(y)
        y = torch.relu(z) + z  # not fused: z is used twice
        return torch.relu_(self.last(y))  # fused


@needs_onednn
@pytest.mark.parametrize("shape", [(1, 3, 32, 32), (2, 3, 20, 52)])
def test_convolution_arguments_are_kept(shape):
    """The converted module computes what the module does, at the size the weights were
    packed for and at another, with a batch of 2."""
    module = _Convs().eval()
    frozen = torch.jit.freeze(torch.jit.script(module))
    assert channels_last_convolutions(frozen) == 4
    assert _nodes(frozen, _PACKED) == 3  # not the 1 x 1 one
    assert _nodes(frozen, "aten::relu") + _nodes(frozen, "aten::relu_") == 1
    x = torch.randn(*shape)
    with torch.inference_mode():
        want, got = module(x), frozen(x)
    assert got.shape == want.shape
    assert torch.allclose(want, got, atol=1e-5)


needs_bf16 = pytest.mark.skipif(not loading._native_bfloat16(),
                                reason="needs a CPU with native bfloat16 (AVX-512 BF16 or AMX)")


@needs_onednn
@needs_bf16
@pytest.mark.parametrize("shape", [(1, 3, 32, 32), (2, 3, 20, 52)])
def test_bfloat16_convolutions_compute_what_autocast_does(shape):
    """In bfloat16 the converted module computes what the module computes under bfloat16
    autocast (which casts inputs, weights and biases to bfloat16 on every call)."""
    module = _Convs().eval()
    frozen = torch.jit.freeze(torch.jit.script(module))
    assert channels_last_convolutions(frozen, torch.bfloat16) == 4
    assert _nodes(frozen, "aten::to") == 4 and _nodes(frozen, _PACKED) == 3
    x = torch.randn(*shape)
    with torch.inference_mode():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            want = module(x)
        got = frozen(x)
        exact = module(x)
    assert want.dtype == got.dtype == torch.bfloat16 and got.shape == want.shape
    assert torch.allclose(want.float(), got.float(), atol=1e-2, rtol=1e-2)
    assert not torch.equal(got.float(), exact)  # it did run in bfloat16
    with pytest.raises(ValueError, match="float32 or bfloat16, not torch.float16"):
        channels_last_convolutions(frozen, torch.float16)


class _NotFrozen(nn.Module):
    """Convolutions it must leave: a weight given at run time, padding given as a word."""

    def __init__(self) -> None:
        super().__init__()
        self.same = nn.Conv2d(2, 2, 3, padding="same")

    def forward(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self.same(torch.conv2d(x, weight))


def test_convolutions_it_cannot_take_are_left_as_they_are(monkeypatch):
    module = _NotFrozen().eval()
    frozen = torch.jit.freeze(torch.jit.script(module))
    before = str(frozen.graph)
    assert channels_last_convolutions(frozen) == 0
    assert str(frozen.graph) == before
    x, w = torch.randn(1, 2, 9, 9), torch.randn(2, 2, 1, 1)
    with torch.inference_mode():
        assert torch.allclose(module(x, w), frozen(x, w), atol=1e-6)

    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    frozen = torch.jit.freeze(torch.jit.script(_Convs().eval()))
    assert channels_last_convolutions(frozen) == 0 and _nodes(frozen, "aten::conv2d") == 4


@needs_onednn
def test_prepared_cpu_model_has_channels_last_convolutions_with_avx512(monkeypatch):
    """load_model's prepared float model on an AVX-512 CPU is the channels-last copy; on
    others (where those kernels ran MitoNet_v1 1.7-2x slower) optimize_for_inference's."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    loading.clear_model_cache()
    fast = loading.load_model("panoptem_mito_small")
    assert fast.optimized
    assert _nodes(fast.module, _CONVERTED) > 40 and _nodes(fast.module, "aten::conv2d") == 0
    assert _nodes(fast.module, "prim::mkldnn_convolution") == 0  # not optimize_for_inference's

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    loading.clear_model_cache()
    fast = loading.load_model("panoptem_mito_small")
    assert fast.optimized
    assert _nodes(fast.module, _CONVERTED) == 0 and _nodes(fast.module, "prim::mkldnn_convolution") > 40
