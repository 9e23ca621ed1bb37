"""Tests of panoptem.registry: built-in and user configs, registration, model info, files.

Loading is tested in test_loading.py, downloading in test_download.py. Model files are tiny
scripted modules written into tmp_path (modelfiles.py); every test has its own PANOPTEM_HOME.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from modelfiles import (
    JIT_DEPRECATION,
    files_under,
    make_config,
    sha256,
    write_yaml,
)
from panoptem import loading, registry
from panoptem.errors import PanoptemError
from testutils import FINETUNE

# The tests build their model files with torch.jit.script/save, which torch 2.13 marks deprecated.
pytestmark = [pytest.mark.filterwarnings(JIT_DEPRECATION), pytest.mark.usefixtures("home")]

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
    config = make_config(model=str(tiny_pth))
    del config["FINETUNE"]
    write_yaml(home / "configs" / "Plain.yaml", config)
    info = registry.model_info("Plain")
    assert info.label_divisor is None
    assert "not given" in info.summary()


def test_unknown_model_lists_available():
    with pytest.raises(PanoptemError) as err:
        registry.get_config("NoSuchNet")
    message = str(err.value)
    assert "NoSuchNet" in message and "MitoNet_v1" in message and "DropNet_base_v1" in message
    with pytest.raises(PanoptemError, match="NoSuchNet"):
        loading.load_model("NoSuchNet")


def test_corrupt_user_yaml(home):
    bad = home / "configs" / "Broken.yaml"
    bad.parent.mkdir(parents=True)
    bad.write_text("model: [unclosed\nnorms: {mean: 0.5\n")
    assert "Broken" in registry.list_models()
    with pytest.raises(PanoptemError) as err:
        registry.get_config("Broken")
    assert str(bad) in str(err.value) and "YAML" in str(err.value)


def test_missing_keys(home):
    config = make_config()
    del config["padding_factor"], config["norms"]
    path = write_yaml(home / "configs" / "Incomplete.yaml", config)
    with pytest.raises(PanoptemError) as err:
        registry.get_config("Incomplete")
    message = str(err.value)
    assert str(path) in message and "padding_factor" in message and "norms" in message


def test_bad_values_rejected(home):
    path = write_yaml(home / "configs" / "Odd.yaml", make_config(padding_factor="16"))
    with pytest.raises(PanoptemError, match="padding_factor") as err:
        registry.get_config("Odd")
    assert str(path) in str(err.value)


# --------------------------------------------------------------------------------------
# Registering
# --------------------------------------------------------------------------------------
def test_register_local_model(tmp_path, home, tiny_pth):
    cfg = write_yaml(tmp_path / "cfg" / "mine.yaml", make_config())
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
    assert set(yaml.safe_load(written.read_text())) == set(make_config())


def test_register_existing_name_gets_new_suffix(tmp_path, tiny_pth):
    cfg = write_yaml(tmp_path / "mine.yaml", make_config(model=str(tiny_pth)))
    assert registry.register_model("MitoNet_v1", cfg) == "MitoNet_v1New"
    assert registry.register_model("MitoNet_v1", cfg) == "MitoNet_v1NewNew"
    assert registry.register_model("Mine", cfg) == "Mine"
    assert registry.register_model("Mine", cfg) == "MineNew"
    # the built-in is untouched
    assert registry.get_config("MitoNet_v1")["model"] == OFFICIAL["MitoNet_v1"][0]


def test_user_config_overrides_builtin(home, tiny_pth):
    write_yaml(home / "configs" / "Zeta.yaml", make_config(model=str(tiny_pth)))
    write_yaml(home / "configs" / "MitoNet_v1.yaml", make_config(model=str(tiny_pth)))
    names = registry.list_models()
    assert names == [*BUILTINS, "Zeta"]
    assert names.count("MitoNet_v1") == 1
    assert registry.get_config("MitoNet_v1")["model"] == str(tiny_pth)


def test_register_resolves_relative_path_next_to_config(tmp_path, tiny_pth):
    cfg = write_yaml(tmp_path / "mine.yaml", make_config(model="tiny.pth"))
    name = registry.register_model("Rel", cfg)
    assert registry.get_config(name)["model"] == str(tiny_pth.absolute())


def test_register_url_checks_syntax_only(tmp_path, home):
    cfg = write_yaml(tmp_path / "mine.yaml", make_config())
    url = "https://example.invalid/files/remote.pth?download=1"
    name = registry.register_model("Remote", cfg, model=url, quantized_model=url)
    config = registry.get_config(name)
    assert config["model"] == url and config["model_quantized"] == url
    assert files_under(home) == [home / "configs" / "Remote.yaml"]
    with pytest.raises(PanoptemError, match="scheme"):
        registry.register_model("Bad", cfg, model="ftp://example.invalid/remote.pth")
    with pytest.raises(PanoptemError, match="file name"):
        registry.register_model("Bad", cfg, model="https://example.invalid/")


def test_register_replacing_a_file_drops_its_checksum(tmp_path, tiny_pth):
    url = "https://example.invalid/files/remote.pth"
    cfg = write_yaml(
        tmp_path / "mine.yaml",
        make_config(
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
    assert loading.load_model(replaced).path == other.absolute()
    # a local copy of the very file the checksum is of keeps it (e.g. an imported model)
    good = sha256(other)
    cfg2 = write_yaml(tmp_path / "copy.yaml", make_config(model=url, model_hash=good))
    copied = registry.get_config(registry.register_model("Copy", cfg2, model=other))
    assert copied["model_hash"] == good and copied["model"] == str(other.absolute())


def test_register_drops_missing_quantized_with_warning(tmp_path, tiny_pth):
    cfg = write_yaml(
        tmp_path / "mine.yaml", make_config(model=str(tiny_pth), model_quantized="gone.pth")
    )
    with pytest.warns(UserWarning, match="gone.pth"):
        name = registry.register_model("Q", cfg)
    assert registry.get_config(name)["model_quantized"] is None


def test_register_errors(tmp_path, home, tiny_pth):
    cfg = write_yaml(tmp_path / "mine.yaml", make_config(model=str(tiny_pth)))
    with pytest.raises(PanoptemError, match="name is empty"):
        registry.register_model("", cfg)
    with pytest.raises(PanoptemError, match="name"):
        registry.register_model("a/b", cfg)
    yml = write_yaml(tmp_path / "mine.yml", make_config(model=str(tiny_pth)))
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
    incomplete = write_yaml(tmp_path / "incomplete.yaml", {"model": str(tiny_pth)})
    with pytest.raises(PanoptemError, match="thing_list"):
        registry.register_model("X", incomplete)
    assert "X" not in registry.list_models()


def test_fetch_file_local(tiny_pth, tmp_path):
    assert registry.fetch_file(tiny_pth) == tiny_pth
    assert registry.fetch_file(str(tiny_pth)) == tiny_pth
    with pytest.raises(PanoptemError) as err:
        registry.fetch_file(tmp_path / "absent.pth")
    assert str(tmp_path / "absent.pth") in str(err.value)


def test_relative_model_paths_are_relative_to_the_config(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    (tmp_path / "weights.pth").write_bytes(b"x")
    cfg = tmp_path / "sub" / "rel.yaml"
    cfg.write_text(
        yaml.safe_dump({**make_config(), "model": "../weights.pth", "model_quantized": None})
    )
    monkeypatch.chdir(tmp_path / "sub")
    assert registry.read_config(cfg)["model"] == str((tmp_path / "weights.pth").resolve())
