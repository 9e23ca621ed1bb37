"""Make the screenshots of the user guide: the finetuning tutorial and the proofreading page.

Runs napari (under a virtual display: ``xvfb-run -a .venv/bin/python docs/make_screenshots.py
[tutorial|proofreading]``, both by default) with the bundled sample image and its mask,
opening every widget from the Plugins menu as a user does, and writes
``docs/images/tutorial-*.png`` (docs/tutorial-finetuning.md; the model is finetuned for a
few iterations only, so the pictures show the steps, not a good model) and
``docs/images/proofreading-*.png`` (docs/widgets/proofreading.md). Nothing is written
outside a temporary folder except the pictures.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "images"


def main() -> None:
    which = sys.argv[1:] or ["tutorial", "proofreading"]
    if "tutorial" in which:
        tutorial()
    if "proofreading" in which:
        proofreading()


def _session(prefix: str):
    """A napari viewer and the helpers the pictures are made with: open, run, shot."""
    import napari
    from napari._app_model import get_app_model
    from npe2 import PluginManager
    from PIL import Image as PILImage
    from qtpy.QtWidgets import QApplication

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

    def shot(name: str, reset: bool = True) -> None:
        if reset:
            viewer.reset_view()
        for _ in range(20):
            QApplication.processEvents()
        path = OUT / f"{prefix}-{name}.png"
        picture = PILImage.fromarray(viewer.window.screenshot(canvas_only=False))
        # a 256-colour palette keeps the pictures small in the repository
        picture.convert("RGB").quantize(256).save(path, optimize=True)
        print("wrote", path)

    return viewer, open_widget, run, shot


def proofreading() -> None:
    import numpy as np
    from PIL import Image as PILImage
    from scipy import ndimage

    import panoptem
    from panoptem.demo import sample_image

    OUT.mkdir(exist_ok=True)
    viewer, open_widget, run, shot = _session("proofreading")
    viewer.add_image(sample_image(), name="sample")
    mask = np.asarray(PILImage.open(Path(panoptem.__file__).parent / "data" / "lucchi_pp_sample_mask.png"))
    labels = viewer.add_labels(ndimage.label(mask > 0)[0].astype(np.uint32), name="mito", opacity=0.6)
    found = ndimage.find_objects(labels.data)
    big = sorted(range(len(found)), key=lambda i: -(labels.data[found[i]] == i + 1).sum())[:3]
    centre = [np.argwhere(labels.data == i + 1).mean(0) for i in big]
    points = viewer.add_points(centre[:2], name="points", size=20, face_color="yellow")
    merge = open_widget("Merge Labels")
    merge.reset_choices()
    merge.labels_layer.value, merge.points_layer.value = labels, points
    shot("1-points-on-two-labels")
    run(merge)
    shot("2-merged")
    labels.undo()
    vox = np.argwhere(labels.data == big[0] + 1)  # one point at each end of the largest object
    points.data = [vox[vox[:, 1].argmin()], vox[vox[:, 1].argmax()]]
    split = open_widget("Split Labels")
    run(split, labels_layer=labels, points_layer=points, points_as_markers=True)
    shot("3-split")
    count = open_widget("Count Labels")
    run(count, labels_layer=labels, label_text="1,mito")
    shot("4-count")
    viewer.close()


def tutorial() -> None:
    import numpy as np
    from PIL import Image as PILImage
    from scipy import ndimage

    import panoptem
    from panoptem.demo import sample_image

    work = Path(tempfile.mkdtemp(prefix="panoptem-tutorial-"))
    os.environ["PANOPTEM_HOME"] = str(work / "home")  # keep the user's model list clean
    OUT.mkdir(exist_ok=True)
    viewer, open_widget, run, shot = _session("tutorial")

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
