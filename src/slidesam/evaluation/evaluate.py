"""Score a folder of predicted label maps against a folder of ground-truth label maps.

Cases are matched by file name without the image ending (``case_00001.nii.gz`` in the prediction
folder matches ``case_00001.nii.gz`` or ``case_00001.nrrd`` in the ground-truth folder); other
files and sub-folders are ignored. Every prediction must lie on its ground truth's grid (shape,
spacing, origin and direction): labels are never resampled. Metrics and their empty-mask
conventions are those of :mod:`slidesam.evaluation.metrics`.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from slidesam.core import KITS_REGIONS, InputError
from slidesam.data.io import image_suffix, read_label, strip_suffix
from slidesam.evaluation.metrics import EMPTY_CONVENTION, EMPTY_MATCH, RegionScores, label_scores

__all__ = ["METRICS", "EvaluationResult", "evaluate_folders", "write_results"]

log = logging.getLogger(__name__)

#: metric names, in CSV column order
METRICS: tuple[str, ...] = ("dice", "iou", "hd95", "nsd")
_REGION_MODES = ("both", "kits", "labels")
_CSV_COLUMNS = ("case", "region", *METRICS, "gt_voxels", "pred_voxels")


@dataclass(frozen=True)
class EvaluationResult:
    """Scores of every case and region.

    Attributes:
        scores: case -> region name -> RegionScores; cases sorted, regions in ``regions`` order.
        regions: region name -> label values merged into it.
        tolerance_mm: the NSD tolerance used.
        pred_dir: the prediction folder.
        gt_dir: the ground-truth folder.
        missing_predictions: ground-truth cases without a prediction, scored as empty predictions.
        ignored_predictions: predictions without ground truth (not scored).
    """

    scores: dict[str, dict[str, RegionScores]]
    regions: dict[str, tuple[int, ...]]
    tolerance_mm: float
    pred_dir: str
    gt_dir: str
    missing_predictions: tuple[str, ...] = field(default_factory=tuple)
    ignored_predictions: tuple[str, ...] = field(default_factory=tuple)

    @property
    def cases(self) -> tuple[str, ...]:
        return tuple(self.scores)

    def rows(self) -> list[dict[str, str | float | int]]:
        """One row per (case, region) with the ``per_case.csv`` columns."""
        return [
            {"case": case, "region": region, **s.as_dict()}
            for case, by_region in self.scores.items()
            for region, s in by_region.items()
        ]

    def summary(self) -> dict:
        """Per region and metric: mean, std (ddof=0), median, n, n_undefined (NaN values).

        Statistics are over the cases whose value is defined (not NaN); they are ``None`` when
        no case has one. Only HD95 can be undefined (exactly one mask empty).
        """
        regions = {}
        for region, labels in self.regions.items():
            entry: dict = {"labels": list(labels)}
            for metric in METRICS:
                values = np.array(
                    [getattr(self.scores[c][region], metric) for c in self.scores], dtype=float
                )
                entry[metric] = _stats(values)
            regions[region] = entry
        return {
            "tolerance_mm": self.tolerance_mm,
            "conventions": {
                **EMPTY_CONVENTION,
                "hd95": "max of the two directed 95th percentiles of surface-voxel distances (mm)",
                "nsd": f"normalized surface Dice of surface voxels at {self.tolerance_mm:g} mm",
                "statistics": "over cases with a defined value; std is the population std",
            },
            "pred_dir": self.pred_dir,
            "gt_dir": self.gt_dir,
            "n_cases": len(self.scores),
            "cases": list(self.scores),
            "missing_predictions": list(self.missing_predictions),
            "ignored_predictions": list(self.ignored_predictions),
            "regions": regions,
        }


def evaluate_folders(
    pred_dir: str | Path,
    gt_dir: str | Path,
    *,
    regions: str | Mapping[str, Sequence[int]] = "both",
    tolerance_mm: float = 2.0,
    missing: str = "error",
    progress: bool = True,
) -> EvaluationResult:
    """Score every ground-truth case against the prediction of the same name.

    Args:
        pred_dir: folder of predicted label maps (NIfTI, NRRD, MHA), e.g. ``CASE.nii.gz``.
        gt_dir: folder of ground-truth label maps; defines the cases.
        regions: ``"labels"``: one region per nonzero label seen in any ground truth, named from
            ``dataset.json`` (in ``gt_dir`` or its parent) or ``label_<k>``; ``"kits"``:
            ``slidesam.core.KITS_REGIONS``; ``"both"``: both (a label region identical to a
            KiTS region is kept once). A mapping name -> label values gives the regions directly.
        tolerance_mm: NSD tolerance in mm.
        missing: what to do with ground-truth cases without a prediction: ``"error"`` raises,
            ``"empty"`` scores them as empty predictions.
        progress: show a progress bar over cases.

    Raises:
        InputError: bad folders or arguments, no case matched, missing predictions with
            ``missing="error"``, or an unreadable file or a prediction off its ground truth's
            grid (the message starts with the case name).
    """
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    fixed, per_label = _resolve_region_mode(regions)
    if missing not in ("error", "empty"):
        raise InputError(f"missing must be 'error' or 'empty', got {missing!r}")
    tol = float(tolerance_mm)
    if not math.isfinite(tol) or tol < 0:
        raise InputError(f"tolerance_mm must be a finite number >= 0, got {tolerance_mm!r}")

    gts = _label_files(gt_dir, "ground-truth")
    preds = _label_files(pred_dir, "prediction")
    if not gts:
        raise InputError(f"{gt_dir}: no label files (.nii.gz, .nii, .nrrd, .mha, ...) found")
    ignored = tuple(sorted(set(preds) - set(gts)))
    absent = tuple(sorted(set(gts) - set(preds)))
    if len(absent) == len(gts):
        raise InputError(
            f"no prediction in {pred_dir} matches a ground-truth case in {gt_dir} "
            f"(ground truth e.g. {_brief(sorted(gts), 3)}; predictions must be named CASE.nii.gz)"
        )
    if ignored:
        log.warning(
            "%d prediction(s) without ground truth, ignored: %s", len(ignored), _brief(ignored)
        )
    if absent and missing == "error":
        raise InputError(
            f"{len(absent)} ground-truth case(s) have no prediction in {pred_dir}: "
            f"{_brief(absent)}; use missing='empty' (--missing empty) to score them as empty"
        )
    if absent:
        log.warning(
            "%d case(s) without prediction, scored as empty: %s", len(absent), _brief(absent)
        )

    # Score each distinct label set once per case; fixed regions and per-label regions that
    # coincide (KiTS "tumor" = label 2) share it. Labels absent from both maps of a case are a
    # perfect empty match.
    per_case: dict[str, dict[tuple[int, ...], RegionScores]] = {}
    gt_labels: set[int] = set()
    pred_labels: set[int] = set()
    for case in tqdm(sorted(gts), desc="evaluate", unit="case", disable=not progress):
        try:
            gt = read_label(gts[case])
            pred = (
                read_label(preds[case], reference=gt).array
                if case in preds
                else np.zeros_like(gt.array)
            )
        except InputError as exc:
            raise InputError(f"case {case}: {exc}") from None
        in_gt, in_pred = _labels_in(gt.array), _labels_in(pred)
        gt_labels |= in_gt
        pred_labels |= in_pred
        wanted = set(fixed.values())
        if per_label:
            wanted |= {(k,) for k in in_gt | in_pred}
        regions_here = {",".join(map(str, t)): t for t in sorted(wanted)}
        scored = (
            label_scores(
                pred, gt.array, spacing=gt.geometry.spacing, regions=regions_here, tolerance_mm=tol
            )
            if regions_here
            else {}
        )
        per_case[case] = {regions_here[name]: s for name, s in scored.items()}

    label_regions = (
        _name_label_regions(sorted(gt_labels), _label_names(gt_dir), fixed) if per_label else {}
    )
    if per_label and pred_labels - gt_labels:
        log.warning(
            "label(s) %s appear in predictions but in no ground truth; not scored per label",
            sorted(pred_labels - gt_labels),
        )
    all_regions = {**label_regions, **{k: v for k, v in fixed.items() if k not in label_regions}}
    if not all_regions:
        raise InputError(f"{gt_dir}: the ground truth holds no nonzero label; nothing to score")
    scores = {
        case: {name: by_set.get(labels, EMPTY_MATCH) for name, labels in all_regions.items()}
        for case, by_set in per_case.items()
    }
    return EvaluationResult(
        scores=scores,
        regions=all_regions,
        tolerance_mm=tol,
        pred_dir=str(pred_dir),
        gt_dir=str(gt_dir),
        missing_predictions=absent,
        ignored_predictions=ignored,
    )


def write_results(result: EvaluationResult, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``per_case.csv`` and ``summary.json`` into ``out_dir`` (created if needed).

    CSV values have 6 decimals; an undefined HD95 is written ``nan``. In the JSON, statistics
    without any defined value are ``null``.

    Returns:
        (path of per_case.csv, path of summary.json)
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir}: output path exists and is not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = out_dir / "per_case.csv", out_dir / "summary.json"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=_CSV_COLUMNS)
        writer.writeheader()
        for row in result.rows():
            writer.writerow({k: f"{v:.6f}" if isinstance(v, float) else v for k, v in row.items()})
    json_path.write_text(json.dumps(result.summary(), indent=2, allow_nan=False) + "\n")
    return csv_path, json_path


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def _resolve_region_mode(regions) -> tuple[dict[str, tuple[int, ...]], bool]:
    """(fixed regions, whether to add one region per ground-truth label)."""
    if isinstance(regions, str):
        if regions not in _REGION_MODES:
            raise InputError(
                f"regions must be one of {', '.join(_REGION_MODES)} or a mapping, got {regions!r}"
            )
        fixed = dict(KITS_REGIONS) if regions in ("both", "kits") else {}
        return fixed, regions in ("both", "labels")
    if not isinstance(regions, Mapping) or not regions:
        raise InputError(f"regions must be a non-empty mapping name -> labels, got {regions!r}")
    fixed = {}
    for name, labels in regions.items():
        values = np.asarray(labels).reshape(-1)
        if values.size == 0 or values.dtype.kind not in "iu" or np.any(values <= 0):
            raise InputError(f"region {name!r}: labels must be positive integers, got {labels!r}")
        fixed[str(name)] = tuple(int(v) for v in values)
    return fixed, False


def _label_files(folder: Path, what: str) -> dict[str, Path]:
    """case name -> label file in ``folder`` (image endings only, no hidden files)."""
    if not folder.exists():
        raise InputError(f"{folder}: {what} folder does not exist")
    if not folder.is_dir():
        raise InputError(f"{folder}: {what} path must be a folder of label files")
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.name.startswith(".") or not image_suffix(path):
            continue
        case = strip_suffix(path)
        if case in files:
            raise InputError(
                f"{folder}: {files[case].name} and {path.name} are both case {case!r}; keep one"
            )
        files[case] = path
    return files


def _labels_in(array: np.ndarray) -> set[int]:
    counts = np.bincount(array.reshape(-1), minlength=1)
    return {int(k) for k in np.flatnonzero(counts) if k != 0}


def _label_names(gt_dir: Path) -> dict[int, str]:
    """label value -> name from ``dataset.json`` in ``gt_dir`` or its parent (nnU-Net v1/v2)."""
    for path in (gt_dir / "dataset.json", gt_dir.parent / "dataset.json"):
        if not path.is_file():
            continue
        try:
            labels = json.loads(path.read_text())["labels"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("%s: no usable 'labels' (%s); regions are named label_<k>", path, exc)
            return {}
        names: dict[int, str] = {}
        if isinstance(labels, dict):
            for key, value in labels.items():
                if isinstance(value, int) and not isinstance(value, bool):  # v2: name -> value
                    names[value] = str(key)
                elif str(key).isdigit() and isinstance(value, str):  # v1 / MSD: "1" -> name
                    names[int(key)] = value
        names.pop(0, None)
        return names
    return {}


def _name_label_regions(
    labels: list[int], names: dict[int, str], fixed: dict[str, tuple[int, ...]]
) -> dict[str, tuple[int, ...]]:
    """Region name -> (label,), skipping a label that equals a fixed region of the same name."""
    out: dict[str, tuple[int, ...]] = {}
    for k in labels:
        name = names.get(k, f"label_{k}")
        if (name in fixed and fixed[name] != (k,)) or name in out:
            name = f"label_{k}"
        out[name] = (k,)
    return out


def _stats(values: np.ndarray) -> dict[str, float | int | None]:
    defined = values[~np.isnan(values)]
    n = int(defined.size)
    return {
        "mean": float(np.mean(defined)) if n else None,
        "std": float(np.std(defined)) if n else None,
        "median": float(np.median(defined)) if n else None,
        "n": n,
        "n_undefined": int(values.size - n),
    }


def _brief(names: Sequence[str], limit: int = 10) -> str:
    names = list(names)
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
