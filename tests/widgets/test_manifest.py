"""The npe2 manifest: valid, every contribution importable, settings read by the widgets."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

npe2 = pytest.importorskip("npe2")

ROOT = Path(__file__).resolve().parents[2]

WIDGETS = {
    "panoptem.inference_2d": "2D Inference (Parameter Testing)",
    "panoptem.inference_3d": "3D Inference",
    "panoptem.register_model": "Register a model",
    "panoptem.model_info": "Get model info",
    "panoptem.export_model": "Export a model",
    "panoptem.import_model": "Import a model",
    "panoptem.archive_model": "Archive a model",
}


@pytest.fixture(scope="module")
def manifest():
    return npe2.PluginManifest.from_file(ROOT / "napari.yaml")


def test_manifest_is_the_packaged_one(manifest):
    link = ROOT / "src" / "panoptem" / "napari.yaml"
    assert link.is_symlink() and link.resolve() == (ROOT / "napari.yaml").resolve()
    assert manifest.name == "panoptem"


def test_widgets_and_names(manifest):
    widgets = {w.command: w.display_name for w in manifest.contributions.widgets}
    assert widgets == WIDGETS


def test_every_command_is_importable_and_callable(manifest):
    for cmd in manifest.contributions.commands:
        module, _, attr = cmd.python_name.partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), cmd.id


def test_reader_writer_sample(manifest):
    c = manifest.contributions
    assert [r.command for r in c.readers] == ["panoptem.read_zarr"]
    assert c.readers[0].filename_patterns == ["*.zarr"]
    assert [w.command for w in c.writers] == ["panoptem.write_labels"]
    assert list(c.writers[0].layer_types) == ["labels"]
    assert [s.display_name for s in c.sample_data] == ["Lucchi++ FIB-SEM (mitochondria)"]


def test_installed_plugin_is_discovered():
    from npe2 import PluginManager

    pm = PluginManager.instance()
    pm.discover()
    assert "panoptem" in {m.name for m in pm.iter_manifests()}


def test_settings_move_the_model_folder(manifest, tmp_path, monkeypatch, small_config):
    """The "Model folder" preference is what the widgets' model drop-down reads."""
    import yaml
    from napari import settings as napari_settings

    from panoptem import registry
    from panoptem._widgets import _common, _settings

    props = manifest.contributions.configurations
    assert props["models"].properties["model_home"].default == ""
    assert props["inference"].properties["device"].enum == ["auto", "cpu", "cuda"]

    monkeypatch.setattr(napari_settings, "_CFG_PATH", str(tmp_path / "settings.yaml"))
    napari_settings._clear_plugin_settings_cache()
    try:
        s = napari_settings.get_plugin_settings("panoptem")
        assert s.inference.device == "auto" and _settings.model_home() == ""
        other = tmp_path / "elsewhere"
        cfg = tmp_path / "m.yaml"
        cfg.write_text(yaml.safe_dump(small_config))
        s.models.model_home = str(other)
        monkeypatch.setenv(registry.HOME_ENV, str(tmp_path / "unused"))
        assert "ElsewhereNet" not in _common.model_choices()
        assert registry.home_dir() == other
        registry.register_model("ElsewhereNet", cfg)
        assert (other / "configs" / "ElsewhereNet.yaml").is_file()
        assert "ElsewhereNet" in _common.model_choices()
        s.inference.device = "cpu"
        assert _settings.default_use_gpu() is False
    finally:
        napari_settings._clear_plugin_settings_cache()
