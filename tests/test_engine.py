"""The 2D engine end to end with a real TorchScript model on real EM images."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from panoptem import registry
from panoptem.errors import Cancelled, PanoptemError
from panoptem.inference.engine import Engine2D, Params2D
from panoptem.progress import CallbackProgress, Progress
from testutils import model_config


@pytest.fixture
def crop(lucchi_image):
    return np.ascontiguousarray(lucchi_image[:256, :320])


@pytest.fixture
def engine(small_config):
    return Engine2D(small_config)


def test_registered_model_from_path_runs_on_real_image(small_model_file, tmp_path, lucchi_image):
    cfg = tmp_path / "small.yaml"
    import yaml

    yaml.safe_dump(model_config("placeholder.pth"), cfg.open("w"))
    name = registry.register_model("SmallTest", str(cfg), model=str(small_model_file))
    assert name in registry.list_models()
    eng = Engine2D(name)
    img = lucchi_image[:384, :512]
    out = eng.segment(img, confidence_thr=0.3)
    assert out.shape == img.shape and out.dtype == np.int32
    ids = np.unique(out[out > 0])
    assert ((ids // 10000) == 1).all()  # class 1 * label divisor + k
    assert eng.timings["forward"] > 0 and eng.timings["total"] >= eng.timings["forward"]


@pytest.fixture
def http_server(server, small_model_file):
    shutil.copy(small_model_file, server.root / "SmallServed.pth")
    return server.url


def test_model_from_url_runs_on_real_image(http_server, small_config, crop, panoptem_home):
    cfg = dict(small_config, model=f"{http_server}/SmallServed.pth?download=1")
    eng = Engine2D(cfg)
    assert (panoptem_home / "SmallServed.pth").exists()
    out = eng.segment(crop)
    ref = Engine2D(small_config).segment(crop)
    np.testing.assert_array_equal(out, ref)


def test_engine_reuses_the_cached_model(small_config):
    assert Engine2D(small_config).loaded.module is Engine2D(small_config).loaded.module


def test_same_segmentation_for_every_dtype(engine, crop):
    # stretch the picture to 0..255 so every dtype's own range maps onto the same values
    u = crop.astype(np.float64)
    u8 = np.round((u - u.min()) / (u.max() - u.min()) * 255).astype(np.uint8)
    ref = engine.segment(u8, confidence_thr=0.45)
    variants = {
        "uint16": u8.astype(np.uint16) * 257,
        "int32": u8.astype(np.int32) * 1000 - 70000,
        "float32": u8.astype(np.float32) * 0.25 + 3.0,
    }
    for name, img in variants.items():
        np.testing.assert_array_equal(engine.segment(img, confidence_thr=0.45), ref, err_msg=name)


def test_deterministic_and_parameters_change_results(engine, crop):
    a = engine.segment(crop)
    np.testing.assert_array_equal(a, engine.segment(crop))
    low = engine.segment(crop, confidence_thr=0.1)
    high = engine.segment(crop, confidence_thr=0.9)
    assert (low > 0).sum() >= (a > 0).sum() >= (high > 0).sum()


@pytest.mark.parametrize("s", [2, 4])
def test_downsampling_keeps_full_size(engine, crop, s):
    out = engine.segment(crop, downsampling=s, confidence_thr=0.3)
    assert out.shape == crop.shape


def test_fine_boundaries_and_semantic_only(engine, crop):
    fine = engine.segment(crop, fine_boundaries=True, confidence_thr=0.3)
    coarse = engine.segment(crop, confidence_thr=0.3)
    assert fine.shape == crop.shape and fine.any() and coarse.any()
    # the semantic map does not depend on fine boundaries; with any centre found, every
    # foreground pixel joins an object in both modes
    np.testing.assert_array_equal(fine > 0, coarse > 0)
    sem = engine.segment(crop, semantic_only=True, confidence_thr=0.3, max_objects=1000)
    assert set(np.unique(sem)) <= {0, 1000}


def test_tiled_run_on_real_image(engine, lucchi_image):
    img = lucchi_image[:300, :700]
    out = engine.segment(img, tile_size=256, confidence_thr=0.3)
    assert out.shape == img.shape and out.dtype == np.int32
    # a tile larger than the image is the untiled result
    np.testing.assert_array_equal(
        engine.segment(img, tile_size=1280, confidence_thr=0.3),
        engine.segment(img, confidence_thr=0.3),
    )


def test_roi_mask_confines_labels(engine, crop):
    roi = np.zeros(crop.shape, bool)
    roi[40:200, 60:260] = True
    out = engine.segment(crop, roi=roi, confidence_thr=0.2)
    assert out.shape == crop.shape
    assert not out[~roi].any()
    with pytest.raises(PanoptemError, match="ROI mask has shape"):
        engine.segment(crop, roi=roi[:10])
    with pytest.raises(PanoptemError, match="empty"):
        engine.segment(crop, roi=np.zeros_like(roi))


def test_fill_holes_never_removes_labels(engine, crop):
    plain = engine.segment(crop, confidence_thr=0.3)
    filled = engine.segment(crop, confidence_thr=0.3, fill_holes=True)
    assert set(np.unique(plain)) == set(np.unique(filled))
    changed = plain != filled
    assert (plain[changed] == 0).all()


def test_batch_equals_single_images_and_reports_progress(engine, crop):
    stack = np.stack([crop, crop[::-1].copy(), np.fliplr(crop).copy()])
    seen = []
    out = engine.segment_batch(
        stack, progress=CallbackProgress(lambda s, d, t: seen.append((s, d, t)))
    )
    assert out.shape == stack.shape
    for i in range(3):
        np.testing.assert_array_equal(out[i], engine.segment(stack[i]))
    assert seen[-1] == ("images", 3, 3)


def test_cancel_stops_between_tiles(engine, lucchi_image):
    class CancelAfterOne(Progress):
        def on_advance(self, done, total):
            self.cancel()

    with pytest.raises(Cancelled):
        engine.segment(lucchi_image, tile_size=256, progress=CancelAfterOne())


@pytest.mark.parametrize(
    "image,match",
    [
        (np.zeros((64, 64, 3), np.uint8), "RGB"),
        (np.zeros((2, 3, 64, 64), np.uint8), "2-D"),
        (np.zeros((0, 64), np.uint8), "empty"),
        (np.zeros((64, 64), bool), "dtype"),
    ],
)
def test_bad_images_are_clear_errors(engine, image, match):
    with pytest.raises(PanoptemError, match=match):
        engine.segment(image)


def test_image_smaller_than_padding_factor(engine):
    img = (np.random.default_rng(0).random((7, 11)) * 255).astype(np.uint8)
    assert engine.segment(img).shape == (7, 11)


def test_constant_image_is_not_an_error(engine):
    assert engine.segment(np.full((40, 40), 7, np.uint16)).shape == (40, 40)


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("downsampling", 3, "Downsampling"),
        ("confidence_thr", 1.5, "confidence_thr"),
        ("min_distance", 0, "Min Distance"),
        ("max_objects", 1, "Max objects"),
        ("tile_size", -5, "Tile size"),
    ],
)
def test_bad_parameters_are_clear_errors(field, value, match):
    with pytest.raises(PanoptemError, match=match):
        Params2D(**{field: value}).validated()


@pytest.mark.parametrize("value", [float("nan"), float("inf"), None, "3", True, 2.5])
@pytest.mark.parametrize("field,match", [
    ("downsampling", "Image Downsampling must be one of"),
    ("min_distance", "Centers Min Distance must be a whole number from 1"),
    ("max_objects", "Max objects per class must be 0"),
    ("tile_size", "Tile size must be 0"),
])
def test_whole_number_parameters_refuse_anything_else(field, value, match):
    """Not a whole number (NaN, infinity, None, text, a boolean, a fraction): a
    PanoptemError naming the parameter, not Python's own error from int()."""
    with pytest.raises(PanoptemError, match=match):
        Params2D(**{field: value}).validated()


