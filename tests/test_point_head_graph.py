"""The PointRend point-head rewrite of a frozen model (panoptem._point_head_graph).

The rewritten first layer has two branches, chosen per call: the feature map projected
and then sampled (fewer map pixels than points), or the file's own concatenation and
convolution. Both must give the file's outputs, and so must both branches of the head on
points as rows (``rows=True``, panoptem._point_rows), which the channels-last CPU model runs.
"""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn

from modelfiles import JIT_DEPRECATION, Tiny
from panoptem import loading
from panoptem._conv_graph import channels_last_convolutions
from panoptem._point_head_graph import (
    onednn_point_convolutions,
    rewrite_point_heads,
    scatter_into_own_dtype,
)
from panoptem.models.point_rend import PointRendSemSegHead

pytestmark = [pytest.mark.filterwarnings(JIT_DEPRECATION), pytest.mark.usefixtures("home")]


def _projected_first(module, *args) -> bool:
    """Whether a call ran the projected branch: its first layer then convolves the coarse
    logits alone, an input of one channel and one row (1, 1, 1, points) once torch has made
    the 1-D convolution 2-D."""
    with torch.inference_mode(), torch.profiler.profile(record_shapes=True) as prof:
        module(*args)
    inputs = [e.input_shapes[0] for e in prof.events() if "conv" in e.name and e.input_shapes]
    assert any(len(s) == 4 and s[2] == 1 for s in inputs), "no point head ran"
    return any(len(s) == 4 and s[1] == 1 and s[2] == 1 for s in inputs)


def _row_layers(module, *args) -> int:
    """How many point-head layers a call of a model with the head on points as rows ran as
    convolutions of rows (input (1, channels, 1, points)): 2 per step after projecting
    first, 3 per step otherwise (the predictor is a matrix product)."""
    with torch.inference_mode(), torch.profiler.profile(record_shapes=True) as prof:
        module(*args)
    kinds = ("aten::convolution", "mkldnn::_convolution_pointwise")
    return sum(e.name in kinds and len(shape) == 4 and shape[0] == 1 and shape[2] == 1
               and shape[3] > 1 for e in prof.events()
               for shape in [next((s for s in e.input_shapes if s), [])])


def _normalised(image) -> torch.Tensor:
    x = torch.from_numpy(image.astype("float32") / 255.0)
    return ((x - 0.57571) / 0.12765)[None, None]


@pytest.mark.parametrize("rows", [False, True])
@pytest.mark.parametrize("size, projected", [(128, True), (384, False)])
def test_bundled_model_rewritten_gives_the_files_outputs(lucchi_image, size, projected, rows):
    """On a real EM crop: 128 x 128 has a 32 x 32 feature map for 4096 and 8192 points
    (projected); 384 x 384 has 96 x 96 = 9216 pixels for 8192 points (the file's layer).
    On points as rows, also once its convolutions are channels-last ones, as load_model
    prepares it on CPUs with AVX-512."""
    plain = loading.load_model("panoptem_mito_small", optimize=False).module
    frozen = torch.jit.freeze(plain.eval())
    assert rewrite_point_heads(frozen, rows=rows) == 1
    x = _normalised(lucchi_image[:size, :size])
    versions = [frozen]
    if rows:
        assert len(frozen.graph.findAllNodes("aten::embedding_bag", True)) == 2
        assert len(frozen.graph.findAllNodes("aten::conv1d", True)) == 0
        if torch.backends.mkldnn.is_available():
            converted = copy.deepcopy(frozen)
            assert channels_last_convolutions(converted) > 40
            versions.append(converted)
    with torch.inference_mode():
        want = plain(x, 2, True)
        for version in versions:
            got = version(x, 2, True)
            for key in ("sem_logits", "ctr_hmp", "offsets"):
                assert torch.allclose(want[key], got[key], atol=1e-4), key
            assert ((want["sem_logits"] > 0) == (got["sem_logits"] > 0)).float().mean() > 0.999
    for version in versions:
        if rows:
            assert _row_layers(version, x, 2, True) == 2 * (2 if projected else 3)
        else:
            assert _projected_first(version, x, 2, True) is projected


