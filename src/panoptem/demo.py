"""The demo: segment the bundled sample image and write the labels and a picture of them.

The demo runs the bundled model (``panoptem_mito_small``, shipped inside the package, so no
download) on the bundled Lucchi++ crop through the normal registry and engine.

:func:`untrained_model` builds a small model with random weights whose outputs still have
structure: a stand-in used by tests and benchmarks that need a model of a given shape.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

__all__ = ["DemoResult", "run_demo", "sample_image", "untrained_model", "write_overlay_png"]

#: The bundled model the demo runs.
DEMO_MODEL = "panoptem_mito_small"

DEMO_ARCH = {
    "arch": "PanopticDeepLabPR",
    "encoder": "resnet18",
    "num_classes": 1,
    "stage4_stride": 16,
    "decoder_channels": 64,
    "low_level_stages": [1],
    "low_level_channels_project": [32],
    "atrous_rates": [2, 4, 6],
    "aspp_channels": None,
    "aspp_dropout": 0.5,
    "ins_decoder": True,
    "ins_ratio": 0.5,
    "num_fc": 3,
    "train_num_points": 1024,
    "oversample_ratio": 3,
    "importance_sample_ratio": 0.75,
    "subdivision_steps": 2,
    "subdivision_num_points": 8192,
}


@dataclass
class DemoResult:
    image_path: str
    labels_path: Path
    picture_path: Path
    n_objects: int
    seconds: float
    model: str

    def summary(self) -> str:
        return (
            f"Segmented {self.image_path} with {self.model}: {self.n_objects} objects in "
            f"{self.seconds:.1f} s\nlabels:  {self.labels_path}\npicture: {self.picture_path}"
        )


def sample_image() -> np.ndarray:
    """The bundled 512 x 512 FIB-SEM sample (a Lucchi++ crop, see data/SOURCE.md)."""
    from PIL import Image

    with resources.as_file(resources.files("panoptem") / "data" / "lucchi_pp_sample.png") as p:
        return np.asarray(Image.open(p))


def untrained_model(arch: dict, calibration_image: np.ndarray | None = None, seed: int = 0,
                    head_gain: float = 3.0, center_bias: float = 0.3):
    """Build a model with random weights whose outputs still vary across the image.

    A freshly built model's heads are initialised to near-constant outputs, which gives
    no centres at all. Here every convolution gets PyTorch's default initialisation, the
    BatchNorm statistics are measured on ``calibration_image`` (the bundled sample by
    default), and the semantic and centre heads are amplified, so the model yields
    foreground, centres and objects: a stand-in for demos, tests and benchmarks, not a
    segmentation model.
    """
    import torch

    from panoptem.models import build_model

    torch.manual_seed(seed)
    model = build_model(arch)
    for mod in model.modules():
        if isinstance(mod, (torch.nn.Conv1d, torch.nn.Conv2d)):
            mod.reset_parameters()
        elif isinstance(mod, torch.nn.BatchNorm2d):
            mod.reset_running_stats()
            mod.momentum = None  # cumulative average over the calibration passes
    img = sample_image() if calibration_image is None else calibration_image
    side = min(img.shape) // 32 * 32
    x = torch.from_numpy(((img[:side, :side] / 255.0 - 0.57571) / 0.12765).astype(np.float32))
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(x[None, None])
        model.semantic_head.head[-1].weight.mul_(head_gain)
        model.ins_center.head[-1].weight.mul_(head_gain)
        model.ins_center.head[-1].bias.fill_(center_bias)
    return model.eval()


def run_demo(out_dir="panoptem_demo", image=None, device="cpu", quantized: bool = False,
             overwrite: bool = False) -> DemoResult:
    """Segment the sample (or ``image``, a path) and write ``labels.tif`` and ``overlay.png``
    in ``out_dir``; files of those names already there are an error unless ``overwrite``."""
    from panoptem._files import check_output
    from panoptem.inference.engine import Engine2D
    from panoptem.io import read_image, write_labels

    img = read_image(image) if image else sample_image()
    labels_out, picture_out = (check_output(Path(out_dir) / name, "demo output", overwrite)
                               for name in ("labels.tif", "overlay.png"))
    engine = Engine2D(DEMO_MODEL, device=device, quantized=quantized)
    t0 = time.perf_counter()
    labels = engine.segment(img)
    seconds = time.perf_counter() - t0
    labels_path = write_labels(labels_out, labels)
    picture = write_overlay_png(picture_out, img, labels)
    return DemoResult(str(image or "the bundled sample"), labels_path, picture,
                      int(len(np.unique(labels[labels > 0]))), seconds,
                      f"{DEMO_MODEL}{' (int8)' if engine.loaded.quantized else ''}")


def write_overlay_png(path, image: np.ndarray, labels: np.ndarray, alpha: float = 0.45) -> Path:
    """Save the grayscale image with each label in its own colour blended on top."""
    from PIL import Image

    img = np.asarray(image, dtype=np.float64)
    lo, hi = float(img.min()), float(img.max())
    gray = ((img - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(img)).astype(np.uint8)
    rgb = np.repeat(gray[..., None], 3, axis=2).astype(np.float64)
    ids = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(0)
    uniq = np.unique(ids[ids > 0])
    colours = rng.integers(64, 256, size=(len(uniq), 3))
    lut_idx = np.searchsorted(uniq, ids)
    fg = ids > 0
    if uniq.size:
        rgb[fg] = (1 - alpha) * rgb[fg] + alpha * colours[lut_idx[fg]]
    path = Path(path)
    Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).save(path)
    return path
