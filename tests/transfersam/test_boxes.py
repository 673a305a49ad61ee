"""Kidney boxes, box growth and the ROI box on hand-built masks with hand-computed boxes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from slidesam.transfersam.boxes import (
    expand_box_mean,
    expand_box_random,
    kidney_boxes,
    remove_small_components,
    roi_box,
    scale_px,
)
from slidesam.transfersam.config import BoxConfig


def _mask(shape, *rects):
    m = np.zeros(shape, bool)
    for y0, y1, x0, x1 in rects:  # inclusive
        m[y0 : y1 + 1, x0 : x1 + 1] = True
    return m


def test_a_jump_of_exactly_the_gap_splits():
    m = _mask((512, 512), (10, 20, 100, 240), (30, 40, 280, 400))  # 280 - 240 = 40
    kb = kidney_boxes(m, BoxConfig())
    assert kb.split_x == 260
    np.testing.assert_array_equal(kb.boxes, [[100, 10, 240, 20], [280, 30, 400, 40]])


def test_two_kidneys_are_split_at_the_gap_middle():
    # 512 px: left kidney x 100..180, right x 300..380: extent 280 >= 100, gap 120 >= 40
    m = _mask((512, 512), (200, 260, 100, 180), (210, 280, 300, 380))
    kb = kidney_boxes(m, BoxConfig())
    assert kb.split_x == (180 + 300) // 2 == 240
    np.testing.assert_array_equal(kb.boxes, [[100, 200, 180, 260], [300, 210, 380, 280]])
    assert kb.regions(512) == [slice(0, 240), slice(240, 512)]


@pytest.mark.parametrize(
    ("rects", "box"),
    [
        # extent 80 < 100: one box even with a 50 px gap inside
        ([(10, 20, 100, 120), (30, 40, 171, 180)], [100, 10, 180, 40]),
        # extent 300 but the largest jump between occupied columns is 279 - 240 = 39 < 40
        ([(10, 20, 100, 240), (30, 40, 279, 400)], [100, 10, 400, 40]),
    ],
)
def test_one_box_when_narrow_or_without_a_wide_gap(rects, box):
    kb = kidney_boxes(_mask((512, 512), *rects), BoxConfig())
    assert kb.split_x is None
    np.testing.assert_array_equal(kb.boxes, [box])


def test_thresholds_scale_with_the_width():
    # at 128 px: extent >= 25, gap >= 10. Kidneys x 20..40 and 60..80: gap 20 -> split at 50
    m = _mask((128, 128), (50, 60, 20, 40), (50, 60, 60, 80))
    kb = kidney_boxes(m, BoxConfig())
    assert kb.split_x == 50
    # the same gap of 20 px on a 512 px slice is below 40: no split
    big = _mask((512, 512), (50, 60, 20, 40), (50, 60, 60, 80))
    assert kidney_boxes(big, BoxConfig()).split_x is None
    assert scale_px(40, 128) == 10


def test_empty_mask_has_no_box():
    kb = kidney_boxes(np.zeros((64, 64), bool), BoxConfig())
    assert kb.boxes.shape == (0, 4)
    assert kb.split_x is None


def test_random_growth_statistics_and_cap():
    cfg = BoxConfig()
    box = np.array([100.0, 200.0, 180.0, 400.0])  # width 80, height 200
    rng = np.random.default_rng(0)
    grown = np.stack([expand_box_random(box, (512, 512), cfg, rng) for _ in range(4000)])
    grow = np.abs(grown - box)
    # x sides: |N(0, 8)| (below the 20 px cap almost always): mean 8 * sqrt(2/pi) = 6.38
    assert grow[:, [0, 2]].mean() == pytest.approx(8 * math.sqrt(2 / math.pi), rel=0.05)
    # y sides: |N(0, 20)| capped at 20: E = 20 * (sqrt(2/pi) (1 - e^-1/2) + P(|Z| > 1)) = 13.17
    expect = 20 * (math.sqrt(2 / math.pi) * (1 - math.exp(-0.5)) + 2 * (1 - 0.841344746))
    assert grow[:, [1, 3]].mean() == pytest.approx(expect, rel=0.05)
    assert grow.max() <= 20.0
    assert (grown[:, :2] <= box[:2]).all()
    assert (grown[:, 2:] >= box[2:]).all()


def test_growth_cap_scales_and_boxes_stay_inside():
    cfg = BoxConfig()
    box = np.array([0.0, 10.0, 127.0, 120.0])
    rng = np.random.default_rng(1)
    g = np.stack([expand_box_random(box, (128, 128), cfg, rng) for _ in range(500)])
    assert (g[:, 0] == 0).all()
    assert (g[:, 2] <= 128).all()
    assert (g[:, 3] <= 128).all()
    assert (g[:, 1] >= 10 - 5.0).all()  # cap 20 px at 512 = 5 px at 128


def test_mean_growth_is_the_expected_value():
    cfg = BoxConfig()
    box = np.array([100.0, 100.0, 150.0, 400.0])  # width 50 -> 5*sqrt(2/pi); height 300 -> cap 20
    out = expand_box_mean(box, (512, 512), cfg)
    d = 5 * math.sqrt(2 / math.pi)
    np.testing.assert_allclose(out, [100 - d, 80, 150 + d, 420])


def test_roi_box_is_the_seeds_box_at_512_and_scales():
    np.testing.assert_allclose(roi_box((512, 512), BoxConfig()), [0, 100, 512, 450])
    np.testing.assert_allclose(roi_box((256, 128), BoxConfig()), [0, 50, 128, 225])


def test_small_components_are_removed():
    m = _mask((64, 64), (0, 1, 0, 1), (10, 19, 10, 19), (40, 40, 40, 44))  # 4, 100 and 5 px
    kept = remove_small_components(m, 5)
    assert kept.sum() == 105
    assert not kept[0, 0]
