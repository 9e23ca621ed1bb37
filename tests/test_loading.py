"""Tests of panoptem.loading: a model file onto a device, the model cache, int8 fallback.

Model files are tiny scripted modules written into tmp_path (modelfiles.py).
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from modelfiles import JIT_DEPRECATION, Broken, Tiny, make_config, save_scripted, write_yaml
from panoptem import loading, registry
from panoptem.errors import PanoptemError

pytestmark = [pytest.mark.filterwarnings(JIT_DEPRECATION), pytest.mark.usefixtures("home")]


def test_load_model_local_and_cached(tmp_path, tiny_pth):
    cfg = write_yaml(tmp_path / "mine.yaml", make_config(model=str(tiny_pth)))
    name = registry.register_model("Local", cfg)
    loaded = loading.load_model(name)
    assert isinstance(loaded.module, torch.jit.ScriptModule)
    assert loaded.optimized  # frozen for inference (a frozen module has no training flag)
    assert not loading.load_model(name, optimize=False).module.training
    assert loaded.device == torch.device("cpu") and loaded.quantized is False
    assert loaded.config["model"] == str(tiny_pth.absolute())
    out = loaded.module(torch.zeros(1, 1, 16, 16), 2, True)
    assert set(out) == {"sem_logits", "ctr_hmp", "offsets"}
    assert out["offsets"].shape == (1, 2, 16, 16)

    # same file + device -> same module object, whether by name, dict or torch.device
    assert loading.load_model(name).module is loaded.module
    assert loading.load_model(registry.get_config(name)).module is loaded.module
    assert loading.load_model(name, device=torch.device("cpu")).module is loaded.module
    assert loading.load_model(cfg).module is loaded.module  # a config path works too
    # quantized requested but the config has none -> float model, no warning
    assert loading.load_model(name, quantized=True).module is loaded.module

    loading.clear_model_cache()
    fresh = loading.load_model(name)
    assert fresh.module is not loaded.module

    # a file overwritten on disk (e.g. by finetuning) is read again
    time.sleep(0.01)
    save_scripted(Tiny(), tiny_pth)
    os.utime(tiny_pth, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert loading.load_model(name).module is not fresh.module


def test_load_model_bad_device(tiny_pth):
    config = make_config(model=str(tiny_pth))
    with pytest.raises(PanoptemError, match="device"):
        loading.load_model(config, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(PanoptemError, match="CUDA") as err:
            loading.load_model(config, device="cuda:1")
        assert "cpu" in str(err.value)


def test_load_model_missing_file(tmp_path):
    missing = tmp_path / "gone.pth"
    with pytest.raises(PanoptemError) as err:
        loading.load_model(make_config(model=str(missing)))
    assert str(missing) in str(err.value)


def test_corrupt_pth(tmp_path):
    bad = tmp_path / "random.pth"
    bad.write_bytes(os.urandom(4096))
    with pytest.raises(PanoptemError) as err:
        loading.load_model(make_config(model=str(bad)))
    message = str(err.value)
    assert str(bad) in message and "TorchScript" in message


def test_file_from_a_newer_torch_says_so(tmp_path, tiny_pth):
    """A file that calls an operation this torch lacks (torch 2.13's scripted interpolate
    names a lanczos resize that torch 2.11 does not know: seen with the bundled model)."""
    import zipfile

    newer = tmp_path / "newer.pth"
    with zipfile.ZipFile(tiny_pth) as src, zipfile.ZipFile(newer, "w") as dst:
        edited = 0
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("modelfiles.py"):  # Tiny's forward
                data = data.replace(b"torch.slice(", b"torch._upsample_from_the_future(", 1)
                edited += 1
            dst.writestr(info, data)
    assert edited
    with pytest.raises(PanoptemError) as err:
        loading.load_model(make_config(model=str(newer)))
    message = str(err.value)
    assert str(newer) in message and "newer PyTorch" in message and torch.__version__ in message
    assert "copy or download it again" not in message


def test_state_dict_is_not_torchscript(tmp_path):
    ckpt = tmp_path / "checkpoint.pth"
    torch.save(Tiny().state_dict(), ckpt)
    with pytest.raises(PanoptemError, match="export"):
        loading.load_model(make_config(model=str(ckpt)))


# --------------------------------------------------------------------------------------
# Quantized models
# --------------------------------------------------------------------------------------
def test_quantized_used_on_cpu(tmp_path, tiny_pth):
    qfile = save_scripted(Tiny(), tmp_path / "tiny_quantized.pth")
    config = make_config(model=str(tiny_pth), model_quantized=str(qfile))
    loaded = loading.load_model(config, quantized=True)
    assert loaded.quantized is True and loaded.path == qfile
    assert loading.load_model(config, quantized=True).module is loaded.module
    float_model = loading.load_model(config)
    assert float_model.quantized is False and float_model.module is not loaded.module


def test_quantized_corrupt_falls_back_to_float(tmp_path, tiny_pth):
    qfile = tmp_path / "tiny_quantized.pth"
    qfile.write_bytes(os.urandom(2048))
    config = make_config(model=str(tiny_pth), model_quantized=str(qfile))
    with pytest.warns(UserWarning, match="float"):
        loaded = loading.load_model(config, quantized=True)
    assert loaded.quantized is False
    assert loaded.module is loading.load_model(config).module


def test_quantized_that_cannot_run_falls_back(tmp_path, tiny_pth):
    qfile = save_scripted(Broken(), tmp_path / "broken_quantized.pth")
    config = make_config(model=str(tiny_pth), model_quantized=str(qfile))
    for _ in range(2):  # the second call remembers the failure and warns again
        with pytest.warns(UserWarning, match="not supported"):
            assert loading.load_model(config, quantized=True).quantized is False


X86_ENGINES = ["qnnpack", "onednn", "x86", "fbgemm", "none"]


@pytest.mark.parametrize(("amx", "before", "supported", "after"), [
    (False, "none", ["qnnpack", "none"], "qnnpack"),  # a machine with none selected
    (True, "none", ["qnnpack", "none"], "qnnpack"),
    # torch's default on x86: its oneDNN kernels kept a fast path only for the shape of their
    # first call (the one-unit smoke test), so int8 files are loaded for fbgemm instead
    (False, "x86", X86_ENGINES, "fbgemm"),
    # except with AMX int8, where oneDNN's engine runs them faster whatever the first shape
    (True, "x86", X86_ENGINES, "onednn"),
    (True, "x86", ["x86", "fbgemm", "none"], "fbgemm"),  # a build without it
])
def test_quantized_engine_selected_at_load(tmp_path, tiny_pth, monkeypatch, amx, before, supported,
                                           after):
    class Engines:  # stands in for torch.backends.quantized
        engine = before
        supported_engines = supported

    monkeypatch.setattr(torch.backends, "quantized", Engines)
    monkeypatch.setattr(loading, "_has_amx_int8", lambda: amx)
    qfile = save_scripted(Tiny(), tmp_path / "tiny_quantized.pth")
    config = make_config(model=str(tiny_pth), model_quantized=str(qfile))
    assert Engines.engine == before  # nothing happens before loading
    assert loading.load_model(config, quantized=True).quantized is True
    assert Engines.engine == after


def test_amx_int8_is_what_the_cpu_reports(monkeypatch):
    flags = Path("/proc/cpuinfo")
    if not flags.is_file():
        pytest.skip("needs Linux's /proc/cpuinfo")
    assert loading._has_amx_int8() == (" amx_int8" in flags.read_text())
    monkeypatch.delattr(torch.cpu, "get_capabilities")  # a torch that cannot tell
    assert loading._has_amx_int8() is False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_load_on_cuda(tmp_path, tiny_pth):
    qfile = save_scripted(Tiny(), tmp_path / "tiny_quantized.pth")
    config = make_config(model=str(tiny_pth), model_quantized=str(qfile))
    loaded = loading.load_model(config, device="cuda", quantized=True)
    assert loaded.quantized is False  # quantized models are CPU only, as in the original
    assert loaded.device == torch.device("cuda", torch.cuda.current_device())
    assert loading.load_model(config, device=loaded.device).module is loaded.module
    out = loaded.module(torch.zeros(1, 1, 16, 16, device=loaded.device), 2, True)
    assert out["sem_logits"].is_cuda




def _em_input() -> torch.Tensor:
    """A real Lucchi++ crop (128 x 128), normalised as the bundled model expects."""
    from testutils import em_png

    img = torch.from_numpy(em_png("lucchi_train_0000_y300_x400.png").astype("float32") / 255.0)
    return ((img - 0.57571) / 0.12765)[None, None]


def test_float_model_is_prepared_for_inference_once(tmp_path):
    fast = loading.load_model("panoptem_mito_small")
    plain = loading.load_model("panoptem_mito_small", optimize=False)
    assert fast.optimized and not plain.optimized
    assert fast.module is not plain.module
    assert loading.load_model("panoptem_mito_small").module is fast.module  # prepared once, cached
    # frozen: the weights are folded into the graph, no parameters are left
    assert not list(fast.module.parameters()) and list(plain.module.parameters())
    x = _em_input()
    with torch.inference_mode():
        want, got = plain.module(x, 2, False), fast.module(x, 2, False)
    for key in ("sem_logits", "ctr_hmp", "offsets"):
        assert torch.allclose(want[key], got[key], atol=1e-4), key


def test_model_that_cannot_be_prepared_runs_as_loaded(monkeypatch):
    def refuse(module, *args, **kwargs):
        raise RuntimeError("freezing is not supported for this module")

    monkeypatch.setattr(torch.jit, "freeze", refuse)
    with pytest.warns(UserWarning, match="cannot be prepared for faster inference.*freezing is not supported"):
        loaded = loading.load_model("panoptem_mito_small")
    assert not loaded.optimized and list(loaded.module.parameters())
    with torch.inference_mode():
        out = loaded.module(_em_input(), 2, False)
    assert out["sem_logits"].shape == (1, 1, 128, 128)


def test_prepared_copy_that_disagrees_is_not_used(monkeypatch):
    from modelfiles import Tiny

    class Off(torch.nn.Module):  # a "prepared" copy whose outputs are wrong
        def forward(self, x, render_steps: int, interpolate_ins: bool):
            return {k: v + 1 for k, v in module(x, render_steps, interpolate_ins).items()}

    module = torch.jit.script(Tiny()).eval()
    monkeypatch.setattr(loading, "channels_last_convolutions", lambda frozen: 1)  # "converted"
    monkeypatch.setattr(loading, "_freeze", lambda m, rewrite, onednn=False: Off())
    monkeypatch.setattr(torch.jit, "optimize_for_inference", lambda m, *a, **k: m)
    with pytest.warns(UserWarning, match="'sem_logits' output differs"):
        prepared, optimized = loading.prepare_for_inference(module, torch.device("cpu"), 16)
    assert prepared is module and not optimized


def test_each_way_of_preparing_is_tried_in_turn(monkeypatch):
    """On AVX-512 CPUs: channels-last convolutions first, then optimize_for_inference, each with the
    point-head rewrite and then without; the first copy that passes the check is used, and
    a copy that fails to be made or to agree makes way for the next (on GPUs only the
    optimize_for_inference ones are made)."""
    module = torch.jit.script(Tiny()).eval()
    made = []

    def freeze(m, rewrite, onednn=False, rows=False):
        made.append(("freeze", rewrite, onednn, rows))
        return torch.jit.freeze(m)

    def convert(frozen):
        made.append("channels-last")
        raise RuntimeError("oneDNN cannot take this graph")

    def optimize(frozen):
        made.append("optimize")
        if len(made) < 6:  # the rewritten one disagrees
            return lambda *args: {k: v + 1 for k, v in frozen(*args).items()}
        return frozen

    monkeypatch.setattr(loading, "_freeze", freeze)
    monkeypatch.setattr(loading, "channels_last_pays", lambda: True)
    monkeypatch.setattr(loading, "channels_last_convolutions", convert)
    monkeypatch.setattr(torch.jit, "optimize_for_inference", optimize)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prepared, optimized = loading.prepare_for_inference(module, torch.device("cpu"), 16)
    assert optimized and prepared is not module
    # the channels-last copy with the rewrite has its point heads on points as rows
    assert made == [("freeze", True, True, True), "channels-last", ("freeze", True, True, False),
                    "optimize", ("freeze", False, False, False), "channels-last",
                    ("freeze", False, False, False), "optimize"]
    assert [len(loading._prepared_candidates(module, torch.device(d))) for d in ("cpu", "cuda")] == [4, 2]
    monkeypatch.setattr(loading, "channels_last_pays", lambda: False)  # no AVX-512
    assert len(loading._prepared_candidates(module, torch.device("cpu"))) == 2


def _frozen(module) -> bool:
    """Whether ``module`` is frozen: its submodules' code inlined, none called."""
    return "prim::CallMethod" not in str(module.graph)


