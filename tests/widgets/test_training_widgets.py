"""Pick, save, finetune and train through the widgets, as a user clicks them.

The end-to-end test goes the way every finetuning tutorial of the original goes: a real EM
image and its labels, 16 patches picked around points and at random, stored as a dataset,
the bundled model finetuned on it for a few iterations, and the new model used at once from
the 2D Inference widget.
"""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import yaml
from scipy import ndimage
from widgetutils import click, open_from_menu

from panoptem import registry
from panoptem.inference.engine import Engine2D
from panoptem.training.patches import pick_patches
from testutils import EM_DATA, SMALL_ARCH, read_png

PICK, SAVE = "Pick finetune/training patches", "Save finetune/training patches"
SLOW_MS = 600_000


@pytest.fixture
def em_with_labels(lucchi_image):
    mask = read_png(EM_DATA / "lucchi_test_0000_mask.png")[..., 0] > 0
    return lucchi_image, ndimage.label(mask)[0].astype(np.int32)


def _set(widget, **values):
    widget.reset_choices()
    for name, value in values.items():
        field = getattr(widget, name)
        if value == "" and type(field).__name__ == "FileEdit":
            field.line_edit.value = ""  # as a user clears it (setting "" means the cwd)
        else:
            field.value = value


def test_pick_store_finetune_and_segment_end_to_end(make_napari_viewer, wait_job, tmp_path,
                                                    em_with_labels, notifications):
    image, labels = em_with_labels
    viewer = make_napari_viewer()
    scale, translate = (2.0, 2.0), (10.0, -4.0)
    image_layer = viewer.add_image(image, name="lucchi", scale=scale, translate=translate)
    labels_layer = viewer.add_labels(labels, name="truth", scale=scale, translate=translate)
    # two points placed in world coordinates (as a user clicks them): pixels (300, 400), (50, 1000)
    world = [[300 * 2 + 10, 400 * 2 - 4], [50 * 2 + 10, 1000 * 2 - 4]]
    points = viewer.add_points(world, name="where")

    pick = open_from_menu(viewer, PICK)
    _set(pick, image_layer=image_layer, points_layer=points, num_patches=16, patch_size=224,
         label_option=True, labels_layer=labels_layer)
    assert wait_job(click(pick)).error is None
    patches, patch_labels = viewer.layers["lucchi_patches"], viewer.layers["lucchi_patches_labels"]
    assert patches.data.shape == patch_labels.data.shape == (16, 224, 224)
    suffixes = patches.metadata["suffices"]
    assert patches.metadata["prefix"] == "lucchi" and len(suffixes) == 16
    # the first patches are centred on the points, in the image's pixels
    assert suffixes[0] == "s0-LOC-2d_188-412_288-512"
    np.testing.assert_array_equal(patches.data[0], image[188:412, 288:512])
    np.testing.assert_array_equal(patch_labels.data[0], labels[188:412, 288:512])
    assert suffixes[1] == "s0-LOC-2d_0-224_800-1024"
    assert patch_labels.metadata == patches.metadata

    save = open_from_menu(viewer, SAVE)
    _set(save, image_layer=patches, labels_layer=patch_labels, save_dir=tmp_path / "datasets",
         dataset_name="mito")
    written = click(save)
    assert len(written) == 16
    source = tmp_path / "datasets" / "mito" / "lucchi"
    assert sorted(p.name for p in (source / "masks").iterdir()) == sorted(p.name for p in written)
    np.testing.assert_array_equal(tifffile.imread(written[0]), image[188:412, 288:512])

    finetune = open_from_menu(viewer, "Finetune a model")
    finetune.iterations.min = 1  # a few iterations here; the original's minimum is 100
    _set(finetune, model_name="MyMito", train_dir=tmp_path / "datasets" / "mito",
         eval_dir=tmp_path / "datasets" / "mito", model_dir=tmp_path / "models",
         base_model="panoptem_mito_small", iterations=2, patch_size=224)
    job = wait_job(click(finetune), timeout=SLOW_MS)
    assert job.error is None, job.error
    assert job.result.exported.name == "MyMito" and len(job.result.evaluations) == 1
    # a determinate bar over the iterations, reading out the loss and the validation
    assert (job.progress.stage_name, job.progress.done, job.progress.total) == ("training", 2, 2)
    assert job.progress.note_text.startswith("loss ") and "validation IoU" in job.progress.note_text
    assert any("'MyMito' is registered" in t and "Validation: IoU" in t
               for level, t in notifications if level == "info")

    infer = open_from_menu(viewer, "2D Inference (Parameter Testing)")
    assert "MyMito" in infer.model_config.choices  # listed at once
    _set(infer, image_layer=image_layer, model_config="MyMito", use_quantized=False)
    assert wait_job(click(infer)).error is None
    np.testing.assert_array_equal(viewer.layers["empanada_seg_2d"].data,
                                  Engine2D("MyMito").segment(image))


