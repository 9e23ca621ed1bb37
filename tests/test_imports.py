"""The core library imports neither napari nor Qt, and has no side effects at import."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CORE_MODULES = [
    "panoptem",
    "panoptem.registry",
    "panoptem.models",
    "panoptem.inference.engine",
    "panoptem.inference.postprocess",
    "panoptem.inference.tiling",
    "panoptem.cli",
    "panoptem.io",
    "panoptem.demo",
    "panoptem.progress",
    "panoptem.evaluation",
    "panoptem.inference.volume",
    "panoptem.inference.consensus",
    "panoptem.inference.distributed",
    "panoptem.training.datasets",
    "panoptem.training.loop",
    "panoptem.training.publish",
]


def test_core_imports_without_gui_and_side_effects(tmp_path):
    home = tmp_path / "never_created"
    code = (
        "import sys, torch\n"
        "hub = torch.hub.get_dir()\n"
        f"for m in {CORE_MODULES!r}: __import__(m)\n"
        "gui = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('napari', 'qtpy', 'magicgui', 'PyQt5', 'PyQt6', 'PySide2', 'PySide6', 'superqt'))\n"
        "assert not gui, gui\n"
        "assert torch.hub.get_dir() == hub, 'torch hub dir changed at import'\n"
    )
    env = dict(os.environ, PANOPTEM_HOME=str(home))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=tmp_path)
    assert not home.exists(), "importing panoptem created its home folder"


def test_import_linter_contracts():
    """The import-linter contracts in pyproject.toml hold: the core never imports napari or
    Qt, and dependencies run one way (layers: napari, CLI, features, models, loading,
    registry, downloads, basics), so no module imports one above it and there is no cycle."""
    exe = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(exe)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "The core library does not import napari or Qt KEPT" in result.stdout
    assert "Dependencies run one way" in result.stdout
    assert "2 kept, 0 broken" in result.stdout


def test_the_layers_contract_catches_an_upward_import(tmp_path):
    """The layers contract is not vacuous: a registry that imports loading (the cycle that
    once existed) breaks it."""
    import shutil

    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "src", copy / "src")
    shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")
    registry = copy / "src" / "panoptem" / "registry.py"
    registry.write_text(registry.read_text() + "\n\ndef _upward():\n    from panoptem import loading\n")
    exe = Path(sys.executable).with_name("lint-imports")
    env = dict(os.environ, PYTHONPATH=str(copy / "src"))
    result = subprocess.run([str(exe)], cwd=copy, capture_output=True, text=True, env=env)
    assert result.returncode != 0
    assert "panoptem.registry is not allowed to import panoptem.loading" in result.stdout
