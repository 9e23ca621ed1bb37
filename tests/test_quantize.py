"""int8 export: which parts run in int8, and agreement with the float model on real EM."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from panoptem import registry
from panoptem.demo import DEMO_MODEL
from panoptem.evaluation import evaluate
from panoptem.inference.engine import Engine2D, Params2D
from panoptem.models.quantize import (
    calibration_tensors,
    model_from_torchscript,
    quantize_model,
    save_quantized,
)
from panoptem.training.config import load_training_config
from testutils import em_png

BUNDLED_RECIPE = Path(__file__).resolve().parents[1] / "custom_configs" / "bundled" / "panoptem_mito_small.yaml"


def _int8_convs(module: torch.jit.ScriptModule) -> int:
    """Number of int8 convolutions in a scripted (sub)module's code, its children included."""
    count = 0
    for sub in [module, *module.modules()]:
        try:
            count += sub.code.count("quantized.conv") + sub.code.count("quantized::conv")
        except (RuntimeError, AttributeError):
            pass
    return count


def test_int8_export_of_the_bundled_model_agrees_with_float(tmp_path, lucchi_image):
    cfg = registry.get_config(DEMO_MODEL)
    arch = load_training_config(BUNDLED_RECIPE)["MODEL"]
    model = model_from_torchscript(registry.fetch_file(cfg["model"]), arch)
    train = [em_png(f"lucchi_train_{i:04d}_y300_x400.png") for i in (0, 40, 80)]
    int8 = quantize_model(model, calibration_tensors(train, cfg["norms"]), already_fused=True)

    # the encoder and every convolution branch of both ASPPs run in int8; pooling stays float
    assert _int8_convs(int8.encoder) >= 10
    for decoder in (int8.semantic_decoder, int8.instance_decoder):
        convs = list(decoder.aspp.convs)
        assert all(_int8_convs(branch) >= 1 for branch in convs[:4])
        assert _int8_convs(convs[4]) == 0
        # so does each fusion block (5 x 5 separable conv-BN-ReLU) of the decoders
        assert all(_int8_convs(block) >= 2 for block in decoder.fuse)
    # and the first block of each head; the final convolution (logits, centres, offsets) is float
    for head in (int8.semantic_head, int8.ins_center, int8.ins_xy):
        assert _int8_convs(head.head[0]) >= 2
        assert _int8_convs(head.head[1]) == 0
    # PointRend stays float
    assert _int8_convs(int8.semantic_pr) == 0

    # the file runs through the engine at image sizes it was not traced with
    path = tmp_path / "small_quantized.pth"
    save_quantized(int8, path)
    config = {**cfg, "model_quantized": str(path)}
    image = np.ascontiguousarray(lucchi_image[:384, :640])
    float_labels = Engine2D(config).segment(image, Params2D())
    engine = Engine2D(config, quantized=True)
    assert engine.loaded.quantized and engine.loaded.path == path
    agreement = evaluate(engine.segment(image, Params2D()), float_labels)
    assert agreement.fg_iou >= 0.95 and agreement.f1 >= 0.9
