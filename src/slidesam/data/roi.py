"""Region-of-interest ("zoom") input: the model sees a square crop around the prompt, resized.

SAM and Slide-SAM see the whole slice. A small model at a small input size (our tiny models:
256 px, 64 x 64 mask logits) then draws a 2 cm tumour on a few mask pixels. A model with
``SamConfig.roi_context = c > 0`` is trained and used on a square crop instead:

- centre = the prompt box's centre; side = ``c`` x the box's longer side, but at least
  ``min_fraction`` x the slice's longer side (so a one-pixel box still shows its neighbourhood);
- the crop is resampled to the model's input size (bilinear image, nearest mask; zeros outside
  the slice, i.e. the bottom of the intensity window);
- the mask logits are resampled back into the slice (``paste_logits``); outside the crop they
  are ``-OUTSIDE_LOGIT`` (background).

One function pair serves training (``slidesam.training.windows``) and inference
(``slidesam.inference.predictor``), so the model sees at inference the crops it was trained on.

Coordinates: pixel ``i`` covers ``[i, i + 1)`` (edges); a box is XYXY of inclusive pixel
indices as everywhere in slidesam, so it covers edges ``[x0, x1 + 1]``. A ``Roi`` is the square
``[cx - side / 2, cx + side / 2]`` x ``[cy - side / 2, cy + side / 2]`` in edge coordinates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from slidesam.core import InputError

__all__ = ["DEFAULT_MIN_FRACTION", "OUTSIDE_LOGIT", "Roi", "crop", "paste_logits", "roi_for_box"]

#: smallest crop side as a fraction of the slice's longer side
DEFAULT_MIN_FRACTION = 0.1
#: logit given to slice pixels outside the crop (background)
OUTSIDE_LOGIT = 20.0


@dataclass(frozen=True)
class Roi:
    """A square crop of a slice: centre ``(cx, cy)`` and ``side`` in slice pixel edges."""

    cx: float
    cy: float
    side: float

    def key(self) -> tuple[float, float, float]:
        """Hashable identity, rounded to 1/100 px (for embedding caches)."""
        return (round(self.cx, 2), round(self.cy, 2), round(self.side, 2))

    def to_crop(self, xy: np.ndarray, size: int) -> np.ndarray:
        """Slice pixel coordinates (..., 2) XY -> crop-input pixel coordinates at ``size``."""
        xy = np.asarray(xy, dtype=np.float32)
        origin = np.array([self.cx - self.side / 2, self.cy - self.side / 2], np.float32)
        return (xy - origin) * (size / self.side)

    def to_dict(self) -> dict:
        return {"cx": self.cx, "cy": self.cy, "side": self.side}


def roi_for_box(
    box, slice_shape: tuple[int, int], context: float, *, min_fraction: float = DEFAULT_MIN_FRACTION
) -> Roi:
    """The crop a model with ``roi_context = context`` sees for an XYXY ``box`` on a slice of
    ``slice_shape`` (H, W)."""
    x0, y0, x1, y1 = (float(v) for v in np.asarray(box, dtype=np.float64).reshape(4))
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)) or x1 < x0 or y1 < y0:
        raise InputError(f"box must be finite XYXY with x0 <= x1 and y0 <= y1, got {box!r}")
    if not context > 0:
        raise InputError(f"roi context must be > 0, got {context}")
    side = context * max(x1 - x0 + 1.0, y1 - y0 + 1.0)
    side = max(side, min_fraction * max(slice_shape), 1.0)
    return Roi(cx=(x0 + x1 + 1.0) / 2.0, cy=(y0 + y1 + 1.0) / 2.0, side=side)


def _theta_crop(roi: Roi, height: int, width: int) -> torch.Tensor:
    """affine_grid matrix: crop output (normalised) -> slice input (normalised)."""
    return torch.tensor(
        [
            [roi.side / width, 0.0, -1.0 + 2.0 * roi.cx / width],
            [0.0, roi.side / height, -1.0 + 2.0 * roi.cy / height],
        ],
        dtype=torch.float32,
    )


def crop(image: torch.Tensor, roi: Roi, size: int, *, mode: str = "bilinear") -> torch.Tensor:
    """Resample the ``roi`` of ``image`` (C, H, W) or (B, C, H, W) to (…, C, size, size).

    ``mode``: ``bilinear`` for images, ``nearest`` for masks; zeros outside the slice.
    """
    batched = image.ndim == 4
    x = image if batched else image[None]
    h, w = x.shape[-2:]
    theta = _theta_crop(roi, h, w)[None].expand(x.shape[0], 2, 3).to(x.device)
    grid = F.affine_grid(theta, [x.shape[0], x.shape[1], size, size], align_corners=False)
    out = F.grid_sample(x.float(), grid, mode=mode, padding_mode="zeros", align_corners=False)
    return out if batched else out[0]


def paste_logits(logits: torch.Tensor, roi: Roi, slice_shape: tuple[int, int]) -> torch.Tensor:
    """Crop-frame logits (B, C, h, w) -> slice-frame logits (B, C, H, W), bilinear inside the
    crop and ``-OUTSIDE_LOGIT`` outside it."""
    height, width = slice_shape
    b, c = logits.shape[:2]
    theta = torch.tensor(
        [
            [width / roi.side, 0.0, (width - 2.0 * roi.cx) / roi.side],
            [0.0, height / roi.side, (height - 2.0 * roi.cy) / roi.side],
        ],
        dtype=torch.float32,
        device=logits.device,
    )[None].expand(b, 2, 3)
    grid = F.affine_grid(theta, [b, c, height, width], align_corners=False)
    shifted = logits.float() + OUTSIDE_LOGIT  # zero padding then means -OUTSIDE_LOGIT
    out = F.grid_sample(shifted, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out - OUTSIDE_LOGIT
