"""Create Tiles / Merge Tiles on real EM: exact round trips in every dtype, the original's
file layout and metadata, its metadata accepted as it is, every refusal, nothing overwritten,
progress and cancel."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
from scipy import ndimage

from panoptem.errors import Cancelled, PanoptemError
from panoptem.progress import CallbackProgress, Progress
from panoptem.tiles import create_tiles, merge_tiles, read_tile_metadata
from testutils import EM_DATA, file_tree, read_png

TILE = 500  # divides neither side of the images below


@pytest.fixture(scope="module")
def big_em(lucchi_image) -> tuple[np.ndarray, np.ndarray]:
    """A 1536 x 2048 real FIB-SEM image (Lucchi++ slice 0 tiled 2 x 2, mirrored) and its
    mitochondria labelled as instances (uint32)."""
    mask = read_png(EM_DATA / "lucchi_test_0000_mask.png")[..., 0] > 0
    image = np.block([[lucchi_image, lucchi_image[:, ::-1]], [lucchi_image[::-1], lucchi_image]])
    mask = np.block([[mask, mask[:, ::-1]], [mask[::-1], mask]])
    labels = ndimage.label(mask)[0].astype(np.uint32)
    assert image.shape == (1536, 2048) and labels.max() > 50
    return image, labels


def _write(path, arr, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, arr, **kw)
    return path


# --------------------------------------------------------------------------------------
# round trips
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("image_dtype", "mask_dtype"),
    [("uint8", "uint32"), ("uint16", "int32"), ("float32", None)],
)
def test_create_then_merge_is_exact(tmp_path, big_em, image_dtype, mask_dtype):
    em, labels = big_em
    image = {
        "uint8": em,
        "uint16": em.astype(np.uint16) * 257 + 3,
        "float32": em.astype(np.float32) / 255 - 0.25,
    }[image_dtype]
    image_path = _write(tmp_path / "in" / "image.tif", image)
    mask = labels.astype(mask_dtype) if mask_dtype else None
    if mask_dtype == "int32":
        mask[mask > 0] += 70_000  # ids beyond uint16, which the original's merge would cut
    mask_path = _write(tmp_path / "in" / "mask.tif", mask) if mask is not None else None

    tiles = create_tiles(image_path, tmp_path / "tiles", TILE, mask_path=mask_path)
    assert tiles == tmp_path / "tiles"
    names = {f"{y}_{x}.tif" for y in range(0, 2000, TILE) for x in range(0, 2500, TILE)}
    assert {p.name for p in (tiles / "im").iterdir()} == names  # 4 x 5 tiles, padded
    if mask is None:
        assert not (tiles / "msk").exists()
    else:
        assert {p.name for p in (tiles / "msk").iterdir()} == names
    corner = tifffile.imread(tiles / "im" / "1500_2000.tif")
    assert corner.shape == (TILE, TILE) and corner.dtype == image.dtype
    np.testing.assert_array_equal(corner[:36, :48], image[1500:, 2000:])
    assert not corner[36:].any() and not corner[:, 48:].any()  # zero padding
    with tifffile.TiffFile(tiles / "im" / "0_500.tif") as tif:
        assert tif.is_bigtiff
    assert not [p for p in tiles.iterdir() if p.name.startswith(".")]  # no leftovers

    merged_image, merged_mask = merge_tiles(tiles, tmp_path / "merged")
    assert merged_image == tmp_path / "merged" / "im.tif"
    out = tifffile.imread(merged_image)
    assert out.dtype == image.dtype and np.array_equal(out, image)
    if mask is None:
        assert merged_mask is None and not (tmp_path / "merged" / "msk.tif").exists()
    else:
        assert merged_mask == tmp_path / "merged" / "msk.tif"
        back = tifffile.imread(merged_mask)
        assert back.dtype == mask.dtype and np.array_equal(back, mask)


def test_metadata_has_the_original_keys_and_more(tmp_path, big_em):
    image, labels = big_em
    create_tiles(
        _write(tmp_path / "a.tif", image[:700, :900]),
        tmp_path / "t",
        256,
        mask_path=_write(tmp_path / "m.tif", labels[:700, :900]),
    )
    with tifffile.TiffFile(tmp_path / "t" / "metadata.tif") as tif:
        page = tif.pages[0]
        assert page.shape == (1, 1) and page.dtype == np.uint8
        meta = json.loads(page.description)  # where the original's merge reads it
    assert meta == {
        "original_image_shape": [700, 900],
        "padded_image_shape": [768, 1024],
        "mask_available": True,
        "tile_size": 256,
        "image_dtype": "uint8",
        "mask_dtype": "uint32",
    }
    assert read_tile_metadata(tmp_path / "t")["original_image_shape"] == (700, 900)


def test_tiles_with_the_originals_metadata_merge(tmp_path, big_em):
    """The original writes only three keys (shapes as JSON lists); its tiles merge here."""
    image, labels = big_em
    image, labels = image[:1000, :1100], labels[:1000, :1100].astype(np.uint16)
    tiles = create_tiles(
        _write(tmp_path / "a.tif", image),
        tmp_path / "t",
        384,
        mask_path=_write(tmp_path / "m.tif", labels),
    )
    original_meta = {
        "original_image_shape": (1000, 1100),
        "padded_image_shape": (1152, 1152),
        "mask_available": True,
    }
    (tiles / "metadata.tif").unlink()
    tifffile.imwrite(
        tiles / "metadata.tif",
        np.zeros((1, 1), np.uint8),
        description=json.dumps(original_meta),
        bigtiff=True,
    )
    im, msk = merge_tiles(tiles, tmp_path / "out")
    assert np.array_equal(tifffile.imread(im), image)
    assert np.array_equal(tifffile.imread(msk), labels)

    # "mask_available" missing (older metadata): the image alone
    (tiles / "metadata.tif").unlink()
    del original_meta["mask_available"]
    tifffile.imwrite(
        tiles / "metadata.tif", np.zeros((1, 1), np.uint8), description=json.dumps(original_meta)
    )
    im, msk = merge_tiles(tiles, tmp_path / "out2")
    assert msk is None and np.array_equal(tifffile.imread(im), image)


def test_edited_tiles_of_another_dtype_and_tiff_suffix(tmp_path, big_em):
    """A mask tile re-saved (as .tiff, in int32) after proofreading merges into a dtype
    that holds every tile."""
    image, labels = big_em
    image, labels = image[:600, :600], labels[:600, :600].astype(np.uint8)
    tiles = create_tiles(
        _write(tmp_path / "a.tif", image),
        tmp_path / "t",
        300,
        mask_path=_write(tmp_path / "m.tif", labels),
    )
    edited = tifffile.imread(tiles / "msk" / "300_300.tif").astype(np.int32) + 1000
    (tiles / "msk" / "300_300.tif").unlink()
    tifffile.imwrite(tiles / "msk" / "300_300.tiff", edited)
    _, msk = merge_tiles(tiles, tmp_path / "out")
    back = tifffile.imread(msk)
    assert back.dtype == np.int32
    np.testing.assert_array_equal(back[:300], labels[:300])
    np.testing.assert_array_equal(back[300:, 300:], labels[300:, 300:].astype(np.int32) + 1000)


def test_compressed_input_is_read_without_memmap_and_left_alone(tmp_path, big_em):
    image, _ = big_em
    path = _write(tmp_path / "zlib.tif", image, compression="zlib", rowsperstrip=64)
    with pytest.raises(ValueError):
        tifffile.memmap(path, mode="r")  # the case the fallback is for
    before = file_tree(tmp_path)
    create_tiles(path, tmp_path / "t", 700)
    assert file_tree(tmp_path)["zlib.tif"] == before["zlib.tif"]
    im, _ = merge_tiles(tmp_path / "t", tmp_path / "t")
    assert np.array_equal(tifffile.imread(im), image)


def test_tile_size_one_image_side_and_bool_mask(tmp_path):
    image = read_png(EM_DATA / "lucchi_train_0000_y300_x400.png")  # 128 x 128
    mask = read_png(EM_DATA / "lucchi_train_0000_y300_x400_mask.png") > 0
    tiles = create_tiles(
        _write(tmp_path / "a.tif", image),
        tmp_path / "t",
        128.0,
        mask_path=_write(tmp_path / "m.tif", mask),
    )
    assert [p.name for p in (tiles / "im").iterdir()] == ["0_0.tif"]
    im, msk = merge_tiles(tiles, tmp_path / "out")
    assert np.array_equal(tifffile.imread(im), image)
    back = tifffile.imread(msk)  # a boolean mask comes back as 0/1 uint8 (tif has no bool)
    assert back.dtype == np.uint8 and np.array_equal(back, mask)


# --------------------------------------------------------------------------------------
# never overwrite
# --------------------------------------------------------------------------------------
def test_merge_never_overwrites_and_keeps_pairs_numbered_together(tmp_path, big_em):
    image, labels = big_em
    image, labels = image[:520, :520], labels[:520, :520]
    tiles = create_tiles(
        _write(tmp_path / "a.tif", image),
        tmp_path / "t",
        512,
        mask_path=_write(tmp_path / "m.tif", labels),
    )
    out = tmp_path / "out"
    first = merge_tiles(tiles, out)
    kept = file_tree(out)
    second = merge_tiles(tiles, out)
    assert [p.name for p in second] == ["im_1.tif", "msk_1.tif"]
    assert {k: v for k, v in file_tree(out).items() if k in kept} == kept
    assert np.array_equal(tifffile.imread(second[0]), tifffile.imread(first[0]))
    # a user's own msk_2.tif: the next pair skips to 3 rather than splitting the pair
    _write(out / "msk_2.tif", np.ones((2, 2), np.uint8))
    assert [p.name for p in merge_tiles(tiles, out)] == ["im_3.tif", "msk_3.tif"]
    assert tifffile.imread(out / "msk_2.tif").shape == (2, 2)


def test_tiles_are_never_written_over_old_tiles(tmp_path, big_em):
    image, _ = big_em
    path = _write(tmp_path / "a.tif", image[:300, :300])
    create_tiles(path, tmp_path / "t", 100)
    before = file_tree(tmp_path / "t")
    with pytest.raises(PanoptemError, match="already holds tiles"):
        create_tiles(path, tmp_path / "t", 150)
    assert file_tree(tmp_path / "t") == before
    # a folder with only a metadata.tif (or only msk/) is refused too
    for name in ("metadata.tif", "msk"):
        other = tmp_path / f"other_{name}"
        if name == "msk":
            (other / name).mkdir(parents=True)
        else:
            _write(other / name, np.zeros((1, 1), np.uint8))
        with pytest.raises(PanoptemError, match=f"already holds tiles \\({name} exists\\)"):
            create_tiles(path, other, 100)
        assert not (other / "im").exists()


# --------------------------------------------------------------------------------------
# refusals, before any file is written
# --------------------------------------------------------------------------------------
def _refused(tmp_path, match, image_path, tile_size=256, mask_path=None, out="t"):
    before = file_tree(tmp_path)
    with pytest.raises(PanoptemError, match=match):
        create_tiles(image_path, tmp_path / out, tile_size, mask_path=mask_path)
    assert file_tree(tmp_path) == before and not (tmp_path / "t").exists()


def test_create_refuses_bad_inputs(tmp_path, em_volume, lucchi_image):
    good = _write(tmp_path / "good.tif", lucchi_image)
    _refused(
        tmp_path, "has shape \\(64, 128, 128\\).*2D images", _write(tmp_path / "vol.tif", em_volume)
    )
    rgb = np.stack([lucchi_image] * 3, axis=-1)
    _refused(tmp_path, "RGB.*grayscale", _write(tmp_path / "rgb.tif", rgb, photometric="rgb"))
    _refused(
        tmp_path,
        "mask has shape \\(768, 1000\\) but the image \\(768, 1024\\)",
        good,
        mask_path=_write(tmp_path / "small_mask.tif", lucchi_image[:, :1000]),
    )
    for size in (0, -5, 0.5, 12.5, "big"):
        _refused(tmp_path, "Tile size must be a whole number", good, tile_size=size)
    broken = tmp_path / "broken.tif"
    broken.write_bytes(b"II*\x00 this is no tif")
    _refused(tmp_path, "Could not read the image .*broken.tif", broken)
    _refused(tmp_path, "No such file: .*missing.tif", tmp_path / "missing.tif")
    _refused(tmp_path, "No such file: .*nomask.tif.*mask", good, mask_path=tmp_path / "nomask.tif")
    # a file where the output folder should be
    _write(tmp_path / "afile", np.zeros(1, np.uint8))
    _refused(tmp_path, "is a file, not a folder", good, out="afile")


def test_a_single_plane_stored_as_3d_is_taken(tmp_path, lucchi_image):
    path = _write(tmp_path / "one.tif", lucchi_image[None])
    create_tiles(path, tmp_path / "t", 512)
    im, _ = merge_tiles(tmp_path / "t", tmp_path / "t")
    assert np.array_equal(tifffile.imread(im), lucchi_image)


def test_merge_refuses_missing_or_wrong_tiles(tmp_path, big_em):
    image, labels = big_em
    image, labels = image[:700, :700], labels[:700, :700]
    out = tmp_path / "out"

    def refused(match, tiles):
        with pytest.raises(PanoptemError, match=match):
            merge_tiles(tiles, out)
        assert not out.exists()

    refused("No such folder", tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    refused("No metadata.tif in .*empty", tmp_path / "empty")
    tiles = create_tiles(
        _write(tmp_path / "a.tif", image),
        tmp_path / "t",
        400,
        mask_path=_write(tmp_path / "m.tif", labels),
    )
    (tiles / "msk" / "400_0.tif").unlink()
    refused("tile msk/400_0.tif is missing", tiles)
    _write(tiles / "msk" / "400_0.tif", np.zeros((400, 399), np.uint32))
    refused("tile msk/400_0.tif has shape \\(400, 399\\)", tiles)
    (tiles / "msk" / "400_0.tif").write_bytes(b"garbage")
    refused("Could not read the tile .*400_0.tif", tiles)
    (tiles / "metadata.tif").unlink()
    _write(tiles / "metadata.tif", np.zeros((1, 1), np.uint8), description="not json")
    refused("holds no tile metadata", tiles)


# --------------------------------------------------------------------------------------
# progress and cancel
# --------------------------------------------------------------------------------------
def test_progress_counts_tiles(tmp_path, big_em):
    image, labels = big_em
    seen = []
    create_tiles(
        _write(tmp_path / "a.tif", image),
        tmp_path / "t",
        1024,
        mask_path=_write(tmp_path / "m.tif", labels),
        progress=CallbackProgress(lambda *a: seen.append(a)),
    )
    assert seen[0] == ("cutting tiles", 0, 4) and seen[-1] == ("cutting tiles", 4, 4)
    seen.clear()
    merge_tiles(
        tmp_path / "t", tmp_path / "out", progress=CallbackProgress(lambda *a: seen.append(a))
    )
    assert ("merging image tiles", 4, 4) in seen and seen[-1] == ("merging mask tiles", 4, 4)


class _CancelAfter(Progress):
    def __init__(self, steps: int) -> None:
        super().__init__()
        self.steps = steps

    def on_advance(self, done, total) -> None:
        self.steps -= 1
        if self.steps <= 0:
            self.cancel()


def test_cancel_leaves_nothing_behind(tmp_path, big_em):
    image, labels = big_em
    path = _write(tmp_path / "a.tif", image)
    mask = _write(tmp_path / "m.tif", labels)
    with pytest.raises(Cancelled):
        create_tiles(path, tmp_path / "t", 500, mask_path=mask, progress=_CancelAfter(3))
    assert list((tmp_path / "t").iterdir()) == []  # no tiles, no metadata, no temp folder
    create_tiles(path, tmp_path / "t", 500, mask_path=mask)  # the folder is usable at once
    # cancelled while merging the mask: neither half of the pair stays
    with pytest.raises(Cancelled):
        merge_tiles(tmp_path / "t", tmp_path / "out", progress=_CancelAfter(25))
    assert list((tmp_path / "out").iterdir()) == []
