"""``slidesam demo``: SSA end to end on fresh phantom cases with the embedded models."""

from __future__ import annotations

import argparse
from pathlib import Path

_DESCRIPTION = """\
The main job out of the box: generates a few synthetic three-phase renal CT cases, runs the
full SSA pipeline on them with the embedded models (stage 1: a small 3D U-Net on the arterial
phase; stage 2: a tiny Slide-SAM guided by the stage-1 boxes on every phase; the confidence
filter), scores the tumor against the phantoms' ground truth and prints, per phase, the
stage-1 mask moved to that phase (what you get without Slide-SAM) against SSA.

Writes OUT/cohort (the cases), OUT/ground_truth, OUT/ssa/CASE (masks, overlays,
ssa_report.json) and OUT/demo_results.{json,csv}. Re-running reuses the generated cases.
The embedded models know phantoms only: this shows the pipeline, not accuracy on real CT.
"""


def register(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="run SSA on fresh phantom cases with the embedded models and score it",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=Path("demo"), help="output folder (demo)")
    p.add_argument("--cases", type=int, default=3, help="phantom cases (default 3)")
    p.add_argument("--seed", type=int, default=4242, help="cohort seed (default 4242)")
    p.add_argument("--threshold", type=float, default=0.8, help="tau (default 0.8)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "mps"))
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from slidesam.ssa.demo import format_table, run_demo
    from slidesam.ssa.pipeline import SSAConfig

    results = run_demo(
        args.out,
        cases=args.cases,
        seed=args.seed,
        config=SSAConfig(threshold=args.threshold),
        device=args.device,
        progress=not args.no_progress,
    )
    print(format_table(results))
    print(f"written to {args.out}/ (ssa/CASE/ssa_report.json, demo_results.csv)")
    return 0