def test_flipbooks_from_a_scaled_volume_and_their_middle_slices_stored(
    make_napari_viewer, wait_job, em_volume, tmp_path
):
    viewer = make_napari_viewer()
    image_layer = viewer.add_image(em_volume, name="vol", scale=(2.0, 1.0, 1.0),
                                   translate=(0.0, 5.0, 0.0))
    points = viewer.add_points([[40 * 2, 60 + 5, 70]], name="p")  # world: slice 40, (60, 70)
    pick = open_from_menu(viewer, PICK)
    _set(pick, image_layer=image_layer, points_layer=points, num_patches=2, patch_size=224)
    assert wait_job(click(pick)).error is None
    flip = viewer.layers["vol_flipbooks"]
    assert flip.data.shape == viewer.layers["vol_flipbooks_labels"].data.shape == (2, 5, 224, 224)
    assert flip.metadata["suffices"][0] == "s0-LOC-0_38-43_0-128_0-128"
    np.testing.assert_array_equal(flip.data[0, :, :128, :128], em_volume[38:43])
    assert tuple(viewer.dims.current_step[:2]) == (0, 2)  # the first flipbook's middle slice
    labels = viewer.layers["vol_flipbooks_labels"]
    labels.data[0, 2, 10:20, 10:20] = 7  # a user's annotation on the middle slice
    save = open_from_menu(viewer, SAVE)
    _set(save, image_layer=flip, labels_layer=labels, save_dir=tmp_path, dataset_name="flip")
    first = click(save)
    mask = tifffile.imread(tmp_path / "flip" / "vol" / "masks" / first[0].name)
    assert mask.shape == (128, 128) and (mask == 7).sum() == 100
    np.testing.assert_array_equal(tifffile.imread(first[0]), em_volume[40])
    # saving again appends: every earlier file stays as it was
    before = {p.name: p.read_bytes() for p in (tmp_path / "flip" / "vol" / "images").iterdir()}
    second = click(save)
    after = {p.name: p.read_bytes() for p in (tmp_path / "flip" / "vol" / "images").iterdir()}
    assert len(after) == 4 and all(after[name] == data for name, data in before.items())
    assert {p.name for p in second}.isdisjoint(before)


