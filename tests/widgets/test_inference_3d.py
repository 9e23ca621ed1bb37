"""The "3D Inference" widget on a real FIB-SEM volume, checked against the headless engine.

The widget must only map its fields onto Params2D/Params3D, run Engine3D (or the
multi-process runner) and place the arrays: every test compares the layers with what
Engine3D gives for the same crop and parameters.
"""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from widgetutils import click, open_from_menu

from panoptem.inference.engine import Params2D
from panoptem.inference.volume import Engine3D, Params3D

SCALE = (3.0, 2.0, 2.0)
TRANSLATE = (5.0, -8.0, 4.0)
FAST = {"min_size": 50, "min_extent": 2}  # keep objects of the small test crops
SLOW_MS = 600_000  # CPU-only CI machines shared with other work can be slow


@pytest.fixture(autouse=True)
def no_job_left_running(qtbot):
    """A test that fails while a job still runs cancels it, so Qt is not torn down under it."""
    yield
    from panoptem._widgets import _worker

    job = _worker.last_job
    if job is not None and not job.done:
        job.cancel()
        qtbot.waitUntil(lambda: job.done, timeout=SLOW_MS)


@pytest.fixture
def make_widget(make_napari_viewer, registered_model):
    """``viewer, widget = make_widget()``: a viewer with the 3D widget opened from the Plugins
    menu, set to the small test model, CPU, float."""

    def make():
        viewer = make_napari_viewer()
        widget = open_from_menu(viewer, "3D Inference")
        widget.model_config.value = registered_model
        widget.use_gpu.value = False
        widget.use_quantized.value = False
        return viewer, widget

    return make


def start(widget, **values):
    widget.reset_choices()
    for name, value in values.items():
        getattr(widget, name).value = value
    return click(widget)


def headless(model, volume, zarr_path=None, **p3):
    return Engine3D(model).segment(volume, Params2D(), Params3D(**p3), zarr_path=zarr_path)


def test_fields_defaults_and_button(make_widget, registered_model):
    _, w = make_widget()
    assert w._call_button.text == "Run 3D Inference"
    assert registered_model in w.model_config.choices
    labels = {
        name: getattr(w, name).label
        for name in (
            "downsampling",
            "confidence_thr",
            "center_confidence_thr",
            "min_distance_object_centers",
            "median_slices",
            "min_size",
            "min_extent",
            "maximum_objects_per_class",
            "inference_plane",
            "label_erosion",
            "label_dilation",
            "pixel_vote_thr",
            "store_dir",
            "chunk_size",
        )
    }
    assert labels == {
        "downsampling": "Image Downsampling",
        "confidence_thr": "Segmentation Confidence Thr",
        "center_confidence_thr": "Center Confidence Thr",
        "min_distance_object_centers": "Centers Min Distance",
        "median_slices": "Median Filter Size",
        "min_size": "Min Size (Voxels)",
        "min_extent": "Min Box Extent",
        "maximum_objects_per_class": "Max objects per class in 3D",
        "inference_plane": "Inference plane",
        "label_erosion": "Erode Labels",
        "label_dilation": "Dilate Labels",
        "pixel_vote_thr": "Voxel Vote Thr Out of 3",
        "store_dir": "Directory",
        "chunk_size": "Chunk size",
    }
    texts = {
        name: getattr(w, name).text
        for name in (
            "use_gpu",
            "use_quantized",
            "multigpu",
            "fine_boundaries",
            "semantic_only",
            "fill_holes_in_segmentation",
            "orthoplane",
            "return_panoptic",
            "allow_one_view",
        )
    }
    assert texts["multigpu"] == "Multi GPU" and texts["orthoplane"] == "Run ortho-plane"
    assert texts["allow_one_view"] == "Permit detections found in 1 stack into consensus"
    assert texts["return_panoptic"] == "Return xy, xz, yz stacks"
    values = {
        name: getattr(w, name).value
        for name in (
            "downsampling",
            "confidence_thr",
            "center_confidence_thr",
            "min_distance_object_centers",
            "fine_boundaries",
            "semantic_only",
            "median_slices",
            "min_size",
            "min_extent",
            "maximum_objects_per_class",
            "inference_plane",
            "label_erosion",
            "label_dilation",
            "fill_holes_in_segmentation",
            "orthoplane",
            "return_panoptic",
            "pixel_vote_thr",
            "allow_one_view",
            "chunk_size",
            "multigpu",
        )
    }
    assert values == {
        "downsampling": 1,
        "confidence_thr": 0.5,
        "center_confidence_thr": 0.1,
        "min_distance_object_centers": 3,
        "fine_boundaries": False,
        "semantic_only": False,
        "median_slices": 3,
        "min_size": 500,
        "min_extent": 5,
        "maximum_objects_per_class": "10000",
        "inference_plane": "xy",
        "label_erosion": 0,
        "label_dilation": 0,
        "fill_holes_in_segmentation": False,
        "orthoplane": True,
        "return_panoptic": False,
        "pixel_vote_thr": 2,
        "allow_one_view": False,
        "chunk_size": "256",
        "multigpu": False,
    }
    assert str(w.store_dir.value) == "no zarr storage" and w.store_dir.mode.value == "d"
    assert list(w.median_slices.choices) == [1, 3, 5, 7, 9, 11]
    assert list(w.inference_plane.choices) == ["xy", "xz", "yz"]
    assert (w.min_size.min, w.min_size.max, w.min_size.step) == (0, 1_000_000, 100)
    assert (w.pixel_vote_thr.min, w.pixel_vote_thr.max) == (1, 3)
    assert (w.label_erosion.max, w.label_dilation.max, w.min_extent.max) == (50, 50, 1000)
    heads = [x.label for x in w if x.name.endswith("_head")]
    assert heads == [
        "<h3>2D Parameters</h3>",
        "<h3>Stack Parameters</h3>",
        "<h3>Ortho-plane Parameters (Optional)</h3>",
        "<h3>Zarr Storage (optional)</h3>",
        "<h3>Block-wise (big volumes, optional)</h3>",
    ]
    assert (w.run_blockwise.text, w.run_blockwise.value) == ("Run block-wise (dask)", False)
    assert (w.block_size.value, w.workers.value) == ("", 1)


