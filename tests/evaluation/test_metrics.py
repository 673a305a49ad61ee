"""Metrics against values computed by hand (MONAI test style: parametrized expected values)."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from slidesam.core import KITS_REGIONS, InputError
from slidesam.evaluation.metrics import RegionScores, binary_scores, label_scores


def _cube(shape, start, size=10) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[tuple(slice(s, s + size) for s in start)] = True
    return mask


# --- overlap ------------------------------------------------------------------------------------
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_cubes_shifted_by_half_their_side(axis):
    shift = [2, 2, 2]
    shift[axis] += 5  # overlap 5 x 10 x 10 = 500 of 1000 voxels each
    s = binary_scores(_cube((20, 20, 20), (2, 2, 2)), _cube((20, 20, 20), shift), spacing=(1, 1, 1))
    assert s.dice == pytest.approx(0.5)  # 2 * 500 / 2000
    assert s.iou == pytest.approx(1 / 3)  # 500 / 1500
    assert (s.gt_voxels, s.pred_voxels) == (1000, 1000)


def test_identical_masks_score_perfectly():
    cube = _cube((14, 14, 14), (2, 2, 2))
    assert binary_scores(cube, cube, spacing=(2.5, 0.7, 0.7)) == RegionScores(
        dice=1.0, iou=1.0, hd95=0.0, nsd=1.0, gt_voxels=1000, pred_voxels=1000
    )


def test_numeric_zero_one_masks_equal_bool_masks():
    a, b = _cube((16, 16, 16), (1, 1, 1)), _cube((16, 16, 16), (3, 2, 1))
    assert binary_scores(a.astype(np.uint8), b.astype(np.float32), spacing=(1, 1, 1)) == (
        binary_scores(a, b, spacing=(1, 1, 1))
    )


# --- surface distances --------------------------------------------------------------------------
@pytest.mark.filterwarnings("error")  # no MONAI warnings leak out
@pytest.mark.parametrize(
    ("tolerance_mm", "nsd"),
    [(5.0, 0.0), (7.4, 0.0), (7.5, 1.0), (8.0, 1.0)],  # a distance equal to tau is correct
)
def test_parallel_plates_three_slices_apart(tolerance_mm, nsd):
    # one-voxel-thick plates: every voxel is surface; each lies 3 slices x 2.5 mm from the other
    gt, pred = np.zeros((12, 10, 10), bool), np.zeros((12, 10, 10), bool)
    gt[2, 2:8, 2:8] = True
    pred[5, 2:8, 2:8] = True
    s = binary_scores(pred, gt, spacing=(2.5, 1.0, 1.0), tolerance_mm=tolerance_mm)
    assert s.hd95 == 7.5
    assert s.nsd == nsd
    assert s.dice == 0.0


@pytest.mark.parametrize(
    ("spacing", "hd95"),
    [
        ((1.0, 1.0, 1.0), 3.0),
        ((1.0, 1.0, 2.0), 6.0),  # the x spacing doubles the distance
        ((2.0, 1.0, 1.0), 3.0),  # z and y spacing do not enter a shift along x
        ((1.0, 3.0, 1.0), 3.0),
    ],
)
def test_spacing_is_applied_per_axis_in_zyx_order(spacing, hd95):
    gt, pred = np.zeros((10, 10, 10), bool), np.zeros((10, 10, 10), bool)
    gt[2:8, 2:8, 2] = True  # plates perpendicular to x, 3 columns apart
    pred[2:8, 2:8, 5] = True
    assert binary_scores(pred, gt, spacing=spacing).hd95 == pytest.approx(hd95)


def test_single_voxels_give_the_euclidean_distance_in_mm():
    gt, pred = np.zeros((8, 8, 8), bool), np.zeros((8, 8, 8), bool)
    gt[2, 2, 2] = True
    pred[3, 4, 5] = True  # offset (1, 2, 3) voxels -> (2.5, 2, 3) mm
    s = binary_scores(pred, gt, spacing=(2.5, 1.0, 1.0), tolerance_mm=4.3)
    assert s.hd95 == pytest.approx(math.sqrt(2.5**2 + 2**2 + 3**2), rel=1e-6)
    assert s.nsd == 0.0  # sqrt(19.25) = 4.39 > 4.3


def test_hd95_ignores_a_single_outlier_voxel():
    gt = np.zeros((12, 12, 12), bool)
    gt[2, 1:11, 1:11] = True  # 100 surface voxels
    pred = gt.copy()
    pred[10, 5, 5] = True  # 8 mm away: pred->gt distances are 100 x 0 and one 8
    s = binary_scores(pred, gt, spacing=(1, 1, 1), tolerance_mm=2.0)
    assert s.hd95 == 0.0  # the 95th percentile of 101 values, 100 of them 0
    assert s.dice == pytest.approx(200 / 201)
    assert s.nsd == pytest.approx(200 / 201)  # (100 + 100) / (101 + 100)


def test_hd95_is_symmetric_and_interpolates_the_percentile():
    # gt: a 10 x 20 plate; pred: its first column. pred->gt distances are all 0; gt->pred are
    # x = 0..19, ten of each (200 values); q95 at position 0.95 * 199 = 189.05 -> 18.05 mm
    gt, pred = np.zeros((5, 10, 20), bool), np.zeros((5, 10, 20), bool)
    gt[2, :, :] = True
    pred[2, :, 0] = True
    forward = binary_scores(pred, gt, spacing=(1, 1, 1)).hd95
    backward = binary_scores(gt, pred, spacing=(1, 1, 1)).hd95
    assert forward == pytest.approx(18.05, abs=1e-4)
    assert backward == forward


# --- empty masks (KiTS convention for Dice and NSD) --------------------------------------------
@pytest.mark.parametrize(
    ("pred_empty", "gt_empty", "expected"),
    [
        (True, True, (1.0, 1.0, 0.0, 1.0)),
        (True, False, (0.0, 0.0, math.nan, 0.0)),
        (False, True, (0.0, 0.0, math.nan, 0.0)),
    ],
)
def test_empty_conventions(pred_empty, gt_empty, expected):
    cube = _cube((12, 12, 12), (1, 1, 1))
    empty = np.zeros_like(cube)
    s = binary_scores(empty if pred_empty else cube, empty if gt_empty else cube, spacing=(1, 1, 1))
    got = (s.dice, s.iou, s.hd95, s.nsd)
    np.testing.assert_equal(got, expected)  # NaN == NaN here
    assert (s.pred_voxels, s.gt_voxels) == (0 if pred_empty else 1000, 0 if gt_empty else 1000)


# --- label maps and regions ---------------------------------------------------------------------
def test_label_scores_per_region_by_hand():
    gt = np.zeros((6, 10, 10), np.uint8)
    gt[1:5, 1:9, 1:5] = 1  # kidney: 128 voxels
    gt[1:5, 1:5, 5:9] = 2  # tumor: 64
    gt[1:5, 5:9, 5:9] = 3  # cyst: 64
    pred = np.zeros_like(gt)
    pred[1:5, 1:9, 1:5] = 1  # kidney exact
    pred[1:5, 1:9, 5:9] = 2  # tumor over tumor and cyst: 128 voxels
    regions = {**KITS_REGIONS, "kidney": (1,), "cyst": (3,), "label_4": (4,)}
    s = label_scores(pred, gt, spacing=(2.0, 0.8, 0.8), regions=regions)
    assert list(s) == list(regions)
    assert s["kidney_and_masses"].dice == 1.0  # both are the same 256-voxel box
    assert s["masses"].dice == 1.0  # both are [1:5, 1:9, 5:9]
    assert s["tumor"].dice == pytest.approx(2 / 3)  # 2 * 64 / (128 + 64)
    assert s["tumor"].iou == pytest.approx(0.5)  # 64 / 128
    assert (s["tumor"].gt_voxels, s["tumor"].pred_voxels) == (64, 128)
    assert s["kidney"] == RegionScores(1.0, 1.0, 0.0, 1.0, 128, 128)
    assert (s["cyst"].dice, s["cyst"].nsd) == (0.0, 0.0)
    assert math.isnan(s["cyst"].hd95)
    assert s["label_4"] == RegionScores(1.0, 1.0, 0.0, 1.0, 0, 0)  # absent from both


# --- validation at the boundary -----------------------------------------------------------------
_A = np.zeros((4, 4, 4), bool)


@pytest.mark.parametrize(
    ("pred", "gt", "kwargs", "match"),
    [
        (_A, np.zeros((4, 4, 5), bool), {}, "same grid"),
        (_A[0], _A[0], {}, "3D"),
        (_A, _A, {"spacing": (1, -1, 1)}, "spacing"),
        (_A, _A, {"spacing": (1, 0, 1)}, "spacing"),
        (_A, _A, {"spacing": (1, 1)}, "spacing"),
        (_A, _A, {"spacing": "abc"}, "spacing"),
        (_A, _A, {"tolerance_mm": -1}, "tolerance_mm"),
        (_A, _A, {"tolerance_mm": math.nan}, "tolerance_mm"),
        (np.full((4, 4, 4), 2, np.uint8), _A, {}, "binary"),
    ],
)
def test_binary_scores_rejects_bad_input(pred, gt, kwargs, match):
    kwargs = {"spacing": (1, 1, 1), **kwargs}
    with pytest.raises(InputError, match=match):
        binary_scores(pred, gt, **kwargs)


@pytest.mark.parametrize(
    ("labels", "regions", "match"),
    [
        (np.zeros((4, 4, 4), np.uint8), {}, "non-empty"),
        (np.zeros((4, 4, 4), np.uint8), {"bg": (0,)}, "positive"),
        (np.zeros((4, 4, 4), np.uint8), {"none": ()}, "positive"),
        (np.zeros((4, 4, 4), np.float32), {"kidney": (1,)}, "integer"),
    ],
)
def test_label_scores_rejects_bad_input(labels, regions, match):
    with pytest.raises(InputError, match=match):
        label_scores(labels, labels, spacing=(1, 1, 1), regions=regions)


def test_importing_the_metrics_does_not_import_torch():
    code = (
        "import sys, slidesam.evaluation.metrics, slidesam.evaluation.evaluate; "
        "sys.exit(int('torch' in sys.modules or 'monai' in sys.modules))"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