def test_train_a_model_from_the_widget(make_napari_viewer, wait_job, tmp_path, em_with_labels,
                                       notifications):
    image, labels = em_with_labels
    patches = pick_patches(image, name="l", n_patches=4, patch_size=224, labels=labels, seed=0)
    from panoptem.training.patches import store_patches

    store_patches(tmp_path / "ds", "train", patches.images, patches.labels, prefix="l",
                  suffixes=patches.suffixes)
    config = tmp_path / "small.yaml"  # a small architecture and batch, for a CPU test
    config.write_text(yaml.safe_dump({"BASE": str(_template()), "MODEL": dict(SMALL_ARCH),
                                      "TRAIN": {"batch_size": 2}}))
    viewer = make_napari_viewer()
    train = open_from_menu(viewer, "Train a model")
    defaults = {name: getattr(train, name).value for name in
                ("model_name", "label_divisor", "model_arch", "use_cem", "finetune_layer",
                 "iterations", "patch_size")}
    assert defaults == {"model_name": "NewModel", "label_divisor": "1000",
                        "model_arch": "PanopticDeepLab", "use_cem": True, "finetune_layer": "all",
                        "iterations": 500, "patch_size": 256}
    _set(train, model_name="Scratch", train_dir=tmp_path / "ds" / "train",
         model_dir=tmp_path / "models", use_cem=False, iterations=1, patch_size=224,
         custom_config=config, description="Trained in a test.",
         dataset_labels="1,mito,instance")
    job = wait_job(click(train), timeout=SLOW_MS)
    assert job.error is None, job.error
    cfg = registry.get_config("Scratch")
    assert cfg["description"] == "Trained in a test." and cfg["labels"] == [1]
    infer = open_from_menu(viewer, "3D Inference")
    assert "Scratch" in infer.model_config.choices


def _template():
    from panoptem.training.config import TEMPLATE_DIR

    return TEMPLATE_DIR / "custom_training_pdl.yaml"


def test_cem_weights_that_cannot_be_downloaded_are_reported_before_training(
    make_napari_viewer, wait_job, tmp_path, em_with_labels, notifications, monkeypatch
):
    image, labels = em_with_labels
    p = pick_patches(image, name="l", n_patches=16, patch_size=224, labels=labels, seed=0)
    from panoptem.training.patches import store_patches

    store_patches(tmp_path / "ds", "train", p.images, p.labels, prefix="l", suffixes=p.suffixes)
    monkeypatch.setenv("PANOPTEM_OFFLINE", "1")
    import panoptem.models

    monkeypatch.setattr(panoptem.models, "build_model",
                        lambda *a, **k: pytest.fail("the model was built before the download"))
    viewer = make_napari_viewer()
    train = open_from_menu(viewer, "Train a model")
    _set(train, train_dir=tmp_path / "ds" / "train", model_dir=tmp_path / "models")
    job = wait_job(click(train))
    assert type(job.error).__name__ == "PanoptemError"
    errors = [t for level, t in notifications if level == "error"]
    assert any("cem1.5m_swav_resnet50" in t and "not in the model cache" in t for t in errors)


@pytest.mark.parametrize("case, message", [
    ("no-image", "Add or select the image to pick from"),
    ("paired-without-labels", "Pick paired patches needs a labels layer"),
    ("labels-shape", "pair the image with a labels layer of its shape"),
    ("points-outside", "lie outside 'img'"),
    ("all-points-without-points", "'Pick all points' needs points"),
])
def test_pick_errors_are_notifications(make_napari_viewer, wait_job, notifications, lucchi_image,
                                       case, message):
    viewer = make_napari_viewer()
    pick = open_from_menu(viewer, PICK)
    values = dict(patch_size=224)
    if case != "no-image":
        values["image_layer"] = viewer.add_image(lucchi_image[:300, :300], name="img")
    if case == "paired-without-labels":
        values["label_option"] = True
    elif case == "labels-shape":
        values.update(label_option=True,
                      labels_layer=viewer.add_labels(np.zeros((10, 10), np.int32)))
    elif case == "points-outside":
        values["points_layer"] = viewer.add_points([[100.0, 100.0], [5000.0, 20.0]], name="p")
    elif case == "all-points-without-points":
        values["pick_points_only"] = True
    n_layers = len(viewer.layers)
    _set(pick, **values)
    job = click(pick)
    if job is not None:
        wait_job(job)
    errors = [t for level, t in notifications if level == "error"]
    assert any(message in t for t in errors), errors
    assert len(viewer.layers) == n_layers