def test_stack_xy_layers_equal_the_engine(make_widget, wait_job, registered_model, em_volume):
    vol = np.ascontiguousarray(em_volume[:16, :128, :128])
    viewer, w = make_widget()
    image = viewer.add_image(vol, name="crop", scale=SCALE, translate=TRANSLATE)
    job = wait_job(
        start(
            w,
            image_layer=image,
            orthoplane=False,
            return_panoptic=True,
            maximum_objects_per_class="1000",
            **FAST,
        ),
        timeout=SLOW_MS,
    )
    assert job.error is None
    ref = headless(registered_model, vol, max_objects=1000, return_stacks=True, **FAST)
    mito, stack = viewer.layers["crop-mito-prediction"], viewer.layers["crop-panoptic-stack-xy"]
    assert [lay.name for lay in viewer.layers] == [
        "crop",
        "crop-panoptic-stack-xy",
        "crop-mito-prediction",
    ]
    assert mito.data.dtype == np.int32 and mito.data.shape == vol.shape
    np.testing.assert_array_equal(mito.data, ref.classes["mito"])
    np.testing.assert_array_equal(stack.data, ref.stacks["xy"])
    ids = np.unique(mito.data[mito.data > 0])
    assert len(ids) > 0 and (ids == np.arange(1, len(ids) + 1)).all()
    assert set(np.unique(stack.data[stack.data > 0]) // 1000) == {1}  # class 1 * divisor + k
    for lay in (mito, stack):
        np.testing.assert_allclose(lay.scale, SCALE)
        np.testing.assert_allclose(lay.translate, TRANSLATE)
    assert mito.visible and image.visible and not stack.visible  # as the original


def test_other_plane_and_parameters_4d_input(make_widget, wait_job, registered_model, em_volume):
    """A (1, Z, Y, X) image loses its channel axis (and its scale); yz plane, 2D and
    morphology options reach the engine."""
    vol = np.ascontiguousarray(em_volume[:12, :64, :48])
    viewer, w = make_widget()
    image = viewer.add_image(vol[None], name="four", scale=(1.0, *SCALE))
    job = wait_job(
        start(
            w,
            image_layer=image,
            orthoplane=False,
            inference_plane="yz",
            downsampling=2,
            confidence_thr=0.3,
            center_confidence_thr=0.2,
            min_distance_object_centers=5,
            median_slices=5,
            label_dilation=1,
            fill_holes_in_segmentation=True,
            min_size=20,
            min_extent=1,
        ),
        timeout=SLOW_MS,
    )
    assert job.error is None
    p2 = Params2D(downsampling=2, confidence_thr=0.3, center_confidence_thr=0.2, min_distance=5)
    p3 = Params3D(plane="yz", median_size=5, dilate=1, fill_holes=True, min_size=20, min_extent=1)
    ref = Engine3D(registered_model).segment(vol, p2, p3).classes["mito"]
    out = viewer.layers["four-mito-prediction"]
    assert out.data.shape == vol.shape and ref.any()
    np.testing.assert_array_equal(out.data, ref)
    np.testing.assert_allclose(out.scale, SCALE)


def test_ortho_plane_to_zarr_then_reopened(
    make_widget, wait_job, registered_model, em_volume, tmp_path
):
    vol = np.ascontiguousarray(em_volume[:8, :40, :48])
    viewer, w = make_widget()
    image = viewer.add_image(vol, name="vol", scale=SCALE, translate=TRANSLATE)
    job = wait_job(
        start(
            w,
            image_layer=image,
            return_panoptic=True,
            store_dir=str(tmp_path),
            chunk_size="4, 32, 32",
            **FAST,
        ),
        timeout=SLOW_MS,
    )
    assert job.error is None and w.orthoplane.value
    store = tmp_path / f"vol_{registered_model}.zarr"
    ref = headless(registered_model, vol, ortho_plane=True, return_stacks=True, **FAST)
    names = [
        "vol-panoptic-stack-xy",
        "vol-panoptic-stack-xz",
        "vol-panoptic-stack-yz",
        "vol-mito-prediction",
    ]
    assert [lay.name for lay in viewer.layers][1:] == names
    on_disk = zarr.open_group(str(store), mode="r")
    assert sorted(on_disk.array_keys()) == ["mito", "panoptic_xy", "panoptic_xz", "panoptic_yz"]
    assert on_disk["mito"].chunks == (4, 32, 32) and on_disk["mito"].dtype == np.int32
    mito = viewer.layers["vol-mito-prediction"]
    assert isinstance(mito.data, zarr.Array)  # shown lazily from the store, editable
    assert not mito.data.read_only
    np.testing.assert_array_equal(mito.data[:], ref.classes["mito"])
    assert ref.classes["mito"].any()
    for ax in ("xy", "xz", "yz"):
        np.testing.assert_array_equal(
            viewer.layers[f"vol-panoptic-stack-{ax}"].data[:], ref.stacks[ax]
        )

    # the reader reopens the store with the same names, data and placement
    viewer.layers.clear()
    viewer.open(str(store), plugin="panoptem")
    assert [lay.name for lay in viewer.layers] == names
    for lay in viewer.layers:
        assert lay.__class__.__name__ == "Labels"
        np.testing.assert_allclose(lay.scale, SCALE)
        np.testing.assert_allclose(lay.translate, TRANSLATE)
    np.testing.assert_array_equal(
        np.asarray(viewer.layers["vol-mito-prediction"].data), ref.classes["mito"]
    )


def test_cancel_stops_a_running_job(
    make_widget, wait_job, notifications, em_volume, tmp_path, qtbot
):
    viewer, w = make_widget()
    image = viewer.add_image(np.ascontiguousarray(em_volume[:, :128, :128]), name="big")
    job = start(w, image_layer=image, store_dir=str(tmp_path), **FAST)
    assert job is not None and job.worker is not None
    # a determinate napari progress bar counts the slices of the first stack
    qtbot.waitUntil(
        lambda: job.bar is not None and job.bar.total == 64 and job.bar.n >= 2, timeout=SLOW_MS
    )
    assert job.bar.desc.startswith("3D Inference: stack xy")
    job.cancel()
    wait_job(job, timeout=SLOW_MS)
    assert type(job.error).__name__ == "Cancelled"
    assert job.progress.done < 64  # stopped within the first stack
    assert [lay.name for lay in viewer.layers] == ["big"]
    assert any(level == "info" and "cancelled" in text for level, text in notifications)
    store = next(tmp_path.glob("*.zarr"))
    assert list(zarr.open_group(str(store), mode="r").array_keys()) == []  # nothing half-written


@pytest.mark.parametrize(
    "case, message",
    [
        ("2d", "needs a volume"),
        ("chunks", "Chunk size"),
        ("max_objects", "Max objects per class in 3D"),
        ("multigpu", "Multi GPU needs at least two CUDA GPUs"),
        ("no_layer", "Choose an image layer"),
        ("rgb", "is a 2D RGB image, not a volume"),
        ("bool", "dtype bool; give integer or float grayscale data"),
        ("5d", "3D Inference needs a volume (Z, Y, X)"),
        ("bf16_quantized", "'Use bfloat16' does not go together with 'Use quantized model'"),
        ("bf16_blocks", "'Use bfloat16' does not go together with 'Run block-wise'"),
    ],
)
def test_bad_input_is_a_notification(
    make_widget, notifications, em_volume, case, message, monkeypatch
):
    from panoptem._widgets import inference_3d

    viewer, w = make_widget()
    vol = em_volume[:4, :32, :32]
    if case == "rgb":
        image = viewer.add_image(np.stack([vol[0]] * 3, axis=-1), rgb=True)
    elif case == "bool":
        image = viewer.add_image(vol > 100)
    elif case == "5d":
        image = viewer.add_image(np.stack([vol] * 2)[:, :, None])  # (2, 4, 1, 32, 32)
    else:
        image = viewer.add_image(vol[0] if case == "2d" else vol)
    values = {"image_layer": image}
    if case == "chunks":
        values["chunk_size"] = "32, 32"
    elif case == "max_objects":
        values["maximum_objects_per_class"] = "many"
    elif case == "multigpu":
        monkeypatch.setattr(inference_3d, "multi_gpu_devices", lambda: ["cuda:0"])
        values["multigpu"] = True
    elif case == "no_layer":
        viewer.layers.clear()
        values = {}
    elif case == "bf16_quantized":
        values.update(use_bfloat16=True, use_quantized=True)
    elif case == "bf16_blocks":
        values.update(use_bfloat16=True, run_blockwise=True)
    assert start(w, **values) is None
    assert any(level == "error" and message in text for level, text in notifications)
    assert len(viewer.layers) == (0 if case == "no_layer" else 1)


def test_multi_gpu_runs_one_process_per_device(
    make_widget, wait_job, registered_model, em_volume, monkeypatch
):
    """ "Multi GPU" reaches the multi-process runner (here two CPU processes, gloo) and gives
    the single-process result."""
    from panoptem._widgets import inference_3d

    calls = []

    def devices():
        calls.append(1)
        return ["cpu", "cpu"]

    monkeypatch.setattr(inference_3d, "multi_gpu_devices", devices)
    vol = np.ascontiguousarray(em_volume[:8, :64, :80])
    viewer, w = make_widget()
    image = viewer.add_image(vol, name="mp")
    job = wait_job(
        start(w, image_layer=image, multigpu=True, orthoplane=False, **FAST), timeout=SLOW_MS
    )
    assert job.error is None and calls
    ref = headless(registered_model, vol, **FAST)
    np.testing.assert_array_equal(viewer.layers["mp-mito-prediction"].data, ref.classes["mito"])


@pytest.mark.parametrize("option", ["fine_boundaries", "semantic_only"])
def test_fine_boundaries_and_semantic_only(
    make_widget, wait_job, registered_model, em_volume, option
):
    """The 2D block's two check boxes reach Engine3D; "Semantic Only" gives one label."""
    vol = np.ascontiguousarray(em_volume[:8, :96, :96])
    viewer, w = make_widget()
    image = viewer.add_image(vol, name="crop")
    job = wait_job(
        start(w, image_layer=image, orthoplane=False, **{option: True}, **FAST),
        timeout=SLOW_MS,
    )
    assert job.error is None
    out = viewer.layers["crop-mito-prediction"].data
    ref = Engine3D(registered_model).segment(vol, Params2D(**{option: True}), Params3D(**FAST))
    np.testing.assert_array_equal(out, ref.classes["mito"])
    ids = set(np.unique(out)) - {0}
    assert ids
    default = headless(registered_model, vol, **FAST).classes["mito"]
    if option == "semantic_only":
        assert len(ids) == 1 and len(np.unique(default)) > 2  # several objects without it
    else:
        assert not np.array_equal(out > 0, default > 0)  # grouped at full, not 1/4, resolution


def test_multiscale_quantized_and_the_model_is_kept(
    make_widget, wait_job, small_config, small_model_file, em_volume, tmp_path
):
    """Level 0 of a multiscale image is segmented; "Use quantized model" loads the config's
    int8 file (here the float file stands in for it) once, and a second click reuses it."""
    import yaml

    from panoptem import loading, registry

    cfg = tmp_path / "q.yaml"
    cfg.write_text(yaml.safe_dump({**small_config, "model_quantized": str(small_model_file)}))
    name = registry.register_model("SmallQuantized", cfg)
    vol = np.ascontiguousarray(em_volume[:6, :32, :48])
    viewer, w = make_widget()
    image = viewer.add_image([vol, vol[:, ::2, ::2]], multiscale=True, name="ms")
    for _ in range(2):
        job = wait_job(
            start(
                w,
                image_layer=image,
                model_config=name,
                use_quantized=True,
                orthoplane=False,
                min_size=20,
                min_extent=1,
            ),
            timeout=SLOW_MS,
        )
        assert job.error is None
    assert [m.quantized for m in loading.cached_models()] == [True]  # int8, loaded once
    out = viewer.layers["ms-mito-prediction"].data
    assert out.shape == vol.shape
    np.testing.assert_array_equal(
        out, headless(small_config, vol, min_size=20, min_extent=1).classes["mito"]
    )


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_use_gpu_without_cuda_runs_on_the_cpu_with_one_notice(
    make_widget, wait_job, notifications, em_volume
):
    viewer, w = make_widget()
    image = viewer.add_image(em_volume[:4, :32, :32])
    job = wait_job(start(w, image_layer=image, use_gpu=True, orthoplane=False, **FAST))
    assert job.error is None
    gpu_notes = [t for level, t in notifications if "Use GPU" in t]
    assert len(gpu_notes) == 1 and "running on the CPU" in gpu_notes[0]
    assert len(viewer.layers) == 2  # the image and its mito layer


def test_cli_store_opens_as_the_widget_store(make_widget, wait_job, registered_model, em_volume,
                                             tmp_path):
    """A store written by ``panoptem segment3d`` opens through File > Open with the same
    layer names, scale and data as one written by the 3D widget."""
    import tifffile

    from panoptem.cli import main

    vol = np.ascontiguousarray(em_volume[:6, :40, :48])
    viewer, w = make_widget()
    image = viewer.add_image(vol, name="vol", scale=SCALE)
    job = wait_job(start(w, image_layer=image, orthoplane=False, return_panoptic=True,
                         store_dir=str(tmp_path / "widget"), **FAST), timeout=SLOW_MS)
    assert job.error is None
    tifffile.imwrite(tmp_path / "vol.tif", vol)
    args = ["segment3d", str(tmp_path / "vol.tif"), "-o", str(tmp_path / "cli" / "vol.zarr"),
            "--model", registered_model, "--scale", "3,2,2", "--return-stacks", "--quiet",
            "--min-size", "50", "--min-extent", "2"]
    assert main(args) == 0
    shown = {}
    for source, store in (("widget", tmp_path / "widget" / f"vol_{registered_model}.zarr"),
                          ("cli", tmp_path / "cli" / "vol.zarr")):
        viewer.layers.clear()
        viewer.open(str(store), plugin="panoptem")
        shown[source] = [(lay.name, tuple(lay.scale), np.asarray(lay.data[:]))
                         for lay in viewer.layers]
    assert [s[:2] for s in shown["cli"]] == [s[:2] for s in shown["widget"]] == [
        ("vol-panoptic-stack-xy", SCALE), ("vol-mito-prediction", SCALE)]
    for (_, _, a), (_, _, b) in zip(shown["cli"], shown["widget"], strict=True):
        np.testing.assert_array_equal(a, b)
    assert shown["cli"][1][2].any()


def test_a_second_run_never_replaces_the_first_store(make_widget, wait_job, registered_model,
                                                     em_volume, tmp_path, notifications):
    vol = np.ascontiguousarray(em_volume[:4, :32, :32])
    viewer, w = make_widget()
    image = viewer.add_image(vol, name="vol")
    first = tmp_path / f"vol_{registered_model}.zarr"
    values = dict(image_layer=image, orthoplane=False, store_dir=str(tmp_path), min_size=10,
                  min_extent=1)
    assert wait_job(start(w, **values), timeout=SLOW_MS).error is None
    stamp = {p.name: p.stat().st_mtime_ns for p in (first / "mito").rglob("*") if p.is_file()}
    assert wait_job(start(w, **values, confidence_thr=0.3), timeout=SLOW_MS).error is None
    second = tmp_path / f"vol_{registered_model}_1.zarr"
    assert (second / "mito").is_dir()
    assert stamp == {p.name: p.stat().st_mtime_ns for p in (first / "mito").rglob("*")
                     if p.is_file()}
    assert any(str(second) in t for level, t in notifications if level == "info")


def test_an_unwritable_zarr_directory_is_refused_before_the_run(make_widget, notifications,
                                                                em_volume, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    viewer, w = make_widget()
    image = viewer.add_image(np.ascontiguousarray(em_volume[:4, :32, :32]))
    assert start(w, image_layer=image, store_dir=str(blocker / "results")) is None
    errors = [t for level, t in notifications if level == "error"]
    assert any("Cannot write to the zarr directory" in t for t in errors), errors
    assert len(viewer.layers) == 1


def test_block_wise_run_from_the_widget_then_reopened(make_widget, wait_job, registered_model,
                                                      em_volume, tmp_path):
    """'Run block-wise' runs the blocks on a local dask cluster (a worker process) into an
    OME-Zarr store; the layers equal the library's block-wise result, and the reader reopens
    the store as multiscale labels at the image's scale."""
    from panoptem.inference.blockwise import Cluster, segment_blocks

    vol = np.ascontiguousarray(em_volume[:12, 64:, 64:])
    viewer, w = make_widget()
    image = viewer.add_image(vol, name="vol", scale=SCALE, translate=TRANSLATE)
    job = wait_job(start(w, image_layer=image, orthoplane=False, store_dir=str(tmp_path),
                         run_blockwise=True, block_size="6, 32, 32", workers=1, **FAST),
                   timeout=SLOW_MS)
    assert job.error is None
    store = tmp_path / f"vol_{registered_model}.zarr"
    ref = segment_blocks(registered_model, vol, Params2D(), Params3D(**FAST),
                         output=tmp_path / "ref.zarr", block_shape=(6, 32, 32),
                         cluster=Cluster(workers=1, processes=False))
    mito = viewer.layers["vol-mito-prediction"]
    np.testing.assert_allclose(mito.scale, SCALE)
    np.testing.assert_array_equal(np.asarray(mito.data), ref.classes["mito"][:])
    assert ref.classes["mito"][:].any()
    viewer.layers.clear()
    viewer.open(str(store), plugin="panoptem")
    (layer,) = viewer.layers
    # 64 x 64 is one pyramid level: the pyramid stops below 64 voxels in y and x
    assert layer.name == "vol-mito-prediction" and not layer.multiscale
    np.testing.assert_allclose(layer.scale, SCALE)
    np.testing.assert_allclose(layer.translate, TRANSLATE)
    np.testing.assert_array_equal(np.asarray(layer.data), ref.classes["mito"][:])


def test_block_wise_needs_a_directory_and_no_multi_gpu(make_widget, notifications, em_volume):
    viewer, w = make_widget()
    image = viewer.add_image(np.ascontiguousarray(em_volume[:4, :32, :32]))
    assert start(w, image_layer=image, run_blockwise=True) is None
    assert start(w, image_layer=image, run_blockwise=True, store_dir="/tmp",
                 block_size="4,0") is None
    errors = [t for level, t in notifications if level == "error"]
    assert any("choose a Directory" in t for t in errors), errors
    assert any("does not parse" in t for t in errors), errors
    assert len(viewer.layers) == 1


def test_use_bfloat16_runs_the_float_model_in_bfloat16(make_widget, wait_job, em_volume,
                                                      registered_model, monkeypatch):
    import torch

    from panoptem import loading

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    viewer, w = make_widget()
    vol = np.ascontiguousarray(em_volume[:8, :64, :64])
    assert w.use_bfloat16.text == "Use bfloat16" and w.use_bfloat16.value is False
    job = wait_job(start(w, image_layer=viewer.add_image(vol, name="vol"), use_bfloat16=True,
                         orthoplane=False, min_size=50, min_extent=2), timeout=600_000)
    assert job.error is None
    got = viewer.layers["vol-mito-prediction"].data > 0
    assert {m.precision for m in loading.cached_models()} == {"bfloat16"}
    want = np.asarray(headless(registered_model, vol, min_size=50, min_extent=2)
                      .classes["mito"]) > 0
    assert want.any() and (want & got).sum() / (want | got).sum() > 0.9
