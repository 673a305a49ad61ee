"""3D boxes around masks, moved between phases through world space, cut into slice prompts.

SSA stage 2 (the paper's Eq. 1-2): the stage-1 tumour mask on the arterial phase gives a 3D
box; the box is carried to the plain phase *in world coordinates* (optionally through the
patient motion measured by :func:`slidesam.ssa.register.register_rigid`), and every axial slice
of the plain phase inside the box gets the same 2D box prompt.

Conventions (see ``slidesam.core.geometry``): arrays are ``(z, y, x)``; a :class:`Box3D` holds
inclusive voxel index bounds in that order on one grid; world points are LPS ``(x, y, z)`` mm.
Transforms are :class:`~slidesam.ssa.register.WorldTransform` objects whose ``forward`` maps
world points of the SOURCE phase (the box's or mask's grid) to world points of the TARGET phase.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from slidesam.core import Geometry, InputError
from slidesam.core.prompts import Prompt
from slidesam.data.io import to_sitk
from slidesam.ssa.register import WorldTransform

__all__ = [
    "Box3D",
    "axial_axis",
    "component_boxes",
    "resample_mask",
    "slice_prompts_3d",
    "slice_prompts_per_slice",
    "transfer_box",
]

#: tolerance, in voxels, for a voxel centre lying exactly on a box face (counts as inside)
_EPS_VOXEL = 1e-6


def _int3(value, name: str) -> tuple[int, int, int]:
    try:
        out = tuple(int(v) for v in value)
        integral = all(float(v) == int(v) for v in value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be 3 integers (z, y, x), got {value!r}") from None
    if len(out) != 3 or not integral:
        raise InputError(f"{name} must be 3 integers (z, y, x), got {value!r}")
    return out


@dataclass(frozen=True)
class Box3D:
    """An axis-aligned box of voxels on one grid.

    Attributes:
        lo: first voxel ``(z, y, x)``, inclusive.
        hi: last voxel ``(z, y, x)``, inclusive (``hi >= lo`` on every axis).
        component: 1 for the largest connected component, 2 for the next...; 0 for a box over
            all foreground (or not from a component).
        voxels: foreground voxels counted on the grid the box was measured on; 0 when not
            counted there (a box moved to another grid by :func:`transfer_box`).
    """

    lo: tuple[int, int, int]
    hi: tuple[int, int, int]
    component: int = 0
    voxels: int = 0

    def __post_init__(self) -> None:
        lo, hi = _int3(self.lo, "Box3D.lo"), _int3(self.hi, "Box3D.hi")
        if any(h < lo_ for lo_, h in zip(lo, hi, strict=True)):
            raise InputError(f"Box3D is empty: lo {lo} must be <= hi {hi} on every axis")
        if int(self.component) < 0 or int(self.voxels) < 0:
            raise InputError(
                f"Box3D component and voxels must be >= 0, got {self.component}, {self.voxels}"
            )
        object.__setattr__(self, "lo", lo)
        object.__setattr__(self, "hi", hi)
        object.__setattr__(self, "component", int(self.component))
        object.__setattr__(self, "voxels", int(self.voxels))

    @property
    def size(self) -> tuple[int, int, int]:
        """Number of voxels along ``(z, y, x)``."""
        return tuple(h - lo + 1 for lo, h in zip(self.lo, self.hi, strict=True))

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        """Index the box out of a ``(z, y, x)`` array: ``array[box.slices]``."""
        return tuple(slice(lo, h + 1) for lo, h in zip(self.lo, self.hi, strict=True))

    def corners_world(self, geometry: Geometry) -> np.ndarray:
        """(8, 3) LPS mm: the corners of the box's continuous extent (outer voxel faces)."""
        return geometry.index_to_world(_face_corners(self))

    def to_dict(self, geometry: Geometry | None = None) -> dict:
        """JSON-ready. With ``geometry`` (the box's grid), adds its extent in world space:
        ``world_min_lps_mm``/``world_max_lps_mm`` (axis-aligned bounds of the outer voxel faces)
        and ``size_mm`` (z, y, x)."""
        d = {
            "lo_zyx": list(self.lo),
            "hi_zyx": list(self.hi),
            "size_zyx": list(self.size),
            "component": self.component,
            "voxels": self.voxels,
        }
        if geometry is not None:
            w = self.corners_world(geometry)
            d["world_min_lps_mm"] = [round(float(v), 3) for v in w.min(axis=0)]
            d["world_max_lps_mm"] = [round(float(v), 3) for v in w.max(axis=0)]
            d["size_mm"] = [
                round(n * s, 3) for n, s in zip(self.size, geometry.spacing, strict=True)
            ]
        return d


