"""Class weights, the weighted Dice + CE loss, the LR schedule and the label fusion."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slidesam.core import InputError
from slidesam.transfersam.cascade import fuse_labels
from slidesam.transfersam.config import DecoderTrainConfig
from slidesam.transfersam.decoders import binary_dice_ce, class_weights, lr_at


@pytest.mark.parametrize(
    ("fraction", "cap", "expect"),
    [
        (0.2, 50.0, (0.4, 1.6)),  # inverse frequencies 1.25 and 5, scaled to average 1
        (0.5, 50.0, (1.0, 1.0)),
        (0.01, 9.0, (0.2, 1.8)),  # 1/0.99 vs 100: capped at 9x
        (0.9, 50.0, (1.8, 0.2)),
    ],
)
def test_class_weights(fraction, cap, expect):
    assert class_weights(fraction, cap) == pytest.approx(expect)


def test_class_weights_from_a_known_pixel_distribution():
    target = np.zeros((4, 10, 10), np.uint8)
    target[:, :2, :] = 1  # 20 % foreground
    assert class_weights(target.mean()) == pytest.approx((0.4, 1.6))
    with pytest.raises(InputError, match="all background"):
        class_weights(0.0)


def test_loss_prefers_the_right_mask_and_weights_the_rare_class():
    target = torch.zeros(2, 8, 8)
    target[:, 2:4, 2:4] = 1
    loss = binary_dice_ce((0.4, 1.6))
    good = loss(torch.where(target > 0, 6.0, -6.0), target)
    bad = loss(torch.where(target > 0, -6.0, 6.0), target)
    empty = loss(torch.full((2, 8, 8), -6.0), target)
    assert good < 0.05 < empty < bad
    # missing the foreground costs more when it is weighted up
    assert binary_dice_ce((0.1, 1.9))(torch.full((2, 8, 8), -6.0), target) > empty


def test_lr_schedule_warmup_then_cosine():
    c = DecoderTrainConfig(steps=110, warmup_steps=10, lr=1e-3, min_lr=0.0)
    assert lr_at(0, c) == pytest.approx(1e-3 / 200)
    assert lr_at(5, c) == pytest.approx(1e-3 / 200 + (1e-3 - 1e-3 / 200) / 2)
    assert lr_at(10, c) == pytest.approx(1e-3)
    assert lr_at(60, c) == pytest.approx(5e-4)
    assert lr_at(110, c) == pytest.approx(0.0, abs=1e-12)


def test_argmax_fusion_on_hand_built_logits():
    roi = np.array([[0, 1, 1, 1, 0]], bool)
    tumor = np.array([[-1.0, -2.0, 3.0, 1.0, 2.0]])
    cyst = np.array([[-1.0, -1.0, 1.0, 4.0, -3.0]])
    # bg; kidney (ROI, both negative); tumor > cyst; cyst > tumor; tumor outside the ROI (seed)
    np.testing.assert_array_equal(fuse_labels(roi, tumor, cyst), [[0, 1, 2, 3, 2]])
    # ties go to the lower label: a zero logit inside the ROI stays kidney-vs-tumor by eps
    assert fuse_labels(np.array([[True]]), np.array([[0.0]]), np.array([[-np.inf]]))[0, 0] == 1


def test_rotation_zoom_moves_box_and_target_together():
    from slidesam.transfersam.config import BoxConfig
    from slidesam.transfersam.decoders import _batch, _Samples

    target = np.zeros((64, 64), np.uint8)
    target[8:24, 36:56] = 1  # off-centre, so a wrong direction would show
    tight = np.array([36.0, 8.0, 55.0, 23.0])  # slice 64 px = mask 64 px = input 64 px
    samples = _Samples(
        embeddings=[np.zeros((1, 4, 8, 8), np.float16)],
        case=np.array([0]),
        row=np.array([0]),
        boxes=tight[None],
        shapes=np.array([[64, 64]]),
        targets=target[None],
    )
    cfg = DecoderTrainConfig(
        augment_prob=1.0, rotate_deg=30.0, scale=(0.7, 0.7), boxes=BoxConfig(expand_fraction=0.0)
    )
    for seed in range(5):
        _, boxes, tgt = _batch(
            samples, np.array([0]), "tumor", cfg, 64, np.random.default_rng(seed)
        )
        ys, xs = np.nonzero(tgt[0].numpy())
        assert xs.size > 0
        # the warped target lies inside the box around the warped corners, and fills its extent
        x0, y0, x1, y1 = boxes[0].numpy()
        assert x0 - 1.5 <= xs.min()
        assert xs.max() <= x1 + 1.5
        assert y0 - 1.5 <= ys.min()
        assert ys.max() <= y1 + 1.5
        centre = np.array([(x0 + x1) / 2, (y0 + y1) / 2])
        np.testing.assert_allclose(centre, [xs.mean() + 0.5, ys.mean() + 0.5], atol=2.0)
        assert tgt.sum() == pytest.approx(target.sum() * 0.7**2, rel=0.15)  # zoomed out
