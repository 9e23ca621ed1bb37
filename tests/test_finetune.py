"""Finetuning a registered TorchScript model on a dataset folder in the original's layout."""

import shutil

import numpy as np
import pytest
import torch
import yaml

from panoptem import loading, registry
from panoptem.inference.engine import Engine2D
from panoptem.training.finetune import finetune_model
from testutils import EM_DATA, model_config


@pytest.fixture
def sbem_dataset(tmp_path):
    root = tmp_path / "dataset" / "sbem"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in ("010", "012"):
        shutil.copy(EM_DATA / f"cdeep3m_train_{i}_y0_x0.png", root / "images" / f"s{i}.png")
        shutil.copy(EM_DATA / f"cdeep3m_train_{i}_y0_x0_mask.png", root / "masks" / f"s{i}.png")
    return tmp_path / "dataset"


def test_finetune_registers_a_working_model(small_model_file, sbem_dataset, tmp_path, lucchi_image):
    cfg = tmp_path / "base.yaml"
    yaml.safe_dump(
        dict(
            model_config(small_model_file), FINETUNE=registry.get_config("MitoNet_v1")["FINETUNE"]
        ),
        cfg.open("w"),
    )
    base = registry.register_model("BaseSmall", cfg)
    before = {k: v.clone() for k, v in loading.load_model(base).module.state_dict().items()}
    out = finetune_model(
        base,
        sbem_dataset,
        tmp_path / "models",
        name="Tuned",
        iterations=3,
        patch_size=64,
        batch_size=2,
        finetune_layer="stage4",
    )
    assert out.name == "Tuned" and "Tuned" in registry.list_models()
    after = loading.load_model("Tuned").module.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and not any(k.startswith("encoder.layer1.") for k in changed)
    labels = Engine2D("Tuned").segment(lucchi_image[:96, :96])
    assert labels.shape == (96, 96) and labels.dtype == np.int32


def test_finetune_command(small_model_file, sbem_dataset, tmp_path, capsys):
    from panoptem.cli import main

    cfg = tmp_path / "base.yaml"
    yaml.safe_dump(model_config(small_model_file), cfg.open("w"))
    registry.register_model("CliBase", cfg)
    rc = main(
        [
            "finetune",
            str(sbem_dataset),
            "--model",
            "CliBase",
            "--name",
            "CliTuned",
            "--model-dir",
            str(tmp_path / "m"),
            "--iterations",
            "2",
            "--patch-size",
            "64",
            "--batch-size",
            "2",
            "--quiet",
        ]
    )
    assert rc == 0 and "CliTuned" in registry.list_models()
    assert (
        main(
            [
                "finetune",
                str(tmp_path / "nothing"),
                "--model",
                "CliBase",
                "--model-dir",
                str(tmp_path / "m"),
                "--quiet",
            ]
        )
        == 2
    )
    assert "panoptem: error:" in capsys.readouterr().err
