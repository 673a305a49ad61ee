"""The zoomed models' crop: where it lies, and that crop and paste are each other's inverse."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slidesam.core import InputError
from slidesam.data.roi import OUTSIDE_LOGIT, Roi, crop, paste_logits, roi_for_box


def test_roi_centre_and_side_by_hand():
    # box x 10..29 (20 px), y 20..29 (10 px): edges [10, 30] x [20, 30]
    roi = roi_for_box((10, 20, 29, 29), (100, 100), 2.0)
    assert roi == Roi(cx=20.0, cy=25.0, side=40.0)
    # a one-pixel box still shows min_fraction of the slice's longer side
    assert roi_for_box((5, 5, 5, 5), (80, 100), 2.0).side == pytest.approx(10.0)
    with pytest.raises(InputError, match="x0 <= x1"):
        roi_for_box((5, 5, 4, 9), (10, 10), 2.0)


def test_a_pixel_lands_where_to_crop_says():
    image = torch.zeros(1, 60, 80)
    image[0, 12, 30] = 1.0  # row 12, column 30
    roi = Roi(cx=33.0, cy=15.0, side=16.0)
    out = crop(image, roi, 64, mode="nearest")[0]
    rows, cols = np.nonzero(out.numpy())
    x, y = roi.to_crop(np.array([30.5, 12.5]), 64)  # the pixel's centre
    assert abs(cols.mean() + 0.5 - x) < 0.5
    assert abs(rows.mean() + 0.5 - y) < 0.5
    assert rows.size == 16  # 64 / 16 = 4 x 4 output pixels per input pixel


def test_crop_then_paste_gives_the_mask_back_inside_and_background_outside():
    h, w = 50, 70
    yy, xx = np.mgrid[:h, :w]
    mask = (yy - 22) ** 2 + (xx - 40) ** 2 < 8**2
    roi = roi_for_box((32, 14, 48, 30), (h, w), 2.0)  # side 34 around the disk
    cropped = crop(torch.from_numpy(mask.astype(np.float32))[None], roi, 128, mode="nearest")
    logits = paste_logits((cropped * 20 - 10)[None], roi, (h, w))[0, 0].numpy()
    inside = (np.abs(xx + 0.5 - roi.cx) < roi.side / 2 - 1) & (
        np.abs(yy + 0.5 - roi.cy) < roi.side / 2 - 1
    )
    np.testing.assert_array_equal((logits > 0)[inside], mask[inside])
    far = (np.abs(xx + 0.5 - roi.cx) > roi.side / 2 + 1) | (
        np.abs(yy + 0.5 - roi.cy) > roi.side / 2 + 1
    )
    assert far.any()
    np.testing.assert_allclose(logits[far], -OUTSIDE_LOGIT)


def test_crop_outside_the_slice_is_zero():
    image = torch.full((3, 20, 20), 100.0)
    out = crop(image, Roi(cx=0.0, cy=10.0, side=20.0), 20)
    assert torch.all(out[:, :, :9] == 0)
    assert torch.all(out[:, :, 11:] == 100)
