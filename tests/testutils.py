"""Helpers shared by the test modules (import as ``from testutils import ...``).

They live here rather than in conftest.py: tests/ and tests/widgets/ each have a conftest.py,
and ``from testutils import`` resolves to whichever of the two was imported last.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

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
