"""``slidesam prepare``: labelled volumes -> three-slice training windows (seed preprocessing)."""

from __future__ import annotations

import argparse
import json
import os

from slidesam.data.prepare import IMAGE_FORMATS, PrepareConfig, expand_dataset_dirs, prepare_dataset
from slidesam.data.preprocess import SCALINGS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prepare",
        help="cut labelled volumes into three-slice training windows",
        description=(
            "Exactly the data preparation of Slide-SAM/SSA: slice along the axis with the fewest "
            "voxels (or all), stack 3 adjacent slices as RGB, clip CT to [-200, 400] HU (MRI "
            "[0, 600]) and scale to 0..255, resize (bilinear images, nearest masks), keep a "
            "label's mask when its centre-slice area exceeds 0.14%%. Input: nnU-Net dataset "
            "folders (imagesTr/, labelsTr/, dataset.json) or a folder of them. Output: "
            "OUT/<dataset>/{images,masks,meta}, resumable, with summary.json."
        ),
    )
    p.add_argument(
        "--dataset",
        nargs="+",
        required=True,
        metavar="DIR",
        help="nnU-Net dataset folder(s), or a folder holding Dataset*/ folders",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output root")
    p.add_argument(
        "--size",
        type=int,
        default=1024,
        help="output side in pixels (default 1024; 256 for the tiny CPU models)",
    )
    p.add_argument(
        "--axes",
        default="auto",
        choices=("auto", "all", "z", "y", "x"),
        help="slicing axis: fewest voxels (auto, default), all three, or one",
    )
    p.add_argument(
        "--modality",
        default="CT",
        choices=("CT", "MRI"),
        help="picks the default intensity window (CT [-200, 400], MRI [0, 600])",
    )
    p.add_argument(
        "--window",
        nargs=2,
        type=float,
        metavar=("LOW", "HIGH"),
        help="intensity window overriding the modality default",
    )
    p.add_argument(
        "--scaling",
        default="fixed",
        choices=SCALINGS,
        help="fixed: window -> 0..255 for every volume (papers' text, default); "
        "window-minmax: each 3-slice window stretched to 0..255 (reference code)",
    )
    p.add_argument(
        "--format",
        dest="image_format",
        default="jpg",
        choices=IMAGE_FORMATS,
        help="image files: jpg (paper; 4:4:4 q95, default), png or npz (lossless)",
    )
    p.add_argument(
        "--min-area",
        type=float,
        default=0.0014,
        help="keep a mask when its centre-slice area exceeds this fraction (0.0014)",
    )
    p.add_argument(
        "--labels",
        nargs="+",
        default=(),
        metavar="LABEL",
        help="only these label names or values from dataset.json (default: all)",
    )
    p.add_argument("--channel", type=int, default=0, help="nnU-Net channel to read (default 0)")
    p.add_argument(
        "--keep-empty", action="store_true", help="also write windows where no label is kept"
    )
    p.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="processes over cases (default: all cores)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="delete an earlier output with other settings instead of refusing",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = PrepareConfig(
        size=args.size,
        axes=args.axes,
        modality=args.modality,
        window=tuple(args.window) if args.window else None,
        scaling=args.scaling,
        image_format=args.image_format,
        min_area_fraction=args.min_area,
        keep_empty=args.keep_empty,
        labels=tuple(args.labels),
        channel=args.channel,
    )
    failed = 0
    for dataset in expand_dataset_dirs(args.dataset):
        summary = prepare_dataset(
            dataset,
            args.out,
            config,
            workers=args.workers,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
        failed += len(summary["cases_failed"])
        print(
            f"{summary['output']}: {summary['cases']} cases "
            f"({summary['cases_resumed']} already done, {len(summary['cases_failed'])} failed), "
            f"{summary['windows']} windows; masks kept {json.dumps(summary['masks_kept'])}, "
            f"discarded {json.dumps(summary['masks_discarded'])}"
        )
    return 1 if failed else 0
