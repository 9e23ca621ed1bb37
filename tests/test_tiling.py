"""Tile layout and stitching: tiled results equal untiled ones on a grid of disks."""

import cc3d
import numpy as np
import pytest

from panoptem.inference.tiling import axis_tiles, min_overlap, segment_tiled, tile_grid


@pytest.mark.parametrize(
    "length,tile", [(1000, 256), (1024, 512), (5000, 1280), (300, 256), (257, 256)]
)
def test_axis_tiles_cover_with_minimum_overlap(length, tile):
    spans = axis_tiles(length, tile)
    assert spans[0][0] == 0 and spans[-1][1] == length
    assert all(b - a == tile for a, b in spans)
    seams = [spans[i][1] - spans[i + 1][0] for i in range(len(spans) - 1)]
    assert min(seams) >= min_overlap(tile)
    assert max(seams) - min(seams) <= 1
    # minimal: one tile fewer could not keep the seams wide enough
    n = len(spans)
    if n > 2:
        assert ((n - 1) * tile - length) / (n - 2) < min_overlap(tile)


def test_short_axis_gets_one_tile():
    assert axis_tiles(200, 1280) == [(0, 200)]
    tiles = tile_grid((200, 3000), 1280)
    assert {(t.y0, t.y1) for t in tiles} == {(0, 200)}
    assert len(tiles) == 3
    # x-major enumeration: the outer loop runs over x
    assert [t.x0 for t in tile_grid((600, 600), 256)][:3] == [0, 0, 0]


def disk_grid(shape, radius, spacing, offset=0):
    yy, xx = np.indices(shape)
    img = np.zeros(shape, np.uint8)
    for cy in range(offset + radius + 2, shape[0] - radius - 1, spacing):
        for cx in range(offset + radius + 2, shape[1] - radius - 1, spacing):
            img[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = 255
    return img


def cc_segment(image, div=1000):
    """Stand-in for the model: connected components of bright pixels as class-1 objects."""
    cc = cc3d.connected_components(image > 0, connectivity=8).astype(np.int32)
    return np.where(cc > 0, div + cc, 0).astype(np.int32)


def f1_same_objects(a, b):
    """Instance F1 at IoU 0.5 (objects of a against objects of b)."""
    ids_a = [i for i in np.unique(a) if i]
    ids_b = [i for i in np.unique(b) if i]
    matched = 0
    for i in ids_a:
        m = a == i
        j = np.bincount(b[m]).argmax() if b[m].any() else 0
        if j and (m & (b == j)).sum() / (m | (b == j)).sum() > 0.5:
            matched += 1
    return 2 * matched / (len(ids_a) + len(ids_b))


@pytest.mark.parametrize(
    "shape,tile,radius,spacing",
    [
        ((700, 900), 256, 12, 37),  # many disks cut by seams
        ((513, 1100), 300, 20, 61),  # large disks, uneven seams
        ((90, 1500), 256, 15, 40),  # an image thinner than a tile
    ],
)
def test_tiled_equals_untiled_on_disk_grid(shape, tile, radius, spacing):
    img = disk_grid(shape, radius, spacing)
    untiled = cc_segment(img)
    tiled = segment_tiled(shape, tile, lambda t: cc_segment(img[t.slices]), [1], 1000)
    assert tiled.dtype == np.int32
    assert f1_same_objects(untiled, tiled) == 1.0
    # exactly the same pixels and partition, and ids numbered 1..N per class
    np.testing.assert_array_equal(tiled > 0, untiled > 0)
    assert len(np.unique(tiled)) == len(np.unique(untiled))
    assert sorted(np.unique(tiled))[-1] == 1000 + len(np.unique(untiled)) - 1


def test_seam_crossing_object_is_whole():
    img = np.zeros((300, 600), np.uint8)
    img[100:140, 150:450] = 255  # a long bar crossing every vertical seam
    tiled = segment_tiled(img.shape, 200, lambda t: cc_segment(img[t.slices]), [1], 1000)
    assert np.unique(tiled[img > 0]).tolist() == [1001]


def test_unconfirmed_fragment_in_seam_is_dropped():
    """A detection only one tile makes, lying mostly in a seam, is a cut-off fragment."""
    img = np.zeros((256, 500), np.uint8)
    tiles = tile_grid(img.shape, 256)
    seam_x = tiles[1].x0  # start of the second column of tiles

    def fake(t):
        out = np.zeros((t.y1 - t.y0, t.x1 - t.x0), np.int32)
        if t.x0 == 0:  # only the first tile "sees" a blob inside the seam
            out[50:60, seam_x + 2 - t.x0 : seam_x + 12 - t.x0] = 1001
            out[10:20, 10:20] = 1002  # and a normal object away from the seam
        return out

    res = segment_tiled(img.shape, 256, fake, [1], 1000)
    assert res[55, seam_x + 5] == 0
    assert res[15, 15] == 1001
