"""AU-PRO and AU-sPRO: hand-made cases with known answers, agreement with a straightforward port
of the official MVTec code (tests/vad_metrics_reference.py), and property tests."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vad_metrics_reference import brute_force_au_spro, official_au_pro, official_trapezoid

from vad.errors import VadError
from vad_metrics.pro import au_pro, au_spro, overlap_curve, pro_curve, trapezoid


def blob_masks(count, size, rng, good_every=3):
    """Masks with a few discs and rectangles (several 8-connected regions), some good images."""
    yy, xx = np.mgrid[:size, :size]
    masks = []
    for index in range(count):
        if index % good_every == 0:
            masks.append(None)
            continue
        mask = np.zeros((size, size), bool)
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.integers(0, size, 2)
            radius = rng.integers(1, max(2, size // 8))
            mask |= (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
        y0, x0 = rng.integers(0, size - 2, 2)
        mask[y0 : y0 + 2, x0 : x0 + 3] = True
        masks.append(mask)
    return masks


def smooth_maps(masks, size, rng, dtype=np.float32):
    """Noisy maps that score defects higher (a detector of medium quality)."""
    maps = []
    for mask in masks:
        noise = rng.normal(0, 1, (size, size))
        signal = 0 if mask is None else 1.5 * mask
        maps.append((noise + signal).astype(dtype))
    return maps


# --------------------------------------------------------------------------- known answers


def test_perfect_map_gives_one():
    mask = np.zeros((16, 16), bool)
    mask[3:6, 4:9] = True
    mask[12, 12] = True  # a one-pixel region
    maps = [mask.astype(np.float32), np.zeros((16, 16), np.float32)]
    assert au_pro(maps, [mask, None]) == pytest.approx(1.0, abs=1e-12)
    assert au_pro(maps, [mask, None], fpr_limit=1.0) == pytest.approx(1.0, abs=1e-12)


def test_inverted_map_gives_zero():
    mask = np.zeros((8, 8), bool)
    mask[2:4, 2:4] = True
    assert au_pro([(~mask).astype(float)], [mask]) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("limit", [0.05, 0.3, 1.0])
def test_constant_map_gives_half_the_limit_area(limit):
    # one threshold: the curve jumps from (0, 0) to (1, 1); the area up to x is x^2 / 2
    mask = np.zeros((10, 10), bool)
    mask[:3, :3] = True
    value = au_pro([np.full((10, 10), 0.7), np.full((10, 10), 0.7)], [mask, None], fpr_limit=limit)
    assert value == pytest.approx(limit / 2, abs=1e-12)


def test_limit_inside_a_flat_step():
    # negatives 0.9, 0.4, 0.3, 0.2 and one positive pixel at 0.5: points (0.25, 0) then (0.25, 1)
    anomaly_map = np.array([[0.5, 0.9, 0.4, 0.3, 0.2]])
    mask = np.array([[True, False, False, False, False]])
    assert au_pro([anomaly_map], [mask], fpr_limit=0.3) == pytest.approx(0.05 / 0.3, abs=1e-12)
    assert au_pro([anomaly_map], [mask], fpr_limit=0.4) == pytest.approx(0.15 / 0.4, abs=1e-12)
    assert au_pro([anomaly_map], [mask], fpr_limit=0.1) == pytest.approx(0.0, abs=1e-12)
    assert au_pro([anomaly_map], [mask], fpr_limit=0.25) == pytest.approx(0.0, abs=1e-12)


def test_ties_between_normal_and_defect_pixels_enter_together():
    # a negative and a positive share 0.8: one point (0.5, 0.5), interpolated at 0.3 -> y = 0.3
    anomaly_map = np.array([[0.8, 0.1, 0.8, 0.2]])
    mask = np.array([[True, True, False, False]])
    assert au_pro([anomaly_map], [mask], fpr_limit=0.3) == pytest.approx(0.15, abs=1e-12)
    fprs, pros = pro_curve([anomaly_map], [mask])
    assert fprs.tolist() == [0.0, 0.5, 1.0, 1.0, 1.0]
    assert pros.tolist() == [0.0, 0.5, 0.5, 1.0, 1.0]


def test_regions_are_eight_connected_and_averaged_over_all_images():
    # two diagonal pixels are ONE region (8-connectivity); the other image has one region
    first = np.zeros((4, 4), bool)
    first[0, 0] = first[1, 1] = True
    second = np.zeros((4, 4), bool)
    second[3, 3] = True
    map_first = np.zeros((4, 4))
    map_first[0, 0] = 1.0  # half of region 1 detected at the top threshold
    map_second = np.zeros((4, 4))
    map_second[3, 3] = 1.0  # region 2 fully detected
    fprs, pros = pro_curve([map_first, map_second], [first, second])
    assert fprs[1] == 0.0 and pros[1] == pytest.approx((0.5 + 1.0) / 2)


def test_good_images_add_false_positives_only():
    mask = np.zeros((8, 8), bool)
    mask[:2, :2] = True
    rng = np.random.default_rng(1)
    defect_map = rng.random((8, 8))
    alone = au_pro([defect_map], [mask], fpr_limit=1.0)
    hot_good_image = np.full((8, 8), 2.0)  # scores above everything: FPR rises before any TP
    with_good = au_pro([defect_map, hot_good_image], [mask, None], fpr_limit=1.0)
    assert with_good < alone
    assert with_good == pytest.approx(official_au_pro([defect_map, hot_good_image], [mask, None], 1.0), abs=1e-6)


def test_no_defect_anywhere_or_no_normal_pixel_is_an_error():
    with pytest.raises(VadError, match="at least one ground-truth region"):
        au_pro([np.zeros((4, 4))], [None])
    with pytest.raises(VadError, match="negative pixels"):
        au_pro([np.zeros((4, 4))], [np.ones((4, 4), bool)])


@pytest.mark.parametrize("limit", [0, -0.1, 1.5, "x", None])
def test_bad_fpr_limit(limit):
    with pytest.raises(VadError, match="fpr_limit"):
        au_pro([np.zeros((4, 4))], [np.eye(4, dtype=bool)], fpr_limit=limit)


def test_bad_inputs_are_clear_errors():
    mask = np.eye(4, dtype=bool)
    with pytest.raises(VadError, match="shape"):
        au_pro([np.zeros((4, 5))], [mask])
    with pytest.raises(VadError, match="NaN"):
        au_pro([np.full((4, 4), np.nan)], [mask])
    with pytest.raises(VadError, match="2 anomaly maps but 1"):
        au_pro([np.zeros((4, 4))] * 2, [mask])
    with pytest.raises(VadError, match="2-D"):
        au_pro([np.zeros((2, 4, 4))], [mask])
    with pytest.raises(VadError, match="no anomaly maps"):
        au_pro([], [])


def test_trapezoid_matches_the_official_one():
    x = np.array([0.0, 0.1, 0.1, 0.25, 0.5, 1.0])
    y = np.array([0.0, 0.2, 0.4, 0.5, 0.9, 1.0])
    for x_max in [0.05, 0.1, 0.3, 0.5, 0.99, 1.0, None]:
        assert trapezoid(x, y, x_max) == pytest.approx(official_trapezoid(x, y, x_max), abs=1e-15)


# --------------------------------------------------------------------------- vs the official port


@pytest.mark.parametrize("limit", [0.01, 0.05, 0.3, 1.0])
@pytest.mark.parametrize("kind", ["random", "quantized", "structured", "float64"])
def test_agrees_with_the_official_port(kind, limit):
    rng = np.random.default_rng(hash((kind, limit)) % 2**32)
    size = 48
    masks = blob_masks(9, size, rng)
    if kind == "random":
        maps = [rng.random((size, size)).astype(np.float32) for _ in masks]
        masks = [None if m is None else rng.random((size, size)) > 0.9 for m in masks]
    elif kind == "quantized":  # heavy ties, also at the truncation score
        maps = [np.round(m * 4) / 4 for m in smooth_maps(masks, size, rng)]
    elif kind == "structured":
        maps = smooth_maps(masks, size, rng)
    else:
        maps = smooth_maps(masks, size, rng, np.float64)
    assert au_pro(maps, masks, limit) == pytest.approx(official_au_pro(maps, masks, limit), abs=1e-6)


def test_agrees_with_the_official_port_at_1024():
    rng = np.random.default_rng(7)
    masks = blob_masks(3, 1024, rng, good_every=2)
    maps = smooth_maps(masks, 1024, rng)
    assert au_pro(maps, masks) == pytest.approx(official_au_pro(maps, masks), abs=1e-6)


def test_images_of_different_sizes():
    rng = np.random.default_rng(3)
    masks = [blob_masks(2, 40, rng, good_every=5)[1], blob_masks(2, 24, rng, good_every=5)[1]]
    maps = [rng.random(m.shape) + m for m in masks]
    assert au_pro(maps, masks) == pytest.approx(official_au_pro(maps, masks), abs=1e-6)


# --------------------------------------------------------------------------- properties


@st.composite
def evaluation_sets(draw):
    size = draw(st.integers(4, 12))
    count = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    levels = draw(st.integers(2, 30))  # few levels: many ties
    maps = [rng.integers(0, levels, (size, size)).astype(np.float64) for _ in range(count)]
    masks = [rng.random((size, size)) < draw(st.floats(0.05, 0.6)) for _ in range(count)]
    masks[0][0, 0] = True  # at least one region
    masks[0][-1, -1] = False  # at least one normal pixel
    return maps, masks


@settings(max_examples=60, deadline=None)
@given(evaluation_sets(), st.sampled_from([0.01, 0.05, 0.3, 1.0]))
def test_bounds_invariance_and_agreement(data, limit):
    maps, masks = data
    value = au_pro(maps, masks, limit)
    assert 0.0 <= value <= 1.0
    # strictly increasing maps that keep every distinct value distinct (integers: exact)
    for transform in (lambda m: 3.0 * m + 1.0, lambda m: m**3, np.exp):
        assert au_pro([transform(m) for m in maps], masks, limit) == pytest.approx(value, abs=1e-12)
    assert value == pytest.approx(official_au_pro(maps, masks, limit), abs=1e-6)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31), st.integers(1, 200))
def test_overlap_curve_is_monotone(seed, count):
    rng = np.random.default_rng(seed)
    negatives = rng.integers(0, 10, count).astype(float)
    positives = rng.integers(0, 10, count).astype(float)
    fprs, pros = overlap_curve(negatives, positives, np.full(count, 1 / count), 1, 0.3)
    assert np.all(np.diff(fprs) >= 0) and np.all(np.diff(pros) >= -1e-12)
    assert fprs[-1] == 1.0 and pros[-1] == 1.0


# --------------------------------------------------------------------------- AU-sPRO


def test_spro_with_full_saturation_is_pro():
    rng = np.random.default_rng(5)
    masks = blob_masks(6, 32, rng)
    maps = smooth_maps(masks, 32, rng, np.float64)
    from scipy import ndimage

    regions = []
    for mask in masks:
        if mask is None:
            regions.append([])
            continue
        labeled, count = ndimage.label(mask, structure=np.ones((3, 3)))
        regions.append([(labeled == k, float((labeled == k).sum())) for k in range(1, count + 1)])
    assert au_spro(maps, regions) == pytest.approx(au_pro(maps, masks), abs=1e-9)


def test_spro_saturates():
    # one region of 4 pixels, saturation 2: detecting 2 of them is full overlap
    anomaly_map = np.array([[0.9, 0.8, 0.1, 0.1, 0.5, 0.4, 0.3, 0.2]])
    region = np.array([[True, True, True, True, False, False, False, False]])
    fprs_limit = 0.25
    assert au_spro([anomaly_map], [[(region, 2)]], fprs_limit) == pytest.approx(1.0, abs=1e-12)
    assert au_spro([anomaly_map], [[(region, 4)]], fprs_limit) == pytest.approx(0.5, abs=1e-12)


@pytest.mark.parametrize("limit", [0.05, 0.3, 1.0])
def test_spro_agrees_with_brute_force(limit):
    rng = np.random.default_rng(11)
    maps, regions = [], []
    for index in range(6):
        anomaly_map = np.round(rng.random((12, 12)) * 20) / 20  # ties
        entries = []
        if index % 3:
            for _ in range(rng.integers(1, 3)):  # overlapping annotations
                mask = np.zeros((12, 12), bool)
                y, x = rng.integers(0, 9, 2)
                mask[y : y + rng.integers(1, 4), x : x + rng.integers(1, 4)] = True
                entries.append((mask, float(rng.uniform(0.5, mask.sum() * 1.5))))
        maps.append(anomaly_map)
        regions.append(entries)
    assert au_spro(maps, regions, limit) == pytest.approx(brute_force_au_spro(maps, regions, limit), abs=1e-9)


def test_spro_bad_regions():
    with pytest.raises(VadError, match="empty mask"):
        au_spro([np.zeros((3, 3))], [[(np.zeros((3, 3), bool), 1.0)]])
    with pytest.raises(VadError, match="saturation area"):
        au_spro([np.zeros((3, 3))], [[(np.eye(3, dtype=bool), 0.0)]])


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31), st.integers(5, 300), st.sampled_from([0.01, 0.05, 0.3, 0.9]))
def test_truncated_curve_gives_the_full_curves_area(seed, count, limit):
    from vad_metrics.pro import area_under_curve

    rng = np.random.default_rng(seed)
    negatives = rng.integers(0, 6, count * 3).astype(np.float32)  # ties at the cut
    positives = rng.integers(0, 8, count).astype(np.float32)
    weights = rng.random(count)
    full = area_under_curve(*overlap_curve(negatives, positives, weights, 5, None), limit)
    truncated = area_under_curve(*overlap_curve(negatives, positives, weights, 5, limit), limit)
    assert truncated == pytest.approx(full, abs=1e-12)
