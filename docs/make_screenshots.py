"""Make the screenshots of the finetuning tutorial (docs/tutorial-finetuning.md).

Runs napari (under a virtual display: ``xvfb-run -a .venv/bin/python docs/make_screenshots.py``)
through the tutorial's steps with the bundled sample image and its mask, opening every
widget from the Plugins menu as a user does, and writes ``docs/images/tutorial-*.png``. The
model is finetuned for a few iterations only, so the pictures show the steps, not a good
model. Nothing is written outside a temporary folder except the pictures.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "images"


def main() -> None:
    import napari
    import numpy as np
    from napari._app_model import get_app_model
    from npe2 import PluginManager
    from PIL import Image as PILImage
    from qtpy.QtWidgets import QApplication
    from scipy import ndimage

    import panoptem
    from panoptem.demo import sample_image

    work = Path(tempfile.mkdtemp(prefix="panoptem-tutorial-"))
    os.environ["PANOPTEM_HOME"] = str(work / "home")  # keep the user's model list clean
    OUT.mkdir(exist_ok=True)
    pm = PluginManager.instance()
    pm.discover()
    commands = {w.display_name: w.command for w in pm.get_manifest("panoptem").contributions.widgets}
    viewer = napari.Viewer(show=True)
    viewer.window.resize(1400, 900)

    def open_widget(title: str):
        get_app_model().commands.execute_command(commands[title]).result()
        return viewer.window.dock_widgets[f"{title} (panoptem)"]

    def run(widget, **values):
        widget.reset_choices()
        for name, value in values.items():
            getattr(widget, name).value = value
        results = []
        widget.called.connect(results.append)
        widget.call_button.native.click()
        job = results[0]
        while job is not None and hasattr(job, "done") and not job.done:
            QApplication.processEvents()
        return job

    def shot(name: str) -> None:
        viewer.reset_view()
        for _ in range(20):
            QApplication.processEvents()
        path = OUT / f"tutorial-{name}.png"
        picture = PILImage.fromarray(viewer.window.screenshot(canvas_only=False))
        # a 256-colour palette keeps the pictures small in the repository
        picture.convert("RGB").quantize(256).save(path, optimize=True)
        print("wrote", path)

    image = viewer.add_image(sample_image(), name="sample")
    mask = np.asarray(PILImage.open(Path(panoptem.__file__).parent / "data" / "lucchi_pp_sample_mask.png"))
    truth = ndimage.label(mask > 0)[0].astype(np.int32)
    points = viewer.add_points([[120, 140], [380, 300]], name="points", size=20,
                               face_color="yellow")
    shot("1-image-and-points")

    pick = open_widget("Pick finetune/training patches")
    run(pick, image_layer=image, points_layer=points, num_patches=16, patch_size=224)
    viewer.layers["sample_patches_labels"].data = np.stack(
        [truth[slice(*_rows(s)), slice(*_cols(s))] if _fits(s) else np.zeros((224, 224), np.int32)
         for s in viewer.layers["sample_patches"].metadata["suffices"]])  # "annotated"
    viewer.layers["sample_patches_labels"].opacity = 0.6
    for layer in (image, points):
        layer.visible = False
    shot("2-picked-and-annotated")

    save = open_widget("Save finetune/training patches")
    run(save, image_layer=viewer.layers["sample_patches"],
        labels_layer=viewer.layers["sample_patches_labels"], save_dir=work / "datasets",
        dataset_name="my_mito")
    shot("3-saved")

    finetune = open_widget("Finetune a model")
    finetune.iterations.min = 1
    run(finetune, model_name="MyMito", train_dir=work / "datasets" / "my_mito",
        model_dir=work / "models", base_model="panoptem_mito_small", iterations=2,
        patch_size=224)
    shot("4-finetuned")

    for layer in list(viewer.layers):
        layer.visible = layer is image
    infer = open_widget("2D Inference (Parameter Testing)")
    run(infer, image_layer=image, model_config="MyMito", use_quantized=False)
    shot("5-segmented-with-the-new-model")
    viewer.close()


def _rows(suffix: str) -> tuple[int, int]:
    y, _ = suffix.rsplit("_", 2)[1:]
    return tuple(int(v) for v in y.split("-"))


def _cols(suffix: str) -> tuple[int, int]:
    return tuple(int(v) for v in suffix.rsplit("_", 1)[1].split("-"))


def _fits(suffix: str) -> bool:
    (y0, y1), (x0, x1) = _rows(suffix), _cols(suffix)
    return y1 - y0 == 224 and x1 - x0 == 224


if __name__ == "__main__":
    sys.exit(main())
