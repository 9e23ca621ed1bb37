"""Training-config templates and BASE inheritance."""

from pathlib import Path

import pytest
import yaml

from panoptem.errors import PanoptemError
from panoptem.models import build_model
from panoptem.training.config import TEMPLATES, load_training_config, merge_configs

REPO_TEMPLATES = Path(__file__).resolve().parents[1] / "custom_configs"


def test_merge_is_recursive_and_lists_replace():
    base = {"A": {"x": 1, "y": [1, 2]}, "B": 2}
    assert merge_configs(base, {"A": {"y": [3]}, "C": 4}) == {
        "A": {"x": 1, "y": [3]},
        "B": 2,
        "C": 4,
    }
    assert base == {"A": {"x": 1, "y": [1, 2]}, "B": 2}  # untouched


def test_templates_load_and_inherit():
    cfgs = {name: load_training_config(REPO_TEMPLATES / name) for name in TEMPLATES}
    pdl, bifpn = cfgs["custom_training_pdl.yaml"], cfgs["custom_training_bifpn.yaml"]
    # the training templates inherit the finetuning schedule and augmentations
    assert pdl["TRAIN"]["schedule_params"]["max_lr"] == 0.003
    assert len(pdl["TRAIN"]["augmentations"]) == 7
    assert pdl["TRAIN"]["finetune_layer"] == "all"  # overridden
    assert (
        bifpn["MODEL"]["arch"] == "PanopticBiFPNPR"
        and bifpn["EVAL"]["engine_params"]["nms_kernel"] == 7
    )
    assert "BASE" not in bifpn
    # the MODEL blocks build real models once num_classes is filled
    for cfg in (pdl, bifpn):
        model = build_model(dict(cfg["MODEL"], num_classes=1, encoder="resnet18"))
        assert sum(p.numel() for p in model.parameters()) > 1e6


def test_bad_configs(tmp_path):
    (tmp_path / "a.yaml").write_text("BASE: b.yaml\nx: 1\n")
    (tmp_path / "b.yaml").write_text("BASE: a.yaml\n")
    with pytest.raises(PanoptemError, match="cycle"):
        load_training_config(tmp_path / "a.yaml")
    (tmp_path / "bad.yaml").write_text("x: [1, 2\n")
    with pytest.raises(PanoptemError, match="not valid YAML"):
        load_training_config(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(PanoptemError, match="mapping"):
        load_training_config(tmp_path / "list.yaml")
    with pytest.raises(PanoptemError, match="not found"):
        load_training_config(tmp_path / "missing.yaml")


def test_templates_ship_in_the_package_and_custom_configs_links_to_them():
    from panoptem.training.config import ARCHITECTURES, TEMPLATE_DIR, training_template

    for name in TEMPLATES:
        assert (TEMPLATE_DIR / name).is_file()
        assert (REPO_TEMPLATES / name).resolve() == (TEMPLATE_DIR / name).resolve()
    assert training_template("PanopticDeepLab")["MODEL"]["arch"] == "PanopticDeepLabPR"
    assert training_template("PanopticBiFPN")["MODEL"]["arch"] == "PanopticBiFPNPR"
    assert set(ARCHITECTURES) == {"PanopticDeepLab", "PanopticBiFPN"}
    with pytest.raises(PanoptemError, match="Model architecture must be one of"):
        training_template("UNet")
