"""``slidesam nnunet-export``: a multi-phase cohort as nnU-Net v2 raw dataset(s) for stage 1."""

from __future__ import annotations

import argparse

from slidesam.core import PHASES
from slidesam.stage1.export import DEFAULT_DATASET_ID, LAYOUTS, export_nnunet

_DESCRIPTION = f"""\
Write a multi-phase CT cohort as nnU-Net v2 raw dataset(s), so that stage 1 can be trained with
nnU-Net's own commands on a GPU. --out becomes (or goes into) nnUNet_raw.

Cohort (--cohort): the output folder of 'slidesam phantom' (one nnU-Net dataset per phase), or
a folder of CASE_plain.nii.gz, CASE_arterial.nii.gz, CASE_venous.nii.gz (directly or in images/)
with optional labels CASE_<phase>_seg.nii.gz or labels/CASE_<phase>.nii.gz.

Layouts:
  channels   one dataset (id {DEFAULT_DATASET_ID["channels"]}), one channel per phase: every phase
             resampled onto the reference phase's grid in world coordinates (linear); labels from
             the reference phase. Patient motion between phases is NOT corrected: register first.
  per-phase  one dataset per phase (ids {DEFAULT_DATASET_ID["per-phase"]}, +1, ...), files copied
             bit for bit.
Cases with labels go to imagesTr/labelsTr, cases without to imagesTs. Rerunning resumes; a folder
holding a different dataset is refused.

Then, with nnUNet_raw=OUT (and nnUNet_preprocessed, nnUNet_results set):
  nnUNetv2_plan_and_preprocess -d ID --verify_dataset_integrity
  nnUNetv2_train ID 3d_fullres 0
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "nnunet-export",
        help="write a multi-phase cohort as nnU-Net v2 raw dataset(s) to train stage 1",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--cohort", required=True, metavar="DIR", help="cohort folder")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (nnUNet_raw)")
    p.add_argument(
        "--layout",
        required=True,
        choices=LAYOUTS,
        help="channels: one dataset, a channel per phase; per-phase: a dataset per phase",
    )
    p.add_argument(
        "--reference-phase",
        default="arterial",
        metavar="PHASE",
        help="channels layout: the phase whose grid and labels are used (arterial)",
    )
    p.add_argument(
        "--phases",
        nargs="+",
        default=None,
        metavar="PHASE",
        help=f"phases to export, in channel order (default: all found, {' '.join(PHASES)})",
    )
    p.add_argument(
        "--dataset-id",
        type=int,
        default=None,
        metavar="N",
        help=f"nnU-Net dataset id (channels {DEFAULT_DATASET_ID['channels']}, per-phase "
        f"{DEFAULT_DATASET_ID['per-phase']} for the first phase, +1 for each next one)",
    )
    p.add_argument(
        "--name",
        default="RenalCT",
        help="dataset name: DatasetN_NAME, per-phase DatasetN_NAMEPhase (RenalCT)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    summary = export_nnunet(
        args.cohort,
        args.out,
        layout=args.layout,
        reference_phase=args.reference_phase,
        phases=args.phases,
        dataset_id=args.dataset_id,
        name=args.name,
        progress=not args.no_progress,
    )
    for info in summary["datasets"].values():
        print(
            f"{info['folder']}: {info['training']} training and {info['test']} test cases, "
            f"channels {', '.join(f'{i}={p}' for i, p in enumerate(info['channels']))}"
        )
    ids = " ".join(str(info["dataset_id"]) for info in summary["datasets"].values())
    print(
        f"{summary['cases']} cases ({summary['cases_resumed']} dataset entries already done). "
        f"Next: nnUNetv2_plan_and_preprocess -d {ids} --verify_dataset_integrity"
    )
    return 0
