"""An exported model reloads through the registry and gives the same output as before."""

import numpy as np
import torch

from panoptem import loading, registry
from panoptem.demo import untrained_model
from panoptem.inference.engine import Engine2D
from panoptem.loading import LoadedModel
from panoptem.training.publish import publish_model
from testutils import SMALL_ARCH


def _export(model, name, folder):
    return publish_model(model, name, folder, arch=SMALL_ARCH["arch"],
                                class_names={1: "mito"}, labels=[1], thing_list=[1],
                                norms={"mean": 0.57571, "std": 0.12765})


def test_exported_model_reloads_and_agrees(tmp_path, lucchi_image):
    model = untrained_model(SMALL_ARCH)
    out = _export(model, "MyFinetuned", tmp_path / "models")
    assert out.name == "MyFinetuned" and out.name in registry.list_models()
    info = registry.model_info(out.name)
    assert (
        info.padding_factor == 16 and info.label_divisor == 1000 and info.class_names == {1: "mito"}
    )
    loaded = loading.load_model(out.name)
    x = torch.randn(1, 1, 64, 96)
    with torch.no_grad():
        ref = model.eval()(x, 2, True)
        got = loaded.module(x, 2, True)
    for key in ("sem_logits", "ctr_hmp", "offsets"):
        torch.testing.assert_close(got[key], ref[key], rtol=1e-4, atol=1e-4)
    img = lucchi_image[:128, :160]
    eager = Engine2D(LoadedModel(model.eval(), loaded.config, torch.device("cpu"), False)).segment(
        img
    )
    exported = Engine2D(out.name).segment(img)
    assert (eager == exported).mean() > 0.999
    assert abs(len(np.unique(eager)) - len(np.unique(exported))) <= 1
    # a second export under the same name is registered as a new name, nothing overwritten
    again = _export(model, "MyFinetuned", tmp_path / "models2")
    assert again.name == "MyFinetunedNew"


def test_a_second_model_with_the_same_name_keeps_the_first_ones_weights(tmp_path):
    """Finetuning twice with the default name into one folder: the second model gets a
    fresh name and fresh files; the first still loads its own weights."""
    first, second = untrained_model(SMALL_ARCH, seed=1), untrained_model(SMALL_ARCH, seed=2)
    folder = tmp_path / "models"
    a = _export(first, "FinetunedModel", folder)
    before = a.model_path.read_bytes()
    # the registry entry is gone (e.g. archived by hand), but the files are still there
    (registry.config_dir() / "FinetunedModel.yaml").unlink()
    b = _export(second, "FinetunedModel", folder)
    assert b.name == "FinetunedModelNew"
    assert b.model_path == folder / "FinetunedModelNew.pth" and b.config_path.name == "FinetunedModelNew.yaml"
    assert a.model_path.read_bytes() == before  # the first model's weights are untouched
    registry.register_model("FinetunedModel", a.config_path)
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        ref = first.eval()(x, 2, True)["sem_logits"]
        got_a = loading.load_model("FinetunedModel").module(x, 2, True)["sem_logits"]
        got_b = loading.load_model("FinetunedModelNew").module(x, 2, True)["sem_logits"]
    torch.testing.assert_close(got_a, ref, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got_a, got_b)


def test_an_unwritable_model_folder_is_refused(tmp_path):
    import pytest

    from panoptem.errors import PanoptemError

    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(PanoptemError, match="Cannot write to the model folder"):
        _export(untrained_model(SMALL_ARCH), "X", blocker / "models")
    assert "X" not in registry.list_models()
