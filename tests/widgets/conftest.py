"""Fixtures for the napari widget tests (run under xvfb: ``xvfb-run -a python -m pytest``).

Widgets are opened only the ways a user opens them (see ``widgetutils.py``).
"""

from __future__ import annotations

import pytest
import yaml

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

TEST_MODEL = "SmallTestNet"

@pytest.fixture
def registered_model(small_config, tmp_path) -> str:
    """The small untrained test model, registered in this test's PANOPTEM_HOME."""
    from panoptem import registry

    cfg = tmp_path / "small.yaml"
    cfg.write_text(yaml.safe_dump(small_config))
    return registry.register_model(TEST_MODEL, cfg)


@pytest.fixture
def notifications(monkeypatch):
    """Messages shown through napari notifications during the test, as (level, text)."""
    from napari.utils import notifications as nt

    shown: list[tuple[str, str]] = []
    original = nt.notification_manager.dispatch

    def dispatch(notification):
        shown.append((str(notification.severity), notification.message))
        return original(notification)

    monkeypatch.setattr(nt.notification_manager, "dispatch", dispatch)
    return shown


@pytest.fixture
def wait_job(qtbot):
    """``wait_job(job)`` waits until a widget job has run its callbacks, and returns it."""

    def wait(job, timeout=120_000):
        assert job is not None, "the widget did not start a job"
        qtbot.waitUntil(lambda: job.done, timeout=timeout)
        return job

    return wait
