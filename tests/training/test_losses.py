"""Slide-SAM loss against values computed by hand (MONAI test style: parametrized expectations).

Most cases use constant logits ``c`` on 2 x 2 slices, where every term has a closed form:
BCE per pixel = softplus(-c) on foreground, softplus(c) on background; with p = sigmoid(c) and
n pixels of target g (0 or 1), Dice = 1 - (2 n p g + eps) / (n p + n g + eps), eps = 1e-5.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import slidesam
from slidesam.core import InputError
from slidesam.training.losses import LossConfig, SlideSAMLoss, slidesam_loss
from slidesam.training.prompt_sim import simulate_prompt_batch

LN2 = math.log(2.0)
EPS = 1e-5
DICE_HALF_ON_ONES = 1 - (4 + EPS) / (6 + EPS)  # p = 0.5 on 4 foreground pixels: ~1/3
DICE_HALF_ON_ZEROS = 1 - EPS / (2 + EPS)  # p = 0.5 on 4 background pixels: ~1


def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def _const_slice_loss(c: float, g: int, lambda_ce: float = 20.0, lambda_dice: float = 1.0):
    """Loss of one 2 x 2 slice with every logit c and every target pixel g."""
    n, p = 4, _sigmoid(c)
    bce = _softplus(-c) if g else _softplus(c)
    dice = 1 - (2 * n * p * g + EPS) / (n * p + n * g + EPS)
    return lambda_ce * bce + lambda_dice * dice


def _const_logits(values, s=3, size=2) -> torch.Tensor:
    """(1, K, s, size, size) logits, candidate j constant values[j]."""
    return (
        torch.tensor(values, dtype=torch.float32)
        .view(1, -1, 1, 1, 1)
        .expand(1, len(values), s, size, size)
        .clone()
    )


# --- the best candidate -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("values", "g", "best", "expected"),
    [
        # target all foreground: the confident positive candidate wins
        (
            [-10.0, 10.0, 0.0],
            1,
            1,
            [
                _const_slice_loss(-10.0, 1),
                _const_slice_loss(10.0, 1),
                20 * LN2 + DICE_HALF_ON_ONES,  # 14.19628
            ],
        ),
        # target all background: the confident negative candidate wins
        (
            [0.0, 10.0, -10.0],
            0,
            2,
            [
                20 * LN2 + DICE_HALF_ON_ZEROS,  # 14.86294
                _const_slice_loss(10.0, 0),
                _const_slice_loss(-10.0, 0),
            ],
        ),
    ],
)
def test_min_over_candidates_picks_the_known_candidate(values, g, best, expected):
    logits = _const_logits(values)
    target = torch.full((1, 3, 2, 2), float(g))
    out = slidesam_loss(logits, target, torch.ones(1, 3), torch.zeros(1, 3))
    assert out.per_candidate[0].tolist() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert out.best.tolist() == [best]
    assert out.seg.item() == pytest.approx(expected[best], rel=1e-5, abs=1e-6)


def test_ranking_follows_the_weights():
    # one foreground pixel of four; candidate 0 leans to background (better CE),
    # candidate 1 leans to foreground (better Dice), so the weights decide the winner
    target = torch.tensor([[1.0, 0.0], [0.0, 0.0]]).expand(1, 3, 2, 2)
    logits = _const_logits([-1.5, 0.5])
    per_pixel_cfg = LossConfig(lambda_ce=1.0, lambda_dice=0.0)
    dice_cfg = LossConfig(lambda_ce=0.0, lambda_dice=1.0)
    per_pixel = slidesam_loss(logits, target, torch.ones(1, 3), torch.zeros(1, 2), per_pixel_cfg)
    dice_only = slidesam_loss(logits, target, torch.ones(1, 3), torch.zeros(1, 2), dice_cfg)
    # BCE = (softplus(-c) + 3 softplus(c)) / 4: 0.5764 for c = -1.5, 0.8492 for c = 0.5
    assert per_pixel.per_candidate[0].tolist() == pytest.approx(
        [(_softplus(1.5) + 3 * _softplus(-1.5)) / 4, (_softplus(-0.5) + 3 * _softplus(0.5)) / 4],
        rel=1e-5,
    )
    assert per_pixel.best.item() == 0
    # Dice = 1 - (2 p + eps) / (4 p + 1 + eps): 0.7891 for c = -1.5, 0.6433 for c = 0.5
    p0, p1 = _sigmoid(-1.5), _sigmoid(0.5)
    assert dice_only.per_candidate[0].tolist() == pytest.approx(
        [1 - (2 * p0 + EPS) / (4 * p0 + 1 + EPS), 1 - (2 * p1 + EPS) / (4 * p1 + 1 + EPS)],
        rel=1e-5,
    )
    assert dice_only.best.item() == 1


# --- the indicator ------------------------------------------------------------------------------
@pytest.mark.parametrize("outer_logit", [-30.0, 30.0, 0.0])
def test_unlabelled_slices_do_not_change_the_loss(outer_logit):
    logits = torch.full((1, 1, 3, 2, 2), outer_logit)
    logits[:, :, 1] = 0.0  # the centre slice: BCE ln 2, Dice ~1/3
    target = torch.ones(1, 3, 2, 2)
    out = slidesam_loss(logits, target, torch.tensor([[0, 1, 0]]), torch.zeros(1, 1))
    assert out.seg.item() == pytest.approx(20 * LN2 + DICE_HALF_ON_ONES, rel=1e-6)
    assert out.total.item() == pytest.approx(20 * LN2 + DICE_HALF_ON_ONES, rel=1e-6)


@pytest.mark.parametrize(
    ("indicator", "expected"),
    [
        ([1, 1, 1], (2 * _const_slice_loss(-30.0, 1) + _const_slice_loss(30.0, 1)) / 3),
        ([1, 1, 0], (_const_slice_loss(-30.0, 1) + _const_slice_loss(30.0, 1)) / 2),
        ([0, 1, 0], _const_slice_loss(30.0, 1)),
        ([0, 0, 1], _const_slice_loss(-30.0, 1)),
    ],
)
def test_segmentation_loss_is_the_mean_over_labelled_slices(indicator, expected):
    # slices 0 and 2 confidently wrong (-30 on foreground), slice 1 confidently right
    logits = torch.tensor([-30.0, 30.0, -30.0]).view(1, 1, 3, 1, 1).expand(1, 1, 3, 2, 2)
    target = torch.ones(1, 3, 2, 2)
    out = slidesam_loss(logits, target, torch.tensor([indicator]), torch.zeros(1, 1))
    assert out.seg.item() == pytest.approx(expected, rel=1e-5)


# --- the IoU head -------------------------------------------------------------------------------
def _iou_case() -> tuple[torch.Tensor, torch.Tensor]:
    """Prediction and target with |P ∩ G| = 3, |P ∪ G| = 8 over 3 slices (IoU 3/8).

    slice 0: G = [1 1 / 0 0], P = [1 0 / 1 0] -> inter 1, union 3
    slice 1: G = [1 1 / 1 1], P = [1 1 / 0 0] -> inter 2, union 4 (IoU of this slice alone 1/2)
    slice 2: G = [0 0 / 0 0], P = [1 0 / 0 0] -> inter 0, union 1
    """
    target = torch.tensor(
        [[[1, 1], [0, 0]], [[1, 1], [1, 1]], [[0, 0], [0, 0]]], dtype=torch.float32
    )[None]
    pred = torch.tensor([[[1, 0], [1, 0]], [[1, 1], [0, 0]], [[1, 0], [0, 0]]], dtype=torch.bool)
    logits = torch.where(pred, 2.0, -2.0)[None, None]
    return logits, target


@pytest.mark.parametrize("iou_weight", [1.0, 2.0, 0.0])
def test_iou_loss_of_a_3d_sample_is_the_squared_error(iou_weight):
    logits, target = _iou_case()
    iou_pred = torch.tensor([[0.875]])
    config = LossConfig(iou_weight=iou_weight)
    out = slidesam_loss(logits, target, torch.ones(1, 3), iou_pred, config)
    assert out.true_iou.item() == pytest.approx(3 / 8)
    assert out.iou.item() == pytest.approx((0.875 - 0.375) ** 2)  # 0.25
    assert out.total.item() == pytest.approx(out.seg.item() + iou_weight * 0.25, rel=1e-6)


@pytest.mark.parametrize("indicator", [[0, 1, 0], [1, 0, 0], [1, 1, 0]])
def test_iou_loss_is_zero_for_2d_labelled_samples(indicator):
    logits, target = _iou_case()
    out = slidesam_loss(logits, target, torch.tensor([indicator]), torch.tensor([[0.875]]))
    assert out.iou.item() == 0.0
    assert out.total.item() == pytest.approx(out.seg.item(), rel=1e-7)
    if indicator == [0, 1, 0]:  # the true IoU is still reported, over the labelled slice only
        assert out.true_iou.item() == pytest.approx(1 / 2)


def test_iou_of_an_empty_prediction_on_an_empty_target_is_one():
    out = slidesam_loss(
        torch.full((1, 2, 3, 2, 2), -5.0),
        torch.zeros(1, 3, 2, 2),
        torch.ones(1, 3),
        torch.ones(1, 2),
    )
    assert out.true_iou.tolist() == [[1.0, 1.0]]
    assert out.iou.item() == 0.0


def test_only_the_best_candidates_iou_term_counts():
    logits, target = _iou_case()
    # candidate 0: the IoU case (true IoU 3/8); candidate 1: all wrong, far worse segmentation
    logits = torch.cat([logits, -logits], dim=1)
    iou_pred = torch.tensor([[0.875, 0.0]])  # candidate 1 is far off too, but not the best
    out = slidesam_loss(logits, target, torch.ones(1, 3), iou_pred)
    assert out.best.item() == 0
    assert out.iou.item() == pytest.approx(0.25)
    # SAM's way: every candidate against its own true IoU (0.3 for candidate 1), averaged
    every = slidesam_loss(
        logits, target, torch.ones(1, 3), iou_pred, LossConfig(iou_candidates="all")
    )
    assert out.true_iou[0, 1].item() == pytest.approx(0.3)
    assert every.iou.item() == pytest.approx((0.25 + 0.3**2) / 2)
    assert every.seg.item() == pytest.approx(out.seg.item())


# --- weights ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("lambda_ce", "lambda_dice"), [(20.0, 1.0), (1.0, 0.0), (0.0, 1.0), (5.0, 3.0)]
)
def test_lambda_weights_scale_the_two_terms(lambda_ce, lambda_dice):
    # logits 0 on foreground: BCE ln 2, Dice ~1/3; nothing predicted, so true IoU 0 = iou_pred
    out = slidesam_loss(
        torch.zeros(1, 1, 3, 2, 2),
        torch.ones(1, 3, 2, 2),
        torch.ones(1, 3),
        torch.zeros(1, 1),
        LossConfig(lambda_ce=lambda_ce, lambda_dice=lambda_dice),
    )
    assert out.total.item() == pytest.approx(lambda_ce * LN2 + lambda_dice * DICE_HALF_ON_ONES)


def test_total_is_the_mean_over_samples():
    logits = torch.zeros(2, 1, 3, 2, 2)
    logits[1] = 30.0
    out = slidesam_loss(logits, torch.ones(2, 3, 2, 2), torch.ones(2, 3), torch.zeros(2, 1))
    # sample 0: ln 2, Dice ~1/3, IoU 0 (nothing predicted); sample 1: ~0 and IoU 1: error 1
    expected_0 = 20 * LN2 + DICE_HALF_ON_ONES
    expected_1 = _const_slice_loss(30.0, 1) + 1.0
    assert out.total.item() == pytest.approx((expected_0 + expected_1) / 2, rel=1e-5)


# --- gradients ----------------------------------------------------------------------------------
def test_gradients_reach_the_best_candidate_and_its_iou_prediction():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 3, 4, 4, generator=gen).requires_grad_()
    target = torch.rand(2, 3, 4, 4, generator=gen) > 0.5
    indicator = torch.tensor([[1, 1, 1], [0, 1, 0]])  # sample 0 3D, sample 1 2D
    iou_pred = torch.rand(2, 3, generator=gen).requires_grad_()
    out = slidesam_loss(logits, target, indicator, iou_pred)
    out.total.backward()

    best = out.best.tolist()
    for b in range(2):
        for k in range(3):
            has_grad = bool(logits.grad[b, k].abs().sum() > 0)
            assert has_grad == (k == best[b])
    assert torch.all(logits.grad[1, best[1], [0, 2]] == 0)  # unlabelled slices of the 2D sample
    assert torch.all(logits.grad[1, best[1], 1] != 0)

    expected = torch.zeros(2, 3)  # d/du mean_b (u - t)^2 = 2 (u - t) / B, best of the 3D one
    expected[0, best[0]] = (iou_pred[0, best[0]] - out.true_iou[0, best[0]]).detach()
    assert torch.allclose(iou_pred.grad, expected, atol=1e-7)
    assert iou_pred.grad[0, best[0]] != 0


def test_module_returns_the_functions_total():
    logits, target = _iou_case()
    config = LossConfig(lambda_ce=3.0, iou_weight=0.5)
    crit = SlideSAMLoss(config=config)
    args = (logits, target, torch.ones(1, 3), torch.tensor([[0.5]]))
    assert crit(*args).item() == slidesam_loss(*args, config).total.item()


# --- focal option -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("focal", "gamma", "alpha", "expected"),
    [
        # logits [0, 2], target [1, 0], one slice of two pixels, lambda_ce 1, lambda_dice 0
        # CE: (ln 2 + softplus(2)) / 2 = (0.693147 + 2.126928) / 2
        (False, 2.0, None, 1.410038),
        # focal: (0.5^2 ln 2 + sigmoid(2)^2 softplus(2)) / 2 = (0.173287 + 1.650076) / 2
        (True, 2.0, None, 0.911682),
        # alpha 0.25: foreground x 0.25, background x 0.75
        (True, 2.0, 0.25, (0.25 * 0.173287 + 0.75 * 1.650076) / 2),
        # gamma 0, no alpha: the focal loss is the CE
        (True, 0.0, None, 1.410038),
    ],
)
def test_focal_option_matches_hand_computation(focal, gamma, alpha, expected):
    logits = torch.tensor([0.0, 2.0]).view(1, 1, 1, 1, 2)
    target = torch.tensor([1.0, 0.0]).view(1, 1, 1, 2)
    config = LossConfig(
        lambda_ce=1.0, lambda_dice=0.0, focal=focal, focal_gamma=gamma, focal_alpha=alpha
    )
    out = slidesam_loss(logits, target, torch.ones(1, 1), torch.ones(1, 1), config)
    assert out.seg.item() == pytest.approx(expected, abs=2e-6)


def test_focal_differs_from_ce_on_the_reference_weights():
    logits, target = _iou_case()
    args = (logits, target, torch.ones(1, 3), torch.zeros(1, 1))
    ce = slidesam_loss(*args).seg.item()
    focal = slidesam_loss(*args, LossConfig(focal=True)).seg.item()
    assert focal < ce  # (1 - p_t)^2 < 1 on every pixel


# --- boundary checks ----------------------------------------------------------------------------
def _good_inputs(b=1) -> dict:
    return {
        "logits": torch.zeros(b, 3, 3, 2, 2),
        "target": torch.ones(b, 3, 2, 2),
        "indicator": torch.ones(b, 3),
        "iou_pred": torch.zeros(b, 3),
    }


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"logits": torch.zeros(1, 3, 2, 2)}, "logits must be a float tensor"),
        ({"logits": torch.zeros(1, 3, 3, 2, 2, dtype=torch.int64)}, "logits must be a float"),
        ({"target": torch.ones(1, 3, 8, 8)}, "resize the masks"),
        ({"indicator": torch.ones(1, 2)}, r"indicator must be \(B, S\)"),
        ({"iou_pred": torch.zeros(1, 1)}, r"iou_pred must be \(B, K\)"),
        ({"target": torch.full((1, 3, 2, 2), 0.5)}, "binary"),
        ({"indicator": torch.full((1, 3), 2.0)}, "0/1"),
        ({"indicator": torch.zeros(1, 3)}, r"sample\(s\) \[0\] have no labelled slice"),
        ({"target": torch.ones(1, 3, 2, 2).numpy()}, "torch.Tensor"),
    ],
)
def test_bad_inputs_are_refused(change, message):
    with pytest.raises(InputError, match=message):
        slidesam_loss(**{**_good_inputs(), **change})


def test_good_inputs_pass():
    assert torch.isfinite(slidesam_loss(**_good_inputs(2)).total)


@pytest.mark.parametrize(
    "kwargs", [{"lambda_ce": -1.0}, {"iou_weight": float("nan")}, {"focal_alpha": 1.5}]
)
def test_bad_config_is_refused(kwargs):
    with pytest.raises(InputError, match="LossConfig"):
        LossConfig(**kwargs)


# --- with the model -----------------------------------------------------------------------------
def test_one_training_step_with_simulated_prompts():
    """Tiny model, mixed point/box batch: decode per kind, resize targets, loss, backward."""
    torch.manual_seed(0)
    model = slidesam.build_slidesam("tiny_64")
    masks = torch.zeros(4, 3, 64, 64)
    for i in range(4):
        masks[i, :, 10 + 3 * i : 40, 12 : 50 - 4 * i] = 1.0
    images = masks * 200.0 + 20.0
    prompts = simulate_prompt_batch(masks[:, 1].bool(), np.random.default_rng(1))
    assert len(prompts.box_index) > 0  # this seed mixes both kinds
    assert len(prompts.point_index) > 0

    emb = model.encode(images)
    by_box = model.decode(emb[prompts.box_index], boxes=prompts.boxes)
    by_point = model.decode(
        emb[prompts.point_index], points=(prompts.point_coords, prompts.point_labels)
    )
    order = torch.cat([prompts.box_index, prompts.point_index]).argsort()
    logits = torch.cat([by_box[0], by_point[0]])[order]
    iou_pred = torch.cat([by_box[1], by_point[1]])[order]
    target = F.interpolate(masks, size=logits.shape[-2:], mode="nearest")
    indicator = torch.tensor([[1, 1, 1], [0, 1, 0], [1, 1, 1], [0, 1, 0]])
    out = slidesam_loss(logits, target, indicator, iou_pred)
    out.total.backward()

    assert logits.shape[:3] == (4, 3, 3)
    assert torch.isfinite(out.total)
    assert out.iou[[1, 3]].tolist() == [0.0, 0.0]
    assert model.mask_decoder.iou_prediction_head.layers[-1].weight.grad.abs().sum() > 0
    assert model.image_encoder.patch_embed.proj.weight.grad.abs().sum() > 0
