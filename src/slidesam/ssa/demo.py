"""``slidesam demo``: the whole SSA pipeline on fresh phantom cases, with the embedded models.

1. generates ``cases`` synthetic three-phase renal CT cases (``slidesam.data.phantom``; a seed
   the embedded models were not trained on) and writes them as a cohort
   (``OUT/cohort/case_NNNNN_<phase>.nii.gz``, ground truth in ``OUT/ground_truth/``);
2. runs SSA on every case with the embedded stage-1 U-Net and the embedded Slide-SAM
   (``OUT/ssa/case_NNNNN/``: masks, overlays, ``ssa_report.json``);
3. scores the tumour on every phase against the phantom's ground truth: the baseline (the
   stage-1 U-Net's arterial mask, moved to each phase through world coordinates, i.e. what
   you get without Slide-SAM) against SSA, and prints the table (``OUT/demo_results.json``,
   ``OUT/demo_results.csv``).

The embedded models are trained on phantoms only: the demo shows the pipeline, not a result
on real CT.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from slidesam.core import PHASES, InputError
from slidesam.data.io import read_image, read_label, write_image, write_mask
from slidesam.data.phantom import PhantomConfig, generate_case
from slidesam.evaluation.metrics import binary_scores
from slidesam.ssa.boxes import resample_mask
from slidesam.ssa.pipeline import SSAConfig
from slidesam.ssa.run import ssa_cohort

__all__ = ["DEMO_SEED", "run_demo"]

log = logging.getLogger(__name__)

#: cohort seed of the demo cases (the embedded models were trained on other seeds)
DEMO_SEED = 4242


def _write_cases(out: Path, n: int, seed: int, progress: bool) -> list[tuple[str, dict]]:
    cohort, truth = out / "cohort", out / "ground_truth"
    cases = []
    for i in tqdm(range(n), desc="phantoms", unit="case", disable=not progress):
        name = f"case_{i:05d}"
        images = {p: cohort / f"{name}_{p}.nii.gz" for p in PHASES}
        if not all(p.is_file() for p in images.values()):
            case = generate_case(i, seed=seed, config=PhantomConfig())
            for p in PHASES:
                write_mask(case.labels[p].array, case.labels[p].geometry, truth / images[p].name)
                write_image(case.phases[p], images[p])
        cases.append((name, images))
    return cases


def run_demo(
    out: str | Path = "demo",
    *,
    cases: int = 3,
    seed: int = DEMO_SEED,
    config: SSAConfig | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> dict:
    """Run the demo (see the module docstring); returns the results table as a dict."""
    from slidesam.inference.models import default_model
    from slidesam.inference.predictor import SlideSAMPredictor
    from slidesam.stage1.unet import default_unet

    if cases < 1:
        raise InputError(f"cases must be >= 1, got {cases}")
    out = Path(out)
    t0 = time.perf_counter()
    cohort = _write_cases(out, cases, seed, progress)
    stage1 = default_unet(device=device)
    predictor = SlideSAMPredictor(default_model(device=device), device=device)
    status = ssa_cohort(
        cohort,
        out / "ssa",
        stage1,
        predictor,
        config or SSAConfig(),
        model_name="embedded default",
        progress=progress,
    )
    failed = [s for s in status if s[1].startswith("failed")]
    if failed:
        raise InputError(f"SSA failed on {', '.join(c for c, _ in failed)}")
    rows = []
    for name, images in tqdm(cohort, desc="scoring", unit="case", disable=not progress):
        art = read_image(images["arterial"])
        s1 = read_label(out / "ssa" / name / "stage1_arterial.nii.gz", reference=art)
        for phase in PHASES:
            image = read_image(images[phase])
            gt = read_label(out / "ground_truth" / images[phase].name, reference=image).array == 2
            ssa = read_label(out / "ssa" / name / f"tumor_{phase}.nii.gz", reference=image)
            row = {"case": name, "phase": phase}
            row["ssa_dice"] = binary_scores(ssa.array > 0, gt, spacing=image.spacing).dice
            moved = resample_mask(s1.array == 2, art.geometry, image.geometry)
            row["baseline_dice"] = binary_scores(moved, gt, spacing=image.spacing).dice
            rows.append(row)
    table = {}
    for phase in PHASES:
        mine = [r for r in rows if r["phase"] == phase]
        table[phase] = {
            "baseline": _mean([r.get("baseline_dice") for r in mine]),
            "ssa": _mean([r["ssa_dice"] for r in mine]),
        }
    results = {
        "cases": cases,
        "seed": seed,
        "table": table,
        "per_case": rows,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    (out / "demo_results.json").write_text(json.dumps(results, indent=2))
    with (out / "demo_results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["case", "phase", "baseline_dice", "ssa_dice"])
        writer.writeheader()
        writer.writerows(rows)
    return results


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def format_table(results: dict) -> str:
    """The printed table: tumour Dice per phase, baseline vs SSA."""
    lines = [
        f"tumor Dice on {results['cases']} new phantom cases (seed {results['seed']}), "
        f"{results['seconds']:.0f} s",
        f"{'phase':10s} {'stage 1 moved':>14s} {'SSA':>7s}",
    ]
    for phase, r in results["table"].items():
        base = "-" if r["baseline"] is None else f"{r['baseline']:.3f}"
        lines.append(f"{phase:10s} {base:>14s} {r['ssa']:7.3f}")
    return "\n".join(lines)
