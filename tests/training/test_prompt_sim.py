"""Prompt simulation (Slide-SAM Appendix C): exact boxes by hand, noise statistics, seeding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slidesam.core import InputError
from slidesam.training.prompt_sim import (
    PromptSimConfig,
    mask_box,
    simulate_prompt,
    simulate_prompt_batch,
)

BOXES_ONLY = PromptSimConfig(p_point=0.0)


def _rect(shape=(128, 128), rows=(40, 71), cols=(30, 81)) -> np.ndarray:
    """Mask with rows rows[0]..rows[1] and columns cols[0]..cols[1] set, inclusive."""
    mask = np.zeros(shape, bool)
    mask[rows[0] : rows[1] + 1, cols[0] : cols[1] + 1] = True
    return mask


def _blob() -> np.ndarray:
    """A non-convex mask (an L) so that 'inside the box' does not imply 'inside the mask'."""
    mask = np.zeros((64, 64), bool)
    mask[10:50, 10:20] = True
    mask[40:50, 10:55] = True
    return mask


def _boxes(mask, n, config, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([simulate_prompt(mask, rng, config).box for _ in range(n)])


# --- exact boxes --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("rows", "cols", "expected"),
    [
        ((3, 6), (10, 14), [10, 3, 14, 6]),  # mask[3:7, 10:15]
        ((0, 127), (0, 127), [0, 0, 127, 127]),  # the whole image
        ((5, 5), (7, 9), [7, 4.5, 9, 5.5]),  # one row: widened to 1 px about its centre
        ((0, 0), (0, 0), [0, 0, 1, 1]),  # one corner pixel: widened inwards
        ((127, 127), (127, 127), [126, 126, 127, 127]),
    ],
)
def test_zero_noise_gives_the_mask_box(rows, cols, expected):
    mask = _rect(rows=rows, cols=cols)
    config = PromptSimConfig(p_point=0.0, box_noise=0.0)
    prompt = simulate_prompt(mask, np.random.default_rng(0), config)
    assert prompt.kind == "box"
    assert prompt.point is None
    assert prompt.box.tolist() == expected


def test_mask_box_of_an_l_shape():
    assert mask_box(_blob()).tolist() == [10, 10, 54, 49]


# --- points -------------------------------------------------------------------------------------
@pytest.mark.parametrize("p_point", [0.5, 0.2, 1.0, 0.0])
def test_points_lie_in_the_mask_at_the_configured_rate(p_point):
    mask = _blob()
    rng = np.random.default_rng(1)
    config = PromptSimConfig(p_point=p_point)
    prompts = [simulate_prompt(mask, rng, config) for _ in range(2000)]
    points = np.array([p.point for p in prompts if p.kind == "point"]).reshape(-1, 2)
    assert all((p.box is None) == (p.kind == "point") for p in prompts)
    # binomial std of the fraction <= sqrt(0.25 / 2000) = 0.011: 4 std tolerance
    assert len(points) / len(prompts) == pytest.approx(p_point, abs=0.045)
    x, y = points[:, 0].astype(int), points[:, 1].astype(int)
    assert np.array_equal(points, np.stack([x, y], axis=1))  # pixel coordinates
    assert mask[y, x].all()  # (x, y) = (column, row)


def test_points_cover_the_mask_uniformly():
    mask = _blob()  # 400 + 350 = 750 pixels: the arm x >= 20 holds 350 of them (47 %)
    rng = np.random.default_rng(2)
    config = PromptSimConfig(p_point=1.0)
    xs = np.array([simulate_prompt(mask, rng, config).point[0] for _ in range(3000)])
    assert np.mean(xs >= 20) == pytest.approx(350 / 750, abs=0.04)


# --- box noise ----------------------------------------------------------------------------------
def test_box_noise_std_is_a_tenth_of_the_side_along_each_axis():
    # x side 130 - 80 = 50 -> std 5 px; y side 120 - 100 = 20 -> std 2 px
    mask = _rect(shape=(256, 256), rows=(100, 120), cols=(80, 130))
    clean = np.array([80, 100, 130, 120], float)
    shifts = _boxes(mask, 4000, BOXES_ONLY) - clean
    # std of a 4000-sample std estimate ~ 1.1 %: 6 % tolerance; clipping at 20 px is > 4 std
    assert shifts.std(axis=0) == pytest.approx([5.0, 2.0, 5.0, 2.0], rel=0.06)
    assert np.abs(shifts.mean(axis=0)) == pytest.approx([0, 0, 0, 0], abs=0.25)
    # independent per coordinate (not one translation of the whole box)
    assert abs(np.corrcoef(shifts[:, 0], shifts[:, 2])[0, 1]) < 0.1


@pytest.mark.parametrize("max_shift", [20.0, 5.0])
def test_box_shifts_never_exceed_the_cap(max_shift):
    # side 200 -> std 20 px: the cap is hit often, never passed
    mask = _rect(shape=(512, 512), rows=(150, 350), cols=(150, 350))
    config = PromptSimConfig(p_point=0.0, max_shift_px=max_shift)
    shifts = _boxes(mask, 1000, config) - np.array([150, 150, 350, 350], float)
    assert np.abs(shifts).max() == pytest.approx(max_shift)
    assert np.mean(np.isclose(np.abs(shifts), max_shift)) > 0.05
    assert np.abs(shifts).max() <= max_shift


@pytest.mark.parametrize(
    ("shape", "rows", "cols"),
    [
        ((64, 64), (0, 9), (0, 9)),  # corner: noise pushes outside
        ((64, 64), (50, 63), (40, 63)),  # other corner
        ((64, 64), (30, 30), (20, 21)),  # one row, two columns
        ((32, 48), (0, 31), (0, 47)),  # the whole (non-square) image
        ((2, 2), (0, 0), (1, 1)),  # tiny image
    ],
)
def test_boxes_stay_inside_the_image_and_non_degenerate(shape, rows, cols):
    mask = _rect(shape=shape, rows=rows, cols=cols)
    config = PromptSimConfig(p_point=0.0, box_noise=0.5)  # strong noise to provoke crossings
    boxes = _boxes(mask, 500, config)
    h, w = shape
    assert np.all(boxes >= 0)
    assert np.all(boxes[:, [0, 2]] <= w - 1)
    assert np.all(boxes[:, [1, 3]] <= h - 1)
    assert np.all(boxes[:, 2] - boxes[:, 0] >= 1 - 1e-9)  # at least 1 px (up to rounding)
    assert np.all(boxes[:, 3] - boxes[:, 1] >= 1 - 1e-9)


# --- seeding ------------------------------------------------------------------------------------
def test_same_seed_same_prompts_other_seed_other_prompts():
    mask = _blob()

    def draw(seed):
        rng = np.random.default_rng(seed)
        out = []
        for _ in range(50):
            p = simulate_prompt(mask, rng)
            out.append((p.kind, (p.box if p.kind == "box" else p.point).tolist()))
        return out

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)


def test_the_global_rng_is_not_used():
    mask = _blob()
    np.random.seed(0)
    state = np.random.get_state()[1].copy()
    simulate_prompt(mask, np.random.default_rng(3))
    assert np.array_equal(np.random.get_state()[1], state)


# --- batches ------------------------------------------------------------------------------------
def test_batch_splits_by_kind_and_matches_single_draws():
    masks = np.stack([_rect(shape=(64, 64), rows=(5 + i, 30), cols=(8, 40 - i)) for i in range(8)])
    batch = simulate_prompt_batch(torch.from_numpy(masks), np.random.default_rng(4))
    rng = np.random.default_rng(4)
    singles = [simulate_prompt(m, rng) for m in masks]

    kinds = [p.kind for p in singles]
    assert [p.kind for p in batch.prompts] == kinds
    assert batch.box_index.tolist() == [i for i, k in enumerate(kinds) if k == "box"]
    assert batch.point_index.tolist() == [i for i, k in enumerate(kinds) if k == "point"]
    assert 0 < len(batch.box_index) < 8  # this seed mixes both kinds
    nb, npt = len(batch.box_index), len(batch.point_index)
    assert batch.boxes.shape == (nb, 4)
    assert batch.boxes.dtype == torch.float32
    assert batch.point_coords.shape == (npt, 1, 2)
    assert batch.point_coords.dtype == torch.float32
    assert batch.point_labels.tolist() == [[1]] * npt
    for row, i in enumerate(batch.box_index.tolist()):
        assert batch.boxes[row].tolist() == pytest.approx(singles[i].box.tolist())
    for row, i in enumerate(batch.point_index.tolist()):
        assert batch.point_coords[row, 0].tolist() == singles[i].point.tolist()


def test_batch_of_one_kind_has_empty_tensors_for_the_other():
    masks = [_blob(), _blob()]
    batch = simulate_prompt_batch(masks, np.random.default_rng(0), BOXES_ONLY)
    assert batch.box_index.tolist() == [0, 1]
    assert batch.point_coords.shape == (0, 1, 2)
    assert batch.point_labels.shape == (0, 1)


# --- boundary checks ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("mask", "message"),
    [
        (np.zeros((16, 16), bool), "empty"),
        (np.ones((2, 16, 16), bool), "2D"),
        (np.ones((1, 16), bool), "2 x 2"),
    ],
)
def test_bad_masks_are_refused(mask, message):
    with pytest.raises(InputError, match=message):
        simulate_prompt(mask, np.random.default_rng(0))


def test_an_empty_mask_in_a_batch_is_named():
    masks = np.stack([_blob(), np.zeros((64, 64), bool)])
    with pytest.raises(InputError, match="mask #1: mask is empty"):
        simulate_prompt_batch(masks, np.random.default_rng(0))


def test_legacy_random_state_is_refused():
    with pytest.raises(InputError, match="Generator"):
        simulate_prompt(_blob(), np.random.RandomState(0))


@pytest.mark.parametrize(
    "kwargs", [{"p_point": 1.5}, {"box_noise": -0.1}, {"max_shift_px": float("nan")}]
)
def test_bad_config_is_refused(kwargs):
    with pytest.raises(InputError, match="PromptSimConfig"):
        PromptSimConfig(**kwargs)
