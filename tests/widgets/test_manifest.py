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
    "panoptem.export_segmentations": "Export Segmentations",
    "panoptem.count_labels": "Count Labels",
    "panoptem.merge_labels": "Merge Labels",
    "panoptem.delete_labels": "Delete Labels",
    "panoptem.morph_labels": "Morph Labels",
    "panoptem.split_labels": "Split Labels",
    "panoptem.filter_labels": "Filter Labels",
    "panoptem.jump_to_label": "Jump to label",
    "panoptem.next_available_label": "Find next available label",
    "panoptem.pick_patches": "Pick finetune/training patches",
    "panoptem.save_patches": "Save finetune/training patches",
    "panoptem.finetune_model": "Finetune a model",
    "panoptem.train_model": "Train a model",
    "panoptem.register_model": "Register a model",
    "panoptem.model_info": "Get model info",
    "panoptem.export_model": "Export a model",
    "panoptem.import_model": "Import a model",
    "panoptem.archive_model": "Archive a model",
    "panoptem.create_tiles": "Create Tiles",
    "panoptem.merge_tiles": "Merge Tiles",
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


def test_npe2_only_no_npe1_hooks():
    """The plugin is found through its npe2 manifest alone: no ``napari.plugin`` (npe1)
    entry point, no npe1 shim, no ``napari_hook_implementation`` anywhere in the plugin."""
    import pkgutil
    from importlib.metadata import distribution

    from npe2 import PluginManager

    import panoptem._widgets

    eps = distribution("panoptem").entry_points
    assert "napari.plugin" not in {ep.group for ep in eps}
    assert [ep.value for ep in eps if ep.group == "napari.manifest"] == ["panoptem:napari.yaml"]
    pm = PluginManager.instance()
    pm.discover()
    assert pm.get_manifest("panoptem").npe1_shim is False
    names = ["panoptem._reader", "panoptem._writer", "panoptem._sample_data"] + [
        f"panoptem._widgets.{m.name}" for m in pkgutil.iter_modules(panoptem._widgets.__path__)
    ]
    for name in names:
        module = importlib.import_module(name)
        hooks = [a for a in vars(module) if a.startswith("napari_") or "hook_implementation" in a]
        assert hooks == [], (name, hooks)
    text = (ROOT / "src" / "panoptem" / "napari.yaml").read_text()
    assert "napari_hook_implementation" not in text and "npe1" not in text


def test_every_contribution_of_the_issue(manifest):
    """Issue 5 item 1: seven widgets, a reader, a writer, sample data and settings."""
    c = manifest.contributions
    commands = {cmd.id for cmd in c.commands}
    for contribution in (*c.widgets, *c.readers, *c.writers, *c.sample_data):
        assert contribution.command in commands
    assert c.readers[0].accepts_directories
    assert set(c.writers[0].filename_extensions) == {".tif", ".tiff"}
    assert [s.key for s in c.sample_data] == ["lucchi"]
    props = {k: set(v.properties) for k, v in c.configurations.items()}
    assert props == {"models": {"model_home"}, "inference": {"device"}}
