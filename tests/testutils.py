"""Helpers shared by the test modules (import as ``from testutils import ...``).

They live here rather than in conftest.py: tests/ and tests/widgets/ each have a conftest.py,
and ``from testutils import`` resolves to whichever of the two was imported last.
"""

from __future__ import annotations

import functools
import http.server
import threading
from pathlib import Path

import numpy as np

from panoptem.demo import DEMO_ARCH
from panoptem.progress import Progress

#: Real EM crops kept in the repository (see data/em/SOURCE.md).
EM_DATA = Path(__file__).resolve().parent / "data" / "em"
EM_VOLUME = EM_DATA / "lucchi_volume_z0-63_y0-127_x192-319.tif"


class CancelAt(Progress):
    """The user presses Cancel once ``step`` steps of the stage ``stage`` are done."""

    def __init__(self, stage: str, step: int) -> None:
        super().__init__()
        self.at = (stage, step)

    def on_advance(self, done: int, total: int) -> None:
        if (self.stage_name, done) == self.at:
            self.cancel()


def em_png(name: str) -> np.ndarray:
    """A PNG of tests/data/em as a numpy array."""
    return read_png(EM_DATA / name)

# the demo's architecture (PanopticDeepLabPR, ResNet-18), made smaller still for fast tests
SMALL_ARCH = {
    **DEMO_ARCH,
    "decoder_channels": 32,
    "low_level_channels_project": [16],
    "train_num_points": 256,
    "subdivision_num_points": 2048,
}


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


def read_png(path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path))


# the FINETUNE block of a released model config (MitoNet_v1's values)
FINETUNE = {
    "criterion": "PanopticLoss",
    "criterion_params": {
        "ce_weight": 1,
        "l1_weight": 0.01,
        "mse_weight": 200,
        "pr_weight": 1,
        "top_k_percent": 0.2,
    },
    "dataset_class": "SingleClassInstanceDataset",
    "dataset_params": {"weight_gamma": 0.7},
    "engine": "PanopticDeepLabEngine",
    "engine_params": {
        "confidence_thr": 0.5,
        "label_divisor": 1000,
        "nms_kernel": 7,
        "nms_threshold": 0.1,
        "stuff_area": 64,
        "thing_list": [1],
        "void_label": 0,
    },
}


class LocalServer:
    """Serves a folder over HTTP on 127.0.0.1 (``.url``, ``.root``) and records the
    requested paths (``.requests``); ``stop()`` may be called more than once."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.requests: list[str] = []
        log = self.requests

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def do_GET(self) -> None:
                log.append(self.path)
                super().do_GET()

        handler = functools.partial(Handler, directory=str(root))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()
        self._stopped = False

    def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            self.httpd.shutdown()
            self.httpd.server_close()
            self.thread.join(5)


def mito_instances_2d() -> np.ndarray:
    """Real mitochondria as instances: CDeep3M slice 10's mask, connected components (uint32)."""
    from skimage.measure import label

    return label(em_png("cdeep3m_train_010_y0_x0_mask.png") > 0).astype(np.uint32)


def mito_instances_3d(depth: int = 6) -> np.ndarray:
    """A 3D instance volume from real masks: CDeep3M slices 10 and 12 (two sections apart)
    alternating ``depth`` times along z, labelled in 3D (uint32, ids 1..n)."""
    from skimage.measure import label

    a = em_png("cdeep3m_train_010_y0_x0_mask.png") > 0
    b = em_png("cdeep3m_train_012_y0_x0_mask.png") > 0
    return label(np.stack([a if z % 2 == 0 else b for z in range(depth)])).astype(np.uint32)


def file_tree(folder) -> dict:
    """Every file under ``folder`` with its size and modification time (to show nothing changed)."""
    import os

    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            st = os.stat(os.path.join(root, f))
            out[os.path.relpath(os.path.join(root, f), folder)] = (st.st_size, st.st_mtime_ns)
    return out
