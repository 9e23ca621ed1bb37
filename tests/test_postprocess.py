"""Post-processing on hand-made model heads with known answers."""

import numpy as np
import pytest
import torch

from panoptem.errors import PanoptemError
from panoptem.inference import postprocess
from panoptem.inference.postprocess import (
    _block_any,
    class_counts,
    class_mask,
    connected_panoptic_codes,
    fill_holes,
    find_instance_centers,
    group_pixels,
    harden_semantic,
    merge_semantic_and_instance,
    panoptic_from_heads,
    panoptic_from_probs,
    relabel_connected,
)


def gaussian_peaks(shape, peaks, sigma=2.0):
    yy, xx = np.indices(shape)
    h = np.zeros(shape, np.float32)
    for y, x, a in peaks:
        h = np.maximum(h, a * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * sigma**2)))
    return torch.from_numpy(h)


def test_centres_are_local_maxima_above_threshold():
    hmp = gaussian_peaks((40, 40), [(10, 10, 0.9), (10, 30, 0.5), (30, 20, 0.05)])
    centres = find_instance_centers(hmp, threshold=0.1, min_distance=3)
    assert centres.tolist() == [[10, 10], [10, 30]]  # the 0.05 peak is below threshold
    assert find_instance_centers(hmp, threshold=0.6, min_distance=3).tolist() == [[10, 10]]


def test_min_distance_suppresses_close_peaks():
    hmp = gaussian_peaks((40, 40), [(20, 15, 0.9), (20, 19, 0.8)], sigma=1.0)
    assert len(find_instance_centers(hmp, 0.1, min_distance=3)) == 2
    # a window of 9 sees both peaks: only the higher survives
    assert find_instance_centers(hmp, 0.1, min_distance=9).tolist() == [[20, 15]]
    # even window sizes work and keep the output shape
    assert find_instance_centers(hmp, 0.1, min_distance=4).shape[1] == 2


def test_no_centres_gives_no_instances():
    assert find_instance_centers(torch.zeros(8, 8), 0.1, 3).shape == (0, 2)
    ids = group_pixels(np.zeros((0, 2)), np.zeros((2, 8, 8)), step=4)
    assert not ids.any()


def test_grouping_follows_offsets_to_nearest_centre():
    h, w = 8, 16
    centres = np.array([[4, 4], [4, 12]])
    yy, xx = np.indices((h, w))
    # every pixel points at the left centre, except the right half points right
    target = np.where(xx < 8, 4, 12)
    offsets = np.stack([(4 - yy) * 1.0, (target - xx) * 1.0])
    ids = group_pixels(centres, offsets, step=1)
    assert (ids[:, :8] == 1).all() and (ids[:, 8:] == 2).all()
    # on a coarse grid positions and centres scale by the step; offsets are input pixels
    ids4 = group_pixels(centres, offsets * 4, step=4)
    np.testing.assert_array_equal(ids4, ids)
    # masked pixels stay 0
    mask = np.zeros((h, w), bool)
    mask[0, 0] = True
    assert group_pixels(centres, offsets, 1, mask=mask).sum() == 1


def test_harden_single_and_multi_class():
    p = torch.tensor([[[0.2, 0.5, 0.9]]])
    assert harden_semantic(p, 0.5).tolist() == [[0, 1, 1]]
    p3 = torch.tensor([[[0.7, 0.1]], [[0.2, 0.1]], [[0.1, 0.8]]])
    assert harden_semantic(p3, 0.99).tolist() == [[0, 2]]