def test_prepared_models_carry_the_rewrite(monkeypatch):
    """load_model's prepared float model and its bfloat16 one both have it; the file's
    module (optimize=False) does not. The float model on a CPU with AVX-512 (channels-last
    convolutions) runs the head on points as rows, sampled by embedding_bag."""
    def samplers(module) -> tuple[int, int]:
        return tuple(len(module.graph.findAllNodes(kind, True))
                     for kind in ("aten::grid_sampler", "aten::embedding_bag"))

    plain = loading.load_model("panoptem_mito_small", optimize=False).module
    assert samplers(torch.jit.freeze(plain.eval())) == (2, 0)  # coarse logits and features
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    loading.clear_model_cache()
    fast = loading.load_model("panoptem_mito_small").module
    assert samplers(fast) == (3, 0)  # the features once more, in the projected branch
    if torch.backends.mkldnn.is_available():
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
        loading.clear_model_cache()
        fast = loading.load_model("panoptem_mito_small").module
        assert samplers(fast) == (1, 2)  # the coarse logits; the features in each branch
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)  # no warning
    bf16 = loading.load_model("panoptem_mito_small", precision="bfloat16").module
    assert samplers(bf16.module) == (3, 0)
    loading.clear_model_cache()  # no model prepared for a patched CPU is left for later tests


