"""Rigid registration between CT phases, and ``WorldTransform``: one map, two directions.

SSA segments the tumour on the arterial phase and needs its box on the plain (non-contrast)
phase. Both phases are in the scanner's patient frame (LPS, ``(x, y, z)`` mm, see
``slidesam.core.geometry``), but the patient moves and breathes between them, so the same
anatomy sits at slightly different world positions. :func:`register_rigid` measures that motion
with SimpleITK; the result is a :class:`WorldTransform` that moves world points of one phase to
the world points of the same anatomy in the other phase.

Direction, once and for all: SimpleITK's registration transform maps points of the FIXED
image's world space to the MOVING image's world space (``fixed(p)`` and ``moving(T(p))`` show
the same anatomy). So ``register_rigid(fixed=arterial, moving=plain).transform.forward`` takes
arterial world points (e.g. the corners of the stage-1 tumour box) to plain world points, which
is what :func:`slidesam.ssa.boxes.transfer_box` and :func:`~slidesam.ssa.boxes.resample_mask`
expect.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import SimpleITK as sitk

from slidesam.core import Geometry, InputError, Volume
from slidesam.data.io import to_sitk

__all__ = ["RigidResult", "WorldTransform", "register_rigid", "roi_mask"]

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# WorldTransform
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class WorldTransform:
    """An affine map between two world frames (LPS, ``(x, y, z)`` mm): ``q = matrix @ p + offset``.

    ``forward`` goes from the *source* frame (the phase the points were measured on, e.g. the
    arterial phase, the FIXED image of a registration) to the *target* frame (e.g. the plain
    phase, the MOVING image); ``inverse`` goes back. Registration gives rigid maps (``matrix`` a
    rotation); any invertible affine is accepted.

    Attributes:
        matrix: (3, 3) float64, read-only.
        offset: (3,) float64 mm, read-only.
    """

    matrix: np.ndarray
    offset: np.ndarray

    def __post_init__(self) -> None:
        matrix = np.array(self.matrix, dtype=np.float64)
        offset = np.array(self.offset, dtype=np.float64).reshape(-1)
        if matrix.shape != (3, 3) or not np.all(np.isfinite(matrix)):
            raise InputError(f"WorldTransform.matrix must be a finite 3x3 matrix, got {matrix!r}")
        if offset.shape != (3,) or not np.all(np.isfinite(offset)):
            raise InputError(
                f"WorldTransform.offset must be 3 finite numbers (x, y, z) mm: {offset}"
            )
        if abs(np.linalg.det(matrix)) < 1e-9:
            raise InputError("WorldTransform.matrix is singular; the map must be invertible")
        matrix.setflags(write=False)
        offset.setflags(write=False)
        object.__setattr__(self, "matrix", matrix)
        object.__setattr__(self, "offset", offset)

    # --- constructors ------------------------------------------------------------------------
    @classmethod
    def identity(cls) -> WorldTransform:
        return cls(matrix=np.eye(3), offset=np.zeros(3))

    @classmethod
    def translation(cls, shift_xyz) -> WorldTransform:
        """``q = p + shift_xyz`` (LPS mm)."""
        return cls(matrix=np.eye(3), offset=np.asarray(shift_xyz, dtype=np.float64))

    @classmethod
    def from_sitk(cls, transform: sitk.Transform) -> WorldTransform:
        """The same map as a SimpleITK transform (same direction: its input is our source).

        Works for any transform that is affine in effect (Euler, Versor, Similarity, Affine,
        Translation, and composites of them): the map is read off ``TransformPoint`` at four
        points and checked on a few more; a deformable transform is refused.
        """
        probe = np.array([[0, 0, 0], [100, 0, 0], [0, 100, 0], [0, 0, 100]], dtype=np.float64)
        out = np.array([transform.TransformPoint(tuple(p)) for p in probe])
        offset = out[0]
        matrix = (out[1:] - offset).T / 100.0
        result = cls(matrix=matrix, offset=offset)
        check = np.array([[37.0, -52.0, 81.0], [-140.0, 95.0, -23.0], [12.0, 210.0, -170.0]])
        got = np.array([transform.TransformPoint(tuple(p)) for p in check])
        if not np.allclose(got, result.forward(check), atol=1e-6):
            raise InputError(
                f"{transform.GetName()} is not an affine map; only rigid or affine transforms "
                "can be used as a WorldTransform"
            )
        return result

    # --- use ---------------------------------------------------------------------------------
    def forward(self, points_xyz) -> np.ndarray:
        """Source-frame world points ``(..., 3)`` LPS mm -> target-frame world points."""
        p = _points(points_xyz)
        return p @ self.matrix.T + self.offset

    def inverse(self, points_xyz) -> np.ndarray:
        """Target-frame world points ``(..., 3)`` LPS mm -> source-frame world points."""
        p = _points(points_xyz)
        return (p - self.offset) @ np.linalg.inv(self.matrix).T

    def inverted(self) -> WorldTransform:
        """The map in the other direction (target -> source) as a WorldTransform."""
        inv = np.linalg.inv(self.matrix)
        return WorldTransform(matrix=inv, offset=-inv @ self.offset)

    def then(self, other: WorldTransform) -> WorldTransform:
        """``self`` followed by ``other``: ``p -> other.forward(self.forward(p))``."""
        return WorldTransform(
            matrix=other.matrix @ self.matrix, offset=other.matrix @ self.offset + other.offset
        )

    def to_sitk(self) -> sitk.AffineTransform:
        """SimpleITK transform of ``forward`` (source -> target), centre at the world origin.

        For ``sitk.Resample`` onto a target grid, pass ``inverted().to_sitk()``: ITK resampling
        asks, for each output (target) point, where to read in the input (source) image.
        """
        tx = sitk.AffineTransform(3)
        tx.SetMatrix(tuple(float(v) for v in self.matrix.reshape(-1)))
        tx.SetTranslation(tuple(float(v) for v in self.offset))
        return tx

    def is_identity(self, *, atol: float = 1e-9) -> bool:
        return bool(
            np.allclose(self.matrix, np.eye(3), atol=atol)
            and np.allclose(self.offset, 0, atol=atol)
        )

    def to_dict(self) -> dict:
        """JSON-ready: ``{"matrix": 3x3 rows, "offset_mm": (x, y, z)}``; ``q = M p + offset``."""
        return {"matrix": self.matrix.tolist(), "offset_mm": self.offset.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> WorldTransform:
        return cls(matrix=np.asarray(d["matrix"]), offset=np.asarray(d["offset_mm"]))


def _points(points_xyz) -> np.ndarray:
    p = np.asarray(points_xyz, dtype=np.float64)
    if p.shape[-1:] != (3,):
        raise InputError(f"points must have a last axis of 3 (x, y, z) mm, got shape {p.shape}")
    return p


# ----------------------------------------------------------------------------------------------
# registration
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RigidResult:
    """Outcome of :func:`register_rigid`.

    Attributes:
        transform: FIXED world -> MOVING world (``forward``); for ``fixed=arterial,
            moving=plain`` it takes arterial points to the plain phase.
        translation_mm: ``(x, y, z)`` LPS mm, the displacement of ``center_mm`` by the
            transform (ITK's Euler translation). With no rotation it is the whole map:
            ``moving_point = fixed_point + translation_mm``, i.e. minus the motion of the
            anatomy from the moving phase to the fixed phase.
        rotation_deg: ITK Euler angles about the world x, y, z axes, degrees (ITK applies
            them in Z-X-Y order), around ``center_mm``.
        center_mm: centre of rotation, world LPS mm (the ROI centre, else the fixed image centre).
        metric: final Mattes mutual information (negative; lower is better).
        iterations: optimizer iterations summed over the resolution levels.
        seconds: wall time of the optimisation.
        stop_condition: the optimizer's reason for stopping, last level.
    """

    transform: WorldTransform
    translation_mm: tuple[float, float, float]
    rotation_deg: tuple[float, float, float]
    center_mm: tuple[float, float, float]
    metric: float
    iterations: int
    seconds: float
    stop_condition: str = ""

    def to_dict(self) -> dict:
        return {
            "direction": "fixed world -> moving world (LPS mm)",
            "transform": self.transform.to_dict(),
            "translation_mm": [round(v, 4) for v in self.translation_mm],
            "rotation_deg": [round(v, 4) for v in self.rotation_deg],
            "center_mm": [round(v, 3) for v in self.center_mm],
            "metric": round(self.metric, 6),
            "iterations": self.iterations,
            "seconds": round(self.seconds, 3),
            "stop_condition": self.stop_condition,
        }


def _check_roi(roi_mm) -> tuple[np.ndarray, np.ndarray]:
    try:
        lo, hi = (np.asarray(v, dtype=np.float64).reshape(-1) for v in roi_mm)
    except (TypeError, ValueError):
        raise InputError(
            f"roi_mm must be ((x0, y0, z0), (x1, y1, z1)) in world LPS mm, got {roi_mm!r}"
        ) from None
    if lo.shape != (3,) or hi.shape != (3,) or not np.all(np.isfinite([lo, hi])):
        raise InputError(f"roi_mm must be two finite (x, y, z) points in mm, got {roi_mm!r}")
    if np.any(hi <= lo):
        raise InputError(f"roi_mm must have low < high on every axis, got {lo} .. {hi}")
    return lo, hi


def roi_mask(geometry: Geometry, roi_mm) -> np.ndarray:
    """(Z, Y, X) uint8: 1 where a voxel centre lies in the world box ``roi_mm``, else 0.

    Args:
        geometry: the grid (any direction: flips, permutations, oblique).
        roi_mm: ``(lo_xyz, hi_xyz)`` LPS mm, an axis-aligned box in world space.
    """
    lo, hi = _check_roi(roi_mm)
    corners = np.array(
        [[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])]
    )
    idx = geometry.world_to_index(corners)
    shape = np.asarray(geometry.shape)
    a = np.clip(np.floor(idx.min(0)).astype(int), 0, shape)
    b = np.clip(np.ceil(idx.max(0)).astype(int) + 1, 0, shape)
    out = np.zeros(geometry.shape, dtype=np.uint8)
    if np.any(b <= a):
        return out
    grid = np.stack(np.meshgrid(*(np.arange(a[k], b[k]) for k in range(3)), indexing="ij"), axis=-1)
    w = geometry.index_to_world(grid)
    inside = np.all((w >= lo - 1e-6) & (w <= hi + 1e-6), axis=-1)
    out[a[0] : b[0], a[1] : b[1], a[2] : b[2]] = inside
    return out


def _overlap(a: Geometry, b: Geometry) -> bool:
    alo, ahi = a.world_bounds()
    blo, bhi = b.world_bounds()
    return bool(np.all(np.maximum(alo, blo) <= np.minimum(ahi, bhi)))


def _fmt_box(lo, hi) -> str:
    return "(" + ", ".join(f"{u:.1f}..{v:.1f}" for u, v in zip(lo, hi, strict=True)) + ") mm"


def register_rigid(
    fixed: Volume,
    moving: Volume,
    *,
    roi_mm=None,
    window_hu: tuple[float, float] = (-200.0, 400.0),
    init: Literal["world", "geometry"] = "world",
    shrink_factors: tuple[int, ...] = (4, 2, 1),
    smoothing_sigmas_vox: tuple[float, ...] = (2.0, 1.0, 0.0),
    iterations: int = 100,
    sampling_percentage: float = 0.2,
    histogram_bins: int = 50,
    learning_rate_mm: float = 2.0,
    seed: int = 1,
    threads: int | None = None,
) -> RigidResult:
    """Rigid (6 degrees of freedom) registration of two CT volumes in world space.

    Mattes mutual information, regular-step gradient descent with scales from physical shift,
    three resolution levels, linear interpolation. Both images are cast to float32 and clipped
    to ``window_hu`` first so that the contrast agent (aorta, enhancing cortex and tumour, up to
    several hundred HU) and bone do not dominate the metric; the grids, spacings and directions
    of the two volumes may differ.

    Args:
        fixed: the reference phase (SSA: arterial, where the stage-1 box was found).
        moving: the phase to align to it (SSA: plain).
        roi_mm: optional ``(lo_xyz, hi_xyz)`` world LPS mm box on the FIXED image; only fixed
            voxels inside it drive the metric (e.g. the kidneys plus a margin). It must cover
            part of the fixed grid.
        window_hu: intensity clip (low, high) in HU.
        init: ``"world"`` starts from the identity, trusting that both phases share the
            scanner's patient frame (multi-phase CT of one session does); ``"geometry"`` uses
            ``CenteredTransformInitializer(GEOMETRY)`` to start with the two image centres on
            top of each other (images from different sessions or scanners). With ``"world"``,
            differing scan ranges do not become a false initial shift.
        shrink_factors: per-level shrink factors (voxels, every axis).
        smoothing_sigmas_vox: per-level Gaussian smoothing sigmas, in voxels of each level's
            shrunk image (so a level's sigma follows its own resolution).
        iterations: maximum optimizer iterations per level.
        sampling_percentage: fraction (0, 1] of the (masked) fixed voxels sampled for the metric
            at each level, drawn at random with ``seed``: the same seed gives the same samples,
            so results repeat up to floating-point summation order inside ITK (~1e-9 mm; not
            bit for bit, even with ``threads=1``).
        histogram_bins: Mattes histogram bins.
        learning_rate_mm: initial optimizer step, about mm of the largest physical shift.
        seed: metric sampling seed, >= 1 (ITK takes 0 to mean "seed from the wall clock",
            which would make runs differ, so 0 is refused).
        threads: ITK threads for the registration (None: ITK's default).

    Returns:
        RigidResult; ``result.transform.forward`` maps FIXED world points to MOVING world points.

    Raises:
        InputError: images that do not overlap in world space, a ROI off the fixed grid, bad
            settings, or a registration that ITK cannot run (e.g. too few samples overlap).
    """
    for name, vol in (("fixed", fixed), ("moving", moving)):
        if not isinstance(vol, Volume):
            raise TypeError(f"{name} must be a Volume, got {type(vol).__name__}")
    if len(shrink_factors) != len(smoothing_sigmas_vox) or not shrink_factors:
        raise InputError(
            f"shrink_factors {tuple(shrink_factors)} and smoothing_sigmas_vox "
            f"{tuple(smoothing_sigmas_vox)} must name the same (>= 1) number of levels"
        )
    if any(int(f) < 1 for f in shrink_factors) or any(s < 0 for s in smoothing_sigmas_vox):
        raise InputError("shrink factors must be >= 1 and smoothing sigmas >= 0")
    if not 0.0 < sampling_percentage <= 1.0:
        raise InputError(f"sampling_percentage must lie in (0, 1], got {sampling_percentage}")
    if int(iterations) < 1 or int(histogram_bins) < 4 or not learning_rate_mm > 0:
        raise InputError("iterations >= 1, histogram_bins >= 4 and learning_rate_mm > 0 required")
    low, high = (float(v) for v in window_hu)
    if not low < high:
        raise InputError(f"window_hu must be (low, high) with low < high, got {window_hu!r}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 1:
        raise InputError(
            f"seed must be an integer >= 1, got {seed!r} (ITK reads 0 as 'seed from the wall "
            "clock', which makes results irreproducible)"
        )
    if init not in ("world", "geometry"):
        raise InputError(f"init must be 'world' or 'geometry', got {init!r}")
    if init == "world" and not _overlap(fixed.geometry, moving.geometry):
        raise InputError(
            "fixed and moving images do not overlap in world space (fixed spans "
            f"{_fmt_box(*fixed.geometry.world_bounds())}, moving spans "
            f"{_fmt_box(*moving.geometry.world_bounds())}); check that both are scans of the "
            "same patient with correct origins, or use init='geometry'"
        )

    def prepare(vol: Volume) -> sitk.Image:
        arr = np.clip(vol.array.astype(np.float32, copy=False), low, high)
        return to_sitk(arr, vol.geometry)

    fixed_img, moving_img = prepare(fixed), prepare(moving)

    reg = sitk.ImageRegistrationMethod()
    flo, fhi = fixed.geometry.world_bounds()
    if roi_mm is not None:
        lo, hi = _check_roi(roi_mm)
        mask = roi_mask(fixed.geometry, (lo, hi))
        if not mask.any():
            raise InputError(
                f"roi_mm {_fmt_box(lo, hi)} holds no voxel of the fixed image, which spans "
                f"{_fmt_box(flo, fhi)}"
            )
        reg.SetMetricFixedMask(to_sitk(mask, fixed.geometry))
        center = (np.maximum(lo, flo) + np.minimum(hi, fhi)) / 2.0  # of the ROI on the grid
    else:
        center = (flo + fhi) / 2.0

    if init == "geometry":
        initial = sitk.CenteredTransformInitializer(
            fixed_img,
            moving_img,
            sitk.Euler3DTransform(),
            sitk.CenteredTransformInitializerFilter.GEOMETRY,
        )
        initial = sitk.Euler3DTransform(initial)
        # keep the same map, rotate about our centre instead of the image centre
        shift = np.asarray(initial.TransformPoint(tuple(center))) - center
        initial = sitk.Euler3DTransform()
        initial.SetCenter(tuple(float(c) for c in center))
        initial.SetTranslation(tuple(float(v) for v in shift))
    else:
        initial = sitk.Euler3DTransform()
        initial.SetCenter(tuple(float(c) for c in center))

    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=int(histogram_bins))
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(float(sampling_percentage), int(seed))
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=float(learning_rate_mm),
        minStep=1e-3,
        numberOfIterations=int(iterations),
        relaxationFactor=0.5,
        gradientMagnitudeTolerance=1e-8,
    )
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([int(f) for f in shrink_factors])
    reg.SetSmoothingSigmasPerLevel([float(s) for s in smoothing_sigmas_vox])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    reg.SetInitialTransform(initial, inPlace=False)
    if threads is not None:
        reg.SetNumberOfThreads(int(threads))
    count = [0]
    reg.AddCommand(sitk.sitkIterationEvent, lambda: count.__setitem__(0, count[0] + 1))

    start = time.perf_counter()
    try:
        out = reg.Execute(fixed_img, moving_img)
    except RuntimeError as exc:
        raise InputError(f"rigid registration failed: {_itk_message(exc)}") from None
    seconds = time.perf_counter() - start

    euler = _as_euler(out)
    result = RigidResult(
        transform=WorldTransform.from_sitk(out),
        translation_mm=tuple(float(v) for v in euler.GetTranslation()),
        rotation_deg=(
            math.degrees(euler.GetAngleX()),
            math.degrees(euler.GetAngleY()),
            math.degrees(euler.GetAngleZ()),
        ),
        center_mm=tuple(float(c) for c in euler.GetCenter()),
        metric=float(reg.GetMetricValue()),
        iterations=int(count[0]),
        seconds=seconds,
        stop_condition=reg.GetOptimizerStopConditionDescription(),
    )
    log.info(
        "rigid registration: translation %s mm, rotation %s deg, MI %.4f, %d iterations, %.2f s",
        np.round(result.translation_mm, 2).tolist(),
        np.round(result.rotation_deg, 2).tolist(),
        result.metric,
        result.iterations,
        seconds,
    )
    return result


def _as_euler(transform: sitk.Transform) -> sitk.Euler3DTransform:
    """The Euler3DTransform inside a registration result (which may come wrapped in a composite)."""
    if transform.GetName() == "CompositeTransform":
        composite = sitk.CompositeTransform(transform)
        composite.FlattenTransform()
        if composite.GetNumberOfTransforms() != 1:
            raise RuntimeError("expected one Euler3DTransform in the registration result")
        transform = composite.GetNthTransform(0)
    return sitk.Euler3DTransform(transform)


def _itk_message(exc: Exception) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.lower().startswith("description:"):
            return ln.split(":", 1)[1].strip()
    return lines[-1] if lines else type(exc).__name__
