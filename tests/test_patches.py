"""Picking training patches and flipbooks, and storing them as a dataset (training.patches)."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from panoptem.errors import PanoptemError
from panoptem.training.datasets import SingleClassInstanceDataset, find_pairs
from panoptem.training.patches import patch_crop, pick_patches, store_patches


@pytest.fixture
def em_labels(lucchi_image):
    """The real Lucchi++ slice and its mitochondria as instances."""
    from scipy import ndimage

    from testutils import EM_DATA, read_png

    mask = read_png(EM_DATA / "lucchi_test_0000_mask.png")[..., 0] > 0
    return lucchi_image, ndimage.label(mask)[0].astype(np.int32)


def test_points_first_then_random_patches_on_the_grid(em_labels):
    image, labels = em_labels
    points = [[10.0, 1020.0], [400.2, 500.7]]
    p = pick_patches(image, name="slice", points=points, n_patches=5, patch_size=256,
                     labels=labels, seed=0)
    assert p.images.shape == p.labels.shape == (5, 256, 256) and p.images.dtype == np.uint8
    assert p.points_used == [0, 1] and p.prefix == "slice"
    # a point near the border: the window is kept inside the image
    assert p.suffixes[0] == "s0-LOC-2d_0-256_768-1024"
    np.testing.assert_array_equal(p.images[0], image[0:256, 768:1024])
    # a point inside: centred on it
    assert p.suffixes[1] == "s0-LOC-2d_272-528_373-629"
    np.testing.assert_array_equal(p.labels[1], labels[272:528, 373:629])
    for suffix in p.suffixes[2:]:  # random patches start on multiples of the patch size
        y0, x0 = int(suffix.split("_")[1].split("-")[0]), int(suffix.split("_")[2].split("-")[0])
        assert y0 % 256 == 0 and x0 % 256 == 0


def test_pick_all_points_gives_one_patch_per_point(em_labels):
    image, _ = em_labels
    points = np.array([[100, 100], [200, 300], [600, 900]], float)
    p = pick_patches(image, points=points, n_patches=1, patch_size=128, pick_all_points=True)
    assert len(p.images) == 3 and p.points_used == [0, 1, 2]
    with pytest.raises(PanoptemError, match="'Pick all points' needs points"):
        pick_patches(image, n_patches=1, pick_all_points=True)


def test_small_image_patches_are_zero_padded_and_stored_without_the_padding(tmp_path, em_labels):
    image, labels = em_labels
    crop, crop_labels = image[:100, :150], labels[:100, :150]
    p = pick_patches(crop, name="tiny", n_patches=2, patch_size=256, labels=crop_labels, seed=1)
    assert p.suffixes == ["s0-LOC-2d_0-100_0-150"] * 2
    assert not p.images[0, 100:].any() and not p.images[0, :, 150:].any()
    assert patch_crop(p.suffixes[0], 256) == (100, 150)
    written = store_patches(tmp_path, "mine", p.images, p.labels, prefix=p.prefix,
                            suffixes=p.suffixes)
    assert [w.name for w in written] == ["tiny-s0-LOC-2d_0-100_0-150.tiff",
                                         "tiny-s0-LOC-2d_0-100_0-150_1.tiff"]
    np.testing.assert_array_equal(tifffile.imread(written[0]), crop)
    mask = tifffile.imread(tmp_path / "mine" / "tiny" / "masks" / written[0].name)
    assert mask.dtype == np.int32
    np.testing.assert_array_equal(mask, crop_labels)


def test_a_2d_stack_gives_square_patches_of_single_planes(em_volume):
    stack = em_volume[:6, :100, :100]
    p = pick_patches(stack, name="stack", points=[[3, 50, 50]], n_patches=2, patch_size=64,
                     is_2d_stack=True, seed=0)
    assert p.images.shape == (2, 64, 64)
    assert p.suffixes[0] == "s0-LOC-2d-3_18-82_18-82"
    np.testing.assert_array_equal(p.images[0], stack[3, 18:82, 18:82])


def test_flipbooks_from_a_volume_and_their_middle_slice_stored(tmp_path, em_volume):
    labels = (em_volume > 150).astype(np.int32)
    p = pick_patches(em_volume, name="vol", points=[[0, 60, 60], [30, 10, 120]], n_patches=3,
                     patch_size=64, labels=labels, level=1, seed=0)
    assert p.images.shape == (3, 5, 64, 64) and p.flipbook
    # the plane of a point near the end is kept two slices inside
    assert p.suffixes[0] == "s1-LOC-0_0-5_28-92_28-92"
    np.testing.assert_array_equal(p.images[0], em_volume[0:5, 28:92, 28:92])
    assert p.suffixes[1] == "s1-LOC-0_28-33_0-64_64-128"
    written = store_patches(tmp_path, "flip", p.images, p.labels, prefix=p.prefix,
                            suffixes=p.suffixes)
    np.testing.assert_array_equal(tifffile.imread(written[1]), em_volume[30, 0:64, 64:128])
    # the stored dataset is one a training run reads
    assert len(find_pairs(tmp_path / "flip")) == 3
    item = SingleClassInstanceDataset(tmp_path / "flip")[0]
    assert item["image"].shape == (1, 64, 64)


def test_isotropic_flipbooks_run_along_any_axis(em_volume):
    axes = set()
    for seed in range(12):
        p = pick_patches(em_volume, n_patches=1, patch_size=32, isotropic=True, seed=seed)
        axes.add(p.suffixes[0].split("-LOC-")[1].split("_")[0])
        assert p.images.shape == (1, 5, 32, 32)
    assert axes == {"0", "1", "2"}


def test_storing_appends_and_never_overwrites(tmp_path, em_labels):
    image, labels = em_labels
    p = pick_patches(image, name="slice", points=[[300, 300]], n_patches=1, patch_size=64,
                     labels=labels)
    first = store_patches(tmp_path, "ds", p.images, p.labels, prefix="slice", suffixes=p.suffixes)
    before = first[0].read_bytes()
    second = store_patches(tmp_path, "ds", p.images, p.labels + 1, prefix="slice",
                           suffixes=p.suffixes)
    assert first[0].read_bytes() == before and second[0] != first[0]
    assert len(list((tmp_path / "ds" / "slice" / "masks").iterdir())) == 2
    # without metadata: the prefix "unknown" and a random name, nothing cropped
    third = store_patches(tmp_path, "ds", p.images, p.labels)
    assert third[0].parent == tmp_path / "ds" / "unknown" / "images"
    assert tifffile.imread(third[0]).shape == (64, 64)


@pytest.mark.parametrize("case, match", [
    ("shape", "labels layer that was picked with these patches"),
    ("count", "labels layer that was picked with these patches"),
    ("names", "names in the layer's metadata"),
    ("dataset", "cannot be a folder name"),
])
def test_mismatched_patches_are_refused_before_anything_is_written(tmp_path, case, match):
    images = np.zeros((2, 32, 32), np.uint8)
    labels = np.zeros((2, 32, 32), np.int32)
    suffixes, name = ["s0-LOC-2d_0-32_0-32"] * 2, "ds"
    if case == "shape":
        labels = labels[:, :16]
    elif case == "count":
        labels = labels[:1]
    elif case == "names":
        suffixes = suffixes[:1]
    else:
        name = "a/b"
    with pytest.raises(PanoptemError, match=match):
        store_patches(tmp_path, name, images, labels, prefix="x", suffixes=suffixes)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kwargs, match", [
    (dict(image=np.zeros((4, 8, 8, 3))), "2D image, a 2D stack or a 3D volume"),
    (dict(labels=np.zeros((5, 5))), "pair the image with a labels layer of its shape"),
    (dict(patch_size=100), "multiple of 16"),
    (dict(n_patches=0), "at least 1"),
    (dict(points=[[5.0, 900.0]]), "lie outside"),
    (dict(points=[[1.0, 2.0, 3.0]]), "Points need 2 coordinates"),
])
def test_bad_picks_are_refused(kwargs, match):
    args = dict(image=np.zeros((64, 64), np.uint8), n_patches=1, patch_size=32)
    args.update(kwargs)
    image = args.pop("image")
    with pytest.raises(PanoptemError, match=match):
        pick_patches(image, **args)


def test_a_thin_volume_has_no_flipbooks():
    with pytest.raises(PanoptemError, match="Tick 'Image is 2D stack'"):
        pick_patches(np.zeros((3, 64, 64), np.uint8), n_patches=1, patch_size=32)
    assert pick_patches(np.zeros((3, 64, 64), np.uint8), n_patches=1, patch_size=32,
                        is_2d_stack=True).images.shape == (1, 32, 32)