def test_merge_label_divisor_and_per_class_numbering():
    sem = np.array([[1, 1, 0, 2, 2, 3, 3]])
    ins = np.array([[5, 5, 0, 7, 9, 0, 0]])
    pan = merge_semantic_and_instance(sem, ins, thing_list=[1, 2], label_divisor=1000, stuff_area=1)
    assert pan.tolist() == [[1001, 1001, 0, 2001, 2002, 3000, 3000]]
    assert (pan // 1000).tolist() == [[1, 1, 0, 2, 2, 3, 3]]


def test_merge_instance_class_is_majority():
    sem = np.array([[1, 1, 2, 0]])
    ins = np.array([[4, 4, 4, 0]])
    pan = merge_semantic_and_instance(sem, ins, [1, 2], 100, stuff_area=1)
    assert pan.tolist() == [[101, 101, 101, 0]]


def test_merge_numbers_the_instances_present_on_thing_pixels():
    sem = np.array([[1, 1, 1, 0], [1, 1, 1, 0]], np.uint8)
    ins = np.array([[5, 5, 2, 4], [5, 5, 2, 4]], np.int32)  # 4 only on background
    out = merge_semantic_and_instance(sem, ins, [1], 1000)
    assert out.tolist() == [[1002, 1002, 1001, 0], [1002, 1002, 1001, 0]]


def test_stuff_area_threshold():
    sem = np.zeros((10, 10), np.uint8)
    sem[:3, :3] = 2  # 9 px of stuff class 2
    ins = np.zeros((10, 10), np.int32)
    assert merge_semantic_and_instance(sem, ins, [1], 1000, stuff_area=9).max() == 2000
    assert merge_semantic_and_instance(sem, ins, [1], 1000, stuff_area=10).max() == 0


def test_thing_pixels_without_centre_are_void():
    sem = np.ones((4, 4), np.uint8)
    pan = merge_semantic_and_instance(sem, np.zeros((4, 4), np.int32), [1], 1000)
    assert not pan.any()


def test_too_many_objects_for_label_divisor():
    sem = np.ones((1, 12), np.uint8)
    ins = np.arange(1, 13)[None]
    with pytest.raises(PanoptemError, match="Max objects per class"):
        merge_semantic_and_instance(sem, ins, [1], 10)


def disk_heads(shape=(64, 64), disks=((20, 20, 8), (40, 44, 10)), step=4):
    """Logits, coarse heat map and offsets of perfect predictions for some disks."""
    yy, xx = np.indices(shape)
    logits = np.full(shape, -10.0, np.float32)
    owner = np.zeros(shape, np.int64)
    for i, (cy, cx, r) in enumerate(disks, 1):
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        logits[inside] = 10.0
        owner[inside] = i
    gh, gw = shape[0] // step, shape[1] // step
    hmp = gaussian_peaks((gh, gw), [(cy / step, cx / step, 1.0) for cy, cx, _ in disks])
    gy, gx = np.indices((gh, gw)) * step
    dy = np.zeros((gh, gw), np.float32)
    dx = np.zeros((gh, gw), np.float32)
    for cy, cx, _ in disks:
        near = ((gy - cy) ** 2 + (gx - cx) ** 2) < 16**2
        dy[near], dx[near] = (cy - gy)[near], (cx - gx)[near]
    return (torch.from_numpy(logits)[None], hmp, torch.from_numpy(np.stack([dy, dx])), owner)


def test_panoptic_from_heads_two_disks():
    sem, hmp, off, owner = disk_heads()
    pan = panoptic_from_heads(sem, hmp, off, thing_list=[1], label_divisor=10000)
    assert sorted(np.unique(pan)) == [0, 10001, 10002]
    for k in (1, 2):
        ids = np.unique(pan[owner == k])
        assert len(ids) == 1 and ids[0] > 0
    assert (pan[owner == 0] == 0).all()


def test_semantic_only_gives_one_label_per_class():
    sem, hmp, off, owner = disk_heads()
    pan = panoptic_from_heads(
        sem, hmp, off, thing_list=[1], label_divisor=10000, semantic_only=True
    )
    assert sorted(np.unique(pan)) == [0, 10000]
    assert ((pan == 10000) == (owner > 0)).all()


def test_inconsistent_head_shapes_are_reported():
    sem, hmp, off, _ = disk_heads()
    with pytest.raises(PanoptemError, match="interface"):
        panoptic_from_heads(sem, hmp[:10], off, thing_list=[1])


def test_relabel_connected_splits_and_numbers_in_raster_order():
    pan = np.zeros((5, 8), np.int32)
    pan[0, 5:7] = 1007  # first in raster order
    pan[3:5, 0:2] = 1003
    pan[3:5, 6:8] = 1003  # second piece of the same id
    pan[2, 2] = 2000  # stuff / other class untouched
    out = relabel_connected(pan, [1], 1000)
    assert out[0, 5] == 1001 and out[3, 0] == 1002 and out[3, 6] == 1003
    assert out[2, 2] == 2000


def test_fill_holes_fills_own_holes_only():
    lab = np.zeros((12, 12), np.int32)
    lab[1:10, 1:10] = 10001
    lab[3:7, 3:7] = 0  # a hole in object 1 ...
    lab[4:6, 4:6] = 10002  # ... holding object 2, which must survive
    lab[0:3, 10:12] = 10003  # a neighbour touching the bbox
    out = fill_holes(lab)
    assert (out[4:6, 4:6] == 10002).all()
    assert (out[3, 3:7] == 10001).all()  # the empty part of the hole is filled
    assert (out[0:3, 10:12] == 10003).all()
    assert out[11, 11] == 0
    # a ring of two objects does not enclose anything of either
    ring = np.zeros((7, 7), np.int32)
    ring[1:6, 1:4] = 1
    ring[1:6, 4:6] = 2
    ring[3, 3:5] = 0
    assert (fill_holes(ring)[3, 3:5] == 0).all()


@pytest.mark.parametrize("classes", [[], [1], [0, 2], [2, 300, -1], list(range(12))])
def test_class_masks_and_counts_by_comparison_and_by_table(classes):
    rng = np.random.default_rng(0)
    for top in (1, 3, 20):  # few classes are compared one by one, many go through tables
        sem = rng.integers(0, top + 1, (30, 40)).astype(np.uint8)
        assert np.array_equal(class_mask(sem, classes), np.isin(sem, classes))
        assert class_counts(sem).tolist() == np.bincount(sem.ravel(), minlength=top + 1).tolist()
    assert class_counts(np.zeros((0, 4), np.uint8)).tolist() == [0]


@pytest.mark.parametrize("factor", [1, 2, 4, 8, 16])
def test_block_any_reads_every_pixel_of_each_block(factor):
    rng = np.random.default_rng(factor)
    h, w = 7, 5
    mask = np.zeros((h * factor, w * factor), bool)
    ys, xs = rng.integers(0, h * factor, 9), rng.integers(0, w * factor, 9)
    mask[ys, xs] = True  # single pixels, anywhere in their block
    expected = np.zeros((h, w), bool)
    expected[ys // factor, xs // factor] = True
    assert np.array_equal(_block_any(mask, factor, (h, w)), expected)


def real_heads(lucchi_image, downsampling=1):
    """The bundled model's raw outputs on a real EM crop whose sides the model pads."""
    from panoptem.demo import DEMO_MODEL
    from panoptem.inference.engine import Engine2D, Params2D
    from panoptem.inference.preprocess import to_unit_range

    p = Params2D(downsampling=downsampling).validated()
    image = to_unit_range(lucchi_image[:401, :522], None)
    probs, ctr, off = Engine2D(DEMO_MODEL).outputs_batch([image], p)[0]
    return probs, ctr, off, (401, 522)


def merged_then_connected(probs, ctr, off, crop, **kw):
    pan = panoptic_from_probs(probs, ctr, off, **kw)[: crop[0], : crop[1]]
    return pan if kw.get("semantic_only") else relabel_connected(pan, kw["thing_list"], kw["label_divisor"])


def assert_codes_equal(probs, ctr, off, crop, **kw):
    expected = merged_then_connected(probs, ctr, off, crop, **kw)
    codes, ids = connected_panoptic_codes(probs, ctr, off, crop=crop, **kw)
    assert ids[0] == 0 and len(set(ids.tolist())) == len(ids)
    assert (np.bincount(codes.ravel(), minlength=len(ids))[1:] > 0).all()  # each id is there
    assert np.array_equal(ids[codes], expected)
    return expected


def test_connected_codes_of_one_thing_class_skip_the_merge(lucchi_image, monkeypatch):
    """A slice with one thing class (here also a stuff class) takes the short way, without
    the merge and the relabelling, and gives their result."""
    probs, ctr, off, crop = real_heads(lucchi_image)
    # background, mitochondria, and a stuff class on the darkest third of the background
    h, w = probs.shape[-2:]  # the padded size
    dark = (1 - probs) * (torch.from_numpy(lucchi_image[:h, :w]).float() < 90)[None]
    three = torch.cat([1 - probs - dark * 0.6, probs, dark * 0.6 + 1e-3], 0)
    n_stuff = int((three.argmax(0) == 2).sum())  # on the whole padded image, as the merge counts
    cases = [(probs, dict(thing_list=[1])), (three, dict(thing_list=[1])),
             (probs, dict(thing_list=[1], min_distance=51)),
             (three, dict(thing_list=[1], stuff_area=n_stuff)),
             (three, dict(thing_list=[1], stuff_area=n_stuff + 1))]
    expected = [merged_then_connected(p, ctr, off, crop, label_divisor=1000, **kw) for p, kw in cases]
    assert len(np.unique(expected[0])) > 5 and (expected[1] == 2000).sum() > 64
    assert len(np.unique(expected[1] // 1000)) == 3  # void, mitochondria and the stuff class
    assert not np.array_equal(expected[0], expected[2])
    assert np.array_equal(expected[3], expected[1]) and not (expected[4] % 1000 == 0).all()
    assert not (expected[4] == 2000).any()  # one pixel short of the stuff area

    def no_merge(*args, **kwargs):
        raise AssertionError("the short way merged")

    monkeypatch.setattr(postprocess, "panoptic_from_probs", no_merge)
    for (p, kw), exp in zip(cases, expected, strict=True):
        codes, ids = connected_panoptic_codes(p, ctr, off, crop=crop, label_divisor=1000, **kw)
        assert np.array_equal(ids[codes], exp)


@pytest.mark.parametrize("kw", [dict(thing_list=[1, 2]), dict(thing_list=[2]),
                                dict(thing_list=[1], semantic_only=True),
                                dict(thing_list=[1], downsampling=2),
                                dict(thing_list=[1], stuff_area=10 ** 6)])
def test_connected_codes_equal_merge_then_relabel(lucchi_image, kw):
    kw = dict(label_divisor=1000, **kw)
    probs, ctr, off, crop = real_heads(lucchi_image, kw.get("downsampling", 1))
    if kw["thing_list"] != [1]:  # two thing classes: mitochondria split at a column
        right = torch.zeros_like(probs)
        right[..., probs.shape[-1] // 2:] = 1
        probs = torch.cat([1 - probs, probs * (1 - right), probs * right], 0)
    labels = assert_codes_equal(probs, ctr, off, crop, **kw)
    assert len(np.unique(labels)) > (1 if kw.get("semantic_only") else 3)


def test_connected_codes_report_too_many_objects_like_the_merge(lucchi_image):
    probs, ctr, off, crop = real_heads(lucchi_image)
    with pytest.raises(PanoptemError, match="Max objects per class") as merged:
        merged_then_connected(probs, ctr, off, crop, thing_list=[1], label_divisor=3)
    with pytest.raises(PanoptemError, match="Max objects per class") as coded:
        connected_panoptic_codes(probs, ctr, off, crop=crop, thing_list=[1], label_divisor=3)
    assert str(coded.value) == str(merged.value)
