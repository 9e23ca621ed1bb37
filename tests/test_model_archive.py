"""Tests of panoptem.model_archive: export / import of .empanada archives, archiving.

Offline: model files are the small test model and a tiny scripted module; URL models are
served by a local HTTP server on 127.0.0.1; every test has its own PANOPTEM_HOME.
"""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

from modelfiles import JIT_DEPRECATION, Tiny, save_scripted
from panoptem import loading, model_archive, registry
from panoptem.errors import Cancelled, PanoptemError
from panoptem.progress import CallbackProgress, Progress
from testutils import FINETUNE, model_config

pytestmark = pytest.mark.filterwarnings(JIT_DEPRECATION)


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory) -> Path:
    """The smallest module with the empanada interface (stands in for a quantized file)."""
    path = save_scripted(Tiny(), tmp_path_factory.mktemp("tiny") / "tiny_quantized.pth")
    return path


def _sha256(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def _write_yaml(path: Path, config: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _register(
    tmp_path: Path, name: str, model: Path, quantized: Path | None = None, **extra
) -> str:
    cfg = model_config(
        model, model_quantized=str(quantized) if quantized else None, FINETUNE=FINETUNE, **extra
    )
    return registry.register_model(name, _write_yaml(tmp_path / f"cfg_{name}.yaml", cfg))


def _copy(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(src.read_bytes())
    return dst


def _files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def _without_files(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in ("model", "model_quantized")}


# --------------------------------------------------------------------------------------
# Export and import
# --------------------------------------------------------------------------------------
def test_round_trip_keeps_files_and_config(tmp_path, panoptem_home, small_model_file, tiny_file):
    name = _register(
        tmp_path, "Mine", small_model_file, tiny_file, model_hash=_sha256(small_model_file)
    )
    events = []
    archive = model_archive.export_model(
        name, tmp_path / "out", progress=CallbackProgress(lambda *e: events.append(e))
    )
    assert archive == tmp_path / "out" / "Mine.empanada"
    assert [p.name for p in _files_under(tmp_path / "out")] == ["Mine.empanada"]
    with zipfile.ZipFile(archive) as zf:
        assert sorted(zf.namelist()) == ["Mine.pth", "Mine.yaml", "Mine_quantized.pth"]
        packed = yaml.safe_load(zf.read("Mine.yaml"))
        assert zf.read("Mine.pth") == small_model_file.read_bytes()
        assert zf.read("Mine_quantized.pth") == tiny_file.read_bytes()
    assert packed["model"] == "Mine.pth" and packed["model_quantized"] == "Mine_quantized.pth"
    original = registry.get_config("Mine")
    assert _without_files(packed) == _without_files(original)
    total = small_model_file.stat().st_size + tiny_file.stat().st_size
    assert events[0] == ("Writing Mine.empanada", 0, total)
    assert events[-1] == ("Writing Mine.empanada", total, total)

    # importing beside the original: the name is taken, so "New" is appended
    imported = model_archive.import_model(archive)
    assert imported == "MineNew"
    models = panoptem_home / "models"
    assert (models / "MineNew.pth").read_bytes() == small_model_file.read_bytes()
    assert (models / "MineNew_quantized.pth").read_bytes() == tiny_file.read_bytes()
    config = registry.get_config("MineNew")
    assert config["model"] == str(models / "MineNew.pth")
    assert config["model_quantized"] == str(models / "MineNew_quantized.pth")
    assert _without_files(config) == _without_files(original)
    assert registry.list_models()[-2:] == ["Mine", "MineNew"]

    loaded = loading.load_model("MineNew")
    assert loaded.path == models / "MineNew.pth"
    out = loaded.module(torch.zeros(1, 1, 64, 64), 2, True)
    assert out["sem_logits"].shape[-2:] == (64, 64)

    # an explicit name, and a second export of the imported model round-trips again
    assert model_archive.import_model(archive, "Other") == "Other"
    again = model_archive.export_model("Other", tmp_path / "again.empanada")
    with zipfile.ZipFile(again) as zf:
        assert zf.read("Other.pth") == small_model_file.read_bytes()


def test_export_without_quantized(tmp_path, small_model_file):
    _register(tmp_path, "Plain", small_model_file)
    archive = model_archive.export_model("Plain", tmp_path)
    with zipfile.ZipFile(archive) as zf:
        assert sorted(zf.namelist()) == ["Plain.pth", "Plain.yaml"]
        assert yaml.safe_load(zf.read("Plain.yaml"))["model_quantized"] is None
    assert model_archive.import_model(archive, "Back") == "Back"
    assert registry.get_config("Back")["model_quantized"] is None


def test_export_never_replaces_a_file_unless_asked(tmp_path, small_model_file):
    _register(tmp_path, "Plain", small_model_file)
    target = tmp_path / "Plain.empanada"
    target.write_bytes(b"keep me")
    with pytest.raises(PanoptemError, match="already exists"):
        model_archive.export_model("Plain", tmp_path)
    assert target.read_bytes() == b"keep me"
    assert model_archive.export_model("Plain", target, overwrite=True) == target
    assert zipfile.is_zipfile(target)
    assert [p.name for p in tmp_path.glob(".*tmp")] == []


def test_export_errors(tmp_path, small_model_file):
    with pytest.raises(PanoptemError, match="Unknown model 'Nope'"):
        model_archive.export_model("Nope", tmp_path)
    gone = _copy(small_model_file, tmp_path / "gone.pth")
    _register(tmp_path, "Gone", gone)
    gone.unlink()
    with pytest.raises(PanoptemError, match="does not exist"):
        model_archive.export_model("Gone", tmp_path / "out")
    assert _files_under(tmp_path / "out") == []
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    _register(tmp_path, "Plain", small_model_file)
    with pytest.raises(PanoptemError, match="is a file"):
        model_archive.export_model("Plain", a_file)


def test_cancelled_export_leaves_nothing(tmp_path, small_model_file):
    _register(tmp_path, "Plain", small_model_file)

    class CancelOnFirstChunk(Progress):
        def on_advance(self, done: int, total: int) -> None:
            self.cancel()

    with pytest.raises(Cancelled):
        model_archive.export_model("Plain", tmp_path / "out", progress=CancelOnFirstChunk())
    assert _files_under(tmp_path / "out") == []


def test_export_url_model_reuses_download_cache(
    tmp_path, panoptem_home, server, small_model_file, tiny_file
):
    _copy(small_model_file, server.root / "remote.pth")
    _copy(tiny_file, server.root / "remote_quantized.pth")
    url = f"{server.url}/remote.pth?download=1"
    qurl = f"{server.url}/remote_quantized.pth?download=1"
    _register(tmp_path, "Remote", small_model_file)
    cfg = registry.get_config("Remote")
    cfg.update(model=url, model_quantized=qurl)
    registry.register_model("FromUrl", _write_yaml(tmp_path / "url.yaml", cfg))
    assert server.requests == []  # registering does not download

    archive = model_archive.export_model("FromUrl", tmp_path / "out")
    with zipfile.ZipFile(archive) as zf:
        assert zf.read("FromUrl.pth") == small_model_file.read_bytes()
        assert zf.read("FromUrl_quantized.pth") == tiny_file.read_bytes()
    # downloaded into the shared model cache, under the URL's file name
    assert (panoptem_home / "remote.pth").read_bytes() == small_model_file.read_bytes()
    assert len(server.requests) == 2
    model_archive.export_model("FromUrl", tmp_path / "out2")
    assert len(server.requests) == 2  # the second export reads the cache


def _original_archive(path: Path, name: str, files: dict[str, bytes], config: dict) -> Path:
    """A zip laid out as empanada-napari's export writes it (yaml.dump, sorted keys)."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{name}.yaml", yaml.dump(config))
        for arcname, data in files.items():
            zf.writestr(arcname, data)
    return path


def test_import_archive_in_the_originals_layout(
    tmp_path, panoptem_home, small_model_file, tiny_file
):
    # the original keeps a local model's own file name and renames downloaded ones
    config = model_config(
        "finetuned_weights.pth", model_quantized="Foo_quantized.pth", FINETUNE=FINETUNE
    )
    archive = _original_archive(
        tmp_path / "Foo.empanada",
        "Foo",
        {
            "finetuned_weights.pth": small_model_file.read_bytes(),
            "Foo_quantized.pth": tiny_file.read_bytes(),
        },
        config,
    )
    assert not (panoptem_home / "models").exists()  # the original failed here (quantized)
    assert model_archive.import_model(archive, "NewModelImported") == "NewModelImported"
    models = panoptem_home / "models"
    assert (models / "NewModelImported.pth").read_bytes() == small_model_file.read_bytes()
    assert (models / "NewModelImported_quantized.pth").read_bytes() == tiny_file.read_bytes()
    registered = registry.get_config("NewModelImported")
    assert _without_files(registered) == _without_files(config)
    assert loading.load_model("NewModelImported", quantized=True).quantized

    # a renamed archive still imports: its only config is used; the default name is its stem
    renamed = tmp_path / "copy of model.empanada"
    renamed.write_bytes(archive.read_bytes())
    assert model_archive.import_model(renamed) == "Foo"


def test_import_original_fallback_to_only_model_file(tmp_path, small_model_file):
    # the yaml's model name does not match the stored file: the single .pth is used
    config = model_config("somewhere/else.pth")
    archive = _original_archive(
        tmp_path / "Bar.empanada", "Bar", {"weights.pth": small_model_file.read_bytes()}, config
    )
    assert model_archive.import_model(archive) == "Bar"
    assert Path(registry.get_config("Bar")["model"]).read_bytes() == small_model_file.read_bytes()


def test_import_keeps_a_quantized_url(tmp_path, small_model_file):
    qurl = "https://example.org/files/q.pth?download=1"
    config = model_config("Baz.pth", model_quantized=qurl)
    archive = _original_archive(
        tmp_path / "Baz.empanada", "Baz", {"Baz.pth": small_model_file.read_bytes()}, config
    )
    assert model_archive.import_model(archive) == "Baz"
    assert registry.get_config("Baz")["model_quantized"] == qurl


def _assert_nothing_imported(home: Path, before: list[str]) -> None:
    assert registry.list_models() == before
    assert _files_under(home / "models") == []
    assert _files_under(home / "configs") == []


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("not_zip", "not a readable zip"),
        ("no_yaml", "no .yaml model config"),
        ("no_pth", "no model file"),
        ("no_quantized", "quantized model file 'X_quantized.pth'"),
        ("bad_yaml", "not valid YAML"),
        ("bad_config", "missing required key"),
        ("two_yamls", "several configs"),
        ("damaged", "damaged"),
        ("not_torchscript", "not a TorchScript model file"),
        ("bad_hash", "does not match the checksum"),
        ("truncated", "not a readable zip"),
    ],
)
def test_bad_archives_are_clear_errors_and_leave_nothing(
    tmp_path, panoptem_home, small_model_file, tiny_file, case, message
):
    model = small_model_file.read_bytes()
    good_cfg = model_config("X.pth")
    path = tmp_path / "X.empanada"
    if case == "not_zip":
        path.write_bytes(b"this is not a zip file at all")
    elif case == "no_yaml":
        _original_archive(tmp_path / "tmp.zip", "unused", {"X.pth": model}, good_cfg)
        with zipfile.ZipFile(tmp_path / "tmp.zip") as src, zipfile.ZipFile(path, "w") as dst:
            dst.writestr("X.pth", src.read("X.pth"))
    elif case == "no_pth":
        _original_archive(path, "X", {}, good_cfg)
    elif case == "no_quantized":
        cfg = model_config("X.pth", model_quantized="X_quantized.pth")
        _original_archive(path, "X", {"X.pth": model}, cfg)
    elif case == "bad_yaml":
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("X.yaml", "model: [unclosed\n")
            zf.writestr("X.pth", model)
    elif case == "bad_config":
        _original_archive(path, "X", {"X.pth": model}, {"model": "X.pth", "labels": [1]})
    elif case == "two_yamls":
        _original_archive(path, "A", {"X.pth": model, "B.yaml": yaml.dump(good_cfg)}, good_cfg)
    elif case == "damaged":
        _original_archive(path, "X", {"X.pth": model}, good_cfg)
        data = bytearray(path.read_bytes())
        at = data.find(model[1000:1032])  # stored uncompressed: flip bytes inside it
        data[at : at + 32] = bytes(b ^ 0xFF for b in data[at : at + 32])
        path.write_bytes(bytes(data))
    elif case == "not_torchscript":
        _original_archive(path, "X", {"X.pth": b"\x00" * 5000}, good_cfg)
    elif case == "bad_hash":
        cfg = model_config("X.pth", model_hash="sha256:" + "0" * 64)
        _original_archive(path, "X", {"X.pth": model}, cfg)
    elif case == "truncated":
        _original_archive(path, "X", {"X.pth": model}, good_cfg)
        path.write_bytes(path.read_bytes()[: len(model) // 2])
    before = registry.list_models()
    with pytest.raises(PanoptemError, match=message) as err:
        model_archive.import_model(path, "Imported")
    assert str(path) in str(err.value) or case == "bad_config"
    _assert_nothing_imported(panoptem_home, before)


def test_import_missing_file_and_bad_name(tmp_path, small_model_file):
    with pytest.raises(PanoptemError, match="does not exist"):
        model_archive.import_model(tmp_path / "missing.empanada")
    archive = _original_archive(
        tmp_path / "X.empanada",
        "X",
        {"X.pth": small_model_file.read_bytes()},
        model_config("X.pth"),
    )
    with pytest.raises(PanoptemError, match="cannot be used as a file name"):
        model_archive.import_model(archive, "a/b")
    assert _files_under(registry.home_dir()) == []


def test_import_never_overwrites_files_in_models(tmp_path, panoptem_home, small_model_file):
    stray = _copy(small_model_file, panoptem_home / "models" / "Kept.pth")
    stray.write_bytes(b"someone else's file")
    archive = _original_archive(
        tmp_path / "X.empanada",
        "X",
        {"X.pth": small_model_file.read_bytes()},
        model_config("X.pth"),
    )
    assert model_archive.import_model(archive, "Kept") == "KeptNew"
    assert stray.read_bytes() == b"someone else's file"
    assert (panoptem_home / "models" / "KeptNew.pth").read_bytes() == small_model_file.read_bytes()


def test_cancelled_import_leaves_nothing(tmp_path, panoptem_home, small_model_file):
    archive = _original_archive(
        tmp_path / "X.empanada",
        "X",
        {"X.pth": small_model_file.read_bytes()},
        model_config("X.pth"),
    )

    class CancelOnFirstChunk(Progress):
        def on_advance(self, done: int, total: int) -> None:
            self.cancel()

    before = registry.list_models()
    with pytest.raises(Cancelled):
        model_archive.import_model(archive, progress=CancelOnFirstChunk())
    _assert_nothing_imported(panoptem_home, before)


# --------------------------------------------------------------------------------------
# Archive
# --------------------------------------------------------------------------------------
def test_archive_moves_config_and_files(tmp_path, panoptem_home, small_model_file, tiny_file):
    model = _copy(small_model_file, tmp_path / "mine" / "mine.pth")
    quant = _copy(tiny_file, tmp_path / "mine" / "mine_quantized.pth")
    _register(tmp_path, "Mine", model, quant)
    config = registry.get_config("Mine")

    archived = model_archive.archive_model("Mine")
    folder = panoptem_home / "archived"
    assert archived == folder / "Mine.yaml"
    assert "Mine" not in registry.list_models()
    assert not (panoptem_home / "configs" / "Mine.yaml").exists()
    assert not model.exists() and not quant.exists()
    assert (folder / "mine.pth").read_bytes() == small_model_file.read_bytes()
    assert (folder / "mine_quantized.pth").read_bytes() == tiny_file.read_bytes()
    kept = registry.read_config(archived)
    assert kept["model"] == str(folder / "mine.pth")
    assert kept["model_quantized"] == str(folder / "mine_quantized.pth")
    assert _without_files(kept) == _without_files(config)
    # the archived config can be registered again as it is
    assert registry.register_model("Mine", archived) == "Mine"
    assert loading.load_model("Mine").path == folder / "mine.pth"


def test_archive_imported_model(tmp_path, panoptem_home, small_model_file):
    archive = _original_archive(
        tmp_path / "X.empanada",
        "X",
        {"X.pth": small_model_file.read_bytes()},
        model_config("X.pth"),
    )
    model_archive.import_model(archive, "Imp")
    model_archive.archive_model("Imp")
    assert _files_under(panoptem_home / "models") == []
    assert sorted(p.name for p in _files_under(panoptem_home / "archived")) == [
        "Imp.pth",
        "Imp.yaml",
    ]


def test_builtin_models_are_refused(tmp_path):
    builtin = registry.builtin_config_dir() / "MitoNet_v1.yaml"
    before = builtin.read_bytes()
    with pytest.raises(PanoptemError, match="built-in"):
        model_archive.archive_model("MitoNet_v1")
    assert builtin.read_bytes() == before
    assert "MitoNet_v1" in registry.list_models()
    assert not model_archive.archived_dir().exists()


def test_archiving_a_user_override_of_a_builtin_brings_the_builtin_back(tmp_path, small_model_file):
    # a user config with a built-in's name replaces it (written by hand or by the original)
    mine = _copy(small_model_file, tmp_path / "mine.pth")
    _write_yaml(registry.config_dir() / "MitoNet_v1.yaml", model_config(mine))
    assert registry.get_config("MitoNet_v1")["model"] == str(mine)
    model_archive.archive_model("MitoNet_v1")
    assert registry.get_config("MitoNet_v1")["model"].startswith("https://zenodo.org/")
    assert (registry.builtin_config_dir() / "MitoNet_v1.yaml").is_file()


def test_archive_never_overwrites(tmp_path, panoptem_home, small_model_file, tiny_file):
    first = _copy(small_model_file, tmp_path / "one" / "model.pth")
    second = _copy(tiny_file, tmp_path / "two" / "model.pth")
    _register(tmp_path, "Same", first)
    model_archive.archive_model("Same")
    _register(tmp_path, "Same", second)  # same name and same file name again
    archived = model_archive.archive_model("Same")
    folder = panoptem_home / "archived"
    assert archived == folder / "Same_1.yaml"
    assert (folder / "model.pth").read_bytes() == small_model_file.read_bytes()
    assert (folder / "model_1.pth").read_bytes() == tiny_file.read_bytes()
    assert registry.read_config(folder / "Same.yaml")["model"] == str(folder / "model.pth")
    assert registry.read_config(archived)["model"] == str(folder / "model_1.pth")


def test_archive_leaves_shared_and_downloaded_files(tmp_path, panoptem_home, small_model_file):
    shared = _copy(small_model_file, tmp_path / "shared.pth")
    _register(tmp_path, "A", shared)
    _register(tmp_path, "B", shared)
    cached = _copy(small_model_file, panoptem_home / "cached.pth")  # a downloaded file
    cfg = registry.get_config("A")
    cfg["model"] = "https://example.org/cached.pth"
    registry.register_model("Web", _write_yaml(tmp_path / "web.yaml", cfg))

    model_archive.archive_model("A")
    assert shared.exists()  # B still uses it
    assert registry.read_config(panoptem_home / "archived" / "A.yaml")["model"] == str(shared)
    model_archive.archive_model("Web")
    assert cached.exists()
    model_archive.archive_model("B")  # now nobody else uses it: it moves
    assert not shared.exists() and (panoptem_home / "archived" / "shared.pth").exists()
    assert [m for m in registry.list_models() if m in ("A", "B", "Web")] == []


def test_archive_broken_config_and_unknown_name(tmp_path, panoptem_home):
    broken = _write_yaml(panoptem_home / "configs" / "Broken.yaml", {"model": 3})
    text = broken.read_text()
    assert model_archive.archive_model("Broken") == panoptem_home / "archived" / "Broken.yaml"
    assert (panoptem_home / "archived" / "Broken.yaml").read_text() == text
    with pytest.raises(PanoptemError, match="Unknown model 'Nope'"):
        model_archive.archive_model("Nope")
