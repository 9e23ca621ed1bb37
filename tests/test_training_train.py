"""Training from scratch from a config, checkpoint export and int8 quantization."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from panoptem import registry
from panoptem.cli import main
from panoptem.errors import PanoptemError
from panoptem.inference.engine import Engine2D, Params2D
from panoptem.training.publish import load_checkpoint, publish_checkpoint, quantize_registered
from panoptem.training.train import CEM_WEIGHTS_URL, train_model
from testutils import SMALL_ARCH, em_png

REPO = Path(__file__).resolve().parents[1]


def _save(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> Path:
    """Two sources of real 128 x 128 crops (Lucchi++ FIB-SEM, CDeep3M SBEM) with masks."""
    root = tmp_path_factory.mktemp("tiny_dataset")
    for i, n in enumerate((0, 40, 80)):
        img = em_png(f"lucchi_train_{n:04d}_y300_x400.png")
        mask = em_png(f"lucchi_train_{n:04d}_y300_x400_mask.png")
        _save(root / "lucchi" / "images" / f"l{i}.png", img)
        _save(root / "lucchi" / "masks" / f"l{i}.png", mask)
    img = em_png("cdeep3m_train_010_y0_x0.png")[:128, :128]
    mask = em_png("cdeep3m_train_010_y0_x0_mask.png")[:128, :128]
    _save(root / "cdeep" / "images" / "c0.png", img)
    _save(root / "cdeep" / "masks" / "c0.png", mask)
    return root


def _config(tmp_path: Path, **train) -> Path:
    """A user config inheriting the repository's Panoptic-DeepLab template via BASE."""
    cfg = {
        "BASE": str(REPO / "custom_configs" / "custom_training_pdl.yaml"),
        "model_name": "TinyMito",
        "DATASET": {"class_names": {1: "mito"}, "labels": [1], "thing_list": [1]},
        "MODEL": {k: v for k, v in SMALL_ARCH.items()},
        "TRAIN": {
            "encoder_pretraining": None,
            "iterations": 3,
            "patch_size": 64,
            "batch_size": 2,
            **train,
        },
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def trained(tiny_dataset, tmp_path_factory):
    """One CLI training run (3 iterations, with validation and quantization), shared."""
    tmp = tmp_path_factory.mktemp("train_run")
    home = tmp / "home"
    mp = pytest.MonkeyPatch()
    mp.setenv("PANOPTEM_HOME", str(home))
    rc = main(
        [
            "train",
            "--config",
            str(_config(tmp)),
            "--train-dir",
            str(tiny_dataset),
            "--eval-dir",
            str(tiny_dataset),
            "-o",
            str(tmp / "models"),
            "--quantize",
            "--log",
            str(tmp / "log.jsonl"),
            "--quiet",
        ]
    )
    yield {"rc": rc, "dir": tmp / "models", "home": home, "log": tmp / "log.jsonl"}
    mp.undo()


def test_cli_train_exports_registers_and_quantizes(trained, monkeypatch, capsys):
    monkeypatch.setenv("PANOPTEM_HOME", str(trained["home"]))
    assert trained["rc"] == 0
    assert "TinyMito" in registry.list_models()
    cfg = registry.get_config("TinyMito")
    assert cfg["padding_factor"] == 16 and cfg["thing_list"] == [1]
    assert 0 < cfg["norms"]["std"] < 1  # measured on the training images (template says null)
    assert Path(cfg["model"]).is_file() and Path(cfg["model_quantized"]).is_file()
    assert (trained["dir"] / "TinyMito_checkpoint.pth.tar").is_file()
    assert '"validation"' in trained["log"].read_text()
    image = em_png("lucchi_test_0000.png")[:256, :256]
    for quantized in (False, True):
        engine = Engine2D("TinyMito", quantized=quantized)
        assert engine.loaded.quantized is quantized
        labels = engine.segment(image, Params2D())
        assert labels.shape == image.shape and labels.dtype == np.int32


def test_checkpoint_export_matches_and_quantize_updates_config(
    trained, monkeypatch, tiny_dataset, tmp_path
):
    monkeypatch.setenv("PANOPTEM_HOME", str(trained["home"]))
    ckpt = trained["dir"] / "TinyMito_checkpoint.pth.tar"
    model, cfg = load_checkpoint(ckpt)
    assert cfg["MODEL"]["encoder"] == SMALL_ARCH["encoder"] and cfg["DATASET"]["labels"] == [1]
    out = publish_checkpoint(ckpt, tmp_path / "again", name="TinyAgain")
    assert out.name == "TinyAgain" and registry.get_config("TinyAgain")["model_quantized"] is None
    x = torch.randn(1, 1, 64, 96)
    a = torch.jit.load(str(trained["dir"] / "TinyMito.pth"))(x, 2, True)
    b = torch.jit.load(str(out.model_path))(x, 2, True)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in ("sem_logits", "ctr_hmp", "offsets"))
    q = quantize_registered("TinyAgain", tiny_dataset, checkpoint=ckpt)
    assert registry.get_config("TinyAgain")["model_quantized"] == str(q) and q.is_file()
    # from the exported file itself plus its architecture: the same int8 model
    q2 = quantize_registered("TinyMito", tiny_dataset, arch_config={"MODEL": cfg["MODEL"]})
    x = torch.randn(1, 1, 64, 64)
    qa, qb = torch.jit.load(str(q))(x, 2, True), torch.jit.load(str(q2))(x, 2, True)
    assert torch.allclose(qa["sem_logits"], qb["sem_logits"], atol=1e-4)
    with pytest.raises(PanoptemError, match="built-in"):
        quantize_registered("MitoNet_v1", tiny_dataset, checkpoint=ckpt)
    with pytest.raises(PanoptemError, match="not both"):
        quantize_registered("TinyAgain", tiny_dataset, checkpoint=ckpt, arch_config=cfg)
    (tmp_path / "junk.pth.tar").write_bytes(b"not a checkpoint")
    with pytest.raises(PanoptemError, match="not a panoptem training checkpoint"):
        load_checkpoint(tmp_path / "junk.pth.tar")


