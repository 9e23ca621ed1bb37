"""Tests of panoptem.models: building, state-dict compatibility, call interface, export.

``tests/data/original_model_shapes.json`` holds the state-dict names and shapes of the
original empanada models for several configs (written by
``tests/data/dump_original_model_shapes.py`` in an environment with empanada installed).
"""

from __future__ import annotations

import copy
import json
import pathlib

import pytest
import torch

from panoptem.errors import PanoptemError
from panoptem.models import (
    ENCODERS,
    MODEL_ARCHS,
    build_model,
    count_parameters,
    export_torchscript,
    load_encoder_weights,
    script_model,
)

# torch >= 2.10 flags TorchScript load/save as deprecated; the released model format is
# TorchScript, so these notices are expected here
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")

DATA = pathlib.Path(__file__).parent / "data"
ORIGINAL = json.loads((DATA / "original_model_shapes.json").read_text())

POINT_REND = dict(
    num_fc=2,
    train_num_points=32,
    oversample_ratio=3,
    importance_sample_ratio=0.75,
    subdivision_steps=2,
    subdivision_num_points=64,
)
SMALL = {
    "PanopticDeepLab": dict(
        arch="PanopticDeepLab",
        encoder="resnet18",
        num_classes=1,
        stage4_stride=16,
        decoder_channels=16,
        low_level_stages=[1],
        low_level_channels_project=[8],
        atrous_rates=[2, 4, 6],
        aspp_channels=None,
        aspp_dropout=0.5,
        ins_decoder=True,
        ins_ratio=0.5,
    ),
    "PanopticBiFPN": dict(
        arch="PanopticBiFPN",
        encoder="resnet18",
        num_classes=3,
        fpn_dim=16,
        fpn_layers=2,
        ins_decoder=True,
        depthwise=True,
    ),
}
SMALL["PanopticDeepLabPR"] = dict(SMALL["PanopticDeepLab"], arch="PanopticDeepLabPR", **POINT_REND)
SMALL["PanopticBiFPNPR"] = dict(SMALL["PanopticBiFPN"], arch="PanopticBiFPNPR", **POINT_REND)
# smallest input side used per architecture (padding factor)
SIDE = {
    "PanopticDeepLab": 64,
    "PanopticDeepLabPR": 64,
    "PanopticBiFPN": 128,
    "PanopticBiFPNPR": 128,
}