@pytest.mark.parametrize("case, message", [
    ("mismatch", "labels layer that was picked with these patches"),
    ("no-dir", "Choose the Save directory"),
    ("no-name", "Type a Dataset name"),
])
def test_save_errors_write_nothing(make_napari_viewer, notifications, tmp_path, case, message):
    viewer = make_napari_viewer()
    images = viewer.add_image(np.zeros((2, 32, 32), np.uint8), name="p",
                              metadata={"prefix": "p", "suffices": ["s0-LOC-2d_0-32_0-32"] * 2})
    labels = viewer.add_labels(np.zeros((2, 32, 32) if case != "mismatch" else (3, 32, 32),
                                        np.int32))
    save = open_from_menu(viewer, SAVE)
    _set(save, image_layer=images, labels_layer=labels,
         save_dir=tmp_path / "out" if case != "no-dir" else "",
         dataset_name="" if case == "no-name" else "ds")
    assert click(save) is None
    assert any(message in t for level, t in notifications if level == "error")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("title, values, message", [
    ("Finetune a model", dict(model_name="has space"), "without spaces"),
    ("Finetune a model", dict(train_dir=""), "Choose the Train directory"),
    ("Train a model", dict(label_divisor="ten"), "Label divisor must be a whole number"),
    ("Train a model", dict(model_dir=""), "Choose the Model directory"),
])
def test_training_widget_errors(make_napari_viewer, notifications, tmp_path, title, values,
                                message):
    viewer = make_napari_viewer()
    widget = open_from_menu(viewer, title)
    base = dict(train_dir=tmp_path / "ds", model_dir=tmp_path / "m")
    _set(widget, **{**base, **values})
    assert click(widget) is None
    assert any(message in t for level, t in notifications if level == "error")


def test_cancel_keeps_the_last_checkpoint(make_napari_viewer, wait_job, qtbot, tmp_path,
                                          em_with_labels, notifications):
    image, labels = em_with_labels
    from panoptem.training.patches import store_patches

    p = pick_patches(image, name="l", n_patches=16, patch_size=224, labels=labels, seed=0)
    store_patches(tmp_path / "ds", "train", p.images, p.labels, prefix="l", suffixes=p.suffixes)
    viewer = make_napari_viewer()
    finetune = open_from_menu(viewer, "Finetune a model")
    finetune.iterations.min = 1
    _set(finetune, model_name="Cut", train_dir=tmp_path / "ds" / "train",
         model_dir=tmp_path / "models", base_model="panoptem_mito_small", iterations=10,
         patch_size=224)
    job = click(finetune)
    qtbot.waitUntil(lambda: job.progress.done >= 3, timeout=SLOW_MS)  # a checkpoint at 2
    job.cancel()
    wait_job(job, timeout=SLOW_MS)
    assert type(job.error).__name__ == "Cancelled"
    kept = tmp_path / "models" / "Cut_checkpoint.pth"
    assert kept.is_file() and "Cut" not in registry.list_models()
    assert any(f"The last checkpoint is kept in {kept}" in t
               for level, t in notifications if level == "info")


def test_pick_from_a_level_of_a_multiscale_image(make_napari_viewer, wait_job, lucchi_image):
    """Points are placed on the full-resolution image; level 1 picks from the half-size one
    around the same place (the point divided by the level's downsampling)."""
    viewer = make_napari_viewer()
    pyramid = [lucchi_image, lucchi_image[::2, ::2]]
    image_layer = viewer.add_image(pyramid, multiscale=True, name="big")
    points = viewer.add_points([[400.0, 600.0]], name="p")
    pick = open_from_menu(viewer, PICK)
    _set(pick, image_layer=image_layer, points_layer=points, num_patches=1, patch_size=224,
         pyramid_level=1)
    assert wait_job(click(pick)).error is None
    patches = viewer.layers["big_patches"]
    # level 1 is 384 x 512: the point (200, 300) there, the window kept inside the image
    assert patches.metadata["suffices"] == ["s1-LOC-2d_88-312_188-412"]
    np.testing.assert_array_equal(patches.data[0], pyramid[1][88:312, 188:412])
