"""Training data: targets, dataset pairing and items, augmentations, one real-data check."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from scipy import ndimage

from panoptem.errors import PanoptemError
from panoptem.training import augment as aug
from panoptem.training.datasets import (
    PanopticDataset,
    SingleClassInstanceDataset,
    find_pairs,
    make_sampler,
    read_image_8bit,
    sampling_weights,
)
from panoptem.training.targets import heatmap_and_offsets, panoptic_targets
from testutils import EM_DATA


def disk(shape, center, radius):
    yy, xx = np.indices(shape)
    return (yy - center[0]) ** 2 + (xx - center[1]) ** 2 <= radius**2


# ----------------------------------------------------------------------------- targets
def test_heatmap_of_a_disk_is_a_unit_gaussian_at_its_centroid():
    mask = disk((121, 131), (60, 70), 12).astype(np.int32) * 7
    heat, offsets = heatmap_and_offsets(mask)
    assert heat.shape == (1, 121, 131) and heat.dtype == np.float32
    assert offsets.shape == (2, 121, 131) and offsets.dtype == np.float32
    assert np.unravel_index(heat.argmax(), heat.shape[1:]) == (60, 70)
    assert heat[0, 60, 70] == pytest.approx(1.0)
    for dy, dx in [(6, 0), (0, -6), (-6, 0)]:
        assert heat[0, 60 + dy, 70 + dx] == pytest.approx(np.exp(-0.5), abs=1e-4)
    assert heat[0, 64, 74] == pytest.approx(np.exp(-32 / 72), abs=1e-4)
    assert heat[0, 60, 70 + 30] < 1e-4  # beyond the 4-sigma kernel radius


def test_offsets_point_to_the_centroid_inside_and_are_zero_outside():
    mask = np.zeros((50, 60), np.int64)
    mask[5:20, 8:30] = 3
    mask[30:45, 35:40] = 1001  # panoptic-style big id
    mask[30:33, 40:55] = 1001  # L shape: non-integer centroid
    _, offsets = heatmap_and_offsets(mask)
    yy, xx = np.indices(mask.shape)
    for ident in (3, 1001):
        inside = mask == ident
        cy, cx = ndimage.center_of_mass(inside)
        np.testing.assert_allclose(yy[inside] + offsets[0][inside], cy, atol=1e-4)
        np.testing.assert_allclose(xx[inside] + offsets[1][inside], cx, atol=1e-4)
    assert not offsets[:, mask == 0].any()


def test_empty_mask_gives_zero_targets():
    heat, offsets = heatmap_and_offsets(np.zeros((16, 20), np.uint8))
    assert heat.shape == (1, 16, 20) and not heat.any()
    assert offsets.shape == (2, 16, 20) and not offsets.any()


def test_panoptic_targets_split_classes_and_only_things_get_centres():
    mask = np.zeros((40, 40), np.int64)
    mask[:10] = 1000  # stuff class 1
    mask[20:30, 5:15] = 2001  # thing class 2, instance 1
    mask[20:30, 25:35] = 2002
    mask[35:, :5] = 7003  # unknown class: background
    sem, heat, offsets = panoptic_targets(mask, labels=[1, 2], thing_list=[2], label_divisor=1000)
    assert sem.dtype == np.int64
    assert set(np.unique(sem)) == {0, 1, 2}
    assert (sem[:10] == 1).all() and (sem[35:, :5] == 0).all()
    peaks = (heat[0] == ndimage.maximum_filter(heat[0], size=5)) & (heat[0] > 0.1)
    assert {tuple(p) for p in np.argwhere(peaks)} == {(24, 9), (24, 29)}
    assert not offsets[:, :10].any()


# ----------------------------------------------------------------------------- pairing
def write_pair(source: Path, name: str, image, mask, mask_name=None):
    (source / "images").mkdir(parents=True, exist_ok=True)
    (source / "masks").mkdir(parents=True, exist_ok=True)
    for folder, arr, fname in (
        (source / "images", image, name),
        (source / "masks", mask, mask_name or name),
    ):
        if fname.endswith(".png"):
            Image.fromarray(arr).save(folder / fname)
        else:
            tifffile.imwrite(folder / fname, arr)


@pytest.fixture
def small_dataset(tmp_path):
    """Source 'a' with 3 pairs (one mask .png for an image .tif), source 'b' with 1 pair."""
    rng = np.random.default_rng(0)
    root = tmp_path / "train"
    for src, n in (("a", 3), ("b", 1)):
        for i in range(n):
            image = rng.integers(0, 256, (48, 64), dtype=np.uint8)
            mask = np.zeros((48, 64), np.int32)
            mask[5:15, 5:20] = 1
            mask[30:40, 30:50] = 2
            mask_name = f"img{i}.png" if (src, i) == ("a", 2) else None
            write_pair(
                root / src,
                f"img{i}.tif",
                image,
                mask.astype(np.uint8) if mask_name else mask,
                mask_name,
            )
    (root / "a" / "images" / "Thumbs.db").write_bytes(b"\0\1")
    (root / "a" / "masks" / ".DS_Store").write_bytes(b"\0")
    return root


def test_pairs_by_name_and_stem_ignoring_non_images_with_one_warning(small_dataset):
    with pytest.warns(UserWarning, match="Thumbs.db") as record:
        pairs = find_pairs(small_dataset)
    assert len(record) == 1 and ".DS_Store" in str(record[0].message)
    assert [(p[0].name, p[1].name, p[2]) for p in pairs] == [
        ("img0.tif", "img0.tif", "a"),
        ("img1.tif", "img1.tif", "a"),
        ("img2.tif", "img2.png", "a"),
        ("img0.tif", "img0.tif", "b"),
    ]


def test_missing_partner_is_an_error_naming_the_file(small_dataset):
    (small_dataset / "b" / "masks" / "img0.tif").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(PanoptemError, match=r"img0\.tif"):
            find_pairs(small_dataset)
    tifffile.imwrite(small_dataset / "b" / "masks" / "img0.tif", np.zeros((48, 64), np.uint8))
    tifffile.imwrite(small_dataset / "b" / "masks" / "extra.tif", np.zeros((48, 64), np.uint8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(PanoptemError, match=r"extra\.tif has no image"):
            find_pairs(small_dataset)


def test_no_pairs_names_the_folder_and_layout(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(PanoptemError, match=r"empty.*<source>/images"):
        find_pairs(tmp_path / "empty")


def test_sampling_weights_balance_sources():
    pairs = [(f"i{i}", f"m{i}", "big") for i in range(8)] + [("j", "n", "small")]
    w = sampling_weights(pairs, 0.7)
    big, small = (1 / 8) ** 0.7, 1.0
    assert w.dtype == torch.float64 and w.shape == (9,)
    np.testing.assert_allclose(w[:8].numpy(), big / (big + small))
    assert w[8].item() == pytest.approx(small / (big + small))
    uniform = sampling_weights(pairs, 0.0)
    assert torch.allclose(uniform, torch.full((9,), 0.5, dtype=torch.float64))


# ----------------------------------------------------------------------------- datasets
def test_single_class_items_have_the_right_shapes_dtypes_and_normalisation(small_dataset):
    norms = {"mean": 0.5, "std": 0.25}
    with pytest.warns(UserWarning):
        ds = SingleClassInstanceDataset(small_dataset, norms=norms, weight_gamma=0.7)
    assert len(ds) == 4 and ds.weights.shape == (4,)
    item = ds[0]
    assert item["image"].shape == (1, 48, 64) and item["image"].dtype == torch.float32
    raw = tifffile.imread(small_dataset / "a" / "images" / "img0.tif")
    np.testing.assert_allclose(item["image"][0].numpy(), (raw / 255 - 0.5) / 0.25, atol=1e-5)
    assert item["sem"].shape == (1, 48, 64) and item["sem"].dtype == torch.float32
    assert set(item["sem"].unique().tolist()) == {0.0, 1.0}
    assert item["ctr_hmp"].shape == (1, 48, 64) and item["offsets"].shape == (2, 48, 64)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2, sampler=make_sampler(ds, 4))))
    assert batch["image"].shape == (2, 1, 48, 64)


def test_binary_mask_becomes_connected_components(tmp_path):
    mask = np.zeros((40, 40), np.uint8)
    mask[2:10, 2:10] = 255
    mask[20:30, 20:30] = 255
    write_pair(tmp_path / "src", "x.png", np.full((40, 40), 100, np.uint8), mask)
    ds = SingleClassInstanceDataset(tmp_path, weight_gamma=None)
    image, instances = ds.load(0)
    assert image.dtype == np.uint8 and len(np.unique(instances)) == 3
    heat = ds[0]["ctr_hmp"][0].numpy()
    assert heat[5, 5] == pytest.approx(1.0, abs=1e-3) and heat[24, 24] == pytest.approx(
        1.0, abs=1e-3
    )


def test_panoptic_dataset_items_and_uint16_images(tmp_path):
    image = np.linspace(1000, 3000, 32 * 32).reshape(32, 32).astype(np.uint16)
    mask = np.zeros((32, 32), np.int32)
    mask[:8] = 1000
    mask[15:25, 10:20] = 2001
    write_pair(tmp_path / "s", "p.tif", image, mask)
    ds = PanopticDataset(tmp_path, labels=[1, 2], thing_list=[2], label_divisor=1000)
    item = ds[0]
    assert item["sem"].dtype == torch.int64 and item["sem"].shape == (32, 32)
    assert item["ctr_hmp"].max() == pytest.approx(1.0)
    eight = read_image_8bit(tmp_path / "s" / "images" / "p.tif")
    assert eight.min() == 0 and eight.max() == 255
    with pytest.raises(PanoptemError, match="at least 2 class labels"):
        PanopticDataset(tmp_path, labels=[1], thing_list=[1], label_divisor=1000)


def test_shape_mismatch_names_both_files(tmp_path):
    write_pair(tmp_path / "s", "a.tif", np.zeros((10, 12), np.uint8), np.zeros((10, 11), np.uint8))
    ds = SingleClassInstanceDataset(tmp_path)
    with pytest.raises(PanoptemError, match=r"images/a\.tif.*masks/a\.tif"):
        ds[0]


# ----------------------------------------------------------------------------- augmentations
def square_pair(size=64):
    mask = np.zeros((size, size), np.int32)
    mask[10:30, 20:44] = 5
    return (mask > 0).astype(np.uint8) * 255, mask


@pytest.mark.parametrize(
    "transform",
    [
        aug.HorizontalFlip(p=1),
        aug.VerticalFlip(p=1),
        aug.Rotate(limit=(90, 90), p=1),
        aug.Rotate(limit=(-37, -37), p=1),
        aug.RandomScale(scale_limit=(0.5, 0.5), p=1),
    ],
)
def test_geometric_transforms_keep_image_and_mask_aligned(transform):
    image, mask = square_pair()
    out_img, out_mask = aug.Compose([transform])(image, mask, np.random.default_rng(0))
    assert out_img.shape == out_mask.shape and out_img.dtype == np.uint8
    assert set(np.unique(out_mask)) <= {0, 5}
    edge = ndimage.binary_dilation(out_mask > 0) & ~ndimage.binary_erosion(out_mask > 0)
    assert np.array_equal((out_img > 127)[~edge], (out_mask > 0)[~edge])


def test_rotation_by_90_moves_the_square_exactly():
    image, mask = square_pair()
    out_img, out_mask = aug.Rotate(limit=(90, 90), p=1)(image, mask, np.random.default_rng(0))
    np.testing.assert_array_equal(out_mask, np.rot90(mask))
    np.testing.assert_array_equal(out_img, np.rot90(image))


def test_default_pipeline_gives_patches_is_reproducible_and_aligned():
    image, mask = square_pair(100)
    pipe = aug.default_augmentations(patch_size=48)
    a = pipe(image, mask, np.random.default_rng(3))
    b = pipe(image, mask, np.random.default_rng(3))
    assert a[0].shape == a[1].shape == (48, 48)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    for seed in range(10):
        img, msk = aug.default_augmentations(48, seed=seed)(image, mask)
        assert img.shape == msk.shape == (48, 48)
        assert set(np.unique(msk)) <= {0, 5}


def test_brightness_contrast_changes_the_image_only():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (32, 32), dtype=np.uint8)
    mask = rng.integers(0, 4, (32, 32))
    t = aug.RandomBrightnessContrast(0.3, 0.3, p=1)
    out_img, out_mask = t(image, mask, np.random.default_rng(1))
    assert out_mask is mask
    draws = np.random.default_rng(1)
    alpha, beta = 1 + draws.uniform(-0.3, 0.3), draws.uniform(-0.3, 0.3)
    expected = np.clip(np.rint(np.clip(image * alpha + beta * 255, 0, 255)), 0, 255)
    np.testing.assert_allclose(out_img, expected, atol=1)


def test_crop_without_padding_says_what_to_do():
    with pytest.raises(PanoptemError, match="PadIfNeeded"):
        aug.RandomCrop(64, 64)(
            np.zeros((32, 32), np.uint8), np.zeros((32, 32)), np.random.default_rng()
        )


def test_pipeline_from_a_config_list():
    pipe = aug.augmentations_from_config(
        [
            {"aug": "RandomScale", "scale_limit": [-0.9, 1]},
            {"aug": "PadIfNeeded", "min_height": None, "min_width": None, "border_mode": 0},
            {"aug": "RandomCrop", "height": None, "width": None},
            {"aug": "HorizontalFlip"},
        ],
        patch_size=32,
        seed=0,
    )
    img, msk = pipe(*square_pair())
    assert img.shape == msk.shape == (32, 32)
    with pytest.raises(PanoptemError, match="Unknown augmentation"):
        aug.augmentations_from_config([{"aug": "Blur"}], 32)


def test_dataset_applies_transforms_before_making_targets(small_dataset):
    with pytest.warns(UserWarning):
        ds = SingleClassInstanceDataset(
            small_dataset, transforms=aug.default_augmentations(32), seed=0
        )
    item = ds[1]
    assert item["image"].shape == item["sem"].shape == item["ctr_hmp"].shape == (1, 32, 32)
    sem = item["sem"][0].numpy() > 0
    assert not item["offsets"][:, ~sem].any()


# ----------------------------------------------------------------------------- real data
def test_real_em_items_have_one_centre_peak_per_mitochondrion(tmp_path):
    root = tmp_path / "dataset" / "cdeep3m"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    images = [EM_DATA / f"cdeep3m_train_{n}_y0_x0.png" for n in ("010", "012")]
    labels = [EM_DATA / f"cdeep3m_train_{n}_y0_x0_mask.png" for n in ("010", "012")]
    for i, (im, lb) in enumerate(zip(images, labels, strict=True)):
        shutil.copy(im, root / "images" / f"slice{i}.png")
        shutil.copy(lb, root / "masks" / f"slice{i}.png")
    ds = SingleClassInstanceDataset(tmp_path / "dataset", weight_gamma=0.7)
    for i in range(len(ds)):
        _, instances = ds.load(i)
        n = len(np.unique(instances)) - 1
        heat = ds[i]["ctr_hmp"][0].numpy()
        peaks = (heat == ndimage.maximum_filter(heat, size=7)) & (heat > 1e-3)
        assert n > 10
        assert 0.8 * n <= peaks.sum() <= n
        centroids = np.array(ndimage.center_of_mass(instances > 0, instances, range(1, n + 1)))
        gaps = np.linalg.norm(np.argwhere(peaks)[:, None] - centroids[None], axis=-1).min(axis=1)
        assert gaps.max() < 2.0  # every peak sits on a mitochondrion's centroid