def _small(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(copy.deepcopy(SMALL[arch])).eval()


def _shapes(out: dict) -> dict:
    return {k: tuple(v.shape) for k, v in out.items()}


def test_model_archs_listed():
    assert set(MODEL_ARCHS) == {
        "PanopticDeepLab",
        "PanopticDeepLabPR",
        "PanopticBiFPN",
        "PanopticBiFPNPR",
    }
    assert {"resnet18", "resnet34", "resnet50"} <= set(ENCODERS)


@pytest.mark.parametrize("arch", sorted(SMALL))
def test_eval_output_shapes_eager_and_scripted(arch):
    model = _small(arch)
    scripted = script_model(model)
    side = SIDE[arch]
    c = SMALL[arch]["num_classes"]
    x = torch.randn(1, 1, side, side)
    with torch.no_grad():
        for steps in (2, 3):
            for interp in (True, False):
                eager = model(x, steps, interp)
                out = scripted(x, steps, interp)
                sem = side * 2 ** (steps - 2)
                ins = side if interp else side // 4
                assert _shapes(out) == {
                    "sem_logits": (1, c, sem, sem),
                    "ctr_hmp": (1, 1, ins, ins),
                    "offsets": (1, 2, ins, ins),
                }
                for k in out:
                    torch.testing.assert_close(out[k], eager[k], rtol=1e-5, atol=1e-6)
        # default arguments = render_steps 2, interpolate_ins True
        assert _shapes(scripted(x)) == _shapes(model(x, 2, True))


@pytest.mark.parametrize("arch", sorted(SMALL))
def test_train_mode_outputs(arch):
    model = _small(arch).train()
    side = SIDE[arch]
    c = SMALL[arch]["num_classes"]
    out = model(torch.randn(2, 1, side, side))
    expected = {
        "sem_logits": (2, c, side, side),
        "ctr_hmp": (2, 1, side, side),
        "offsets": (2, 2, side, side),
    }
    if arch.endswith("PR"):
        p = POINT_REND["train_num_points"]
        expected |= {"sem_points": (2, c, p), "point_coords": (2, p, 2)}
        coords = out["point_coords"]
        assert coords.min() >= 0 and coords.max() <= 1
    assert _shapes(out) == expected
    sum(v.sum() for k, v in out.items() if k != "point_coords").backward()
    assert model.semantic_head.head[1].weight.grad is not None


def test_render_steps_up_to_8():
    model = _small("PanopticDeepLabPR")
    scripted = script_model(model)
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        out = scripted(x, 8, False)
    assert out["sem_logits"].shape == (1, 1, 16 * 64, 16 * 64)
    assert out["ctr_hmp"].shape == (1, 1, 4, 4)
    assert torch.isfinite(out["sem_logits"]).all()


def test_pointrend_keeps_most_of_the_bilinear_upsampling():
    # cells that are not re-predicted keep the x2 bilinear upsampled coarse value
    model = _small("PanopticDeepLabPR")
    pr = model.semantic_pr
    coarse = torch.randn(1, 1, 8, 8)
    feats = torch.randn(1, 16, 8, 8)
    up = torch.nn.functional.interpolate(
        coarse, scale_factor=2.0, mode="bilinear", align_corners=False
    )
    with torch.no_grad():
        out = pr.render(coarse, feats, 1)
    changed = (out != up).sum().item()
    assert out.shape == (1, 1, 16, 16)
    assert 0 < changed <= pr.subdivision_num_points


@pytest.mark.parametrize("name", sorted(ORIGINAL))
def test_state_dict_names_and_shapes_equal_original(name):
    record = ORIGINAL[name]
    with torch.device("meta"):
        model = build_model(record["config"])
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert list(shapes) == list(record["shapes"])  # same names in the same order
    assert shapes == record["shapes"]
    assert count_parameters(model) == record["num_params"]


def test_mitonet_v1_parameter_count():
    with torch.device("meta"):
        model = build_model(ORIGINAL["MitoNet_v1"]["config"])
    n = count_parameters(model)
    assert n == 55_158_486
    assert round(n / 1e6, 2) == 55.16
    with torch.device("meta"):
        mini = build_model(ORIGINAL["MitoNet_v1_mini_fpn160"]["config"])
    assert round(count_parameters(mini) / 1e6, 2) == 28.79


def test_original_checkpoint_loads_strictly():
    # a state dict with exactly the original's names loads without renaming
    model = _small("PanopticBiFPNPR")
    other = _small("PanopticBiFPNPR")
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.01)
    result = model.load_state_dict(other.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_encoder_keys_match_cem_checkpoint_layout():
    # the CEM ResNet50 checkpoint uses torchvision names (no prefix) plus fc.*; the
    # original prefixes them with "encoder." - i.e. they are our encoder's own keys
    with torch.device("meta"):
        model = build_model(ORIGINAL["MitoNet_v1"]["config"])
    original_encoder = {
        k[len("encoder.") :]: v
        for k, v in ORIGINAL["MitoNet_v1"]["shapes"].items()
        if k.startswith("encoder.")
    }
    ours = {k: list(v.shape) for k, v in model.encoder.state_dict().items()}
    assert ours == original_encoder
    assert "conv1.weight" in ours and ours["conv1.weight"] == [64, 1, 7, 7]
    assert not any(k.startswith("fc") for k in ours)


def test_load_encoder_weights_drops_fc_and_returns_norms():
    model = _small("PanopticDeepLab")
    source = build_model(SMALL["PanopticDeepLab"]).encoder
    with torch.no_grad():
        for p in source.parameters():
            p.normal_()
    sd = dict(source.state_dict())
    sd["fc.weight"] = torch.zeros(1000, 512)
    sd["fc.bias"] = torch.zeros(1000)
    norms = load_encoder_weights(model, {"state_dict": sd, "norms": [0.5, 0.1]})
    assert norms == pytest.approx({"mean": 0.5, "std": 0.1})
    torch.testing.assert_close(model.encoder.conv1.weight, source.conv1.weight)
    # plain load_state_dict works too once fc.* is removed
    model.encoder.load_state_dict({k: v for k, v in sd.items() if not k.startswith("fc")})
    with pytest.raises(PanoptemError):
        load_encoder_weights(model, {"state_dict": {"something.else": torch.zeros(1)}})


@pytest.mark.parametrize("arch", ["PanopticDeepLabPR", "PanopticBiFPNPR"])
def test_export_roundtrip(tmp_path, arch):
    model = _small(arch).train()
    with torch.no_grad():  # non-trivial BatchNorm statistics so that fusion matters
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "model.pth"
    returned = export_torchscript(model, path)
    assert model.training  # the caller's model is left alone
    assert isinstance(model.encoder.bn1, torch.nn.BatchNorm2d)
    assert isinstance(returned.encoder.bn1, torch.jit.RecursiveScriptModule)
    loaded = torch.jit.load(str(path))
    model.eval()
    x = torch.randn(1, 1, SIDE[arch], SIDE[arch])
    with torch.no_grad():
        for steps, interp in ((2, True), (3, False)):
            ref = model(x, steps, interp)
            out = loaded(x, steps, interp)  # positional, as the original engines call it
            assert _shapes(out) == _shapes(ref)
            for k in ("ctr_hmp", "offsets"):
                torch.testing.assert_close(out[k], ref[k], rtol=1e-4, atol=1e-5)
            # PointRend may pick a few different cells when fusion changes logits by
            # rounding error; nearly all values must agree
            close = torch.isclose(out["sem_logits"], ref["sem_logits"], rtol=1e-4, atol=1e-5)
            assert close.float().mean() > 0.99
    assert loaded.encoder.bn1.original_name == "Identity"  # conv+BN folded


def test_scripted_model_saves_and_reloads(tmp_path):
    model = _small("PanopticBiFPNPR")
    scripted = script_model(model)
    path = tmp_path / "scripted.pth"
    torch.jit.save(scripted, str(path))
    loaded = torch.jit.load(str(path))
    x = torch.randn(1, 1, 128, 128)
    with torch.no_grad():
        a = scripted(x, 3, True)
        b = loaded(x, 3, True)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"arch": "UNet"}, "arch"),
        ({"encoder": "regnety_6p4gf"}, "encoder"),
        ({"num_classes": None}, "num_classes"),
        ({"stage4_stride": 8}, "stage4_stride"),
        ({"low_level_channels_project": [8, 4]}, "same length"),
    ],
)
def test_invalid_config_raises(change, message):
    cfg = dict(SMALL["PanopticDeepLab"], **change)
    with pytest.raises(PanoptemError, match=message):
        build_model(cfg)


@pytest.mark.parametrize("key", ["arch", "encoder", "num_classes"])
def test_missing_key_raises(key):
    cfg = dict(SMALL["PanopticBiFPN"])
    del cfg[key]
    with pytest.raises(PanoptemError, match=key):
        build_model(cfg)


def test_defaults_and_ignored_keys():
    # absent keys take the original defaults; keys of the other architecture are ignored
    cfg = {
        "arch": "PanopticBiFPN",
        "encoder": "resnet18",
        "num_classes": 1,
        "fpn_dim": 8,
        "stage4_stride": 16,
        "aspp_channels": None,
    }
    with torch.device("meta"):
        model = build_model(cfg)
    assert model.instance_fpn is None  # ins_decoder defaults to False
    assert len(model.semantic_fpn.bifpns) == 3  # fpn_layers defaults to 3
