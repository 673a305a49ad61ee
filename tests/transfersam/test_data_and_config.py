"""Slice selection, slice pixels, and the configs' checks."""

from __future__ import annotations

import numpy as np
import pytest

from slidesam.core import InputError
from slidesam.transfersam.config import (
    BoxConfig,
    CascadeConfig,
    DecoderTrainConfig,
    EmbedConfig,
    EncoderRef,
    load_train_config,
)
from slidesam.transfersam.data import find_cases, select_slices, slice_to_rgb


def test_balanced_selection_takes_every_positive_and_as_many_blanks():
    pos = np.zeros(100, bool)
    pos[40:60] = True  # 20 positives, 80 blanks
    idx = select_slices(pos, max_slices=400, blank_ratio=1.0, rng=np.random.default_rng(0))
    assert len(idx) == 40
    assert pos[idx].sum() == 20
    assert np.all(np.diff(idx) > 0)


@pytest.mark.parametrize(
    ("n_pos", "n_total", "cap", "ratio", "expect_pos", "expect_blank"),
    [
        (20, 100, 30, 1.0, 20, 10),  # cap leaves room for 10 blanks
        (20, 25, 400, 1.0, 20, 5),  # only 5 blanks exist
        (50, 100, 30, 1.0, 30, 0),  # too many positives: 30 evenly spaced, no blanks
        (20, 100, 400, 0.0, 20, 0),  # no blanks asked for
        (10, 100, 400, 2.0, 10, 20),
    ],
)
def test_selection_counts(n_pos, n_total, cap, ratio, expect_pos, expect_blank):
    pos = np.zeros(n_total, bool)
    pos[:n_pos] = True
    idx = select_slices(pos, max_slices=cap, blank_ratio=ratio, rng=np.random.default_rng(3))
    assert pos[idx].sum() == expect_pos
    assert (~pos[idx]).sum() == expect_blank
    assert len(np.unique(idx)) == len(idx)


def test_slice_pixels_use_a_real_ct_window_not_abs_hu():
    hu = np.array([[-1000.0, -200.0], [100.0, 400.0]])
    rgb = slice_to_rgb(hu, (-200.0, 400.0), 2)
    # air is black (the seed's |HU| saturation made it 255 like bone); 100 HU -> 127.5 -> 128
    np.testing.assert_array_equal(rgb[..., 0], [[0, 0], [128, 255]])
    assert rgb.shape == (2, 2, 3)
    assert (rgb[..., 0] == rgb[..., 2]).all()


def test_unknown_config_keys_and_bad_values_are_errors(tmp_path):
    with pytest.raises(InputError, match=r"unknown key.*stepz"):
        DecoderTrainConfig.from_dict({"stepz": 3})
    with pytest.raises(InputError, match="steps must be an integer"):
        DecoderTrainConfig(steps=0)
    with pytest.raises(InputError, match="unknown encoder variant"):
        EncoderRef(variant="vit_q")
    with pytest.raises(InputError, match="low < high"):
        EmbedConfig(window=(400, -200))
    with pytest.raises(InputError, match=r"unknown key.*in box config"):
        DecoderTrainConfig.from_dict({"boxes": {"gap": 3}})
    cfg = tmp_path / "t.yaml"
    cfg.write_text("steps: 7\nlr: 1e-3\nboxes: {split_gap_px: 30}\nscale: [1, 1]\n")
    loaded = load_train_config(cfg)
    assert (loaded.steps, loaded.lr, loaded.boxes.split_gap_px, loaded.scale) == (
        7,
        1e-3,
        30.0,
        (1.0, 1.0),
    )


def test_configs_round_trip():
    c = CascadeConfig(embed=EmbedConfig(window=(-100, 300)), boxes=BoxConfig(split_gap_px=33))
    assert CascadeConfig.from_dict(c.to_dict()) == c
    t = DecoderTrainConfig(steps=5)
    assert DecoderTrainConfig.from_dict(t.to_dict()) == t


def test_empty_dataset_is_an_error(tmp_path):
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    with pytest.raises(InputError, match="no labelled cases"):
        find_cases(tmp_path)
    with pytest.raises(InputError, match="no such dataset folder"):
        find_cases(tmp_path / "nope")


@pytest.mark.parametrize(
    ("factor", "shift", "expected"),
    [
        # mean of [0, 100, 200, 255] = 138.75; mean + factor * (g - mean) + shift, clipped
        (1.0, 0.0, [[0, 100], [200, 255]]),
        (2.0, 10.0, [[0, 71], [255, 255]]),
        (0.5, -20.0, [[49, 99], [149, 177]]),
    ],
)
def test_contrast_jitter_values(factor, shift, expected):
    from slidesam.transfersam.data import jitter_grey

    grey = np.array([[0, 100], [200, 255]], np.uint8)
    out = jitter_grey(grey, factor, shift)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected)


def test_contrast_jitters_are_seeded_per_case_and_slice():
    from slidesam.transfersam.data import contrast_jitters

    j = contrast_jitters(0, "case_00001", np.array([3, 7, 9]), 2, (0.8, 1.2), 15.0)
    assert j.shape == (2, 3, 2)
    assert np.all((j[..., 0] >= 0.8) & (j[..., 0] <= 1.2))
    assert np.all(np.abs(j[..., 1]) <= 15.0)
    assert len(np.unique(j[..., 0])) == 6  # every copy of every slice its own draw
    # a slice's jitter does not depend on which other slices are cached
    np.testing.assert_array_equal(
        contrast_jitters(0, "case_00001", np.array([7]), 2, (0.8, 1.2), 15.0)[:, 0], j[:, 1]
    )
    other = contrast_jitters(0, "case_00002", np.array([3, 7, 9]), 2, (0.8, 1.2), 15.0)
    assert not np.allclose(other, j)


def test_embed_config_contrast_settings():
    plain = EmbedConfig()
    assert "contrast_copies" not in plain.to_dict()  # no copies: described as before
    assert EmbedConfig.from_dict(plain.to_dict()) == plain
    c = EmbedConfig(contrast_copies=2, contrast_factor=[0.9, 1.1], brightness_shift=5)
    assert c.to_dict()["contrast_factor"] == [0.9, 1.1]
    assert EmbedConfig.from_dict(c.to_dict()) == c
    assert plain.differences(c) == {
        "contrast_copies": (0, 2),
        "contrast_factor": ([0.75, 1.25], [0.9, 1.1]),
        "brightness_shift": (20.0, 5.0),
    }
    # without copies the jitter range changes nothing
    assert plain.differences(EmbedConfig(brightness_shift=3)) == {}
    with pytest.raises(InputError, match="contrast_copies must be an integer >= 0"):
        EmbedConfig(contrast_copies=-1)
    with pytest.raises(InputError, match="contrast_factor must have low <= high"):
        EmbedConfig(contrast_factor=(1.2, 0.8))
    with pytest.raises(InputError, match="brightness_shift must be <= 255"):
        EmbedConfig(brightness_shift=300)
