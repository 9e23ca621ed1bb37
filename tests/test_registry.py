"""Tests of panoptem.registry: configs, registration, downloads and model loading.

Offline and fast: downloads are served by a local HTTP server on 127.0.0.1, model files are
tiny scripted modules written into tmp_path, and every test has its own PANOPTEM_HOME.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
from pathlib import Path
from typing import Dict  # noqa: UP035  (TorchScript wants typing.Dict in annotations)

import pytest
import torch
import yaml

from panoptem import registry
from panoptem.errors import Cancelled, PanoptemError
from panoptem.progress import CallbackProgress, Progress
from testutils import FINETUNE

# The tests build their model files with torch.jit.script/save, which torch 2.13 marks deprecated.
pytestmark = pytest.mark.filterwarnings(
    r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning"
)

# the built-ins in list order: MitoNet_v1 first (every tutorial of the original starts with
# it), the original's other three (checked against their official URLs), then panoptem's
# bundled model (tests/test_bundled_model.py)
BUILTINS = [
    "MitoNet_v1",
    "MitoNet_v1_mini",
    "NucleoNet_base_v2",
    "DropNet_base_v1",
    "panoptem_mito_small",
]
OFFICIAL = {
    "MitoNet_v1": (
        "https://zenodo.org/record/6861565/files/MitoNet_v1.pth?download=1",
        "https://zenodo.org/record/6861565/files/MitoNet_v1_quantized.pth?download=1",
        "mito",
        16,
    ),
    "MitoNet_v1_mini": (
        "https://zenodo.org/record/6861565/files/MitoNet_v1_mini.pth?download=1",
        "https://zenodo.org/record/6861565/files/MitoNet_v1_mini_quantized.pth?download=1",
        "mito",
        128,
    ),
    "NucleoNet_base_v2": (
        "https://zenodo.org/records/18142651/files/PanopticDeepLabPR_5f023685-7433-404c-"
        "9f3d-692898aff9ab_panoptic_deeplab_pointrend.pth?download=1",
        "https://zenodo.org/records/18142651/files/PanopticDeepLabPR_5f023685-7433-404c-"
        "9f3d-692898aff9ab_panoptic_deeplab_pointrend_quantized.pth?download=1",
        "nuclei",
        512,
    ),
    "DropNet_base_v1": (
        "https://zenodo.org/records/15298854/files/PanopticDeepLabPR_b0d99498-6c99-4b45-"
        "844e-2b4dca58f24a_panoptic_deeplab_pointrend.pth?download=1",
        "https://zenodo.org/records/15298854/files/PanopticDeepLabPR_b0d99498-6c99-4b45-"
        "844e-2b4dca58f24a_panoptic_deeplab_pointrend_quantized.pth?download=1",
        "lipid",
        512,
    ),
}


# --------------------------------------------------------------------------------------
# Fixtures and helpers
# --------------------------------------------------------------------------------------
class Tiny(torch.nn.Module):
    """Smallest module with the empanada model interface."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 1)

    def forward(
        self, x: torch.Tensor, render_steps: int = 2, interpolate_ins: bool = True
    ) -> Dict[str, torch.Tensor]:  # noqa: UP006
        y = self.conv(x)
        return {"sem_logits": y[:, :1], "ctr_hmp": y[:, 1:2], "offsets": y[:, 2:4]}


class Broken(torch.nn.Module):
    """Loads fine, fails when run (like a quantized file torch can no longer execute)."""

    def forward(
        self, x: torch.Tensor, render_steps: int = 2, interpolate_ins: bool = True
    ) -> Dict[str, torch.Tensor]:  # noqa: UP006
        raise RuntimeError("quantized op not supported")


def _save_scripted(module: torch.nn.Module, path: Path) -> Path:
    torch.jit.save(torch.jit.script(module.eval()), str(path))
    return path


def _config(**overrides) -> dict:
    config = {
        "class_names": {1: "mito"},
        "labels": [1],
        "thing_list": [1],
        "model": "unset.pth",
        "model_quantized": None,
        "padding_factor": 16,
        "norms": {"mean": 0.57571, "std": 0.12765},
        "description": "A test model.",
        "FINETUNE": FINETUNE,
    }
    config.update(overrides)
    return config


