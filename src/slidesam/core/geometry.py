"""Voxel grids in physical space, with one axis convention for the whole toolkit.

Convention (written once, here):

- Arrays are indexed ``(z, y, x)`` (slice, row, column), as ``SimpleITK.GetArrayFromImage``
  returns them.
- ``spacing`` is in millimetres, in the same ``(z, y, x)`` order.
- Physical ("world") points are in the patient frame of DICOM and ITK, **LPS**, and are
  written ``(x, y, z)`` in millimetres: x grows to the patient's left, y to posterior,
  z to superior. ``origin`` is the world position of the centre of voxel ``(0, 0, 0)``.
- ``direction`` is a 3x3 matrix whose column ``a`` is the unit world vector of array axis
  ``a`` (so column 0 is the z axis of the array). ITK stores the same matrix with its columns
  in (i, j, k) = (x, y, z) index order; ``direction_zyx = direction_itk[:, ::-1]``.

So ``world = origin + direction @ (spacing * index_zyx)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from slidesam.core.errors import InputError

__all__ = ["Geometry"]


def _vec3(value, name: str) -> tuple[float, float, float]:
    arr = np.asarray(value, dtype=np.float64).reshape(-1)
    if arr.shape != (3,) or not np.all(np.isfinite(arr)):
        raise InputError(f"{name} must be 3 finite numbers, got {value!r}")
    return (float(arr[0]), float(arr[1]), float(arr[2]))


@dataclass(frozen=True)
class Geometry:
    """A 3D voxel grid placed in LPS world space.

    Attributes:
        shape: number of voxels ``(z, y, x)``.
        spacing: voxel size in mm ``(z, y, x)``, all > 0.
        origin: world position (LPS, ``(x, y, z)`` mm) of the centre of voxel ``(0, 0, 0)``.
        direction: (3, 3) float64; column ``a`` is the world unit vector of array axis ``a``
            (``(z, y, x)`` column order).
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: np.ndarray = field(default_factory=lambda: np.eye(3)[:, ::-1].copy())

    def __post_init__(self) -> None:
        shape = tuple(int(s) for s in self.shape)
        if len(shape) != 3 or min(shape) < 1:
            raise InputError(f"shape must be 3 positive integers (z, y, x), got {self.shape!r}")
        spacing = _vec3(self.spacing, "spacing")
        if min(spacing) <= 0:
            raise InputError(f"spacing must be positive, got {spacing}")
        direction = np.array(self.direction, dtype=np.float64)
        if direction.shape != (3, 3):
            raise InputError(f"direction must be a 3x3 matrix, got shape {direction.shape}")
        if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
            raise InputError("direction must be orthonormal (a rotation, possibly with flips)")
        direction.setflags(write=False)
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "spacing", spacing)
        object.__setattr__(self, "origin", _vec3(self.origin, "origin"))
        object.__setattr__(self, "direction", direction)

    # --- conversions to and from ITK's (x, y, z) ordering ---------------------------------
    @classmethod
    def from_itk(cls, size_xyz, spacing_xyz, origin, direction_flat) -> Geometry:
        """Build from SimpleITK's ``GetSize/GetSpacing/GetOrigin/GetDirection`` values."""
        d_itk = np.asarray(direction_flat, dtype=np.float64).reshape(3, 3)
        return cls(
            shape=tuple(int(s) for s in size_xyz)[::-1],
            spacing=tuple(float(s) for s in spacing_xyz)[::-1],
            origin=tuple(float(o) for o in origin),
            direction=d_itk[:, ::-1],
        )

    def itk_spacing(self) -> tuple[float, float, float]:
        return self.spacing[::-1]

    def itk_direction(self) -> tuple[float, ...]:
        return tuple(float(v) for v in self.direction[:, ::-1].reshape(-1))

    # --- coordinate transforms ---------------------------------------------------------------
    @property
    def affine(self) -> np.ndarray:
        """(4, 4) matrix mapping homogeneous ``(z, y, x, 1)`` indices to ``(x, y, z, 1)`` LPS mm."""
        out = np.eye(4)
        out[:3, :3] = self.direction * np.asarray(self.spacing)[None, :]
        out[:3, 3] = self.origin
        return out

    def index_to_world(self, index_zyx) -> np.ndarray:
        """Continuous voxel indices ``(..., 3)`` in ``(z, y, x)`` -> LPS points ``(..., 3)`` mm."""
        idx = np.asarray(index_zyx, dtype=np.float64)
        if idx.shape[-1] != 3:
            raise InputError(f"indices must have a last axis of 3 (z, y, x), got {idx.shape}")
        a = self.affine
        return idx @ a[:3, :3].T + a[:3, 3]

    def world_to_index(self, points_xyz) -> np.ndarray:
        """LPS points ``(..., 3)`` mm -> continuous voxel indices ``(..., 3)`` in ``(z, y, x)``.

        Indices are not rounded or clipped: round them (``np.rint``) for the nearest voxel, and
        check ``contains`` when the point may lie outside the grid.
        """
        pts = np.asarray(points_xyz, dtype=np.float64)
        if pts.shape[-1] != 3:
            raise InputError(f"points must have a last axis of 3 (x, y, z), got {pts.shape}")
        m = self.direction * np.asarray(self.spacing)[None, :]
        return (pts - np.asarray(self.origin)) @ np.linalg.inv(m).T

    def contains(self, index_zyx, *, margin: float = 0.5) -> np.ndarray:
        """Whether continuous indices fall inside the grid (voxel centres +- ``margin``)."""
        idx = np.asarray(index_zyx, dtype=np.float64)
        upper = np.asarray(self.shape, dtype=np.float64) - 1 + margin
        return np.all((idx >= -margin) & (idx <= upper), axis=-1)

    def world_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Axis-aligned world (LPS) box ``(min_xyz, max_xyz)`` covering the voxel centres."""
        corners = np.array(
            [
                [z, y, x]
                for z in (0, self.shape[0] - 1)
                for y in (0, self.shape[1] - 1)
                for x in (0, self.shape[2] - 1)
            ],
            dtype=np.float64,
        )
        w = self.index_to_world(corners)
        return w.min(axis=0), w.max(axis=0)

    # --- comparison --------------------------------------------------------------------------
    def mismatch(self, other: Geometry, *, tol_voxel: float = 0.01, tol_dir: float = 1e-4) -> str:
        """Empty string when ``other`` is the same grid, else a human-readable difference.

        Tolerances absorb the float32 rounding of NIfTI headers: spacing within a relative
        ``1e-4``, origin within ``tol_voxel`` of the smallest voxel side, direction entries within
        ``tol_dir``.
        """
        if self.shape != other.shape:
            return f"shape (z, y, x) {self.shape} != {other.shape}"
        if not np.allclose(self.spacing, other.spacing, rtol=1e-4, atol=0):
            return f"spacing (z, y, x) mm {_fmt(self.spacing)} != {_fmt(other.spacing)}"
        if np.max(np.abs(np.subtract(self.origin, other.origin))) > tol_voxel * min(self.spacing):
            return f"origin (LPS mm) {_fmt(self.origin)} != {_fmt(other.origin)}"
        if np.max(np.abs(self.direction - other.direction)) > tol_dir:
            return (
                f"direction {np.round(self.direction, 4).tolist()} != "
                f"{np.round(other.direction, 4).tolist()}"
            )
        return ""

    def __eq__(self, other: object) -> bool:  # exact equality, bit for bit
        if not isinstance(other, Geometry):
            return NotImplemented
        return (
            self.shape == other.shape
            and self.spacing == other.spacing
            and self.origin == other.origin
            and np.array_equal(self.direction, other.direction)
        )

    __hash__ = None  # mutable-looking numpy field; geometries are compared, not hashed

    def to_dict(self) -> dict:
        """JSON-ready description (used in reports and metadata)."""
        return {
            "shape_zyx": list(self.shape),
            "spacing_zyx_mm": list(self.spacing),
            "origin_lps_mm": list(self.origin),
            "direction_columns_zyx": self.direction.tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> Geometry:
        return cls(
            shape=d["shape_zyx"],
            spacing=d["spacing_zyx_mm"],
            origin=d["origin_lps_mm"],
            direction=np.asarray(d["direction_columns_zyx"]),
        )


def _fmt(v) -> str:
    return "(" + ", ".join(f"{float(x):.6g}" for x in v) + ")"