class _Render(nn.Module):
    """PointRend inference alone, as panoptem's models script it."""

    def __init__(self, num_points: int, kernel: int = 1, channels: int = 8, classes: int = 1) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.head = PointRendSemSegHead(channels, classes, subdivision_num_points=num_points)
        if kernel != 1:  # a point head of the same pattern that is not point-wise
            for layer in self.head.point_head.fc_layers:
                layer[0] = nn.Conv1d(channels + 1, channels, kernel, padding=kernel // 2)
            self.head.point_head.predictor = nn.Conv1d(channels + 1, 1, kernel, padding=kernel // 2)
        for p in self.head.parameters():
            nn.init.normal_(p, std=0.3)

    def forward(self, coarse: torch.Tensor, features: torch.Tensor, steps: int) -> torch.Tensor:
        return self.head.render(coarse, features, steps)


@pytest.mark.parametrize("num_points, projected", [(128, True), (16, False)])
def test_both_branches_equal_the_scripted_render(num_points, projected):
    """An 8 x 8 feature map (64 pixels): 128 points per step project first, 16 do not."""
    render = _Render(num_points).eval()
    coarse, features = torch.randn(2, 1, 8, 8), torch.randn(2, 8, 8, 8)
    frozen = torch.jit.freeze(torch.jit.script(render))
    assert rewrite_point_heads(frozen) == 1
    with torch.inference_mode():
        want, got = render(coarse, features, 2), frozen(coarse, features, 2)
    assert got.shape == (2, 1, 32, 32)
    assert torch.allclose(want, got, atol=1e-5)
    assert _projected_first(frozen, coarse, features, 2) is projected


@pytest.mark.parametrize("classes", [1, 3])
@pytest.mark.parametrize("num_points, projected", [(128, True), (16, False)])
def test_rows_head_equals_the_scripted_render(num_points, projected, classes):
    """The head on points as rows, in both branches, for one class and for several, on a
    batch of two: as rewritten, and with its convolutions made channels-last ones."""
    render = _Render(num_points, classes=classes).eval()
    coarse, features = torch.randn(2, classes, 8, 8), torch.randn(2, 8, 8, 8)
    frozen = torch.jit.freeze(torch.jit.script(render))
    assert rewrite_point_heads(frozen, rows=True) == 1
    versions = [frozen]
    if torch.backends.mkldnn.is_available():
        converted = copy.deepcopy(frozen)
        assert channels_last_convolutions(converted) > 0
        versions.append(converted)
    with torch.inference_mode():
        want = render(coarse, features, 2)
        for version in versions:
            got = version(coarse, features, 2)
            assert got.shape == (2, classes, 32, 32)
            assert torch.allclose(want, got, atol=1e-5)
            assert _row_layers(version, coarse, features, 2) == 2 * (2 if projected else 3)


def test_rows_need_bilinear_sampling_with_zeros_outside():
    """A head that samples its points otherwise (here: nearest) is rewritten as without
    ``rows``, and computes what it did."""
    render = _Render(128).eval()
    frozen = torch.jit.freeze(torch.jit.script(render))
    samplers = frozen.graph.findAllNodes("aten::grid_sampler", True)
    assert len(samplers) == 2
    for node in samplers:
        node.replaceInput(2, frozen.graph.insertConstant(1))  # mode: nearest
        node.inputsAt(2).node().moveBefore(node)
    nearest = copy.deepcopy(frozen)
    assert rewrite_point_heads(frozen, rows=True) == 1
    assert len(frozen.graph.findAllNodes("aten::embedding_bag", True)) == 0
    assert len(frozen.graph.findAllNodes("aten::grid_sampler", True)) == 3
    coarse, features = torch.randn(1, 1, 8, 8), torch.randn(1, 8, 8, 8)
    with torch.inference_mode():
        assert torch.allclose(nearest(coarse, features, 2), frozen(coarse, features, 2), atol=1e-5)


def test_graphs_it_does_not_cover_are_left_as_they_are():
    render = _Render(128, kernel=3).eval()
    frozen = torch.jit.freeze(torch.jit.script(render))
    before = str(frozen.graph)
    assert rewrite_point_heads(frozen) == 0
    assert str(frozen.graph) == before
    coarse, features = torch.randn(1, 1, 8, 8), torch.randn(1, 8, 8, 8)
    with torch.inference_mode():
        assert torch.allclose(render(coarse, features, 2), frozen(coarse, features, 2), atol=1e-6)

    tiny = torch.jit.freeze(torch.jit.script(Tiny()).eval())
    before = str(tiny.graph)
    assert rewrite_point_heads(tiny) == 0 and str(tiny.graph) == before


def test_a_rewrite_that_fails_leaves_the_frozen_model_without_it(monkeypatch):
    def fail(frozen, rows=False):
        raise RuntimeError("pattern rewriting is not supported here")

    monkeypatch.setattr(loading, "rewrite_point_heads", fail)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "cannot be prepared" warning either
        fast = loading.load_model("panoptem_mito_small")
        bf16 = loading.load_model("panoptem_mito_small", precision="bfloat16")
    assert fast.optimized and not list(fast.module.parameters())  # still frozen, optimised
    assert len(fast.module.graph.findAllNodes("aten::grid_sampler", True)) == 2
    assert len(bf16.module.module.graph.findAllNodes("aten::grid_sampler", True)) == 2


@pytest.mark.parametrize("num_points", [256, 16])
@pytest.mark.parametrize("rewrite", [True, False])
def test_large_point_convolutions_run_in_onednn(num_points, rewrite):
    """The point head's 1-D convolutions with 128 or more channels become oneDNN ones,
    which torch's own kernel ran 2x slower on one thread (as in the 3D modes); the
    predictor (one output) and the coarse logits' term (one input) stay, and so do the
    outputs. An 8 x 8 map: 256 points project first, 16 do not."""
    render = _Render(num_points, channels=128).eval()
    coarse, features = torch.randn(2, 1, 8, 8), torch.randn(2, 128, 8, 8)
    frozen = torch.jit.freeze(torch.jit.script(render))
    if rewrite:
        assert rewrite_point_heads(frozen) == 1
    assert onednn_point_convolutions(frozen) == 3  # the three 129 -> 128 layers
    assert len(frozen.graph.findAllNodes("aten::conv1d", True)) == (2 if rewrite else 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        want, plain_kernels = _wide_point_kernels(render, coarse, features, 2)
        got, kernels = _wide_point_kernels(frozen, coarse, features, 2)
    finally:
        torch.set_num_threads(threads)
    assert torch.allclose(want, got, atol=1e-4)
    # per step: the file's module runs its 3 layers and predictor in torch's kernel; the
    # converted one only the predictor, and its layers (2 after projecting first) in oneDNN's
    assert plain_kernels == {"aten::_slow_conv2d_forward": 2 * 4}
    layers = 2 if rewrite and num_points == 256 else 3
    assert kernels == {"aten::_slow_conv2d_forward": 2, "aten::mkldnn_convolution": 2 * layers}


_KERNELS = ("aten::_slow_conv2d_forward", "aten::mkldnn_convolution")


def _wide_point_kernels(module, *args) -> tuple[torch.Tensor, dict[str, int]]:
    """The output of a call, and which convolution kernels ran on 129-channel point rows."""
    with torch.inference_mode(), torch.profiler.profile(record_shapes=True) as prof:
        out = module(*args)
    counts: dict[str, int] = {}
    for e in prof.events():
        shape = next((s for s in e.input_shapes if s), [])  # oneDNN's lists 2 empty ones first
        if e.name in _KERNELS and len(shape) == 4 and shape[1] == 129 and shape[2] == 1:
            counts[e.name] = counts.get(e.name, 0) + 1
    return out, counts


def test_point_convolutions_converted_for_cpu_float_models_and_channels_last_bfloat16(monkeypatch):
    """The CPU float model's point convolutions become oneDNN ones; the bfloat16 model's too,
    with float32 inputs, where its convolutions become channels-last oneDNN ones (AVX-512 and
    native bfloat16), and not elsewhere: oneDNN's kernel, called directly, takes float32 only
    (the bundled model's 64-channel head itself stays in torch's kernel)."""
    calls = []
    monkeypatch.setattr(loading, "onednn_point_convolutions",
                        lambda frozen, float_inputs=False: calls.append(float_inputs) or 0)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    for pays, expected in ((False, []), (True, [True])):
        monkeypatch.setattr(loading, "channels_last_pays", lambda pays=pays: pays)
        calls.clear()
        loading.clear_model_cache()
        loading.load_model("panoptem_mito_small", precision="bfloat16")
        assert calls == expected
    calls.clear()
    fast = loading.load_model("panoptem_mito_small")
    assert fast.optimized and calls[-1] is False


class _WideLayer(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.Conv1d(128, 128, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def test_point_convolutions_with_float_inputs_take_bfloat16_points():
    """Under bfloat16 autocast a converted layer may meet bfloat16 points: with
    ``float_inputs`` it casts them to float32 and computes in float32 (without, oneDNN
    computes in bfloat16 and returns bfloat16)."""
    layer = _WideLayer().eval()
    x = torch.randn(1, 128, 300)
    plain = torch.jit.freeze(torch.jit.script(layer))
    assert onednn_point_convolutions(plain) == 1
    floats = torch.jit.freeze(torch.jit.script(layer))
    assert onednn_point_convolutions(floats, float_inputs=True) == 1
    with torch.inference_mode():
        want = layer(x.bfloat16().float())
        got = floats(x.bfloat16())
        assert plain(x.bfloat16()).dtype == torch.bfloat16
        assert torch.equal(floats(x), plain(x))  # float32 points: as without the cast
    assert got.dtype == torch.float32 and torch.allclose(want, got, atol=1e-5)


class _MixedScatter(nn.Module):
    """What PointRend's render meets under bfloat16 autocast on a GPU: a float32 target
    (CUDA's autocast keeps bilinear resizing in float32; here grid sampling, which CPU
    autocast keeps in float32, stands for it) and bfloat16 values from a 1-D convolution,
    scattered into it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(1, 1, 1)
        with torch.no_grad():  # values 3 - v: at least 1 away from the samples v they replace
            self.conv.weight.fill_(-1.0)
            self.conv.bias.fill_(3.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = torch.linspace(-0.9, 0.9, 8).reshape(1, 1, 4, 2)
        target = nn.functional.grid_sample(x, grid, align_corners=False).reshape(1, 1, 4)
        values = self.conv(target[:, :, :2])
        return target.scatter_(2, torch.tensor([[[0, 2]]]), values)


@pytest.mark.parametrize("freeze", [True, False])
def test_scattered_values_take_the_targets_dtype(freeze):
    """Frozen or not (the rewrite must come before the first call: TorchScript keeps the plan
    it ran, as ``load_model`` does)."""
    torch.manual_seed(0)
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(_MixedScatter().eval()), buffer)

    def made():  # loaded afresh each time, as load_model loads a file
        buffer.seek(0)
        module = torch.jit.load(buffer)
        return torch.jit.freeze(module) if freeze else module

    x = torch.rand(1, 1, 6, 6)
    with pytest.raises(RuntimeError, match="dtype"), torch.autocast("cpu", dtype=torch.bfloat16):
        made()(x)
    module = made()
    assert scatter_into_own_dtype(module) == 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = module(x)
    want = made()(x)
    assert got.dtype == torch.float32
    assert torch.allclose(got, want, atol=0.02)
    grid = torch.linspace(-0.9, 0.9, 8).reshape(1, 1, 4, 2)
    before = nn.functional.grid_sample(x, grid, align_corners=False).reshape(4)
    # the scattered points differ from what they replace, so `got` close to `want` shows they arrived
    assert (want[0, 0, [0, 2]] - before[[0, 2]]).abs().min() > 0.5
    assert torch.equal(module(x), want)  # float32 unchanged


def test_bfloat16_models_scatter_in_the_targets_dtype(monkeypatch):
    """The bundled model's bfloat16 preparation casts its refined points (render's scatter)."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    loading.clear_model_cache()
    module = loading.load_model("panoptem_mito_small", precision="bfloat16").module.module
    scatters = module.graph.findAllNodes("aten::scatter_", True)
    assert scatters and all(s.inputsAt(3).node().kind() == "aten::type_as" for s in scatters)