def _face_corners(box: Box3D) -> np.ndarray:
    """(8, 3) continuous ``(z, y, x)`` indices of the outer faces: ``lo - 0.5 .. hi + 0.5``."""
    lo = np.asarray(box.lo, dtype=np.float64) - 0.5
    hi = np.asarray(box.hi, dtype=np.float64) + 0.5
    return np.array(
        [[z, y, x] for z in (lo[0], hi[0]) for y in (lo[1], hi[1]) for x in (lo[2], hi[2])]
    )


def _check_mask(mask, shape: tuple[int, ...] | None, name: str = "mask") -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise InputError(f"{name} must be a 3D (z, y, x) array, got shape {mask.shape}")
    if shape is not None and tuple(mask.shape) != tuple(shape):
        raise InputError(f"{name} shape {mask.shape} does not match its geometry {tuple(shape)}")
    if not (mask.dtype == np.bool_ or np.issubdtype(mask.dtype, np.integer)):
        raise TypeError(
            f"{name} must be bool or integer labels, got {mask.dtype}; threshold a probability "
            "map first (e.g. prob > 0.5)"
        )
    return mask


def _check_transform(transform) -> WorldTransform | None:
    if transform is not None and not isinstance(transform, WorldTransform):
        raise TypeError(
            f"transform must be a WorldTransform (source world -> target world), got "
            f"{type(transform).__name__}; wrap a SimpleITK transform with "
            "WorldTransform.from_sitk"
        )
    return transform


def component_boxes(
    mask: np.ndarray,
    geometry: Geometry,
    *,
    per_component: bool = True,
    margin_mm: float = 0.0,
    min_voxels: int = 1,
) -> list[Box3D]:
    """Bounding boxes of a mask's 3D connected components (26-connectivity).

    Args:
        mask: (Z, Y, X) bool or integer; nonzero is foreground.
        geometry: the mask's grid (for the margin's voxel sizes).
        per_component: one box per component, largest first (``component`` 1, 2, ...); False
            gives one box over all kept foreground (``component`` 0), the SSA paper's choice.
        margin_mm: grow each side by this many mm, ``ceil(margin_mm / spacing)`` voxels per
            axis, clipped to the grid.
        min_voxels: components with fewer voxels are dropped (in both modes), e.g. to ignore
            specks of a stage-1 prediction.

    Returns:
        Boxes on ``geometry``'s grid; ``[]`` when nothing is left.
    """
    if not isinstance(geometry, Geometry):
        raise TypeError(f"geometry must be a Geometry, got {type(geometry).__name__}")
    mask = _check_mask(mask, geometry.shape)
    margin_mm = float(margin_mm)
    if not math.isfinite(margin_mm) or margin_mm < 0:
        raise InputError(f"margin_mm must be >= 0, got {margin_mm}")
    if isinstance(min_voxels, bool) or int(min_voxels) < 1:
        raise InputError(f"min_voxels must be a positive integer, got {min_voxels!r}")
    margin = np.array([math.ceil(margin_mm / s - 1e-9) for s in geometry.spacing], dtype=int)
    shape = np.asarray(geometry.shape)

    labels, n = ndimage.label(mask != 0, structure=np.ones((3, 3, 3), dtype=bool))
    if n == 0:
        return []
    counts = np.bincount(labels.ravel(), minlength=n + 1)
    keep = [i for i in range(1, n + 1) if counts[i] >= min_voxels]
    if not keep:
        return []
    objects = ndimage.find_objects(labels)

    def grown(lo, hi, component: int, voxels: int) -> Box3D:
        lo = np.maximum(np.asarray(lo) - margin, 0)
        hi = np.minimum(np.asarray(hi) + margin, shape - 1)
        return Box3D(lo=tuple(lo), hi=tuple(hi), component=component, voxels=voxels)

    def bounds(i: int) -> tuple[list[int], list[int]]:
        sl = objects[i - 1]
        return [s.start for s in sl], [s.stop - 1 for s in sl]

    if not per_component:
        los, his = zip(*(bounds(i) for i in keep), strict=True)
        total = int(sum(counts[i] for i in keep))
        return [grown(np.min(los, axis=0), np.max(his, axis=0), 0, total)]
    keep.sort(key=lambda i: (-counts[i], i))
    return [grown(*bounds(i), rank, int(counts[i])) for rank, i in enumerate(keep, start=1)]


