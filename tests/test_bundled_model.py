"""The bundled model: shipped in the package, segments real EM, int8 agrees with float."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from importlib import resources

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from panoptem import loading, registry
from panoptem.demo import DEMO_MODEL, run_demo, sample_image
from panoptem.evaluation import evaluate
from panoptem.inference.engine import Engine2D, Params2D


def sample_mask() -> np.ndarray:
    with resources.as_file(resources.files("panoptem") / "data" / "lucchi_pp_sample_mask.png") as p:
        return np.asarray(Image.open(p))


def test_bundled_model_is_built_in_and_local():
    assert DEMO_MODEL in registry.list_models()
    cfg = registry.get_config(DEMO_MODEL)
    for key in ("model", "model_quantized"):  # inside the installed package: no download
        path = registry.fetch_file(cfg[key])
        assert path.is_file() and path.stat().st_size < 20e6
        assert "panoptem" in str(path.parent.parent.parent)


def test_bundled_model_segments_the_sample():
    metrics = evaluate(Engine2D(DEMO_MODEL).segment(sample_image(), Params2D()), sample_mask())
    assert metrics.f1 >= 0.8 and metrics.fg_iou >= 0.8


# int8 files are loaded for oneDNN's engine on CPUs with AMX int8, for fbgemm elsewhere
@pytest.fixture(params=[(False, "fbgemm"), (True, "onednn")], ids=["fbgemm", "onednn"])
def int8_engine(request, monkeypatch):
    """The engine int8 files are loaded for, as on a CPU without AMX int8 and with it."""
    amx, name = request.param
    if name not in torch.backends.quantized.supported_engines:
        pytest.skip(f"this torch build has no {name} engine")
    monkeypatch.setattr(loading, "_has_amx_int8", lambda: amx)
    monkeypatch.setattr(torch.backends.quantized, "engine", torch.backends.quantized.engine)
    loading.clear_model_cache()  # int8 modules loaded for another engine are not kept
    yield name
    loading.clear_model_cache()


def test_int8_model_agrees_with_float_on_a_real_image(lucchi_image, int8_engine):
    image = lucchi_image[:512, :768]
    float_labels = Engine2D(DEMO_MODEL).segment(image, Params2D())
    engine = Engine2D(DEMO_MODEL, quantized=True)
    assert engine.loaded.quantized and torch.backends.quantized.engine == int8_engine
    int8_labels = engine.segment(image, Params2D())
    agreement = evaluate(int8_labels, float_labels)
    assert agreement.fg_iou >= 0.95 and agreement.f1 >= 0.9


def test_int8_forward_passes_side_by_side_equal_one_at_a_time(lucchi_image, int8_engine):
    # 3D runs on a CPU put two slices through the one int8 module at once, one thread each
    module = Engine2D(DEMO_MODEL, quantized=True).loaded.module
    crops = [torch.from_numpy(lucchi_image[y:y + 128, x:x + 128].astype(np.float32) / 255)[None, None]
             for y in (0, 128, 256) for x in (0, 256)]

    def forward(x):
        torch.set_num_threads(1)
        with torch.inference_mode():
            return [t.clone() for t in module(x, 2, True).values()]

    threads = torch.get_num_threads()
    try:
        one_at_a_time = [forward(x) for x in crops]
        with ThreadPoolExecutor(2) as pool:
            side_by_side = list(pool.map(forward, crops))
    finally:
        torch.set_num_threads(threads)
    for alone, together in zip(one_at_a_time, side_by_side, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(alone, together, strict=True))


def test_demo_finds_the_sample_mitochondria(tmp_path):
    result = run_demo(tmp_path / "demo")
    labels = tifffile.imread(result.labels_path)
    truth = evaluate(labels, sample_mask())
    assert truth.f1 >= 0.8 and result.n_objects == len(np.unique(labels[labels > 0]))
    assert result.model == DEMO_MODEL and "objects in" in result.summary()
