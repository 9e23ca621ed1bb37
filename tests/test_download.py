"""Tests of model downloads (panoptem._download through registry.fetch_file and loading).

Offline and fast: files are served by a local HTTP server on 127.0.0.1 (the ``server``
fixture); nothing leaves the machine.
"""

from __future__ import annotations

import os
import time

import pytest

from modelfiles import (
    JIT_DEPRECATION,
    closed_port,
    files_under,
    make_config,
    sha256,
)
from panoptem import loading, registry
from panoptem.errors import Cancelled, PanoptemError
from panoptem.progress import CallbackProgress, Progress

pytestmark = [pytest.mark.filterwarnings(JIT_DEPRECATION), pytest.mark.usefixtures("home")]


# --------------------------------------------------------------------------------------
# Downloads (local HTTP server only)
# --------------------------------------------------------------------------------------
def test_load_through_url_then_from_cache(home, server, tiny_pth):
    (server.root / "tiny.pth").write_bytes(tiny_pth.read_bytes())
    url = f"{server.url}/tiny.pth?download=1"
    config = make_config(model=url)
    events = []
    loaded = loading.load_model(config, progress=CallbackProgress(lambda *e: events.append(e)))
    cached = home / "tiny.pth"
    assert cached.read_bytes() == tiny_pth.read_bytes()
    assert loaded.path == cached
    assert files_under(home) == [cached]  # no temporary files left
    size = cached.stat().st_size
    assert events[0] == ("Downloading tiny.pth", 0, size) and events[-1][1:] == (size, size)
    assert len(server.requests) == 1

    server.stop()
    loading.clear_model_cache()
    again = loading.load_model(config)
    assert again.path == cached and again.module is not loaded.module


def test_checksum_ok_and_mismatch(home, server, tiny_pth):
    (server.root / "tiny.pth").write_bytes(tiny_pth.read_bytes())
    url = f"{server.url}/tiny.pth"
    wrong = "sha256:" + "0" * 64
    with pytest.raises(PanoptemError) as err:
        registry.fetch_file(url, known_hash=wrong)
    message = str(err.value)
    assert "checksum" in message and url in message and str(home / "tiny.pth") in message
    assert sha256(tiny_pth).partition(":")[2] in message  # pooch's own words name the hash
    assert files_under(home) == []

    good = sha256(tiny_pth)
    assert registry.fetch_file(url, known_hash=good) == home / "tiny.pth"
    # a cached file that does not match the config's hash is not used
    with pytest.raises(PanoptemError, match="checksum"):
        loading.load_model(make_config(model=url, model_hash=wrong))
    assert loading.load_model(make_config(model=url, model_hash=good)).path == home / "tiny.pth"


def test_bad_checksum_syntax(server):
    with pytest.raises(PanoptemError, match="algorithm"):
        registry.fetch_file(f"{server.url}/x.pth", known_hash="nohash:abc")
    assert server.requests == []


def test_http_404(home, server):
    url = f"{server.url}/missing.pth?download=1"
    with pytest.raises(PanoptemError) as err:
        loading.load_model(make_config(model=url))
    message = str(err.value)
    assert "404" in message and url in message and str(home / "missing.pth") in message
    assert files_under(home) == []


def test_unreachable_url_fails_fast(home):
    url = f"http://127.0.0.1:{closed_port()}/model.pth"
    start = time.monotonic()
    with pytest.raises(PanoptemError) as err:
        registry.fetch_file(url)
    assert time.monotonic() - start < 5
    assert url in str(err.value) and str(home / "model.pth") in str(err.value)
    assert "(Connection refused)" in str(err.value)  # the system's reason, found structurally


def test_offline_mode(home, server, tiny_pth, monkeypatch):
    (server.root / "tiny.pth").write_bytes(tiny_pth.read_bytes())
    url = f"{server.url}/tiny.pth?download=1"
    monkeypatch.setenv("PANOPTEM_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(PanoptemError) as err:
        loading.load_model(make_config(model=url))
    assert time.monotonic() - start < 1
    message = str(err.value)
    assert url in message and str(home / "tiny.pth") in message and "PANOPTEM_OFFLINE" in message
    assert server.requests == []
    # a file placed by hand is used while offline
    home.mkdir()
    (home / "tiny.pth").write_bytes(tiny_pth.read_bytes())
    assert loading.load_model(make_config(model=url)).path == home / "tiny.pth"
    assert server.requests == []


def test_cancelled_download_leaves_nothing(home, server):
    (server.root / "big.pth").write_bytes(os.urandom(3 * 2**20))

    class CancelOnFirstChunk(Progress):
        def on_advance(self, done: int, total: int) -> None:
            self.cancel()

    with pytest.raises(Cancelled):
        registry.fetch_file(f"{server.url}/big.pth", progress=CancelOnFirstChunk())
    assert files_under(home) == []


def test_corrupt_download_suggests_deleting(home, server):
    (server.root / "junk.pth").write_bytes(os.urandom(1024))
    with pytest.raises(PanoptemError) as err:
        loading.load_model(make_config(model=f"{server.url}/junk.pth"))
    message = str(err.value)
    assert "delete" in message and str(home / "junk.pth") in message


