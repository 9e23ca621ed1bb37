"""Finetuning a registered TorchScript model on a dataset folder in the original's layout."""

import shutil

import numpy as np
import pytest
import torch
import yaml

from panoptem import loading, registry
from panoptem.errors import PanoptemError
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
    before = {k: v.clone() for k, v in loading.load_model(base, optimize=False).module.state_dict().items()}
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
    assert out.exported.name == "Tuned" and "Tuned" in registry.list_models()
    assert len(out.losses) == 3 and out.evaluations == []  # no validation folder given
    after = loading.load_model("Tuned", optimize=False).module.state_dict()
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


def test_finetune_with_a_validation_folder(small_model_file, sbem_dataset, tmp_path):
    from panoptem.cli import main

    cfg = tmp_path / "base.yaml"
    yaml.safe_dump(model_config(small_model_file), cfg.open("w"))
    base = registry.register_model("ValBase", cfg)
    out = finetune_model(base, sbem_dataset, tmp_path / "models", name="ValTuned", iterations=4,
                         patch_size=64, batch_size=2, eval_dir=sbem_dataset, eval_every=2)
    assert [ev["iteration"] for ev in out.evaluations] == [2, 4]
    for ev in out.evaluations:
        assert 0.0 <= ev["iou"] <= 1.0 and 0.0 <= ev["f1"] <= 1.0 and 0.0 <= ev["pq"] <= 1.0
    rc = main(["finetune", str(sbem_dataset), "--model", base, "--name", "CliVal", "--model-dir",
               str(tmp_path / "m"), "--iterations", "2", "--patch-size", "64", "--batch-size", "2",
               "--eval-dir", str(sbem_dataset), "--quiet"])
    assert rc == 0 and "CliVal" in registry.list_models()


def test_finetune_a_model_with_two_classes(tmp_path, two_class_dataset):
    """The original finetunes any registered model: a two-class model (mito instances, a
    semantic class) trains on a PanopticDataset with its config's label divisor."""
    from panoptem.demo import untrained_model
    from panoptem.models import export_torchscript
    from panoptem.training.finetune import model_classes
    from testutils import SMALL_ARCH

    pth = tmp_path / "two.pth"
    export_torchscript(untrained_model({**SMALL_ARCH, "num_classes": 3}), pth)
    finetune = dict(registry.get_config("MitoNet_v1")["FINETUNE"])
    finetune["dataset_class"] = "PanopticDataset"
    finetune["engine_params"] = {**finetune["engine_params"], "thing_list": [1],
                                 "label_divisor": 1000}
    config = model_config(pth, class_names={1: "mito", 2: "membrane"}, labels=[1, 2],
                          thing_list=[1], FINETUNE=finetune)
    (tmp_path / "two.yaml").write_text(yaml.safe_dump(config))
    base = registry.register_model("TwoClass", tmp_path / "two.yaml")
    classes = model_classes(registry.get_config(base))
    assert (classes.dataset_class, classes.labels, classes.thing_list, classes.label_divisor) == \
        ("PanopticDataset", [1, 2], [1], 1000)
    out = finetune_model(base, two_class_dataset, tmp_path / "models", name="TwoTuned",
                         iterations=2, patch_size=64, batch_size=2, eval_dir=two_class_dataset)
    assert out.exported.name == "TwoTuned" and len(out.evaluations) == 1
    tuned = registry.get_config("TwoTuned")
    assert tuned["labels"] == [1, 2] and tuned["class_names"] == {1: "mito", 2: "membrane"}
    assert tuned["FINETUNE"]["dataset_class"] == "PanopticDataset"
    labels = Engine2D("TwoTuned").segment(np.zeros((64, 64), np.uint8) + 100)
    assert set(np.unique(labels // 10000)) <= {0, 1, 2}


def test_finetune_refuses_a_config_whose_dataset_class_contradicts_its_classes(
    small_model_file, tmp_path, sbem_dataset
):
    finetune = dict(registry.get_config("MitoNet_v1")["FINETUNE"], dataset_class="PanopticDataset")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(model_config(small_model_file,
                                                                 FINETUNE=finetune)))
    base = registry.register_model("Odd", tmp_path / "c.yaml")
    with pytest.raises(PanoptemError, match="needs SingleClassInstanceDataset"):
        finetune_model(base, sbem_dataset, tmp_path / "m", iterations=1, patch_size=64,
                       batch_size=2)


def test_too_few_patches_for_one_batch_and_a_bad_patch_size_are_refused_first(
    small_model_file, sbem_dataset, tmp_path, monkeypatch
):
    """Both are refused before the model is even loaded (nothing is trained or written)."""
    import torch as torch_module

    cfg = tmp_path / "base.yaml"
    yaml.safe_dump(model_config(small_model_file, padding_factor=128), cfg.open("w"))
    base = registry.register_model("Coarse", cfg)
    with pytest.raises(PanoptemError, match="multiple of 128 for Coarse"):
        finetune_model(base, sbem_dataset, tmp_path / "m", iterations=1, patch_size=192)
    loads = []
    jit_load = torch_module.jit.load
    monkeypatch.setattr(torch_module.jit, "load", lambda *a, **k: loads.append(1) or jit_load(*a, **k))
    with pytest.raises(PanoptemError, match="holds 2 image/mask pair.* one batch takes 16"):
        finetune_model(base, sbem_dataset, tmp_path / "m", iterations=1, patch_size=128)
    assert loads == [] and not any((tmp_path / "m").iterdir())


def test_a_cancel_keeps_the_last_checkpoint_and_the_progress_reads_out_the_loss(
    small_model_file, sbem_dataset, tmp_path
):
    from panoptem.errors import Cancelled
    from panoptem.progress import Progress

    class CancelAfterThree(Progress):
        notes: list = []

        def on_note(self, text):
            self.notes.append(text)

        def on_advance(self, done, total):
            if done == 3:
                self.cancel()

    cfg = tmp_path / "base.yaml"
    yaml.safe_dump(model_config(small_model_file), cfg.open("w"))
    base = registry.register_model("CancelBase", cfg)
    progress = CancelAfterThree()
    with pytest.raises(Cancelled) as err:
        finetune_model(base, sbem_dataset, tmp_path / "models", name="Cut", iterations=10,
                       patch_size=64, batch_size=2, eval_dir=sbem_dataset, eval_every=2,
                       progress=progress)
    kept = tmp_path / "models" / "Cut_checkpoint.pth"
    assert err.value.kept == f"The last checkpoint is kept in {kept}."
    assert kept.is_file() and "Cut" not in registry.list_models()  # nothing registered
    checkpoint = loading.load_model(model_config(kept)).module  # a runnable TorchScript file
    assert checkpoint is not None
    assert progress.notes[0].startswith("loss ")
    assert "validation IoU" in progress.notes[1]  # after the validation at iteration 2
