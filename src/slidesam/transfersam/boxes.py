"""Box prompts of the cascade, on 2D slices. Numpy only.

Frame: a slice is an ``(H, W)`` array (rows y, columns x); boxes are ``(N, 4)`` float XYXY in
slice pixels, ``x1``/``y1`` being the last occupied column/row (inclusive, as in the seed's
code). Lengths given "at 512 px" (``BoxConfig``) are scaled by ``W / 512``; areas by its square.

- :func:`roi_box`: the ROI decoder's fixed large box.
- :func:`remove_small_components`: drop ROI specks before boxes are drawn.
- :func:`kidney_boxes`: one box around the kidney region, or a left and a right box when the
  occupied x-extent is wide and has a wide gap (the seed's ``draw_boxes``).
- :func:`expand_box_random` (training) and :func:`expand_box_mean` (inference): grow a box on
  each side by ``|N(0, f * extent)|`` capped, or by its expected value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from slidesam.transfersam.config import BoxConfig

__all__ = [
    "KidneyBoxes",
    "expand_box_mean",
    "expand_box_random",
    "kidney_boxes",
    "remove_small_components",
    "roi_box",
    "scale_px",
    "tight_box",
]

_REF_WIDTH = 512.0


def scale_px(length_at_512: float, width: int) -> float:
    """A length given at 512 px slice width, on a slice ``width`` pixels wide."""
    return float(length_at_512) * width / _REF_WIDTH


def roi_box(shape: tuple[int, int], config: BoxConfig) -> np.ndarray:
    """The fixed ROI box on an ``(H, W)`` slice: (4,) XYXY pixels, e.g. (0, 100, 512, 450)."""
    h, w = shape
    x0, y0, x1, y1 = config.roi_box
    return np.array([x0 * w, y0 * h, x1 * w, y1 * h], dtype=np.float64)


def remove_small_components(mask: np.ndarray, min_px: float) -> np.ndarray:
    """Bool ``(H, W)`` mask without its 8-connected components smaller than ``min_px`` pixels."""
    mask = np.asarray(mask, dtype=bool)
    if min_px <= 1 or not mask.any():
        return mask.copy()
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= min_px
    keep[0] = False
    return keep[labels]


def tight_box(mask: np.ndarray) -> np.ndarray | None:
    """(4,) XYXY of the occupied pixels (inclusive), or None for an empty mask."""
    ys, xs = np.nonzero(mask)
    if xs.size == 0:
        return None
    return np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.float64)


@dataclass(frozen=True)
class KidneyBoxes:
    """Kidney-region boxes of one slice.

    Attributes:
        boxes: (N, 4) XYXY pixels, N = 0 (empty mask), 1, or 2 (left-of-split first).
        split_x: the column where the slice was split (pixels ``< split_x`` belong to the first
            box), or None.
    """

    boxes: np.ndarray
    split_x: int | None

    def regions(self, width: int) -> list[slice]:
        """The column range owned by each box: the whole width, or the two sides of the split."""
        if self.split_x is None:
            return [slice(0, width)] * len(self.boxes)
        return [slice(0, self.split_x), slice(self.split_x, width)]


def kidney_boxes(mask: np.ndarray, config: BoxConfig) -> KidneyBoxes:
    """Tight boxes of the kidney region ``mask`` (bool ``(H, W)``), split into two if wide.

    With x = the occupied columns: if ``max(x) - min(x) >= split_extent`` and the largest jump
    between consecutive occupied columns is ``>= split_gap`` (both scaled to the width), the
    slice is split at the middle of that gap (``int((x[i] + x[i+1]) / 2)``, the seed's rule) and
    each side gets the tight box of its own pixels. Boxes are not grown here.
    """
    mask = np.asarray(mask, dtype=bool)
    w = mask.shape[1]
    cols = np.flatnonzero(mask.any(axis=0))
    if cols.size == 0:
        return KidneyBoxes(np.zeros((0, 4)), None)
    whole = tight_box(mask)
    if cols[-1] - cols[0] < scale_px(config.split_extent_px, w) or cols.size < 2:
        return KidneyBoxes(whole[None], None)
    gaps = np.diff(cols)
    i = int(np.argmax(gaps))
    if gaps[i] < scale_px(config.split_gap_px, w):
        return KidneyBoxes(whole[None], None)
    split = int((cols[i] + cols[i + 1]) / 2)
    left = tight_box(mask[:, :split])
    right = tight_box(mask[:, split:])
    right[[0, 2]] += split
    return KidneyBoxes(np.stack([left, right]), split)


def _limits(box: np.ndarray, shape: tuple[int, int], grow: np.ndarray) -> np.ndarray:
    """Grow (x0, y0, x1, y1) by ``grow`` = (left, top, right, bottom), clipped to the slice."""
    h, w = shape
    x0, y0, x1, y1 = box
    return np.array(
        [max(0.0, x0 - grow[0]), max(0.0, y0 - grow[1]), min(w, x1 + grow[2]), min(h, y1 + grow[3])]
    )


def expand_box_random(
    box: np.ndarray, shape: tuple[int, int], config: BoxConfig, rng: np.random.Generator
) -> np.ndarray:
    """A training box: each side grows by ``min(|N(0, f * extent)|, cap)`` (extent = the box's
    width for x sides, its height for y sides; cap scaled to the width), clipped to the slice."""
    w = shape[1]
    ext = np.array([box[2] - box[0], box[3] - box[1]] * 2, dtype=np.float64)
    sigma = config.expand_fraction * ext
    grow = np.abs(rng.normal(0.0, 1.0, size=4)) * sigma
    grow = np.minimum(grow, scale_px(config.expand_cap_px, w))
    return _limits(box, shape, grow)


def expand_box_mean(box: np.ndarray, shape: tuple[int, int], config: BoxConfig) -> np.ndarray:
    """The inference box: each side grows by ``E|N(0, f * extent)| = f * extent * sqrt(2/pi)``,
    capped like :func:`expand_box_random`."""
    w = shape[1]
    ext = np.array([box[2] - box[0], box[3] - box[1]] * 2, dtype=np.float64)
    grow = np.minimum(
        config.expand_fraction * ext * math.sqrt(2 / math.pi), scale_px(config.expand_cap_px, w)
    )
    return _limits(box, shape, grow)
