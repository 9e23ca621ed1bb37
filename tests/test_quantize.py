"""int8 export: which parts run in int8, and agreement with the float model on real EM."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from panoptem import registry
from panoptem.demo import DEMO_MODEL
from panoptem.evaluation import evaluate
from panoptem.inference.engine import Engine2D, Params2D
from panoptem.models.blocks import conv_transpose_bn_act
from panoptem.models.point_rend import (
    bilinear_taps,
    calculate_uncertainty,
    point_sample,
    sample_rows,
    uncertain_points_on_grid,
)
from panoptem.models.quantize import (
    POINTS_PER_CHUNK,
    Int8PointHead,
    Int8Upsampling,
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
    for sub in module.modules():  # the module itself first
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
    # the ASPPs hand channels-last maps on (the int8 blocks' layout), so that resizing them
    # and the next int8 block take them without copies
    crop = lucchi_image[:128, :128].astype(np.float32) / 255
    x = torch.from_numpy((crop - cfg["norms"]["mean"]) / cfg["norms"]["std"])[None, None]
    with torch.inference_mode():
        features = int8.encoder(x)
        for decoder in (int8.semantic_decoder, int8.instance_decoder):
            assert decoder.aspp.project.original_name == "ChannelsLastInput"
            out = decoder.aspp(features[-1])
            assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
            assert decoder(features).is_contiguous(memory_format=torch.channels_last)
    # PointRend's convolutions stay float; its point MLP is an int8 matrix product on rows
    assert _int8_convs(int8.semantic_pr) == 0
    layers = [sub for sub in int8.semantic_pr.point_head.modules() if sub.original_name == "Linear"]
    assert len(layers) == len(model.semantic_pr.point_head.fc_layers)
    assert all("quantized.linear_dynamic(" in layer.code for layer in layers)

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


def _bundled_float_model():
    cfg = registry.get_config(DEMO_MODEL)
    arch = load_training_config(BUNDLED_RECIPE)["MODEL"]
    return cfg, model_from_torchscript(registry.fetch_file(cfg["model"]), arch)


def _decoder_outputs(model, image: np.ndarray, norms: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(coarse semantic logits, semantic decoder features) of the float model on an image."""
    x = torch.from_numpy((image.astype(np.float32) / 255 - norms["mean"]) / norms["std"])[None, None]
    with torch.no_grad():
        features, _ = model._decode(x)
        return model.semantic_head(features), features


def test_rows_sampling_equals_point_sample_at_the_render_points(lucchi_image):
    """bilinear_taps + sample_rows give point_sample's values, as rows, at the cell centres
    PointRend refines (border cells included, whose taps leave the map) and at the corners."""
    crops = [lucchi_image[:48, :80], lucchi_image[300:348, 500:580]]
    maps = torch.from_numpy(np.stack([np.stack([c, 255 - c, c[::-1]]) for c in crops]).astype(np.float32))
    up = torch.nn.functional.interpolate(maps[:, :1], scale_factor=2.0, mode="bilinear")
    _, coords = uncertain_points_on_grid(calculate_uncertainty(up - 128), 4 * 48 * 80)  # every cell
    coords = torch.cat([coords, torch.tensor([[[0.0, 0.0], [1.0, 1.0], [0.0, 1.0]]] * 2)], dim=1)
    expected = point_sample(maps, coords)  # (2, 3, P)
    for layout in (torch.contiguous_format, torch.channels_last):
        features = maps.contiguous(memory_format=layout)
        indices, weights = bilinear_taps(coords, 48, 80)
        for i in range(2):
            rows = sample_rows(features, indices, weights, i)
            assert rows.shape == (coords.shape[1], 3)
            torch.testing.assert_close(rows.t(), expected[i], rtol=1e-5, atol=1e-4)
    # the corner points sample only the corner pixel, a quarter of it
    assert torch.allclose(rows[-3], maps[1, :, 0, 0] / 4, atol=1e-4)


@pytest.mark.parametrize("points", [2048, 3000, 8192])
def test_int8_point_head_agrees_with_the_float_head_and_ignores_the_batch(lucchi_image, points):
    """256 x 256 crops have a 64 x 64 feature map: 2048 and 3000 points are sampled from it,
    for 8192 the first layer runs on its 4096 pixels and its result is sampled (project
    first). The points go through the layers in chunks of 2048: one, two (the second
    shorter) and four."""
    assert POINTS_PER_CHUNK == 2048
    cfg, model = _bundled_float_model()
    float_head = model.semantic_pr.point_head
    int8_head = torch.jit.script(Int8PointHead(float_head))
    images = [lucchi_image[:256, :256], lucchi_image[400:656, 600:856]]
    outputs = [_decoder_outputs(model, image, cfg["norms"]) for image in images]
    coarse = torch.cat([logits for logits, _ in outputs])
    features = torch.cat([feats for _, feats in outputs])
    up = torch.nn.functional.interpolate(coarse, scale_factor=2.0, mode="bilinear")
    _, coords = uncertain_points_on_grid(calculate_uncertainty(up), points)
    assert features.shape[-2:] == (64, 64)
    with torch.no_grad():
        expected = float_head.predict(features, coarse, coords)
        got = int8_head.predict(features, coarse, coords)
        assert got.shape == expected.shape == (2, 1, points)
        # the uncertain points are near 0 by construction, yet the sign (the mask) agrees
        assert ((got > 0) == (expected > 0)).float().mean() >= 0.97
        spread = float(expected.std())
        assert float((got - expected).abs().mean()) < 0.05 * spread
        # each image's points are quantized on their own: batch of 2 == each alone
        for i in range(2):
            alone = int8_head.predict(features[i:i + 1], coarse[i:i + 1], coords[i:i + 1])
            assert torch.equal(alone[0], got[i])
    # the first layer's bias is added once, after sampling (which weighs pixels outside the
    # map with zeros): a head with a large first bias agrees as well (without it: 6.9 mean
    # error for 8192 points, against 0.03)
    biased = copy.deepcopy(float_head)
    first = next(m for m in biased.fc_layers[0].modules() if isinstance(m, torch.nn.Conv1d))
    with torch.no_grad():
        first.bias += 2.0
        expected = biased.predict(features, coarse, coords)
        got = torch.jit.script(Int8PointHead(biased)).predict(features, coarse, coords)
    assert float((got - expected).abs().mean()) < 0.05 * float(expected.std())


