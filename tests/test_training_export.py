"""An exported model reloads through the registry and gives the same output as before."""

import numpy as np
import torch

from panoptem import registry
from panoptem.demo import untrained_model
from panoptem.inference.engine import Engine2D
from panoptem.loading import LoadedModel
from panoptem.training.export import export_trained_model
from testutils import SMALL_ARCH


def test_exported_model_reloads_and_agrees(tmp_path, lucchi_image):
    model = untrained_model(SMALL_ARCH)
    norms = {"mean": 0.57571, "std": 0.12765}
    out = export_trained_model(
        model,
        "MyFinetuned",
        tmp_path / "models",
        arch=SMALL_ARCH["arch"],
        class_names={1: "mito"},
        labels=[1],
        thing_list=[1],
        norms=norms,
    )
    assert out.name == "MyFinetuned" and out.name in registry.list_models()
    info = registry.model_info(out.name)
    assert (
        info.padding_factor == 16 and info.label_divisor == 1000 and info.class_names == {1: "mito"}
    )
    loaded = registry.load_model(out.name)
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
    again = export_trained_model(
        model,
        "MyFinetuned",
        tmp_path / "models2",
        arch=SMALL_ARCH["arch"],
        class_names={1: "mito"},
        labels=[1],
        thing_list=[1],
        norms=norms,
    )
    assert again.name == "MyFinetunedNew"