def transfer_box(
    box: Box3D,
    source: Geometry,
    target: Geometry,
    *,
    transform: WorldTransform | None = None,
) -> Box3D | None:
    """Move a box from one grid to another through world space (never by array index).

    The 8 corners of the box's continuous extent (outer voxel faces, ``lo - 0.5 .. hi + 0.5``)
    go to world space on ``source``, through ``transform.forward`` if given (source-phase world
    -> target-phase world, e.g. ``register_rigid(fixed=source_phase, moving=target_phase)
    .transform``), then to continuous indices of ``target``. The result holds the target voxels
    whose centres lie inside the axis-aligned bounds of those 8 points (a centre on a face
    counts as inside), clipped to the target grid. Where the extent is thinner than a target
    voxel and holds no centre, the voxel nearest its middle is kept, so a box that overlaps the
    grid never vanishes. Flipped, permuted or oblique directions, other spacings, origins and
    slice counts are all handled by the world round trip.

    Returns:
        The box on ``target`` (``component`` kept, ``voxels`` 0), or None when its extent does
        not overlap the target grid.
    """
    if not isinstance(box, Box3D):
        raise TypeError(f"box must be a Box3D, got {type(box).__name__}")
    transform = _check_transform(transform)
    world = source.index_to_world(_face_corners(box))
    if transform is not None:
        world = transform.forward(world)
    idx = target.world_to_index(world)
    a, b = idx.min(axis=0), idx.max(axis=0)
    shape = np.asarray(target.shape)
    if np.any(b < -0.5) or np.any(a > shape - 0.5):
        return None
    lo = np.ceil(a - _EPS_VOXEL).astype(int)
    hi = np.floor(b + _EPS_VOXEL).astype(int)
    thin = hi < lo
    mid = np.rint((a + b) / 2.0).astype(int)
    lo[thin], hi[thin] = mid[thin], mid[thin]
    lo, hi = np.maximum(lo, 0), np.minimum(hi, shape - 1)
    if np.any(hi < lo):
        return None
    return Box3D(lo=tuple(lo), hi=tuple(hi), component=box.component, voxels=0)


def axial_axis(geometry: Geometry) -> int:
    """The array axis (0, 1 or 2 of ``(z, y, x)``) most aligned with world z (superior).

    This is the slicing axis for per-axial-slice prompts: 0 for ordinary axial CT (flipped or
    not), 1 or 2 for volumes stored with permuted axes.
    """
    return int(np.argmax(np.abs(geometry.direction[2, :])))


def _plane_axes(axis: int) -> tuple[int, int]:
    """(row axis, column axis) of the 2D slices taken along ``axis``."""
    if axis not in (0, 1, 2):
        raise InputError(f"axis must be 0, 1 or 2 (z, y, x), got {axis!r}")
    rest = [a for a in range(3) if a != axis]
    return rest[0], rest[1]


