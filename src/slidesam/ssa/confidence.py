"""SSA's confidence filter (SSA paper §2.3): how well a slice's mask agrees with its box prompt.

The confidence of a slice is the IoU between the bounding box of its predicted mask and the box
that prompted it (both XYXY inclusive pixel indices). A slice whose confidence is below the
threshold tau (paper: 0.8) is *rejected*; ``REJECTED`` lists what a rejected slice can become.
"""

from __future__ import annotations

import numpy as np

__all__ = ["REJECTED", "box_iou", "mask_box"]

#: what a rejected slice becomes: ``empty`` (no tumour there), ``stage1`` (the stage-1 mask
#: moved to this phase through world coordinates), ``neighbours`` (predicted again with the box
#: of the nearest accepted slice's mask; kept if that agrees, else empty)
REJECTED = ("empty", "stage1", "neighbours")


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """XYXY inclusive box (x = column, y = row) of a 2D mask, None if it is empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])


def box_iou(a, b) -> float:
    """IoU of two XYXY inclusive pixel boxes (areas counted in pixels); 0 if either is None."""
    if a is None or b is None:
        return 0.0
    ax0, ay0, ax1, ay1 = (float(v) for v in a)
    bx0, by0, bx1, by1 = (float(v) for v in b)
    iw = min(ax1, bx1) - max(ax0, bx0) + 1
    ih = min(ay1, by1) - max(ay0, by0) + 1
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    union = (ax1 - ax0 + 1) * (ay1 - ay0 + 1) + (bx1 - bx0 + 1) * (by1 - by0 + 1) - inter
    return float(inter / union)