def test_quantized_model_is_prepared_where_channels_last_pays(monkeypatch, lucchi_image):
    """The bundled int8 file on an AVX-512 CPU: frozen, its float convolutions (the heads'
    last ones) made oneDNN ones, its int8 ones kept, and the same segmentation on a real
    crop as the file's module; on an AVX2 CPU, and when preparing fails, the file's module."""
    from panoptem.inference.engine import Engine2D, Params2D

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    loading.clear_model_cache()
    plain = loading.load_model("panoptem_mito_small", quantized=True, optimize=False)
    assert plain.quantized and not plain.optimized and not _frozen(plain.module)
    fast = loading.load_model("panoptem_mito_small", quantized=True)
    assert fast.quantized and fast.optimized and _frozen(fast.module)
    graph = str(fast.module.graph)
    assert "aten::conv2d" not in graph and "mkldnn::_convolution_pointwise" in graph
    assert "quantized::conv2d" in graph  # the int8 layers, inlined by freezing
    image = np.ascontiguousarray(lucchi_image[:256, :384])
    with monkeypatch.context() as m:
        m.setattr(loading, "load_model", lambda *a, **k: plain)
        engine = Engine2D("panoptem_mito_small", quantized=True)
        assert engine.loaded is plain
        want = engine.segment(image, Params2D())
    engine = Engine2D("panoptem_mito_small", quantized=True)
    assert engine.loaded.module is fast.module
    got = engine.segment(image, Params2D())
    assert want.max() > 5 and np.array_equal(got, want)

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    loading.clear_model_cache()
    avx2 = loading.load_model("panoptem_mito_small", quantized=True)
    assert not avx2.optimized and not _frozen(avx2.module)

    def broken(frozen):
        raise RuntimeError("no oneDNN here")

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(loading, "channels_last_convolutions", broken)
    loading.clear_model_cache()
    fallback = loading.load_model("panoptem_mito_small", quantized=True)
    assert fallback.quantized and not fallback.optimized and not _frozen(fallback.module)
    loading.clear_model_cache()


