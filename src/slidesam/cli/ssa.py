"""``slidesam ssa``: the SSA pipeline on one multi-phase case or a cohort."""

from __future__ import annotations

import argparse
from pathlib import Path

from slidesam.core import InputError

_DESCRIPTION = """\
SSA, the Slide-SAM assisted network for multi-phase renal tumor CT:
  1. stage 1 segments the tumor on the arterial phase (the embedded U-Net, an nnU-Net v2
     model folder with --nnunet, or a given mask with --arterial-mask);
  2. the 3D box of each tumor component is moved to every phase through world coordinates
     (--register also corrects patient motion by rigid registration) and cut into one box
     prompt per axial slice (--box-mode 3d: the same rectangle on every slice, the paper;
     per-slice: each slice's own stage-1 box);
  3. Slide-SAM segments each phase from those prompts;
  4. slices whose mask box agrees with the prompt box by IoU < --threshold (tau, 0.8) are
     rejected and become --rejected (stage1: the stage-1 mask moved there; empty;
     neighbours: predicted again from the nearest accepted slice).

Output (OUT): tumor_<phase>.nii.gz (uint8 0/1, exactly that phase's geometry),
stage1_arterial.nii.gz, overlay_<phase>.png, ssa_report.json (boxes in voxels and mm,
registration, per-slice confidence and accept/reject, timings).

Cohort: --cohort FOLDER with files CASE_plain.nii.gz, CASE_arterial.nii.gz,
CASE_venous.nii.gz (other endings: --suffixes plain=_nc,arterial=_art), or the dataset folders
written by 'slidesam phantom', or an nnU-Net dataset with one channel per phase
(CASE_0000.nii.gz, CASE_0001.nii.gz...: --channels plain=0,arterial=1,venous=2, or read from
its dataset.json "channel_phases" as 'slidesam nnunet-export --layout channels' writes). One
output folder per case; finished cases are skipped; --part-id/--num-parts split the work.
"""