def slice_prompts_3d(box: Box3D, axis: int, label: int = 1, *, source: str = "ssa") -> list[Prompt]:
    """The SSA box prompts (paper Eq. 1-2): the same rectangle on every slice of the box.

    Args:
        box: the box on the grid being prompted.
        axis: slicing axis of the ``(z, y, x)`` array (see :func:`axial_axis`).
        label: output label of the object.
        source: recorded in each prompt.

    Returns:
        One Prompt per slice ``box.lo[axis] .. box.hi[axis]``, ``slice`` indexing ``axis``;
        ``box`` is inclusive XYXY in that slice's pixels, ``(lo_col, lo_row, hi_col, hi_row)``,
        where the slice is ``np.take(array, slice, axis)`` (rows = the first remaining axis,
        columns = the second).
    """
    if not isinstance(box, Box3D):
        raise TypeError(f"box must be a Box3D, got {type(box).__name__}")
    row, col = _plane_axes(axis)
    rect = (box.lo[col], box.lo[row], box.hi[col], box.hi[row])
    return [
        Prompt(slice=s, label=label, box=rect, source=source)
        for s in range(box.lo[axis], box.hi[axis] + 1)
    ]


def slice_prompts_per_slice(
    mask_on_target: np.ndarray,
    axis: int,
    label: int = 1,
    margin_px: float = 0,
    *,
    source: str = "ssa",
) -> list[Prompt]:
    """One box prompt per slice with foreground: that slice's own mask bounding box.

    Args:
        mask_on_target: (Z, Y, X) bool or integer on the grid being prompted (e.g. from
            :func:`resample_mask`); nonzero is foreground.
        axis: slicing axis (see :func:`axial_axis`).
        label: output label of the object.
        margin_px: grow each side by this many pixels (may be fractional), clipped to the slice.
        source: recorded in each prompt.

    Returns:
        Prompts in slice order; ``box`` inclusive XYXY ``(x0, y0, x1, y1)`` in slice pixels
        (x = column, y = row of ``np.take(mask, slice, axis)``).
    """
    mask = _check_mask(mask_on_target, None, "mask_on_target") != 0
    row, col = _plane_axes(axis)
    margin_px = float(margin_px)
    if not math.isfinite(margin_px) or margin_px < 0:
        raise InputError(f"margin_px must be >= 0, got {margin_px}")
    h, w = mask.shape[row], mask.shape[col]
    out = []
    for s in np.flatnonzero(mask.any(axis=(row, col))):
        plane = np.take(mask, s, axis=axis)
        rows = np.flatnonzero(plane.any(axis=1))
        cols = np.flatnonzero(plane.any(axis=0))
        rect = (
            max(cols[0] - margin_px, 0.0),
            max(rows[0] - margin_px, 0.0),
            min(cols[-1] + margin_px, w - 1.0),
            min(rows[-1] + margin_px, h - 1.0),
        )
        out.append(Prompt(slice=int(s), label=label, box=rect, source=source))
    return out


def resample_mask(
    mask: np.ndarray,
    source: Geometry,
    target: Geometry,
    *,
    transform: WorldTransform | None = None,
) -> np.ndarray:
    """Nearest-neighbour resampling of a label map onto another grid, in world space.

    Args:
        mask: (Z, Y, X) bool or integer labels on ``source``.
        source: the mask's grid.
        target: the output grid.
        transform: source-phase world -> target-phase world (same direction as in
            :func:`transfer_box`); its inverse is what ITK's resampler uses internally.

    Returns:
        (Z', Y', X') array on ``target``, same dtype as ``mask``; 0 outside the source grid.
    """
    mask = _check_mask(mask, source.shape)
    transform = _check_transform(transform)
    dtype = mask.dtype
    work = mask.astype(np.uint8) if dtype == np.bool_ else mask
    itk_tx = (
        sitk.Transform(3, sitk.sitkIdentity)
        if transform is None
        else transform.inverted().to_sitk()  # ITK resampling maps output points to input points
    )
    try:
        img = to_sitk(np.ascontiguousarray(work), source)
    except (RuntimeError, TypeError) as exc:
        raise TypeError(f"mask dtype {dtype} is not supported by SimpleITK: {exc}") from None
    out = sitk.Resample(
        img,
        [int(v) for v in target.shape[::-1]],
        itk_tx,
        sitk.sitkNearestNeighbor,
        target.origin,
        target.itk_spacing(),
        target.itk_direction(),
        0,
        img.GetPixelID(),
    )
    return sitk.GetArrayFromImage(out).astype(dtype, copy=False)
