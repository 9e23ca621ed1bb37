"""Tests of panoptem.loading: a model file onto a device, the model cache, int8 fallback.

Model files are tiny scripted modules written into tmp_path (modelfiles.py).
"""

from __future__ import annotations

import os
import time

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
    assert not loaded.module.training
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


def test_quantized_engine_chosen_when_none(tmp_path, tiny_pth, monkeypatch):
    class NoEngine:  # stands in for torch.backends.quantized on a machine with none selected
        engine = "none"
        supported_engines = ["qnnpack", "none"]

    monkeypatch.setattr(torch.backends, "quantized", NoEngine)
    qfile = save_scripted(Tiny(), tmp_path / "tiny_quantized.pth")
    config = make_config(model=str(tiny_pth), model_quantized=str(qfile))
    assert NoEngine.engine == "none"  # nothing happens before loading
    assert loading.load_model(config, quantized=True).quantized is True
    assert NoEngine.engine == "qnnpack"


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


