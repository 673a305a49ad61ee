"""Overlap and surface metrics for 3D segmentations, in millimetres.

Arrays are ``(z, y, x)`` and ``spacing`` is the voxel size in mm in the same order (see
``slidesam.core.geometry``). Prediction and ground truth must lie on the same grid.

Metrics (per binary mask, or per region of a label map):

- **Dice** ``2|P∩G| / (|P| + |G|)`` and **IoU** ``|P∩G| / |P∪G|``, counted in voxels.
- **HD95** (``monai.metrics.compute_hausdorff_distance(percentile=95, directed=False)``): the
  larger of the two directed 95th percentiles, ``max(q95(d(∂P→∂G)), q95(d(∂G→∂P)))``, where
  ``d(∂A→∂B)`` holds, for every surface voxel of A, the Euclidean distance in mm between its centre
  and the nearest surface-voxel centre of B. The percentile is ``torch.quantile`` (linear
  interpolation). It is not the percentile of the pooled distances of both directions.
- **NSD**, normalized surface Dice at tolerance ``tau`` mm (``monai.metrics.compute_surface_dice``
  with ``use_subvoxels=False``): ``(#{d(∂P→∂G) <= tau} + #{d(∂G→∂P) <= tau}) / (|∂P| + |∂G|)``.

The surface ``∂A`` of a mask is MONAI's edge: the foreground voxels removed by one binary
erosion with the 6-connected cross (``scipy.ndimage.binary_erosion``, ``A ^ erode(A)``), i.e.
foreground voxels with at least one face neighbour in the background; voxels on the array border
count as surface. Distances run between voxel centres, scaled by ``spacing`` on each axis, so a
one-voxel-thick plate has all its voxels on the surface. Surface elements are counted, not
weighted by area: the official KiTS evaluation uses DeepMind's ``surface-distance`` package, whose
surfels sit on voxel faces and are weighted by area, so its NSD can differ slightly from ours.

Empty masks are handled here, before MONAI is called (MONAI would return NaN or inf and warn):

====================  ======  ======  ======  ============
case                  Dice    IoU     NSD     HD95
====================  ======  ======  ======  ============
both empty            1.0     1.0     1.0     0.0 mm
exactly one empty     0.0     0.0     0.0     NaN (undefined)
====================  ======  ======  ======  ============

Dice and NSD follow the KiTS challenge: ``compute_metrics_for_label`` in
``kits23/evaluation/metrics.py`` of github.com/neheller/kits23 (both empty: ``dc = sd = 1``; one
empty: ``dc = sd = 0``), the same as KiTS21 (github.com/neheller/kits21,
``kits21/evaluation/metrics.py``). IoU follows Dice. HD95 is not a KiTS metric: both empty is a
perfect match (0 mm); with exactly one mask empty no distance exists, so HD95 is NaN, which
summaries leave out of their statistics and count separately.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from slidesam.core import InputError

__all__ = ["EMPTY_CONVENTION", "EMPTY_MATCH", "RegionScores", "binary_scores", "label_scores"]

#: the empty-mask convention, written into evaluation summaries
EMPTY_CONVENTION: dict[str, str] = {
    "both_empty": "dice=1, iou=1, nsd=1, hd95=0 mm",
    "one_empty": "dice=0, iou=0, nsd=0, hd95=NaN (undefined; excluded from statistics)",
    "source": (
        "Dice/NSD: KiTS challenge, compute_metrics_for_label in kits23/evaluation/metrics.py "
        "(github.com/neheller/kits23) and kits21/evaluation/metrics.py (neheller/kits21)"
    ),
}


@dataclass(frozen=True)
class RegionScores:
    """Scores of one binary mask or label region against its ground truth.

    Attributes:
        dice: Dice coefficient in [0, 1].
        iou: intersection over union in [0, 1].
        hd95: symmetric 95th-percentile Hausdorff distance in mm; NaN when exactly one mask is
            empty.
        nsd: normalized surface Dice in [0, 1] at the tolerance it was computed with.
        gt_voxels: foreground voxels in the ground truth.
        pred_voxels: foreground voxels in the prediction.
    """

    dice: float
    iou: float
    hd95: float
    nsd: float
    gt_voxels: int
    pred_voxels: int

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


#: scores of a region that is empty in both the prediction and the ground truth
EMPTY_MATCH = RegionScores(dice=1.0, iou=1.0, hd95=0.0, nsd=1.0, gt_voxels=0, pred_voxels=0)


def binary_scores(
    pred: np.ndarray,
    gt: np.ndarray,
    *,
    spacing: Sequence[float],
    tolerance_mm: float = 2.0,
) -> RegionScores:
    """Dice, IoU, HD95 and NSD of a binary prediction against a binary ground truth.

    Args:
        pred: (Z, Y, X) bool, or numbers that are all 0 or 1.
        gt: (Z, Y, X) ground truth, same shape and kind as ``pred``.
        spacing: voxel size in mm, ``(z, y, x)``, all > 0.
        tolerance_mm: NSD tolerance in mm, >= 0 (a distance equal to it counts as correct).

    Returns:
        RegionScores; empty masks follow the convention in the module docstring.
    """
    pred, gt = _check_pair(pred, gt)
    pred = _as_binary(pred, "pred")
    gt = _as_binary(gt, "gt")
    return _scores(pred, gt, _check_spacing(spacing), _check_tolerance(tolerance_mm))


def label_scores(
    pred_labels: np.ndarray,
    gt_labels: np.ndarray,
    *,
    spacing: Sequence[float],
    regions: Mapping[str, Sequence[int]],
    tolerance_mm: float = 2.0,
) -> dict[str, RegionScores]:
    """Scores of every region of a label map, a region being the union of some label values.

    Args:
        pred_labels: (Z, Y, X) integer label map.
        gt_labels: (Z, Y, X) integer ground-truth label map, same shape.
        spacing: voxel size in mm, ``(z, y, x)``, all > 0.
        regions: region name -> label values merged into it, e.g. ``slidesam.core.KITS_REGIONS``
            or ``{"kidney": (1,)}``. Values are positive integers (0 is the background).
        tolerance_mm: NSD tolerance in mm, >= 0.

    Returns:
        region name -> RegionScores, in the order of ``regions``.
    """
    pred_labels, gt_labels = _check_pair(pred_labels, gt_labels)
    for name, arr in (("pred_labels", pred_labels), ("gt_labels", gt_labels)):
        if arr.dtype.kind not in "biu":
            raise InputError(f"{name} must hold integer labels, got dtype {arr.dtype}")
    regions = _check_regions(regions)
    spacing = _check_spacing(spacing)
    tolerance_mm = _check_tolerance(tolerance_mm)
    return {
        name: _scores(
            np.isin(pred_labels, labels), np.isin(gt_labels, labels), spacing, tolerance_mm
        )
        for name, labels in regions.items()
    }


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------
def _check_pair(pred, gt) -> tuple[np.ndarray, np.ndarray]:
    pred, gt = np.asarray(pred), np.asarray(gt)
    for name, arr in (("pred", pred), ("gt", gt)):
        if arr.ndim != 3:
            raise InputError(f"{name} must be a 3D (z, y, x) array, got shape {arr.shape}")
    if pred.shape != gt.shape:
        raise InputError(
            f"pred shape {pred.shape} != gt shape {gt.shape}; both must lie on the same grid"
        )
    return pred, gt


def _as_binary(arr: np.ndarray, name: str) -> np.ndarray:
    if arr.dtype == bool:
        return arr
    if arr.dtype.kind not in "iuf":
        raise InputError(f"{name} must be a bool or numeric mask, got dtype {arr.dtype}")
    if np.any((arr != 0) & (arr != 1)):
        raise InputError(
            f"{name} must be a binary mask (bool or 0/1), found other values; "
            "use label_scores for label maps"
        )
    return arr != 0


def _check_spacing(spacing) -> list[float]:
    try:
        arr = np.asarray(spacing, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        arr = np.array([])
    if arr.shape != (3,) or not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise InputError(f"spacing must be 3 positive numbers (z, y, x) in mm, got {spacing!r}")
    return [float(s) for s in arr]


def _check_tolerance(tolerance_mm) -> float:
    try:
        tol = float(tolerance_mm)
    except (TypeError, ValueError):
        tol = math.nan
    if not math.isfinite(tol) or tol < 0:
        raise InputError(f"tolerance_mm must be a finite number >= 0, got {tolerance_mm!r}")
    return tol


def _check_regions(regions: Mapping[str, Sequence[int]]) -> dict[str, tuple[int, ...]]:
    if not isinstance(regions, Mapping) or not regions:
        raise InputError(
            f"regions must be a non-empty mapping name -> label values, got {regions!r}"
        )
    out: dict[str, tuple[int, ...]] = {}
    for name, labels in regions.items():
        values = np.asarray(labels).reshape(-1)
        if values.size == 0 or values.dtype.kind not in "iu" or np.any(values <= 0):
            raise InputError(
                f"region {name!r}: labels must be positive integers (0 is the background), "
                f"got {labels!r}"
            )
        out[str(name)] = tuple(int(v) for v in values)
    return out


# ----------------------------------------------------------------------------------------------
# computation
# ----------------------------------------------------------------------------------------------
def _scores(pred: np.ndarray, gt: np.ndarray, spacing: list[float], tol: float) -> RegionScores:
    n_pred, n_gt = int(np.count_nonzero(pred)), int(np.count_nonzero(gt))
    if n_pred == 0 and n_gt == 0:
        return EMPTY_MATCH
    if n_pred == 0 or n_gt == 0:
        return RegionScores(
            dice=0.0, iou=0.0, hd95=math.nan, nsd=0.0, gt_voxels=n_gt, pred_voxels=n_pred
        )
    inter = int(np.count_nonzero(pred & gt))
    dice = 2.0 * inter / (n_pred + n_gt)
    iou = inter / (n_pred + n_gt - inter)
    hd95, nsd = _surface_scores(pred, gt, spacing, tol)
    return RegionScores(dice=dice, iou=iou, hd95=hd95, nsd=nsd, gt_voxels=n_gt, pred_voxels=n_pred)


def _union_box(pred: np.ndarray, gt: np.ndarray) -> tuple[slice, ...]:
    """Bounding box of ``pred | gt`` grown by one voxel, clipped to the array (MONAI's crop)."""
    union = pred | gt
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hits = np.flatnonzero(union.any(axis=other))
        box.append(slice(max(int(hits[0]) - 1, 0), int(hits[-1]) + 2))
    return tuple(box)


def _surface_scores(
    pred: np.ndarray, gt: np.ndarray, spacing: list[float], tol: float
) -> tuple[float, float]:
    """HD95 (mm) and NSD of two non-empty masks with MONAI (torch is imported here only)."""
    import torch
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice

    # Cropping keeps the tensors small; MONAI crops the same box itself, so results are equal.
    box = _union_box(pred, gt)

    def one_hot(mask: np.ndarray) -> torch.Tensor:  # (1, 1, Z, Y, X): one foreground channel
        return torch.from_numpy(np.ascontiguousarray(mask[box], dtype=np.float32))[None, None]

    p, g = one_hot(pred), one_hot(gt)
    with warnings.catch_warnings():
        # MONAI 1.5/1.6 passes its own deprecated ``always_return_as_numpy`` argument internally
        warnings.filterwarnings(
            "ignore", message=".*always_return_as_numpy", category=FutureWarning
        )
        hd95 = compute_hausdorff_distance(
            p, g, include_background=True, percentile=95, directed=False, spacing=spacing
        )
        nsd = compute_surface_dice(
            p, g, class_thresholds=[tol], include_background=True, spacing=spacing
        )
    return float(hd95[0, 0]), float(nsd[0, 0])
