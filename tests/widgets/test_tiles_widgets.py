"""Create Tiles and Merge Tiles, opened from the Plugins menu and clicked as a user does:
fields as in the original, tiles on disk, the merged image and mask opened as layers, and
errors shown as notifications."""

from __future__ import annotations

import os

import numpy as np
import pytest
import tifffile
from scipy import ndimage
from widgetutils import click, open_from_menu

from testutils import EM_DATA, read_png

CREATE, MERGE = "Create Tiles", "Merge Tiles"


@pytest.fixture
def viewer(make_napari_viewer):
    return make_napari_viewer()


@pytest.fixture
def em_files(tmp_path, lucchi_image):
    """A real FIB-SEM image (768 x 1024 uint8) and its mitochondria labels (uint32) as tifs."""
    mask = read_png(EM_DATA / "lucchi_test_0000_mask.png")[..., 0] > 0
    labels = ndimage.label(mask)[0].astype(np.uint32)
    folder = tmp_path / "in"
    folder.mkdir()
    tifffile.imwrite(folder / "image.tif", lucchi_image)
    tifffile.imwrite(folder / "mask.tif", labels)
    return folder / "image.tif", folder / "mask.tif", lucchi_image, labels


def _texts(notifications, level: str) -> list[str]:
    return [text for severity, text in notifications if severity == level]


def test_fields_and_defaults_are_the_originals(viewer):
    create = open_from_menu(viewer, CREATE)
    assert create._call_button.text == "Create Tiles"
    assert [w.label for w in create if w is not create._call_button] == [
        "Path to tif image",
        "Path to tif mask (optional)",
        "Tile size (px)",
        "Directory to save tiles",
    ]
    size = create.patch_size
    assert type(size).__name__ == "FloatSpinBox"
    assert (size.value, size.min, size.max, size.step) == (512, 1, 300000, 1)
    assert str(create.save_directory.value) == os.getcwd()
    assert create.save_directory.mode.value == "d"

    merge = open_from_menu(viewer, MERGE)
    assert merge._call_button.text == "Merge Tiles"
    assert [w.label for w in merge if w is not merge._call_button] == [
        'Directory with patches (same as from "Create Tiles" option)',
        "Directory to save merged image",
    ]
    assert str(merge.patch_directory.value) == str(merge.save_directory.value) == os.getcwd()
    assert merge.patch_directory.mode.value == merge.save_directory.mode.value == "d"


def test_create_then_merge_opens_the_result(viewer, wait_job, notifications, tmp_path, em_files):
    image_path, mask_path, image, labels = em_files
    create = open_from_menu(viewer, CREATE)
    create.image_path.value = image_path
    create.mask_path.value = mask_path
    create.patch_size.value = 300
    create.save_directory.value = tmp_path / "tiles"
    job = wait_job(click(create))
    assert job.error is None
    tiles = tmp_path / "tiles"
    assert len(list((tiles / "im").iterdir())) == len(list((tiles / "msk").iterdir())) == 12
    assert (tiles / "metadata.tif").is_file()
    assert any("12 image tiles" in t for t in _texts(notifications, "info"))

    merge = open_from_menu(viewer, MERGE)
    merge.patch_directory.value = tiles
    merge.save_directory.value = tmp_path / "merged"
    job = wait_job(click(merge))
    assert job.error is None
    assert (tmp_path / "merged" / "im.tif").is_file()
    im, msk = viewer.layers["im"], viewer.layers["msk"]
    assert type(im).__name__ == "Image" and type(msk).__name__ == "Labels"
    assert np.array_equal(np.asarray(im.data), image) and im.data.dtype == np.uint8
    assert np.array_equal(np.asarray(msk.data), labels) and msk.data.dtype == np.uint32
    assert any("opened in the viewer" in t for t in _texts(notifications, "info"))

    # painting the opened mask does not touch the merged file
    msk.data[0, 0] = 999
    assert tifffile.imread(tmp_path / "merged" / "msk.tif")[0, 0] == labels[0, 0]

    # a second merge into the same folder keeps the first pair
    job = wait_job(click(merge))
    assert job.result[:2] == (tmp_path / "merged" / "im_1.tif", tmp_path / "merged" / "msk_1.tif")
    assert "im_1" in viewer.layers and "msk_1" in viewer.layers


def test_errors_are_notifications(viewer, wait_job, notifications, tmp_path, em_files):
    image_path, _, _, _ = em_files
    create = open_from_menu(viewer, CREATE)
    create.image_path.line_edit.value = ""  # as a user leaves it empty
    create.save_directory.value = tmp_path / "t"
    assert click(create) is None
    assert _texts(notifications, "error")[-1].startswith("Choose the tif image")

    # tiles into a folder that already has them: refused in the worker, shown, nothing new
    create.image_path.value = image_path
    assert wait_job(click(create)).error is None
    before = sorted(p.name for p in (tmp_path / "t" / "im").iterdir())
    job = wait_job(click(create))
    assert job.error is not None
    assert "already holds tiles" in _texts(notifications, "error")[-1]
    assert sorted(p.name for p in (tmp_path / "t" / "im").iterdir()) == before

    merge = open_from_menu(viewer, MERGE)
    merge.patch_directory.value = tmp_path / "in"  # no metadata.tif there
    merge.save_directory.value = tmp_path / "merged"
    job = wait_job(click(merge))
    assert job.error is not None and not (tmp_path / "merged").exists()
    assert _texts(notifications, "error")[-1].startswith("No metadata.tif in")
    assert "im" not in viewer.layers