def register(sub) -> None:
    p = sub.add_parser(
        "ssa",
        help="SSA: arterial stage 1 -> box prompts -> Slide-SAM on each phase",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--plain", type=Path, help="plain (non-contrast) image or DICOM folder")
    p.add_argument("--arterial", type=Path, help="arterial image or DICOM folder")
    p.add_argument("--venous", type=Path, help="venous image or DICOM folder (optional)")
    p.add_argument("--cohort", type=Path, help="folder of cases (instead of the phase files)")
    p.add_argument(
        "--suffixes",
        metavar="PHASE=SUFFIX,...",
        help="cohort: file endings of the phases (default plain=_plain,arterial=_arterial,"
        "venous=_venous)",
    )
    p.add_argument(
        "--channels",
        metavar="PHASE=INDEX,...",
        help="cohort: nnU-Net channel of each phase, e.g. plain=0,arterial=1,venous=2",
    )
    p.add_argument("--out", type=Path, required=True, help="output folder")
    s1 = p.add_argument_group("stage 1 (default: the embedded U-Net)")
    s1.add_argument("--arterial-mask", type=Path, help="use this arterial tumor mask")
    s1.add_argument("--nnunet", type=Path, metavar="MODEL_DIR", help="nnU-Net v2 model folder")
    s1.add_argument("--unet", type=Path, metavar="CKPT", help="a slidesam U-Net checkpoint")
    s2 = p.add_argument_group("stage 2")
    s2.add_argument("--checkpoint", help="Slide-SAM checkpoint (default: the embedded model)")
    s2.add_argument("--threshold", type=float, default=0.8, help="tau (default 0.8)")
    s2.add_argument(
        "--box-mode",
        choices=("3d", "per-slice"),
        default="per-slice",
        help="per-slice (default, better on phantoms) or 3d (the paper's Eq. 1-2)",
    )
    s2.add_argument(
        "--rejected",
        choices=("stage1", "empty", "neighbours"),
        default="stage1",
        help="what a rejected slice becomes (default stage1)",
    )
    s2.add_argument(
        "--one-box",
        action="store_true",
        help="one 3D box around all tumor components (the paper) instead of one per component",
    )
    s2.add_argument("--margin-mm", type=float, default=0.0, help="grow the 3D boxes (mm)")
    s2.add_argument("--register", action="store_true", help="correct motion between phases")
    s2.add_argument(
        "--phases",
        nargs="+",
        choices=("plain", "arterial", "venous"),
        help="phases to segment (default: all given)",
    )
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "mps"))
    p.add_argument("--no-overlays", action="store_true", help="do not write PNG overlays")
    p.add_argument("--part-id", type=int, default=0, help="cohort: this part (0-based)")
    p.add_argument("--num-parts", type=int, default=1, help="cohort: number of parts")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from slidesam.inference.models import load_any
    from slidesam.inference.predictor import SlideSAMPredictor
    from slidesam.ssa.pipeline import SSAConfig
    from slidesam.ssa.run import load_stage1, ssa_case, ssa_cohort

    config = SSAConfig(
        threshold=args.threshold,
        box_mode=args.box_mode,
        rejected=args.rejected,
        per_component=not args.one_box,
        margin_mm=args.margin_mm,
        register=args.register,
    )
    phases = {"plain": args.plain, "arterial": args.arterial, "venous": args.venous}
    phases = {k: v for k, v in phases.items() if v is not None}
    if args.cohort is not None:
        if phases or args.arterial_mask is not None:
            raise InputError("--cohort replaces --plain/--arterial/--venous/--arterial-mask")
        from slidesam.stage1.export import DEFAULT_SUFFIXES, find_phase_cases

        suffixes = _pairs(args.suffixes, "--suffixes", str) if args.suffixes else DEFAULT_SUFFIXES
        channels = _pairs(args.channels, "--channels", int) if args.channels else None
        found = find_phase_cases(args.cohort, suffixes, channels=channels)
        cases = [(c.case_id, c.images) for c in found]
    else:
        if args.suffixes or args.channels:
            raise InputError("--suffixes and --channels go with --cohort")
        if "arterial" not in phases:
            raise InputError("give --arterial (and --plain, --venous), or --cohort")
        for name, path in phases.items():
            if not path.exists():
                raise InputError(f"--{name} {path}: no such file or folder")
    stage1 = load_stage1(
        arterial_mask=args.arterial_mask, nnunet=args.nnunet, unet=args.unet, device=args.device
    )
    predictor = SlideSAMPredictor(load_any(args.checkpoint, device=args.device), device=args.device)
    targets = tuple(args.phases) if args.phases else None
    name = args.checkpoint or "embedded default"
    if args.cohort is None:
        report = ssa_case(
            phases,
            args.out,
            stage1,
            predictor,
            config,
            targets=targets,
            overlays=not args.no_overlays,
            model_name=name,
        )
        for phase, r in report["phases"].items():
            print(
                f"{phase:9s} {r['accepted_slices']}/{r['prompted_slices']} slices accepted, "
                f"{r['tumor_voxels']} tumor voxels"
            )
        for w in report["warnings"]:
            print(f"warning: {w}")
        print(f"written to {args.out}/ (ssa_report.json)")
        return 0
    status = ssa_cohort(
        cases,
        args.out,
        stage1,
        predictor,
        config,
        targets=targets,
        overlays=not args.no_overlays,
        part_id=args.part_id,
        num_parts=args.num_parts,
        model_name=name,
        progress=not args.no_progress,
    )
    failed = [s for s in status if s[1].startswith("failed")]
    print(f"{len(status)} case(s): {len(status) - len(failed)} ok, {len(failed)} failed")
    return 1 if failed else 0


def _pairs(text: str, option: str, cast) -> dict:
    """``"plain=_nc,arterial=_art"`` -> {"plain": "_nc", "arterial": "_art"} (values cast)."""
    out = {}
    for item in text.split(","):
        phase, sep, value = item.partition("=")
        phase = phase.strip().lower()
        if not sep or phase not in ("plain", "arterial", "venous") or not value.strip():
            raise InputError(
                f"{option} {text!r}: give PHASE=VALUE pairs separated by commas, phases plain, "
                "arterial, venous"
            )
        try:
            out[phase] = cast(value.strip())
        except ValueError:
            raise InputError(f"{option} {text!r}: {value!r} is not a valid value") from None
    return out