def _write_yaml(path: Path, config: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch) -> Path:
    """Private PANOPTEM_HOME, online mode, no proxy for loopback, empty model cache."""
    home = tmp_path / "home"
    monkeypatch.setenv("PANOPTEM_HOME", str(home))
    monkeypatch.delenv("PANOPTEM_OFFLINE", raising=False)
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    registry.clear_model_cache()
    yield home
    registry.clear_model_cache()


@pytest.fixture
def tiny_pth(tmp_path) -> Path:
    return _save_scripted(Tiny(), tmp_path / "tiny.pth")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sha256(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def _files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


# --------------------------------------------------------------------------------------
# Built-in configs and lookup
# --------------------------------------------------------------------------------------
def test_builtins_listed_with_official_urls():
    assert registry.list_models() == BUILTINS
    for name, (url, qurl, cls, pf) in OFFICIAL.items():
        config = registry.get_config(name)
        assert config["model"] == url
        assert config["model_quantized"] == qurl
        assert config["class_names"] == {1: cls}
        assert config["labels"] == [1] and config["thing_list"] == [1]
        assert config["padding_factor"] == pf
        assert config["norms"] == {"mean": 0.57571, "std": 0.12765}
        assert config["FINETUNE"] == FINETUNE
        assert config["description"].strip()


def test_defaults_and_no_folders_created(home, monkeypatch):
    monkeypatch.delenv("PANOPTEM_HOME")
    assert registry.home_dir() == Path.home() / ".empanada"
    assert registry.config_dir() == Path.home() / ".empanada" / "configs"
    monkeypatch.setenv("PANOPTEM_HOME", str(home))
    assert registry.home_dir() == home and registry.config_dir() == home / "configs"
    registry.list_models()
    registry.get_config("MitoNet_v1")
    registry.model_info("MitoNet_v1").summary()
    assert not home.exists()


def test_get_config_returns_fresh_copy():
    first = registry.get_config("MitoNet_v1")
    first["padding_factor"] = 999
    first["norms"]["mean"] = 0.0
    again = registry.get_config("MitoNet_v1")
    assert again["padding_factor"] == 16 and again["norms"]["mean"] == 0.57571


def test_model_info_mitonet():
    info = registry.model_info("MitoNet_v1")
    assert info.name == "MitoNet_v1"
    assert info.padding_factor == 16
    assert info.label_divisor == 1000
    assert info.class_names == {1: "mito"}
    assert info.thing_list == [1] and info.labels == [1]
    assert info.model == OFFICIAL["MitoNet_v1"][0]
    assert info.model_quantized == OFFICIAL["MitoNet_v1"][1]
    assert info.norms == {"mean": 0.57571, "std": 0.12765}
    assert "CEM-MitoLab" in info.description
    text = info.summary()
    assert "16" in text and "1000" in text and "mito" in text and "CEM-MitoLab" in text


def test_model_info_without_finetune_block(home, tiny_pth):
    config = _config(model=str(tiny_pth))
    del config["FINETUNE"]
    _write_yaml(home / "configs" / "Plain.yaml", config)
    info = registry.model_info("Plain")
    assert info.label_divisor is None
    assert "not given" in info.summary()


def test_unknown_model_lists_available():
    with pytest.raises(PanoptemError) as err:
        registry.get_config("NoSuchNet")
    message = str(err.value)
    assert "NoSuchNet" in message and "MitoNet_v1" in message and "DropNet_base_v1" in message
    with pytest.raises(PanoptemError, match="NoSuchNet"):
        registry.load_model("NoSuchNet")


def test_corrupt_user_yaml(home):
    bad = home / "configs" / "Broken.yaml"
    bad.parent.mkdir(parents=True)
    bad.write_text("model: [unclosed\nnorms: {mean: 0.5\n")
    assert "Broken" in registry.list_models()
    with pytest.raises(PanoptemError) as err:
        registry.get_config("Broken")
    assert str(bad) in str(err.value) and "YAML" in str(err.value)


def test_missing_keys(home):
    config = _config()
    del config["padding_factor"], config["norms"]
    path = _write_yaml(home / "configs" / "Incomplete.yaml", config)
    with pytest.raises(PanoptemError) as err:
        registry.get_config("Incomplete")
    message = str(err.value)
    assert str(path) in message and "padding_factor" in message and "norms" in message


def test_bad_values_rejected(home):
    path = _write_yaml(home / "configs" / "Odd.yaml", _config(padding_factor="16"))
    with pytest.raises(PanoptemError, match="padding_factor") as err:
        registry.get_config("Odd")
    assert str(path) in str(err.value)


# --------------------------------------------------------------------------------------
# Registering
# --------------------------------------------------------------------------------------
def test_register_local_model(tmp_path, home, tiny_pth):
    cfg = _write_yaml(tmp_path / "cfg" / "mine.yaml", _config())
    name = registry.register_model("MyNet", cfg, model=tiny_pth)
    assert name == "MyNet"
    written = home / "configs" / "MyNet.yaml"
    assert written.is_file()
    assert registry.list_models() == [*BUILTINS, "MyNet"]
    config = registry.get_config("MyNet")
    assert config["model"] == str(tiny_pth.absolute())
    assert config["model_quantized"] is None
    assert config["FINETUNE"] == FINETUNE
    # original-format keys survive a round trip
    assert set(yaml.safe_load(written.read_text())) == set(_config())


def test_register_existing_name_gets_new_suffix(tmp_path, tiny_pth):
    cfg = _write_yaml(tmp_path / "mine.yaml", _config(model=str(tiny_pth)))
    assert registry.register_model("MitoNet_v1", cfg) == "MitoNet_v1New"
    assert registry.register_model("MitoNet_v1", cfg) == "MitoNet_v1NewNew"
    assert registry.register_model("Mine", cfg) == "Mine"
    assert registry.register_model("Mine", cfg) == "MineNew"
    # the built-in is untouched
    assert registry.get_config("MitoNet_v1")["model"] == OFFICIAL["MitoNet_v1"][0]


def test_user_config_overrides_builtin(home, tiny_pth):
    _write_yaml(home / "configs" / "Zeta.yaml", _config(model=str(tiny_pth)))
    _write_yaml(home / "configs" / "MitoNet_v1.yaml", _config(model=str(tiny_pth)))
    names = registry.list_models()
    assert names == [*BUILTINS, "Zeta"]
    assert names.count("MitoNet_v1") == 1
    assert registry.get_config("MitoNet_v1")["model"] == str(tiny_pth)


def test_register_resolves_relative_path_next_to_config(tmp_path, tiny_pth):
    cfg = _write_yaml(tmp_path / "mine.yaml", _config(model="tiny.pth"))
    name = registry.register_model("Rel", cfg)
    assert registry.get_config(name)["model"] == str(tiny_pth.absolute())


def test_register_url_checks_syntax_only(tmp_path, home):
    cfg = _write_yaml(tmp_path / "mine.yaml", _config())
    url = "https://example.invalid/files/remote.pth?download=1"
    name = registry.register_model("Remote", cfg, model=url, quantized_model=url)
    config = registry.get_config(name)
    assert config["model"] == url and config["model_quantized"] == url
    assert _files_under(home) == [home / "configs" / "Remote.yaml"]
    with pytest.raises(PanoptemError, match="scheme"):
        registry.register_model("Bad", cfg, model="ftp://example.invalid/remote.pth")
    with pytest.raises(PanoptemError, match="file name"):
        registry.register_model("Bad", cfg, model="https://example.invalid/")


def test_register_replacing_a_file_drops_its_checksum(tmp_path, tiny_pth):
    url = "https://example.invalid/files/remote.pth"
    cfg = _write_yaml(
        tmp_path / "mine.yaml",
        _config(
            model=url,
            model_hash="sha256:" + "0" * 64,
            model_quantized=url,
            model_quantized_hash="sha256:" + "1" * 64,
        ),
    )
    kept = registry.get_config(registry.register_model("Same", cfg, model=url, quantized_model=url))
    assert kept["model_hash"] == "sha256:" + "0" * 64
    assert kept["model_quantized_hash"] == "sha256:" + "1" * 64
    other = tmp_path / "other.pth"
    other.write_bytes(tiny_pth.read_bytes())
    replaced = registry.get_config(
        registry.register_model("Other", cfg, model=other, quantized_model=other)
    )
    # the old checksums belonged to the replaced files: keeping them would refuse the new ones
    assert "model_hash" not in replaced and "model_quantized_hash" not in replaced
    assert registry.load_model(replaced).path == other.absolute()
    # a local copy of the very file the checksum is of keeps it (e.g. an imported model)
    good = _sha256(other)
    cfg2 = _write_yaml(tmp_path / "copy.yaml", _config(model=url, model_hash=good))
    copied = registry.get_config(registry.register_model("Copy", cfg2, model=other))
    assert copied["model_hash"] == good and copied["model"] == str(other.absolute())


def test_register_drops_missing_quantized_with_warning(tmp_path, tiny_pth):
    cfg = _write_yaml(
        tmp_path / "mine.yaml", _config(model=str(tiny_pth), model_quantized="gone.pth")
    )
    with pytest.warns(UserWarning, match="gone.pth"):
        name = registry.register_model("Q", cfg)
    assert registry.get_config(name)["model_quantized"] is None


def test_register_errors(tmp_path, home, tiny_pth):
    cfg = _write_yaml(tmp_path / "mine.yaml", _config(model=str(tiny_pth)))
    with pytest.raises(PanoptemError, match="name is empty"):
        registry.register_model("", cfg)
    with pytest.raises(PanoptemError, match="name"):
        registry.register_model("a/b", cfg)
    yml = _write_yaml(tmp_path / "mine.yml", _config(model=str(tiny_pth)))
    with pytest.raises(PanoptemError, match=r"\.yaml"):
        registry.register_model("X", yml)
    with pytest.raises(PanoptemError, match="does not exist"):
        registry.register_model("X", tmp_path / "nowhere.yaml")
    missing = tmp_path / "missing.pth"
    with pytest.raises(PanoptemError) as err:
        registry.register_model("X", cfg, model=missing)
    assert str(missing) in str(err.value)
    corrupt = tmp_path / "corrupt.yaml"
    corrupt.write_text("class_names: {1: mito\n  - ]")
    with pytest.raises(PanoptemError, match="YAML") as err:
        registry.register_model("X", corrupt)
    assert str(corrupt) in str(err.value)
    incomplete = _write_yaml(tmp_path / "incomplete.yaml", {"model": str(tiny_pth)})
    with pytest.raises(PanoptemError, match="thing_list"):
        registry.register_model("X", incomplete)
    assert "X" not in registry.list_models()


# --------------------------------------------------------------------------------------
# Local files and loading
# --------------------------------------------------------------------------------------
def test_fetch_file_local(tiny_pth, tmp_path):
    assert registry.fetch_file(tiny_pth) == tiny_pth
    assert registry.fetch_file(str(tiny_pth)) == tiny_pth
    with pytest.raises(PanoptemError) as err:
        registry.fetch_file(tmp_path / "absent.pth")
    assert str(tmp_path / "absent.pth") in str(err.value)


def test_load_model_local_and_cached(tmp_path, tiny_pth):
    cfg = _write_yaml(tmp_path / "mine.yaml", _config(model=str(tiny_pth)))
    name = registry.register_model("Local", cfg)
    loaded = registry.load_model(name)
    assert isinstance(loaded.module, torch.jit.ScriptModule)
    assert not loaded.module.training
    assert loaded.device == torch.device("cpu") and loaded.quantized is False
    assert loaded.config["model"] == str(tiny_pth.absolute())
    out = loaded.module(torch.zeros(1, 1, 16, 16), 2, True)
    assert set(out) == {"sem_logits", "ctr_hmp", "offsets"}
    assert out["offsets"].shape == (1, 2, 16, 16)

    # same file + device -> same module object, whether by name, dict or torch.device
    assert registry.load_model(name).module is loaded.module
    assert registry.load_model(registry.get_config(name)).module is loaded.module
    assert registry.load_model(name, device=torch.device("cpu")).module is loaded.module
    assert registry.load_model(cfg).module is loaded.module  # a config path works too
    # quantized requested but the config has none -> float model, no warning
    assert registry.load_model(name, quantized=True).module is loaded.module

    registry.clear_model_cache()
    fresh = registry.load_model(name)
    assert fresh.module is not loaded.module

    # a file overwritten on disk (e.g. by finetuning) is read again
    time.sleep(0.01)
    _save_scripted(Tiny(), tiny_pth)
    os.utime(tiny_pth, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert registry.load_model(name).module is not fresh.module


def test_load_model_bad_device(tiny_pth):
    config = _config(model=str(tiny_pth))
    with pytest.raises(PanoptemError, match="device"):
        registry.load_model(config, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(PanoptemError, match="CUDA") as err:
            registry.load_model(config, device="cuda:1")
        assert "cpu" in str(err.value)


def test_load_model_missing_file(tmp_path):
    missing = tmp_path / "gone.pth"
    with pytest.raises(PanoptemError) as err:
        registry.load_model(_config(model=str(missing)))
    assert str(missing) in str(err.value)


def test_corrupt_pth(tmp_path):
    bad = tmp_path / "random.pth"
    bad.write_bytes(os.urandom(4096))
    with pytest.raises(PanoptemError) as err:
        registry.load_model(_config(model=str(bad)))
    message = str(err.value)
    assert str(bad) in message and "TorchScript" in message


def test_state_dict_is_not_torchscript(tmp_path):
    ckpt = tmp_path / "checkpoint.pth"
    torch.save(Tiny().state_dict(), ckpt)
    with pytest.raises(PanoptemError, match="export"):
        registry.load_model(_config(model=str(ckpt)))


# --------------------------------------------------------------------------------------
# Quantized models
# --------------------------------------------------------------------------------------
def test_quantized_used_on_cpu(tmp_path, tiny_pth):
    qfile = _save_scripted(Tiny(), tmp_path / "tiny_quantized.pth")
    config = _config(model=str(tiny_pth), model_quantized=str(qfile))
    loaded = registry.load_model(config, quantized=True)
    assert loaded.quantized is True and loaded.path == qfile
    assert registry.load_model(config, quantized=True).module is loaded.module
    float_model = registry.load_model(config)
    assert float_model.quantized is False and float_model.module is not loaded.module


def test_quantized_corrupt_falls_back_to_float(tmp_path, tiny_pth):
    qfile = tmp_path / "tiny_quantized.pth"
    qfile.write_bytes(os.urandom(2048))
    config = _config(model=str(tiny_pth), model_quantized=str(qfile))
    with pytest.warns(UserWarning, match="float"):
        loaded = registry.load_model(config, quantized=True)
    assert loaded.quantized is False
    assert loaded.module is registry.load_model(config).module


def test_quantized_that_cannot_run_falls_back(tmp_path, tiny_pth):
    qfile = _save_scripted(Broken(), tmp_path / "broken_quantized.pth")
    config = _config(model=str(tiny_pth), model_quantized=str(qfile))
    for _ in range(2):  # the second call remembers the failure and warns again
        with pytest.warns(UserWarning, match="not supported"):
            assert registry.load_model(config, quantized=True).quantized is False


def test_quantized_engine_chosen_when_none(tmp_path, tiny_pth, monkeypatch):
    class NoEngine:  # stands in for torch.backends.quantized on a machine with none selected
        engine = "none"
        supported_engines = ["qnnpack", "none"]

    monkeypatch.setattr(torch.backends, "quantized", NoEngine)
    qfile = _save_scripted(Tiny(), tmp_path / "tiny_quantized.pth")
    config = _config(model=str(tiny_pth), model_quantized=str(qfile))
    assert NoEngine.engine == "none"  # nothing happens before loading
    assert registry.load_model(config, quantized=True).quantized is True
    assert NoEngine.engine == "qnnpack"


# --------------------------------------------------------------------------------------
# Downloads (local HTTP server only)
# --------------------------------------------------------------------------------------
def test_load_through_url_then_from_cache(home, server, tiny_pth):
    (server.root / "tiny.pth").write_bytes(tiny_pth.read_bytes())
    url = f"{server.url}/tiny.pth?download=1"
    config = _config(model=url)
    events = []
    loaded = registry.load_model(config, progress=CallbackProgress(lambda *e: events.append(e)))
    cached = home / "tiny.pth"
    assert cached.read_bytes() == tiny_pth.read_bytes()
    assert loaded.path == cached
    assert _files_under(home) == [cached]  # no temporary files left
    size = cached.stat().st_size
    assert events[0] == ("Downloading tiny.pth", 0, size) and events[-1][1:] == (size, size)
    assert len(server.requests) == 1

    server.stop()
    registry.clear_model_cache()
    again = registry.load_model(config)
    assert again.path == cached and again.module is not loaded.module


def test_checksum_ok_and_mismatch(home, server, tiny_pth):
    (server.root / "tiny.pth").write_bytes(tiny_pth.read_bytes())
    url = f"{server.url}/tiny.pth"
    wrong = "sha256:" + "0" * 64
    with pytest.raises(PanoptemError) as err:
        registry.fetch_file(url, known_hash=wrong)
    message = str(err.value)
    assert "checksum" in message and url in message and str(home / "tiny.pth") in message
    assert _files_under(home) == []

    good = _sha256(tiny_pth)
    assert registry.fetch_file(url, known_hash=good) == home / "tiny.pth"
    # a cached file that does not match the config's hash is not used
    with pytest.raises(PanoptemError, match="checksum"):
        registry.load_model(_config(model=url, model_hash=wrong))
    assert registry.load_model(_config(model=url, model_hash=good)).path == home / "tiny.pth"


def test_bad_checksum_syntax(server):
    with pytest.raises(PanoptemError, match="algorithm"):
        registry.fetch_file(f"{server.url}/x.pth", known_hash="nohash:abc")
    assert server.requests == []


def test_http_404(home, server):
    url = f"{server.url}/missing.pth?download=1"
    with pytest.raises(PanoptemError) as err:
        registry.load_model(_config(model=url))
    message = str(err.value)
    assert "404" in message and url in message and str(home / "missing.pth") in message
    assert _files_under(home) == []


def test_unreachable_url_fails_fast(home):
    url = f"http://127.0.0.1:{_closed_port()}/model.pth"
    start = time.monotonic()
    with pytest.raises(PanoptemError) as err:
        registry.fetch_file(url)
    assert time.monotonic() - start < 5
    assert url in str(err.value) and str(home / "model.pth") in str(err.value)


def test_offline_mode(home, server, tiny_pth, monkeypatch):
    (server.root / "tiny.pth").write_bytes(tiny_pth.read_bytes())
    url = f"{server.url}/tiny.pth?download=1"
    monkeypatch.setenv("PANOPTEM_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(PanoptemError) as err:
        registry.load_model(_config(model=url))
    assert time.monotonic() - start < 1
    message = str(err.value)
    assert url in message and str(home / "tiny.pth") in message and "PANOPTEM_OFFLINE" in message
    assert server.requests == []
    # a file placed by hand is used while offline
    home.mkdir()
    (home / "tiny.pth").write_bytes(tiny_pth.read_bytes())
    assert registry.load_model(_config(model=url)).path == home / "tiny.pth"
    assert server.requests == []


def test_cancelled_download_leaves_nothing(home, server):
    (server.root / "big.pth").write_bytes(os.urandom(3 * 2**20))

    class CancelOnFirstChunk(Progress):
        def on_advance(self, done: int, total: int) -> None:
            self.cancel()

    with pytest.raises(Cancelled):
        registry.fetch_file(f"{server.url}/big.pth", progress=CancelOnFirstChunk())
    assert _files_under(home) == []


def test_corrupt_download_suggests_deleting(home, server):
    (server.root / "junk.pth").write_bytes(os.urandom(1024))
    with pytest.raises(PanoptemError) as err:
        registry.load_model(_config(model=f"{server.url}/junk.pth"))
    message = str(err.value)
    assert "delete" in message and str(home / "junk.pth") in message


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_load_on_cuda(tmp_path, tiny_pth):
    qfile = _save_scripted(Tiny(), tmp_path / "tiny_quantized.pth")
    config = _config(model=str(tiny_pth), model_quantized=str(qfile))
    loaded = registry.load_model(config, device="cuda", quantized=True)
    assert loaded.quantized is False  # quantized models are CPU only, as in the original
    assert loaded.device == torch.device("cuda", torch.cuda.current_device())
    assert registry.load_model(config, device=loaded.device).module is loaded.module
    out = loaded.module(torch.zeros(1, 1, 16, 16, device=loaded.device), 2, True)
    assert out["sem_logits"].is_cuda


def test_relative_model_paths_are_relative_to_the_config(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    (tmp_path / "weights.pth").write_bytes(b"x")
    cfg = tmp_path / "sub" / "rel.yaml"
    cfg.write_text(
        yaml.safe_dump({**_config(), "model": "../weights.pth", "model_quantized": None})
    )
    monkeypatch.chdir(tmp_path / "sub")
    assert registry.read_config(cfg)["model"] == str((tmp_path / "weights.pth").resolve())
