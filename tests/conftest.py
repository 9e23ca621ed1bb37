"""Shared fixtures: an isolated panoptem home, a small exported model, real EM images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from modelfiles import Tiny, save_scripted
from panoptem import loading
from testutils import EM_DATA, EM_VOLUME, SMALL_ARCH, LocalServer, em_png, model_config


@pytest.fixture(autouse=True)
def panoptem_home(tmp_path, monkeypatch):
    """Every test gets its own empty model home; nothing touches ~/.empanada."""
    home = tmp_path / "panoptem_home"
    monkeypatch.setenv("PANOPTEM_HOME", str(home))
    monkeypatch.delenv("PANOPTEM_OFFLINE", raising=False)
    loading.clear_model_cache()
    yield home
    loading.clear_model_cache()


@pytest.fixture(scope="session")
def small_model_file(tmp_path_factory) -> Path:
    """A small PanopticDeepLabPR (ResNet-18) with fixed random weights, as TorchScript."""
    from panoptem.demo import untrained_model
    from panoptem.models import export_torchscript

    path = tmp_path_factory.mktemp("models") / "small_pdl.pth"
    model = untrained_model(SMALL_ARCH)
    export_torchscript(model, path)
    return path


@pytest.fixture
def small_config(small_model_file) -> dict:
    return model_config(small_model_file)


@pytest.fixture(scope="session")
def lucchi_image() -> np.ndarray:
    """A real FIB-SEM image, 768 x 1024 uint8 (Lucchi++ test slice 0)."""
    return em_png("lucchi_test_0000.png")


@pytest.fixture(scope="session")
def em_volume() -> np.ndarray:
    """A real FIB-SEM volume, 64 x 128 x 128 uint8 (a Lucchi++ test-volume crop)."""
    import tifffile

    return tifffile.imread(EM_VOLUME)


def _no_proxy(monkeypatch) -> None:
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


@pytest.fixture
def server(tmp_path, monkeypatch):
    """A local HTTP server for tmp_path/served (``.url``, ``.root``, ``.requests``); proxies
    are switched off so requests to 127.0.0.1 never leave the machine."""
    _no_proxy(monkeypatch)
    root = tmp_path / "served"
    root.mkdir()
    srv = LocalServer(root)
    yield srv
    srv.stop()


@pytest.fixture
def home(panoptem_home, monkeypatch) -> Path:
    """The test's own PANOPTEM_HOME (online, empty model cache), with no proxy for loopback."""
    _no_proxy(monkeypatch)
    return panoptem_home


@pytest.fixture
def tiny_pth(tmp_path) -> Path:
    return save_scripted(Tiny(), tmp_path / "tiny.pth")


@pytest.fixture
def two_class_dataset(tmp_path):
    """Real SBEM crops with two classes: mitochondria as instances (class 1, ids 1001, 1002,
    ...) and the dark membranes and myelin as one semantic class (class 2, id 2000)."""
    import tifffile
    from PIL import Image
    from scipy import ndimage

    root = tmp_path / "two_class" / "sbem"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for n in ("010", "012"):
        image = np.asarray(Image.open(EM_DATA / f"cdeep3m_train_{n}_y0_x0.png"))
        mito = np.asarray(Image.open(EM_DATA / f"cdeep3m_train_{n}_y0_x0_mask.png")) > 0
        instances, count = ndimage.label(mito)
        mask = np.where(mito, 1000 + instances, 0).astype(np.int32)
        mask[(image < 70) & ~mito] = 2000
        assert count > 10 and (mask == 2000).any()
        Image.fromarray(image).save(root / "images" / f"s{n}.png")
        tifffile.imwrite(root / "masks" / f"s{n}.tif", mask)
    return tmp_path / "two_class"
