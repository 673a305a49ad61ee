"""``slidesam evaluate``: Dice, IoU, HD95 and NSD of a prediction folder against ground truth."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from slidesam.evaluation.evaluate import EvaluationResult, evaluate_folders, write_results


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="score predicted label maps against ground truth (Dice, IoU, HD95, NSD)",
        description=(
            "Score every ground-truth label map in --gt against the prediction of the same "
            "name in --pred (CASE.nii.gz, .nrrd, .mha). Predictions must lie on the ground "
            "truth's grid. Writes per_case.csv and summary.json. Empty masks: both empty gives "
            "Dice/IoU/NSD 1 and HD95 0 mm; one empty gives Dice/IoU/NSD 0 (as in the KiTS "
            "challenge) and an undefined HD95, left out of the means."
        ),
    )
    parser.add_argument(
        "--pred", required=True, type=Path, metavar="DIR", help="folder of predicted label maps"
    )
    parser.add_argument(
        "--gt",
        required=True,
        type=Path,
        metavar="DIR",
        help="folder of ground-truth label maps (defines the cases)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        default=None,
        help="output folder (default: PRED/evaluation)",
    )
    parser.add_argument(
        "--regions",
        choices=("both", "kits", "labels"),
        default="both",
        help="labels: one region per ground-truth label; kits: kidney_and_masses, masses, tumor; "
        "both (default): both",
    )
    parser.add_argument(
        "--tolerance-mm",
        type=float,
        default=2.0,
        metavar="MM",
        help="normalized surface Dice tolerance in mm (default: 2)",
    )
    parser.add_argument(
        "--missing",
        choices=("error", "empty"),
        default="error",
        help="ground-truth cases without prediction: fail (default), or score as empty",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    result = evaluate_folders(
        args.pred,
        args.gt,
        regions=args.regions,
        tolerance_mm=args.tolerance_mm,
        missing=args.missing,
        progress=sys.stderr.isatty(),
    )
    out = args.out if args.out is not None else Path(args.pred) / "evaluation"
    csv_path, json_path = write_results(result, out)
    print(format_table(result))
    print(f"wrote {csv_path} and {json_path}")
    return 0


def format_table(result: EvaluationResult) -> str:
    """Mean of each metric per region, one line per region."""
    summary = result.summary()
    tol = f"nsd@{result.tolerance_mm:g}mm"
    width = max(len("region"), *(len(r) for r in summary["regions"]))
    lines = [
        f"{len(result.cases)} case(s)"
        + (
            f", {len(result.missing_predictions)} scored as empty (no prediction)"
            if result.missing_predictions
            else ""
        ),
        f"{'region':<{width}}  {'dice':>6}  {'iou':>6}  {'hd95 mm':>8}  {tol:>10}  hd95 undefined",
    ]
    for region, entry in summary["regions"].items():
        hd = entry["hd95"]
        lines.append(
            f"{region:<{width}}  {_num(entry['dice']['mean']):>6}  {_num(entry['iou']['mean']):>6}"
            f"  {_num(hd['mean'], 2):>8}  {_num(entry['nsd']['mean']):>10}  {hd['n_undefined']}"
        )
    return "\n".join(lines)


def _num(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"
