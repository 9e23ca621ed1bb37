"""Record the original empanada models' state-dict names and shapes (dev tool, not a test).

Run with the anchor venv that has the original empanada installed::

    /work/anchors/venv/bin/python tests/data/dump_original_model_shapes.py

It builds each configuration below with the original classes (training classes and, where
the original has one, the float ``Quantizable*`` export class), checks that the two give the
same names and shapes, and writes ``original_model_shapes.json`` next to this file:
``{config_name: {"config": {...}, "num_params": int, "shapes": {name: [dims]}}}``.
Only names and shapes are stored, no weights.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import pathlib
import re

import empanada.models as original
import empanada.models.quantization.panoptic_bifpn as qbifpn
import empanada.models.quantization.panoptic_deeplab as qpdl
import yaml

HERE = pathlib.Path(__file__).parent
# locate the plugin without importing it (its __init__ imports napari)
TRAINING = (
    pathlib.Path(importlib.util.find_spec("empanada_napari").submodule_search_locations[0])
    / "training"
)


def load_yaml(name):
    with open(TRAINING / name) as fh:
        return yaml.safe_load(fh)


def configs():
    out = {}
    pdl = load_yaml("pdl_model.yaml")
    pdl["num_classes"] = 1
    out["MitoNet_v1"] = pdl
    bifpn = load_yaml("bifpn_model.yaml")
    bifpn["num_classes"] = 1
    out["MitoNet_v1_mini"] = bifpn
    # the mini project config (mmm_panoptic_bifpn_pointrend.yaml) uses fpn_dim 160
    mini160 = copy.deepcopy(bifpn)
    mini160["fpn_dim"] = 160
    out["MitoNet_v1_mini_fpn160"] = mini160
    # small and multi-class variants exercising other code paths
    out["pdl_resnet18_defaults_3cls"] = {
        "arch": "PanopticDeepLab",
        "encoder": "resnet18",
        "num_classes": 3,
        "stage4_stride": 32,
        "decoder_channels": 64,
        "low_level_stages": [3, 2, 1],
        "low_level_channels_project": [32, 16, 8],
        "atrous_rates": [2, 4, 6],
        "aspp_channels": 48,
        "aspp_dropout": 0.1,
        "ins_decoder": False,
        "ins_ratio": 0.5,
    }
    out["pdlpr_resnet34_insdec_3cls"] = {
        "arch": "PanopticDeepLabPR",
        "encoder": "resnet34",
        "num_classes": 3,
        "stage4_stride": 32,  # the original's BasicBlock refuses dilation (stride 16) "decoder_channels": 32,
        "low_level_stages": [2, 1],
        "low_level_channels_project": [16, 8],
        "atrous_rates": [2, 4, 6],
        "aspp_channels": None,
        "aspp_dropout": 0.5,
        "ins_decoder": True,
        "ins_ratio": 0.5,
        "num_fc": 2,
        "train_num_points": 64,
        "oversample_ratio": 3,
        "importance_sample_ratio": 0.75,
        "subdivision_steps": 2,
        "subdivision_num_points": 256,
    }
    out["bifpn_resnet18_plain_3cls"] = {
        "arch": "PanopticBiFPN",
        "encoder": "resnet18",
        "num_classes": 3,
        "fpn_dim": 32,
        "fpn_layers": 2,
        "ins_decoder": False,
        "depthwise": False,
    }
    out["bifpnpr_resnet34_2cls"] = {
        "arch": "PanopticBiFPNPR",
        "encoder": "resnet34",
        "num_classes": 2,
        "fpn_dim": 32,
        "fpn_layers": 1,
        "ins_decoder": True,
        "depthwise": True,
        "num_fc": 3,
        "train_num_points": 64,
        "oversample_ratio": 3,
        "importance_sample_ratio": 0.75,
        "subdivision_steps": 2,
        "subdivision_num_points": 256,
    }
    return out


QUANTIZABLE = {
    "PanopticDeepLabPR": qpdl.QuantizablePanopticDeepLabPR,
    "PanopticBiFPNPR": qbifpn.QuantizablePanopticBiFPNPR,
}
QUANTIZABLE_ENCODERS = {"resnet50"}  # the only ResNet the export classes accept


def shapes(model):
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def main():
    result = {}
    for name, cfg in configs().items():
        model = original.__dict__[cfg["arch"]](**copy.deepcopy(cfg))
        sd = shapes(model)
        if cfg["arch"] in QUANTIZABLE and cfg["encoder"] in QUANTIZABLE_ENCODERS:
            qmodel = QUANTIZABLE[cfg["arch"]](**copy.deepcopy(cfg), quantize=False)
            assert shapes(qmodel) == sd, f"{name}: export class differs from training class"
        nparams = sum(p.numel() for p in model.parameters())
        result[name] = {"config": cfg, "num_params": nparams, "shapes": sd}
        print(f"{name}: {len(sd)} entries, {nparams} parameters")
    text = json.dumps(result, indent=1)
    # keep each list of numbers on one line so the file stays small and readable
    text = re.sub(r"\[[\d,\s]*\]", lambda m: json.dumps(json.loads(m.group(0))), text)
    (HERE / "original_model_shapes.json").write_text(text + "\n")


if __name__ == "__main__":
    main()
