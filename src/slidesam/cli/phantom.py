"""``slidesam phantom``: write a synthetic multi-phase renal CT cohort (nnU-Net v2 raw layout)."""

from __future__ import annotations

import argparse

from slidesam.core import PHASES, InputError

_DESCRIPTION = """\
Make synthetic abdominal CT phantoms with KiTS labels (0 background, 1 kidney, 2 tumor, 3 cyst)
in three contrast phases: plain (tumor nearly isodense to kidney), arterial (tumor strongly and
heterogeneously enhancing) and venous (washout). Each phase lies on its own grid (own origin and
z-spacing) with a true patient motion of a few mm between phases, as in real multi-phase CT.

Writes one nnU-Net v2 raw dataset per phase under --out:
  Dataset501_RenalPhantomPlain, Dataset502_RenalPhantomArterial, Dataset503_RenalPhantomVenous
each with imagesTr/case_XXXXX_0000.nii.gz (int16 HU), labelsTr/case_XXXXX.nii.gz and
dataset.json, plus phantom.json with the settings and every case's ground truth.
Case i depends only on (--seed, i): rerunning with the same settings rewrites the same files.
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "phantom",
        help="write synthetic multi-phase renal CT phantoms (nnU-Net layout, KiTS labels)",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    p.add_argument("--cases", type=int, default=4, metavar="N", help="number of cases (4)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="cohort seed (0)")
    p.add_argument(
        "--shape",
        type=int,
        nargs=3,
        metavar=("Z", "Y", "X"),
        default=None,
        help="plain-phase grid size in voxels (48 160 160)",
    )
    p.add_argument(
        "--spacing",
        type=float,
        nargs=3,
        metavar=("Z", "Y", "X"),
        default=None,
        help="plain-phase voxel size in mm (3 2 2)",
    )
    p.add_argument(
        "--phases",
        nargs="+",
        metavar="PHASE",
        default=None,
        help=f"phases to write, any of: {' '.join(PHASES)} (all)",
    )
    p.add_argument(
        "--motion-mm",
        type=float,
        default=None,
        metavar="MM",
        help="largest patient motion per axis between phases, mm (4; 0 disables)",
    )
    p.add_argument(
        "--tumor-diameter-mm",
        type=float,
        nargs=2,
        metavar=("LO", "HI"),
        default=None,
        help="range of the tumor diameter, drawn uniformly, mm (10 60)",
    )
    p.add_argument(
        "--same-z-spacing",
        action="store_true",
        help="give every phase the plain z-spacing (default: 2.5/3/3.5 mm varies)",
    )
    p.add_argument(
        "--random-flips",
        action="store_true",
        help="flip array axes at random per phase (non-identity directions)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="processes generating cases in parallel (1)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from slidesam.data.phantom import PhantomConfig, write_cohort

    overrides = {}
    if args.shape is not None:
        overrides["shape"] = tuple(args.shape)
    if args.spacing is not None:
        overrides["spacing"] = tuple(args.spacing)
    if args.phases is not None:
        overrides["phases"] = tuple(args.phases)
    if args.motion_mm is not None:
        overrides["motion_mm"] = args.motion_mm
    if args.tumor_diameter_mm is not None:
        overrides["tumor_diameter_mm"] = tuple(args.tumor_diameter_mm)
    config = PhantomConfig(
        vary_z_spacing=not args.same_z_spacing, random_flips=args.random_flips, **overrides
    )
    if args.cases < 1:
        raise InputError(f"--cases must be at least 1, got {args.cases}")
    if args.workers < 1:
        raise InputError(f"--workers must be at least 1, got {args.workers}")
    if args.seed < 0:
        raise InputError(f"--seed must be 0 or more, got {args.seed}")
    summary = write_cohort(
        args.out,
        cases=args.cases,
        seed=args.seed,
        config=config,
        workers=args.workers,
        progress=not args.no_progress,
    )
    print(f"wrote {summary['cases']} phantom case(s) to {summary['out_dir']}")
    for phase, folder in summary["datasets"].items():
        print(f"  {phase:<9} {folder}")
    print(f"  truth     {summary['phantom_json']}")
    return 0
