"""The bundled sample: a real FIB-SEM crop, loaded through napari's sample-data menu."""

from __future__ import annotations

import numpy as np

from panoptem._sample_data import lucchi_sample
from panoptem.demo import sample_image


def test_sample_is_the_bundled_em_image():
    ((data, kwargs, kind),) = lucchi_sample()
    assert kind == "image" and kwargs["name"] == "lucchi_pp_sample"
    assert data.shape == (512, 512) and data.dtype == np.uint8
    np.testing.assert_array_equal(data, sample_image())
    assert 20 < data.std() and data.min() < 50 < 200 < data.max()  # real contrast, not blank


def test_sample_opens_in_napari(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample("panoptem", "lucchi")
    (layer,) = viewer.layers
    assert layer.name == "lucchi_pp_sample" and type(layer).__name__ == "Image"
    np.testing.assert_array_equal(layer.data, sample_image())