@pytest.mark.parametrize("value", ["0.5", None, True, float("nan")])
def test_thresholds_refuse_what_is_not_a_number_in_range(value):
    for field in ("confidence_thr", "center_confidence_thr"):
        with pytest.raises(PanoptemError, match=f"{field} must lie between 0 and 1"):
            Params2D(**{field: value}).validated()


def test_whole_number_floats_become_ints():
    p = Params2D(downsampling=2.0, min_distance=4.0, max_objects=100.0, tile_size=256.0).validated()
    assert [(v, type(v)) for v in (p.downsampling, p.min_distance, p.max_objects, p.tile_size)] == [
        (2, int), (4, int), (100, int), (256, int)]


def test_unknown_model_name():
    with pytest.raises(PanoptemError, match="MitoNet_v1"):
        Engine2D("NoSuchModel")


@pytest.mark.parametrize("extra", [{}, {"tile_size": 128}, {"semantic_only": True}],
                         ids=["whole", "tiled", "semantic"])
def test_max_objects_0_numbers_the_objects_from_1(engine, crop, extra):
    """ "Max objects per class" 0 (the original's advice for models whose label divisor is
    None): no class offset, the objects numbered 1..N in the order of their panoptic ids."""
    ref = engine.segment(crop, **extra)
    out = engine.segment(crop, max_objects=0, **extra)
    ids = np.unique(ref[ref > 0])
    assert len(ids) >= (1 if extra.get("semantic_only") else 3)
    np.testing.assert_array_equal(np.unique(out), np.arange(len(ids) + 1))
    lut = dict(zip(ids.tolist(), range(1, len(ids) + 1), strict=True))
    np.testing.assert_array_equal(out, np.vectorize(lambda v: lut.get(v, 0))(ref))


@pytest.mark.parametrize("bad", [1, -3, 2.5, "ten"])
def test_max_objects_must_be_0_or_at_least_2(engine, crop, bad):
    with pytest.raises(PanoptemError, match="must be 0 .* or a whole number >= 2"):
        engine.segment(crop, max_objects=bad)
