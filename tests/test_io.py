"""Reading images and label files (panoptem.io)."""

from __future__ import annotations

import numpy as np
import pytest

from panoptem.errors import PanoptemError
from panoptem.io import label_channel, read_image, read_labels
from testutils import EM_DATA


def test_rgba_mask_reduced_to_one_channel():
    grey = np.zeros((4, 5), np.uint8)
    grey[1:3, 1:3] = 255
    rgba = np.dstack([grey, grey, grey, np.full_like(grey, 255)])
    assert np.array_equal(label_channel(rgba, "m.png"), grey)
    assert np.array_equal(label_channel(rgba[..., :3], "m.tif"), grey)
    colour = rgba.copy()
    colour[0, 0, 1] = 9
    with pytest.raises(PanoptemError, match="colour"):
        label_channel(colour, "m.png")
    vol = np.zeros((2, 4, 3), np.uint8)  # a tif volume whose last axis happens to be 3
    vol[0, 0, 1] = 1
    assert label_channel(vol, "v.tif").shape == (2, 4, 3)


def test_read_labels_of_a_real_rgba_mask():
    """Lucchi++ masks are RGBA PNGs with equal colour channels: one channel comes back."""
    path = EM_DATA / "lucchi_test_0000_mask.png"
    assert read_image(path).shape == (768, 1024, 4)
    labels = read_labels(path)
    assert labels.shape == (768, 1024) and set(np.unique(labels)) == {0, 255}
    np.testing.assert_array_equal(labels, read_image(path)[..., 0])


def test_read_labels_missing_file(tmp_path):
    with pytest.raises(PanoptemError, match="nope.png"):
        read_labels(tmp_path / "nope.png")
