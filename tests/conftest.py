"""Shared fixtures: an isolated panoptem home, a small exported model, real EM images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from panoptem.demo import DEMO_ARCH

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# the demo's architecture (PanopticDeepLabPR, ResNet-18), made smaller still for fast tests
SMALL_ARCH = {
    **DEMO_ARCH,
    "decoder_channels": 32,
    "low_level_channels_project": [16],
    "train_num_points": 256,
    "subdivision_num_points": 2048,
}


@pytest.fixture(autouse=True)
def panoptem_home(tmp_path, monkeypatch):
    """Every test gets its own empty model home; nothing touches ~/.empanada."""
    home = tmp_path / "panoptem_home"
    monkeypatch.setenv("PANOPTEM_HOME", str(home))
    monkeypatch.delenv("PANOPTEM_OFFLINE", raising=False)
    from panoptem import registry

    registry.clear_model_cache()
    yield home
    registry.clear_model_cache()


@pytest.fixture(scope="session")
def small_model_file(tmp_path_factory) -> Path:
    """A small PanopticDeepLabPR (ResNet-18) with fixed random weights, as TorchScript."""
    from panoptem.demo import untrained_model
    from panoptem.models import export_torchscript

    path = tmp_path_factory.mktemp("models") / "small_pdl.pth"
    model = untrained_model(SMALL_ARCH)
    export_torchscript(model, path)
    return path


def model_config(model_path, **extra) -> dict:
    cfg = {
        "class_names": {1: "mito"},
        "labels": [1],
        "thing_list": [1],
        "model": str(model_path),
        "model_quantized": None,
        "padding_factor": 16,
        "norms": {"mean": 0.57571, "std": 0.12765},
        "description": "small test model",
    }
    cfg.update(extra)
    return cfg


@pytest.fixture
def small_config(small_model_file) -> dict:
    return model_config(small_model_file)


def read_png(path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path))


@pytest.fixture(scope="session")
def lucchi_image() -> np.ndarray:
    """A real FIB-SEM image, 768 x 1024 uint8 (Lucchi++ test slice 0)."""
    path = SHARED_DATA / "lucchi_pp" / "test" / "Test_In" / "mask0000.png"
    if not path.exists():
        pytest.skip(f"shared data not found at {path}")
    return read_png(path)
