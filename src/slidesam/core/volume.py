"""``Volume``: a 3D array together with the grid it lives on."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from slidesam.core.errors import InputError
from slidesam.core.geometry import Geometry

__all__ = ["Volume"]


@dataclass
class Volume:
    """An image or label map.

    Attributes:
        array: (Z, Y, X) array, any numeric dtype (images keep their stored values, CT in HU).
        geometry: the grid; ``geometry.shape == array.shape`` always holds.
        source: the path it was read from (file, or folder for a DICOM series), if any.
        source_files: for a DICOM series, the slice files in array order (z = 0 first); used to
            reference them from a DICOM SEG. Empty otherwise.
    """

    array: np.ndarray
    geometry: Geometry
    source: str | None = None
    source_files: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if not isinstance(self.array, np.ndarray):
            raise InputError(f"Volume.array must be a numpy array, got {type(self.array).__name__}")
        if self.array.ndim != 3:
            raise InputError(f"Volume.array must be 3D (z, y, x), got shape {self.array.shape}")
        if tuple(self.array.shape) != self.geometry.shape:
            raise InputError(
                f"array shape {self.array.shape} does not match geometry shape "
                f"{self.geometry.shape}"
            )

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.geometry.shape

    @property
    def spacing(self) -> tuple[float, float, float]:
        return self.geometry.spacing

    def with_array(self, array: np.ndarray) -> Volume:
        """Same grid and source, new array (for masks and processed images)."""
        return Volume(
            array=array, geometry=self.geometry, source=self.source, source_files=self.source_files
        )