def test_cem_weights_need_resnet50_and_say_where_offline(tiny_dataset, tmp_path, monkeypatch):
    with pytest.raises(PanoptemError, match="only for resnet50"):
        train_model(
            _config(tmp_path, encoder_pretraining="cem"),
            train_dir=tiny_dataset,
            model_dir=tmp_path / "m",
        )
    monkeypatch.setenv("PANOPTEM_OFFLINE", "1")
    cfg = yaml.safe_load(_config(tmp_path, encoder_pretraining="cem").read_text())
    cfg["MODEL"]["encoder"] = "resnet50"
    (tmp_path / "r50.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(PanoptemError) as err:
        train_model(tmp_path / "r50.yaml", train_dir=tiny_dataset, model_dir=tmp_path / "m")
    assert CEM_WEIGHTS_URL in str(err.value)


def test_train_config_errors(tiny_dataset, tmp_path):
    with pytest.raises(PanoptemError, match="training folder"):
        train_model(_config(tmp_path), model_dir=tmp_path / "m")
    with pytest.raises(PanoptemError, match="multiple of 16"):
        train_model(
            _config(tmp_path), train_dir=tiny_dataset, model_dir=tmp_path / "m", patch_size=72
        )
    with pytest.raises(PanoptemError, match="encoder_pretraining"):
        train_model(
            _config(tmp_path, encoder_pretraining="imagenet"),
            train_dir=tiny_dataset,
            model_dir=tmp_path / "m",
        )


def test_cli_export_quantize_and_model_archives(
    trained, monkeypatch, tiny_dataset, tmp_path, capsys
):
    monkeypatch.setenv("PANOPTEM_HOME", str(trained["home"]))
    ckpt = str(trained["dir"] / "TinyMito_checkpoint.pth.tar")
    assert main(["export", ckpt, "-o", str(tmp_path / "m"), "--name", "CliTiny"]) == 0
    assert registry.get_config("CliTiny")["model_quantized"] is None
    assert (
        main(["quantize", "CliTiny", "--calibration-dir", str(tiny_dataset), "--checkpoint", ckpt])
        == 0
    )
    assert Path(registry.get_config("CliTiny")["model_quantized"]).is_file()
    assert "calibrating int8" in capsys.readouterr().err  # the text progress bar
    model_bytes = Path(registry.get_config("CliTiny")["model"]).read_bytes()
    archive = tmp_path / "CliTiny.empanada"
    assert main(["models", "export", "CliTiny", str(archive)]) == 0 and archive.is_file()
    assert main(["models", "archive", "CliTiny"]) == 0
    assert "CliTiny" not in registry.list_models()
    assert not (tmp_path / "m" / "CliTiny.pth").exists()  # archiving moves the files
    assert main(["models", "import", str(archive), "--name", "CliTiny2"]) == 0
    restored = registry.get_config("CliTiny2")
    assert Path(restored["model"]).read_bytes() == model_bytes
    assert Path(restored["model_quantized"]).is_file()
    assert main(["models", "archive", "MitoNet_v1"]) == 2  # built-ins stay in the package
    assert "built-in" in capsys.readouterr().err
    assert (
        main(
            [
                "quantize",
                "CliTiny2",
                "--calibration-dir",
                str(tiny_dataset),
                "--checkpoint",
                str(tmp_path / "missing.pth.tar"),
            ]
        )
        == 2
    )


def test_finetune_with_custom_config(tiny_dataset, tmp_path, monkeypatch):
    """The stage-2 recipe of the bundled model: finetune with a custom config (BASE: works)."""
    from panoptem.training.finetune import finetune_model

    cfg = yaml.safe_load(
        (REPO / "custom_configs" / "bundled" / "panoptem_mito_small_stage2.yaml").read_text()
    )
    cfg["BASE"] = str(REPO / "custom_configs" / "custom_finetuning.yaml")
    path = tmp_path / "stage2.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = finetune_model(
        "panoptem_mito_small",
        tiny_dataset,
        tmp_path / "ft",
        name="Stage2",
        iterations=2,
        patch_size=64,
        batch_size=2,
        finetune_layer="all",
        config=path,
    )
    assert (
        out.exported.name == "Stage2"
        and registry.get_config("Stage2")["norms"]
        == registry.get_config("panoptem_mito_small")["norms"]
    )
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"TRAIN": {"augmentations": [{"aug": "Elastic"}]}}))
    with pytest.raises(PanoptemError, match="Unknown augmentation"):
        finetune_model(
            "panoptem_mito_small",
            tiny_dataset,
            tmp_path / "ft",
            name="Bad",
            iterations=2,
            patch_size=64,
            batch_size=2,
            config=bad,
        )


