"""Preprocessing: z-normalisation, crop-or-pad, flips, config errors."""

from __future__ import annotations

import numpy as np
import pytest

from slidesam.core.errors import InputError
from slidesam.msam.config import MSamTrainConfig
from slidesam.msam.data import crop_or_pad, flip, z_normalize


def test_z_normalize_uses_foreground_statistics():
    a = np.array([-1000.0, -1000.0] + [10.0, 30.0] * 10).reshape(2, 11, 1)
    out = z_normalize(a, threshold=0.0)
    # foreground {10, 30}: mean 20, std 10
    assert out[0, 2, 0] == pytest.approx(-1.0)
    assert out[0, 3, 0] == pytest.approx(1.0)
    assert out[0, 0, 0] == pytest.approx(-102.0)


def test_crop_or_pad_inside_and_across_the_border():
    a = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    np.testing.assert_array_equal(crop_or_pad(a, (1, 1, 1), 3), a[1:4, 1:4, 1:4])
    out = crop_or_pad(a, (-1, 3, 4), 3, pad_value=-9)
    assert out[0].tolist() == np.full((3, 3), -9).tolist()  # z = -1 is outside
    np.testing.assert_array_equal(out[1:, :2, :2], a[0:2, 3:5, 4:6])
    assert (out[1:, 2, :] == -9).all()
    assert (out[1:, :, 2] == -9).all()
    assert (crop_or_pad(a, (10, 10, 10), 2, pad_value=5) == 5).all()


def test_flip_axes():
    a = np.arange(8).reshape(2, 2, 2)
    (b,) = flip([a], (0, 2))
    assert b[0, 0, 0] == a[1, 0, 1]
    assert flip([a], ())[0] is a


@pytest.mark.parametrize(
    ("data", "words"),
    [
        ({"data": {"folders": ["x"]}, "optimz": {}}, "unknown config section(s): optimz"),
        ({"data": {"folders": ["x"], "val": 1}}, "unknown key(s) in section 'data': val"),
        ({"data": {"folders": ["x"]}, "optim": {"lr": "fast"}}, "optim.lr must be a number"),
        ({"data": {"folders": ["x"]}, "refine": {"flip_p": 2}}, "flip_p must lie in [0, 1]"),
        ({"model": {}}, "no 'data' section"),
    ],
)
def test_config_errors_name_the_key(data, words):
    with pytest.raises(InputError) as err:
        MSamTrainConfig.from_dict(data)
    assert words in str(err.value)


def test_config_round_trip():
    cfg = MSamTrainConfig.from_dict({"data": {"folders": ["a"]}, "optim": {"epochs": 3}})
    assert MSamTrainConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.optim.milestone_epochs() == [2, 3]