def test_int8_export_of_a_bifpn_model_quantizes_its_pyramid(lucchi_image):
    """MitoNet_v1_mini's architecture (small): the pyramid's resamplings and SiLU blocks, the
    decoders' fusions and the point MLP run in int8 next to the encoder, and the file runs
    at another size with features close to the float model's."""
    from panoptem.models import build_model

    torch.manual_seed(0)
    model = build_model({
        "arch": "PanopticBiFPNPR", "encoder": "resnet18", "num_classes": 1, "fpn_dim": 32,
        "fpn_layers": 2, "ins_decoder": True, "depthwise": True, "num_fc": 2,
        "train_num_points": 32, "oversample_ratio": 3, "importance_sample_ratio": 0.75,
        "subdivision_steps": 2, "subdivision_num_points": 1024,
    }).eval()
    norms = {"mean": 0.57571, "std": 0.12765}
    crops = [lucchi_image[y:y + 256, x:x + 256] for y, x in ((0, 0), (256, 512), (512, 256))]
    int8 = quantize_model(model, calibration_tensors(crops, norms, multiple=128))

    top_down = getattr(int8.semantic_fpn.bifpns, "0").top_down_fpn
    float_top_down = model.semantic_fpn.bifpns[0].top_down_fpn
    resamplings = list(zip(float_top_down.resamplings, top_down.resamplings.children(), strict=True))
    assert sum(not isinstance(f.conv, torch.nn.Identity) for f, _ in resamplings) >= 2
    for float_resampling, resampling in resamplings:  # 1 x 1 conv + BN where channels change
        assert (_int8_convs(resampling) >= 1) == (not isinstance(float_resampling.conv, torch.nn.Identity))
    assert all(_int8_convs(block) >= 2 for block in top_down.after_combines.children())
    block = getattr(top_down.after_combines, "0")  # its SiLU runs in float
    assert getattr(block, "2").original_name == "SiLU" and "dequantize" in block.code
    for decoder in (int8.semantic_decoder, int8.instance_decoder):
        assert _int8_convs(decoder.fusion) >= 2
        # each upsampling (transposed conv-BN-ReLU) is an int8 1 x 1 convolution + shuffle
        ups = list(decoder.upsamplings.children())
        assert len(ups) == 5 and all(up.original_name == "Int8Upsampling" and _int8_convs(up) == 1 for up in ups)
    assert _int8_convs(int8.p2_resample) >= 1
    assert int8.semantic_pr.point_head.original_name == "Int8PointHead"

    x = calibration_tensors([lucchi_image[:256, :384]], norms, size=384, multiple=128)[0]
    assert x.shape == (1, 1, 256, 384)  # not the calibration size
    with torch.no_grad():
        expected, got = model(x, 2, True), int8(x, 2, True)
        assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in expected.items()}
        # the decoders' features (the heads' input; this untrained model's heads are nearly
        # constant, as initialised) agree with float's
        for float_features, int8_features in zip(model._decode(x), int8._decode(x), strict=True):
            pair = torch.stack([int8_features.flatten(), float_features.flatten()])
            assert float(torch.corrcoef(pair)[0, 1]) > 0.99


def test_upsampling_as_a_convolution_and_shuffle_equals_the_transposed_convolution(lucchi_image):
    """Int8Upsampling (before quantization) computes the transposed conv + BN (+ ReLU) it
    replaces, on real EM crops as channels, for kernels 2 and 3 and an odd map size."""
    torch.manual_seed(0)
    crop = torch.from_numpy(lucchi_image[:21, :34].astype(np.float32) / 255)
    x = torch.stack([crop, 1 - crop, crop.flip(0), crop.flip(1)])[None]  # (1, 4, 21, 34)
    for k in (2, 3):
        block = conv_transpose_bn_act(4, 6, k).eval()
        bn = block[1]
        with torch.no_grad():  # a BN that does something
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
        for part in (block, torch.nn.Sequential(block[0], block[1])):  # with and without ReLU
            up = Int8Upsampling(part).eval()
            with torch.no_grad():
                expected = part(x)
                assert expected.shape == (1, 6, 21 * k, 34 * k)
                torch.testing.assert_close(up(x), expected, rtol=1e-5, atol=1e-5)
    # a transposed convolution whose outputs overlap (stride < kernel) is not one
    from panoptem.models.quantize import _upsampling_block

    overlapping = torch.nn.Sequential(torch.nn.ConvTranspose2d(4, 6, 4, stride=2, padding=1),
                                      torch.nn.BatchNorm2d(6), torch.nn.ReLU())
    assert not _upsampling_block(overlapping) and _upsampling_block(conv_transpose_bn_act(4, 6, 2))
