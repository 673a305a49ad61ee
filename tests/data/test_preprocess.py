from __future__ import annotations

import numpy as np
import pytest

from slidesam.core import InputError
from slidesam.data.preprocess import (
    choose_slicing_axes,
    mask_is_kept,
    resize_image,
    resize_masks,
    scale_window,
    slice_window,
    to_uint8,
    window_centres,
)


@pytest.mark.parametrize(
    ("shape", "mode", "expected"),
    [
        ((48, 160, 160), "auto", (0,)),
        ((160, 30, 160), "auto", (1,)),
        ((512, 512, 90), "auto", (2,)),
        ((5, 5, 5), "auto", (0,)),  # ties go to z
        ((9, 7, 7), "auto", (1,)),  # tie between y and x goes to the lower axis
        ((9, 7, 7), "all", (0, 1, 2)),
        ((9, 7, 7), "x", (2,)),
    ],
)
def test_slicing_axis(shape, mode, expected):
    assert choose_slicing_axes(shape, mode) == expected


def test_slicing_axis_rejects_bad_mode():
    with pytest.raises(InputError, match="unknown slicing axis"):
        choose_slicing_axes((3, 3, 3), "diagonal")


@pytest.mark.parametrize(
    ("hu", "expected"),
    # (HU + 200) * 255 / 600, clipped to the window [-200, 400], rounded
    [
        (-1000, 0),
        (-200, 0),
        (-199, 0),
        (-198, 1),
        (0, 85),
        (100, 128),
        (398, 254),
        (399, 255),
        (400, 255),
        (3000, 255),
    ],
)
def test_ct_window_mapping(hu, expected):
    assert to_uint8(np.array([hu], np.int16), (-200, 400))[0] == expected


def test_mri_window_and_bad_window():
    np.testing.assert_array_equal(
        to_uint8(np.array([0, 300, 600, 900]), (0, 600)), [0, 128, 255, 255]
    )
    with pytest.raises(InputError, match="low < high"):
        to_uint8(np.zeros(3), (400, -200))


def test_window_minmax_scaling_stretches_each_window():
    w = np.array([[[0, 50]], [[100, 100]], [[20, 30]]], dtype=np.int16)  # (3, 1, 2)
    out = scale_window(w, (-200, 400), "window-minmax")
    np.testing.assert_array_equal(out[:, 0], [[0, 128], [255, 255], [51, 76]])
    fixed = scale_window(w, (-200, 400), "fixed")
    np.testing.assert_array_equal(fixed[:, 0], [[85, 106], [128, 128], [94, 98]])
    assert scale_window(np.full((3, 2, 2), 7), (-200, 400), "window-minmax").max() == 0


@pytest.mark.parametrize(("area", "kept"), [(0, False), (14, False), (15, True), (100, True)])
def test_area_rule_at_the_boundary(area, kept):
    # 0.14 % of a 100 x 100 slice is exactly 14 pixels: "exceeds" means 15 or more
    m = np.zeros((100, 100), bool)
    m.reshape(-1)[:area] = True
    assert mask_is_kept(m) is kept


def test_area_rule_other_fraction_and_size():
    m = np.zeros((512, 512), bool)
    m.reshape(-1)[:367] = True  # 0.0014 * 262144 = 367.0016 -> 367 is not above it
    assert not mask_is_kept(m)
    m.reshape(-1)[:368] = True
    assert mask_is_kept(m)
    assert mask_is_kept(m, 0.0)
    assert not mask_is_kept(np.zeros((4, 4), bool), 0.0)


def test_windows_and_slices():
    vol = np.arange(4 * 5 * 6).reshape(4, 5, 6)
    assert list(window_centres(4)) == [1, 2]
    np.testing.assert_array_equal(slice_window(vol, 0, 1), vol[0:3])
    np.testing.assert_array_equal(slice_window(vol, 2, 4), np.moveaxis(vol[:, :, 3:6], 2, 0))
    assert slice_window(vol, 1, 3).shape == (3, 4, 6)
    with pytest.raises(InputError, match="out of range"):
        slice_window(vol, 0, 3)


def test_resize_keeps_channels_apart_and_masks_binary():
    w = np.zeros((3, 8, 8), np.uint8)
    w[0], w[1], w[2] = 10, 120, 250
    rgb = resize_image(w, 32)
    assert rgb.shape == (32, 32, 3)
    np.testing.assert_array_equal(rgb[5, 7], [10, 120, 250])
    m = np.zeros((2, 3, 8, 8), bool)
    m[1, 2, 2:6, 4:8] = True
    r = resize_masks(m, 16)
    assert r.shape == (2, 3, 16, 16)
    assert set(np.unique(r)) == {0, 1}
    assert r[1, 2].sum() == 4 * 4 * 4  # nearest x2: every pixel becomes a 2x2 block
    assert r[1, 2, 4:12, 8:16].all()
