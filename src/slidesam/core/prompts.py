"""``Prompt``: what a user (or a pipeline) tells the model about one object on one slice.

Coordinates: ``slice`` indexes the slicing axis (the first axis, z, of the (z, y, x) array for
``slidesam segment``); ``box`` is XYXY and ``points`` are XY in that slice's pixels, x = column,
y = row, inclusive (a box around a mask is the min/max pixel index of the mask).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from slidesam.core.errors import InputError

__all__ = ["Prompt"]


@dataclass(frozen=True, eq=False)
class Prompt:
    """One object's prompt on one slice.

    Attributes:
        slice: index along the slicing axis.
        label: output label value of the object (1..255); prompts with the same label are one
            object (anchors on several slices).
        box: (x0, y0, x1, y1) in slice pixels, or None.
        points: ((x, y), ...) in slice pixels, with ``point_labels`` 1 (object) / 0 (background).
        mask: (H, W) bool on this slice, or None.
        source: where it came from (``"user"``, a file name, ``"ssa"``...), kept in records.
    """

    slice: int
    label: int = 1
    box: tuple[float, float, float, float] | None = None
    points: tuple[tuple[float, float], ...] = ()
    point_labels: tuple[int, ...] = ()
    mask: np.ndarray | None = None
    source: str = "user"

    def __post_init__(self) -> None:
        if self.box is not None:
            box = tuple(float(v) for v in np.asarray(self.box, dtype=float).reshape(-1))
            if len(box) != 4:
                raise InputError(f"box must be [x0, y0, x1, y1], got {self.box!r}")
            object.__setattr__(self, "box", box)
        points = tuple(tuple(float(c) for c in p) for p in self.points)
        if any(len(p) != 2 for p in points):
            raise InputError(f"points must be [[x, y], ...], got {self.points!r}")
        object.__setattr__(self, "points", points)
        object.__setattr__(self, "point_labels", tuple(int(v) for v in self.point_labels))
        if len(self.point_labels) != len(self.points):
            raise InputError(f"{len(self.points)} points but {len(self.point_labels)} point_labels")
        if any(v not in (0, 1) for v in self.point_labels):
            raise InputError(
                f"point_labels must be 1 (object) or 0 (background): {self.point_labels}"
            )
        if not 1 <= int(self.label) <= 255:
            raise InputError(f"label must be 1..255, got {self.label}")
        if self.box is None and not self.points and self.mask is None:
            raise InputError(f"prompt on slice {self.slice} has no box, points or mask")

    def check_fits(self, n_slices: int, slice_shape: tuple[int, int]) -> None:
        """Raise InputError unless the prompt lies inside a stack of ``n_slices`` (H, W) slices."""
        h, w = slice_shape
        where = f"prompt (label {self.label}, slice {self.slice})"
        if not 0 <= self.slice < n_slices:
            raise InputError(f"{where}: slice {self.slice} is out of range 0..{n_slices - 1}")
        if self.box is not None:
            x0, y0, x1, y1 = self.box
            # inclusive pixel coordinates: x0 == x1 is a one-pixel-wide box, x1 < x0 is empty
            if x1 < x0 or y1 < y0:
                raise InputError(
                    f"{where}: empty box {list(self.box)} (need x0 <= x1 and y0 <= y1)"
                )
            if x0 < -0.5 or y0 < -0.5 or x1 > w - 0.5 or y1 > h - 0.5:
                raise InputError(
                    f"{where}: box {list(self.box)} lies outside the {w} x {h} (x, y) slice"
                )
        for x, y in self.points:
            if not (-0.5 <= x <= w - 0.5 and -0.5 <= y <= h - 0.5):
                raise InputError(f"{where}: point ({x}, {y}) lies outside the {w} x {h} slice")
        if self.mask is not None:
            if np.shape(self.mask) != (h, w):
                raise InputError(
                    f"{where}: mask shape {np.shape(self.mask)} is not the slice's {(h, w)}"
                )
            if not np.any(self.mask):
                raise InputError(f"{where}: the mask prompt is empty")
