"""The model widgets (Register / Get info / Export / Import / Archive), driven through their
fields and buttons: registry effects, files on disk, the shown text and the notifications.

Offline: URL models are served by a local HTTP server on 127.0.0.1.
"""

from __future__ import annotations

import socket
import zipfile
from pathlib import Path

import pytest
import yaml
from widgetutils import click, open_from_menu

from panoptem import model_archive, registry

WIDGETS = {
    "Register a model": (
        "Register model",
        [
            "Model name",
            "Model config file",
            "Model file (optional)",
            "Quantized model file (optional)",
        ],
    ),
    "Get model info": ("Print info to terminal", ["Model name", "Model info"]),
    "Export a model": ("Export model", ["Model name", "Export path"]),
    "Import a model": ("Import model", ["New model name (no spaces)", "Model file"]),
    "Archive a model": ("Archive model", ["Model name"]),
}


@pytest.fixture
def viewer(make_napari_viewer):
    return make_napari_viewer()


def _make(viewer, title: str):
    """The widget ``title``, opened as Plugins > panoptem > ``title`` opens it."""
    return open_from_menu(viewer, title)


def _set(widget, **values):
    for name, value in values.items():
        getattr(widget, name).value = value


def _copy(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(src.read_bytes())
    return dst


def _texts(notifications, level: str) -> list[str]:
    return [text for severity, text in notifications if severity == level]


@pytest.fixture
def config_file(tmp_path, small_config) -> Path:
    path = tmp_path / "cfg" / "mine.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(small_config))
    return path


# --------------------------------------------------------------------------------------
def test_titles_labels_and_buttons(viewer):
    for title, (button, labels) in WIDGETS.items():
        widget = _make(viewer, title)
        assert widget._call_button.text == button
        assert [w.label for w in widget if w is not widget._call_button] == labels
    imp = _make(viewer, "Import a model")
    assert imp.model_name.value == "NewModelImported"
    export = _make(viewer, "Export a model")
    assert export.model_name.choices[:4] == tuple(registry.list_models()[:4])


def test_path_or_url_restores_urls():
    from panoptem._widgets.models import path_or_url

    url = "https://zenodo.org/records/1/files/MitoNet_v1.pth?download=1"
    assert path_or_url(Path.cwd() / Path(url)) == url  # what magicgui's FileEdit gives
    assert path_or_url(r"C:\Users\me\https:\zenodo.org\f.pth") == "https://zenodo.org/f.pth"
    assert path_or_url(Path(".")) is None and path_or_url("") is None
    assert path_or_url(Path("/data/model.pth")) == "/data/model.pth"


def test_register_local_files(
    viewer, wait_job, notifications, config_file, small_model_file, tmp_path
):
    widget = _make(viewer, "Register a model")
    quant = _copy(small_model_file, tmp_path / "q" / "mine_quantized.pth")
    _set(
        widget,
        model_name="Mine",
        config_file=config_file,
        model_file=small_model_file,
        model_quant_file=quant,
    )
    job = wait_job(click(widget))
    assert job.error is None and job.result == ("Mine", [])
    config = registry.get_config("Mine")
    assert config["model"] == str(small_model_file)
    assert config["model_quantized"] == str(quant)
    assert any("Registered model 'Mine'" in t for t in _texts(notifications, "info"))

    # the same name again: registered as MineNew, as in the original
    _set(widget, model_file="", model_quant_file="")
    job = wait_job(click(widget))
    assert job.result[0] == "MineNew"
    assert registry.get_config("MineNew")["model"] == str(small_model_file)
    assert any("'MineNew' (the name 'Mine' was taken)" in t for t in _texts(notifications, "info"))


def test_register_url_is_downloaded_with_progress(
    viewer, wait_job, notifications, server, config_file, small_model_file, panoptem_home
):
    _copy(small_model_file, server.root / "remote.pth")
    url = f"{server.url}/remote.pth?download=1"
    widget = _make(viewer, "Register a model")
    _set(widget, model_name="Remote", config_file=config_file, model_file=url)
    job = wait_job(click(widget))
    assert job.error is None
    assert registry.get_config("Remote")["model"] == url  # the URL survived the file picker
    assert (panoptem_home / "remote.pth").read_bytes() == small_model_file.read_bytes()
    assert job.progress.stage_name == "Downloading remote.pth"
    assert job.progress.done == job.progress.total == small_model_file.stat().st_size
    assert server.requests == ["/remote.pth?download=1"]


def test_register_unreachable_url_is_an_error(viewer, wait_job, notifications, config_file):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/gone.pth"
    widget = _make(viewer, "Register a model")
    _set(widget, model_name="Gone", config_file=config_file, model_file=url)
    job = wait_job(click(widget))
    assert job.error is not None
    assert "Gone" not in registry.list_models()
    assert any(url in t for t in _texts(notifications, "error"))


def test_register_field_errors(viewer, wait_job, notifications, config_file, tmp_path):
    widget = _make(viewer, "Register a model")
    _set(widget, model_name="  ", config_file=config_file)
    assert click(widget) is None
    assert any("Model name cannot be empty" in t for t in _texts(notifications, "error"))
    _set(widget, model_name="X", config_file="")
    assert click(widget) is None
    assert any("Model config file" in t for t in _texts(notifications, "error"))
    bad = tmp_path / "cfg.txt"
    bad.write_text(config_file.read_text())
    _set(widget, config_file=bad)
    wait_job(click(widget))
    assert any("must be a .yaml file" in t for t in _texts(notifications, "error"))
    _set(widget, config_file=config_file, model_file=tmp_path / "missing.pth")
    wait_job(click(widget))
    assert any("missing.pth" in t for t in _texts(notifications, "error"))
    assert "X" not in registry.list_models()


def test_model_info_is_shown_in_the_widget(viewer, registered_model, notifications, capsys):
    widget = _make(viewer, "Get model info")
    widget.model_name.reset_choices()
    widget.model_name.value = registered_model
    shown = widget.model_info.value  # updated on selection
    assert "Model: SmallTestNet" in shown and "small test model" in shown
    assert "padding factor): 16" in shown and "1: mito (instance)" in shown
    assert widget.model_info.native.isReadOnly()
    assert click(widget) == shown  # the button shows it and prints it
    assert "Model: SmallTestNet" in capsys.readouterr().out

    widget.model_name.value = "MitoNet_v1"
    assert "Model: MitoNet_v1" in widget.model_info.value
    assert "zenodo.org" in widget.model_info.value


def test_model_info_broken_config_is_a_notification(viewer, notifications, panoptem_home):
    (panoptem_home / "configs").mkdir(parents=True)
    (panoptem_home / "configs" / "Broken.yaml").write_text("model: [unclosed\n")
    widget = _make(viewer, "Get model info")
    widget.model_name.reset_choices()
    widget.model_name.value = "Broken"
    assert widget.model_info.value == ""
    assert click(widget) is None
    assert any("not valid YAML" in t for t in _texts(notifications, "error"))


def test_export_then_import(
    viewer, wait_job, notifications, registered_model, tmp_path, small_model_file, panoptem_home
):
    export = _make(viewer, "Export a model")
    export.model_name.reset_choices()
    _set(export, model_name=registered_model, export_path=tmp_path / "exported")
    job = wait_job(click(export))
    archive = tmp_path / "exported" / f"{registered_model}.empanada"
    assert job.result == archive
    with zipfile.ZipFile(archive) as zf:
        assert sorted(zf.namelist()) == [f"{registered_model}.pth", f"{registered_model}.yaml"]
    assert any(f"Model exported to {archive}" in t for t in _texts(notifications, "info"))
    # exporting again keeps the first archive and says so, before any work starts
    before = archive.stat().st_mtime_ns
    assert click(export) is None
    assert any("already exists" in t for t in _texts(notifications, "error"))
    assert archive.stat().st_mtime_ns == before

    imp = _make(viewer, "Import a model")
    _set(imp, import_path=archive)
    job = wait_job(click(imp))
    assert job.result == "NewModelImported"
    copied = panoptem_home / "models" / "NewModelImported.pth"
    assert copied.read_bytes() == small_model_file.read_bytes()
    assert registry.get_config("NewModelImported")["model"] == str(copied)
    assert any("Model imported as 'NewModelImported'" in t for t in _texts(notifications, "info"))
    # the other widgets' model lists see it
    export.model_name.reset_choices()
    assert "NewModelImported" in export.model_name.choices


def test_import_errors_are_notifications(viewer, wait_job, notifications, tmp_path, panoptem_home):
    imp = _make(viewer, "Import a model")
    assert click(imp) is None  # no file chosen
    assert any("Choose the .empanada file" in t for t in _texts(notifications, "error"))
    junk = tmp_path / "junk.empanada"
    junk.write_bytes(b"not a zip")
    _set(imp, import_path=junk)
    job = wait_job(click(imp))
    assert job.error is not None
    assert any("not a readable zip" in t for t in _texts(notifications, "error"))
    assert "NewModelImported" not in registry.list_models()
    assert not any((panoptem_home / "models").glob("*"))


def test_archive(viewer, notifications, tmp_path, small_model_file, small_config, panoptem_home):
    model = _copy(small_model_file, tmp_path / "mine" / "mine.pth")  # never the shared file
    cfg = tmp_path / "mine.yaml"
    cfg.write_text(yaml.safe_dump({**small_config, "model": str(model)}))
    registry.register_model("ToArchive", cfg)
    widget = _make(viewer, "Archive a model")
    widget.model_name.reset_choices()
    widget.model_name.value = "ToArchive"
    archived = click(widget)
    folder = model_archive.archived_dir()
    assert archived == str(folder / "ToArchive.yaml")
    assert "ToArchive" not in registry.list_models()
    assert "ToArchive" not in widget.model_name.choices
    assert (folder / "mine.pth").read_bytes() == small_model_file.read_bytes()
    assert not model.exists()
    assert any("Model 'ToArchive' archived" in t for t in _texts(notifications, "info"))

    builtin = registry.builtin_config_dir() / "MitoNet_v1.yaml"
    widget.model_name.value = "MitoNet_v1"
    assert click(widget) is None
    assert any("built-in" in t for t in _texts(notifications, "error"))
    assert builtin.is_file() and "MitoNet_v1" in registry.list_models()


def test_export_import_keeps_the_quantized_file(
    viewer, wait_job, tmp_path, small_config, small_model_file, panoptem_home
):
    """Nothing is lost through Export then Import: config, float and quantized files."""
    quant = _copy(small_model_file, tmp_path / "q" / "both_quantized.pth")
    quant.write_bytes(quant.read_bytes() + b"\0")  # a different file from the float one
    cfg = tmp_path / "both.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {**small_config, "model": str(small_model_file), "model_quantized": str(quant)}
        )
    )
    registry.register_model("Both", cfg)
    export = _make(viewer, "Export a model")
    export.model_name.reset_choices()
    _set(export, model_name="Both", export_path=tmp_path / "out")
    archive = wait_job(click(export)).result
    with zipfile.ZipFile(archive) as zf:
        assert sorted(zf.namelist()) == ["Both.pth", "Both.yaml", "Both_quantized.pth"]
        packed = yaml.safe_load(zf.read("Both.yaml"))
    assert packed["model"] == "Both.pth" and packed["model_quantized"] == "Both_quantized.pth"
    assert {k: v for k, v in packed.items() if not k.startswith("model")} == {
        k: v for k, v in small_config.items() if not k.startswith("model")
    }

    imp = _make(viewer, "Import a model")
    _set(imp, model_name="BothBack", import_path=archive)
    assert wait_job(click(imp)).result == "BothBack"
    config = registry.get_config("BothBack")
    assert Path(config["model"]).read_bytes() == small_model_file.read_bytes()
    assert Path(config["model_quantized"]).read_bytes() == quant.read_bytes()
    assert Path(config["model_quantized"]).parent == panoptem_home / "models"