def test_weight_bytes_are_counted_before_freezing():
    """The float weights' size steers how many 3D slices go through the model per call; a
    frozen copy holds its weights in its graph, so they are counted on the file's module."""
    fast = loading.load_model("panoptem_mito_small")
    plain = loading.load_model("panoptem_mito_small", optimize=False)
    expected = sum(t.numel() * t.element_size() for t in plain.module.state_dict().values()
                   if t.is_floating_point())
    assert expected > 1_000_000
    assert fast.weight_bytes == plain.weight_bytes == expected
    assert loading.float_weight_bytes(fast.module) < expected  # what freezing leaves visible
    int8 = loading.load_model("panoptem_mito_small", quantized=True)
    assert int8.quantized and 0 < int8.weight_bytes < expected  # its float parts only

    class NoStateDict:
        def state_dict(self):
            raise RuntimeError("this module has no state dict")

    assert loading.float_weight_bytes(NoStateDict()) == 0


@pytest.fixture
def native_bf16(monkeypatch):
    """Pretend the CPU has native bfloat16, so no emulation warning (the numbers are the
    same either way: only the speed differs)."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)


def test_bfloat16_is_an_opt_in_that_agrees_with_float(native_bf16, lucchi_image):
    from panoptem.evaluation import evaluate
    from panoptem.inference.engine import Engine2D

    fast = loading.load_model("panoptem_mito_small")
    bf16 = loading.load_model("panoptem_mito_small", precision="bfloat16")
    assert fast.precision == "float32" and bf16.precision == "bfloat16"
    assert isinstance(bf16.module, loading.ReducedPrecision) and not bf16.optimized
    assert bf16.weight_bytes == fast.weight_bytes
    # cached apart from the float model, and reused
    assert loading.load_model("panoptem_mito_small", precision="bfloat16").module is bf16.module
    assert loading.load_model("panoptem_mito_small").module is fast.module
    assert {m.precision for m in loading.cached_models()} == {"float32", "bfloat16"}
    # frozen (no parameters left) unless optimize=False, which keeps the file's module
    plain16 = loading.load_model("panoptem_mito_small", precision="bfloat16", optimize=False)
    assert not list(bf16.module.module.parameters()) and list(plain16.module.module.parameters())

    x = _em_input()
    with torch.inference_mode():
        want, got = fast.module(x, 2, False), bf16.module(x, 2, False)
    for key in ("sem_logits", "ctr_hmp", "offsets"):
        assert got[key].dtype == torch.float32 and got[key].shape == want[key].shape
    assert not torch.equal(want["sem_logits"], got["sem_logits"])  # bfloat16 did run
    assert ((want["sem_logits"] > 0) == (got["sem_logits"] > 0)).float().mean() > 0.99

    image = lucchi_image[:512, :512]
    labels32 = Engine2D("panoptem_mito_small").segment(image)
    labels16 = Engine2D("panoptem_mito_small", precision="bfloat16").segment(image)
    m = evaluate(labels16, labels32)
    assert m.n_gt > 10 and m.fg_iou >= 0.98 and m.f1 >= 0.95, m


def _graph_nodes(module, kind: str) -> int:
    return len(module.graph.findAllNodes(kind, True))


@pytest.mark.skipif(not (loading.channels_last_pays() and loading._native_bfloat16()),
                    reason="needs a CPU with AVX-512 and native bfloat16")
def test_bfloat16_model_has_bfloat16_channels_last_convolutions(monkeypatch):
    """On CPUs with AVX-512 and native bfloat16 the bfloat16 model's convolutions are
    oneDNN channels-last ones with bfloat16 weights (its point head's wide layers float32
    oneDNN ones), and it computes nearly what autocast does over the frozen file's
    convolutions."""
    loading.clear_model_cache()
    bf16 = loading.load_model("panoptem_mito_small", precision="bfloat16").module
    assert _graph_nodes(bf16.module, "mkldnn::_convolution_pointwise") > 40
    assert _graph_nodes(bf16.module, "aten::conv2d") == 0
    assert _graph_nodes(bf16.module, "aten::to") > 40  # each convolution's input in bfloat16
    monkeypatch.setattr(loading, "_channels_last_reduced", lambda *args: None)
    loading.clear_model_cache()
    try:
        plain = loading.load_model("panoptem_mito_small", precision="bfloat16").module
    finally:
        loading.clear_model_cache()
    assert _graph_nodes(plain.module, "aten::conv2d") > 40
    x = _em_input()
    with torch.inference_mode():
        want, got = plain(x, 2, False), bf16(x, 2, False)
    for key in ("sem_logits", "ctr_hmp", "offsets"):
        assert got[key].dtype == torch.float32
        assert torch.allclose(want[key], got[key], atol=0.05, rtol=0.05), key
    assert ((want["sem_logits"] > 0) == (got["sem_logits"] > 0)).float().mean() > 0.999


def test_bfloat16_model_without_channels_last_convolutions_where_they_fail(native_bf16, monkeypatch):
    def fails(frozen, dtype=None):
        raise RuntimeError("no such kernel")

    monkeypatch.setattr(loading, "channels_last_pays", lambda: True)
    monkeypatch.setattr(loading, "channels_last_convolutions", fails)
    loading.clear_model_cache()
    try:
        loaded = loading.load_model("panoptem_mito_small", precision="bfloat16")
    finally:
        loading.clear_model_cache()
    assert loaded.precision == "bfloat16" and isinstance(loaded.module, loading.ReducedPrecision)
    assert _graph_nodes(loaded.module.module, "aten::conv2d") > 40  # frozen, convolutions as they were
    with torch.inference_mode():
        out = loaded.module(_em_input(), 2, False)
    assert all(bool(torch.isfinite(out[k]).all()) for k in ("sem_logits", "ctr_hmp", "offsets"))


def test_bfloat16_refusals(tiny_pth, monkeypatch):
    config = make_config(model=str(tiny_pth))
    with pytest.raises(PanoptemError, match="Unknown precision 'float16'.*float32, bfloat16"):
        loading.load_model(config, precision="float16")
    with pytest.raises(PanoptemError, match="either the quantized .* or bfloat16"):
        loading.load_model(config, quantized=True, precision="bfloat16")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    with pytest.warns(UserWarning, match="no native bfloat16.*slower than float32"):
        loaded = loading.load_model(config, precision="bfloat16")
    assert loaded.precision == "bfloat16"
    assert loading.cached_models()[-1].precision == "bfloat16"


def test_bfloat16_model_with_non_finite_outputs_is_refused(native_bf16):
    class Overflow(torch.nn.Module):  # its semantic logits overflow to infinity
        def forward(self, x, render_steps: int, interpolate_ins: bool):
            big = torch.full_like(x, 3e38) @ torch.ones(x.shape[-1], x.shape[-1])
            return {"sem_logits": big, "ctr_hmp": x, "offsets": torch.cat([x, x], 1)}

    module = torch.jit.script(Overflow()).eval()
    with pytest.raises(PanoptemError, match="'sem_logits' output is not finite in bfloat16"):
        loading.prepare_reduced_precision(module, torch.device("cpu"), 16, torch.bfloat16)