def test_train_two_classes_from_dataset_labels_without_editing_the_config(
    two_class_dataset, tmp_path, capsys
):
    """The template's DATASET says one class; --dataset-labels alone switches to the
    multi-class dataset with its label divisor, as the original's Train widget does."""
    rc = main(["train", "--config", str(_config(tmp_path)), "--train-dir", str(two_class_dataset),
               "-o", str(tmp_path / "models"), "--name", "TwoClass", "--iterations", "2",
               "--dataset-labels", "1,mito,instance;2,membrane,semantic",
               "--label-divisor", "1000", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    cfg = registry.get_config("TwoClass")
    assert cfg["labels"] == [1, 2] and cfg["thing_list"] == [1]
    assert cfg["class_names"] == {1: "mito", 2: "membrane"}
    assert cfg["FINETUNE"]["dataset_class"] == "PanopticDataset"
    assert cfg["FINETUNE"]["dataset_params"]["label_divisor"] == 1000
    labels = Engine2D("TwoClass").segment(em_png("cdeep3m_train_010_y0_x0.png")[:64, :64])
    assert set(np.unique(labels // 10000)) <= {0, 1, 2}
    # the labels also come as a file, one class per line
    labels_file = tmp_path / "labels.txt"
    labels_file.write_text("1,mito,instance\n2,membrane,semantic\n")
    rc = main(["train", "--config", str(_config(tmp_path)), "--train-dir", str(two_class_dataset),
               "-o", str(tmp_path / "models"), "--name", "TwoClassFile", "--iterations", "1",
               "--dataset-labels", str(labels_file), "--quiet"])
    assert rc == 0 and registry.get_config("TwoClassFile")["labels"] == [1, 2]


@pytest.mark.parametrize("labels, divisor, match", [
    ("1 mito", None, "is not 'id,name,instance'"),
    ("1,mito,instance;1,er,semantic", None, "given twice"),
    ("1,mito,instance;2,er,semantic", -1, "label divisor must be a positive integer"),
])
def test_bad_dataset_labels_are_refused_before_training(two_class_dataset, tmp_path, labels,
                                                        divisor, match):
    with pytest.raises(PanoptemError, match=match):
        train_model(_config(tmp_path), train_dir=two_class_dataset, model_dir=tmp_path / "m",
                    dataset_labels=labels, label_divisor=divisor)


def test_a_dataset_class_that_contradicts_the_classes_is_refused(two_class_dataset, tmp_path):
    path = _config(tmp_path, dataset_class="SingleClassInstanceDataset")
    with pytest.raises(PanoptemError, match="needs PanopticDataset"):
        train_model(path, train_dir=two_class_dataset, model_dir=tmp_path / "m",
                    dataset_labels="1,mito,instance\n2,membrane,semantic")


def test_too_few_pairs_for_one_batch_is_refused_before_training(tiny_dataset, tmp_path,
                                                                 monkeypatch):
    import panoptem.models

    monkeypatch.setattr(panoptem.models, "build_model",
                        lambda *a, **k: pytest.fail("a model was built"))
    with pytest.raises(PanoptemError, match="holds 4 image/mask pair.* one batch takes 16"):
        train_model(_config(tmp_path), train_dir=tiny_dataset, model_dir=tmp_path / "m",
                    batch_size=16)


def test_the_widget_arguments_pick_the_template_cem_and_description(tiny_dataset, tmp_path):
    out = train_model(architecture="PanopticDeepLab", train_dir=tiny_dataset,
                      model_dir=tmp_path / "m", name="FromTemplate", iterations=1,
                      patch_size=64, batch_size=2, use_cem=False, finetune_layer="stage4",
                      description="A test model.", dataset_labels="1,mito,instance")
    cfg = registry.get_config(out.exported.name)
    assert cfg["description"] == "A test model." and cfg["padding_factor"] == 16
