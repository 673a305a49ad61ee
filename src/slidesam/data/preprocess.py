"""Slice-window preprocessing of the seed papers (Slide-SAM §3 and SSA Appendix A).

Pure array functions; ``slidesam.data.prepare`` runs them over datasets and writes files, and
inference uses the same functions so training and inference see identical inputs.

- Slicing axis: the array axis with the fewest voxels (ties: the lower axis, so z wins), or
  all three axes (Slide-SAM pretraining).
- A window is three adjacent slices ``(c - 1, c, c + 1)`` stacked as the three channels of one
  image; centres run from 1 to n - 2, so every window lies inside the volume.
- Intensities: clip to a window (CT [-200, 400] HU, MRI [0, 600]) and scale linearly to
  [0, 255]. ``"fixed"`` scaling (the default, the papers' text) maps the window itself to
  [0, 255], the same for every slice of every volume; ``"window-minmax"`` (the Slide-SAM reference
  code) clips, then stretches each three-slice window's own min..max to 0..255.
- Resize to ``size x size``: bilinear for images, nearest for masks.
- A label's mask is kept only if its area on the centre slice *exceeds* ``min_area_fraction``
  (0.14 %) of the slice area; the area is counted on the original slice (before resizing), and
  the comparison is exact (rational arithmetic), so the boundary case is decided the same way on
  every machine.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
from PIL import Image

from slidesam.core import InputError

__all__ = [
    "CT_WINDOW",
    "MIN_AREA_FRACTION",
    "MRI_WINDOW",
    "SCALINGS",
    "choose_slicing_axes",
    "mask_is_kept",
    "resize_image",
    "resize_masks",
    "scale_window",
    "slice_window",
    "to_uint8",
    "window_centres",
]

CT_WINDOW: tuple[float, float] = (-200.0, 400.0)
MRI_WINDOW: tuple[float, float] = (0.0, 600.0)
MIN_AREA_FRACTION = 0.0014
SCALINGS = ("fixed", "window-minmax")
AXIS_NAMES = ("z", "y", "x")


def choose_slicing_axes(shape: tuple[int, ...], mode: str = "auto") -> tuple[int, ...]:
    """Axes to slice along: ``"auto"`` (fewest voxels), ``"all"``, or one of ``z``/``y``/``x``.

    Args:
        shape: (Z, Y, X) array shape.
    """
    if len(shape) != 3:
        raise InputError(f"expected a 3D shape (z, y, x), got {tuple(shape)}")
    if mode == "auto":
        return (int(np.argmin(shape)),)  # argmin returns the first minimum: z on ties
    if mode == "all":
        return (0, 1, 2)
    if mode in AXIS_NAMES:
        return (AXIS_NAMES.index(mode),)
    raise InputError(f"unknown slicing axis mode {mode!r}; use auto, all, z, y or x")


def to_uint8(array: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Clip to ``window`` = (low, high) and map linearly to 0..255 (uint8, rounded).

    ``low`` -> 0, ``high`` -> 255; e.g. with (-200, 400): -200 HU -> 0, 100 HU -> 128 (127.5
    rounded half to even gives 128), 400 HU -> 255.
    """
    low, high = float(window[0]), float(window[1])
    if not high > low:
        raise InputError(f"intensity window must have low < high, got {window}")
    scaled = (np.clip(array.astype(np.float32), low, high) - low) * np.float32(255.0 / (high - low))
    return np.rint(scaled).astype(np.uint8)


def scale_window(slices: np.ndarray, window: tuple[float, float], scaling: str) -> np.ndarray:
    """Intensity-map one window ``(3, H, W)`` of raw values to uint8 (see module docstring)."""
    if scaling == "fixed":
        return to_uint8(slices, window)
    if scaling == "window-minmax":
        clipped = np.clip(slices.astype(np.float32), window[0], window[1])
        lo, hi = float(clipped.min()), float(clipped.max())
        if hi <= lo:
            return np.zeros(slices.shape, np.uint8)
        return np.rint((clipped - lo) * np.float32(255.0 / (hi - lo))).astype(np.uint8)
    raise InputError(f"unknown scaling {scaling!r}; use one of {', '.join(SCALINGS)}")


def window_centres(n_slices: int) -> range:
    """Centre indices of all three-slice windows inside a stack of ``n_slices``."""
    return range(1, n_slices - 1)


def slice_window(array: np.ndarray, axis: int, centre: int, *, clamp: bool = False) -> np.ndarray:
    """Slices ``centre - 1 .. centre + 1`` along ``axis`` as a ``(3, H, W)`` array.

    (H, W) are the two remaining axes in array order, e.g. (y, x) for axis 0. Without
    ``clamp`` the window must lie inside the stack (centres 1..n-2; a view is returned); with
    ``clamp`` every centre 0..n-1 works, neighbours past the ends repeating the edge slice
    (inference uses this so the first and last slices get a window of their own).
    """
    n = array.shape[axis]
    if clamp:
        if not 0 <= centre < n:
            raise InputError(f"window centre {centre} out of range for {n} slices")
        index = [min(max(i, 0), n - 1) for i in (centre - 1, centre, centre + 1)]
        return np.moveaxis(np.take(array, index, axis=axis), axis, 0)
    if not 1 <= centre <= n - 2:
        raise InputError(f"window centre {centre} out of range for {n} slices")
    return np.moveaxis(array, axis, 0)[centre - 1 : centre + 2]


def mask_is_kept(centre_mask: np.ndarray, min_area_fraction: float = MIN_AREA_FRACTION) -> bool:
    """True if the mask's area exceeds ``min_area_fraction`` of the slice area (strictly).

    Exact: on a 100 x 100 slice with 0.0014, 14 pixels are dropped and 15 kept.
    """
    area = int(np.count_nonzero(centre_mask))
    limit = Fraction(str(min_area_fraction))
    return area * limit.denominator > limit.numerator * centre_mask.size


def resize_image(window: np.ndarray, size: int) -> np.ndarray:
    """``(3, H, W)`` uint8 -> ``(size, size, 3)`` uint8 RGB, bilinear."""
    rgb = Image.fromarray(np.ascontiguousarray(np.moveaxis(window, 0, -1)), mode="RGB")
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(rgb)


def resize_masks(masks: np.ndarray, size: int) -> np.ndarray:
    """``(..., H, W)`` binary -> ``(..., size, size)`` uint8 0/1, nearest neighbour."""
    flat = masks.reshape(-1, *masks.shape[-2:]).astype(np.uint8)
    out = np.empty((flat.shape[0], size, size), np.uint8)
    for i, m in enumerate(flat):
        img = Image.fromarray(m, mode="L")
        out[i] = np.asarray(img.resize((size, size), Image.Resampling.NEAREST))
    return out.reshape(*masks.shape[:-2], size, size)
