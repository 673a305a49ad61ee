"""``slidesam segment``: prompts on a few slices -> a 3D label map (one case or a cohort)."""

from __future__ import annotations

import argparse
from pathlib import Path

from slidesam.core import InputError

_DESCRIPTION = """\
Segment a CT volume from a few prompts with Slide-SAM: each prompted window is predicted, then
the edge-slice masks prompt the next windows in both directions (sliding window), and
overlapping windows are fused by averaging logits. Output: a label map with exactly the input's
geometry, and a JSON sidecar with per-slice records (window, box, predicted IoU, stability).

prompts.json:
  {"prompts": [{"slice": 27, "box": [x0, y0, x1, y1], "label": 1},
               {"slice": 30, "points": [[x, y]], "point_labels": [1], "label": 1},
               {"box_mm": [[x, y, z], [x, y, z]], "label": 2}]}
"slice" indexes the first (z) axis of the (z, y, x) array; box XYXY and points XY are in that
slice's pixels (x = column, y = row), inclusive; *_mm are world (LPS) millimetres.

Batch mode: --image FOLDER --prompts FOLDER --out FOLDER (prompts matched by case name:
CASE.nii.gz or CASE_0000.nii.gz <-> CASE.json); finished cases are skipped on re-run.
"""


def register(sub) -> None:
    p = sub.add_parser(
        "segment",
        help="segment a volume from box/point prompts (Slide-SAM)",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--image",
        required=True,
        type=Path,
        help="image file, DICOM series folder, or a folder of images (batch)",
    )
    p.add_argument(
        "--prompts",
        required=True,
        type=Path,
        help="prompts JSON file, or a folder of CASE.json files (batch)",
    )
    p.add_argument(
        "--out",
        required=True,
        type=Path,
        help="output mask (.nii.gz, .nrrd, .mha), or a folder (batch)",
    )
    p.add_argument(
        "--checkpoint",
        help="official SAM, released Slide-SAM or slidesam checkpoint "
        "(default: the embedded model)",
    )
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "mps"))
    p.add_argument(
        "--step",
        type=int,
        default=3,
        choices=(1, 2, 3),
        help="slices between window centres: 3 (paper, default) or 1 (reference code)",
    )
    p.add_argument(
        "--mode",
        default="propagate",
        choices=("propagate", "per-slice"),
        help="per-slice: every prompted slice on its own, no propagation (baseline)",
    )
    p.add_argument(
        "--iou-thresh",
        type=float,
        default=0.4,
        help="stop propagating below this predicted IoU (default 0.4)",
    )
    p.add_argument(
        "--stability-thresh",
        type=float,
        default=0.6,
        help="stop propagating below this stability score (default 0.6)",
    )
    p.add_argument(
        "--nms-thresh",
        type=float,
        default=0.7,
        help="objects overlapping more than this on a slice: keep the better (0.7)",
    )
    p.add_argument(
        "--min-area",
        type=int,
        default=10,
        help="edge masks smaller than this (pixels) end a direction (default 10)",
    )
    p.add_argument(
        "--box-margin",
        type=float,
        default=-0.02,  # = PropagationConfig.box_margin (a test checks); literal: no torch
        help="each side of a propagated box moves out by this fraction of the box side, in "
        "when negative (default -0.02: a slight shrink keeps masks from creeping outwards "
        "slice after slice; 0 = the mask's exact box)",
    )
    p.add_argument(
        "--single-mask",
        action="store_true",
        help="use the single-mask output instead of the best of 3 candidates",
    )
    p.add_argument(
        "--mask-prompt",
        action="store_true",
        help="also pass the edge-slice logits as the mask prompt",
    )
    p.add_argument(
        "--window",
        nargs=2,
        type=float,
        default=(-200.0, 400.0),
        metavar=("LO", "HI"),
        help="intensity window in HU (default -200 400, as in training)",
    )
    p.add_argument("--batch-size", type=int, default=4, help="windows per encoder pass")
    p.add_argument(
        "--save-probabilities",
        action="store_true",
        help="also write the fused foreground probability per label",
    )
    p.add_argument(
        "--dicom-seg",
        type=Path,
        metavar="FILE",
        help="single case read from a DICOM series: also write the mask as a DICOM SEG "
        "referencing it (for PACS and viewers)",
    )
    p.add_argument("--overwrite", action="store_true", help="batch: redo finished cases")
    p.add_argument("--part-id", type=int, default=0, help="batch: this part (0-based)")
    p.add_argument("--num-parts", type=int, default=1, help="batch: number of parts")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from slidesam.data.io import read_image
    from slidesam.data.prompts import read_prompts
    from slidesam.inference.models import load_any
    from slidesam.inference.predictor import SlideSAMPredictor
    from slidesam.inference.propagation import PropagationConfig
    from slidesam.inference.segment import (
        find_cohort,
        output_paths,
        run_info,
        segment_cohort,
        segment_volume,
        write_result,
    )

    config = PropagationConfig(
        mode=args.mode,
        step=args.step,
        multimask=not args.single_mask,
        iou_thresh=args.iou_thresh,
        stability_thresh=args.stability_thresh,
        nms_thresh=args.nms_thresh,
        min_area=args.min_area,
        box_margin=args.box_margin,
        mask_prompt=args.mask_prompt,
    )
    if args.num_parts < 1:
        raise InputError(f"--num-parts must be at least 1, got {args.num_parts}")
    batch = args.prompts.is_dir()
    if batch:
        if not args.image.is_dir():
            raise InputError(f"{args.image}: with a prompts folder, --image must be a folder")
        cases = find_cohort(args.image, args.prompts)
    else:
        # everything about the case is checked before the model is loaded or anything written
        image = read_image(args.image)
        prompts = read_prompts(args.prompts, image.geometry)
        output_paths(args.out)
        if args.dicom_seg is not None and not image.source_files:
            raise InputError("--dicom-seg needs the image as a DICOM series folder")
    if batch and args.dicom_seg is not None:
        raise InputError("--dicom-seg is for a single case")
    predictor = SlideSAMPredictor(
        load_any(args.checkpoint, device=args.device),
        device=args.device,
        window=tuple(args.window),
        batch_size=args.batch_size,
    )
    info = run_info(config, args.checkpoint)
    if batch:
        summary = segment_cohort(
            cases,
            args.out,
            predictor,
            config,
            info=info,
            overwrite=args.overwrite,
            save_probabilities=args.save_probabilities,
            part_id=args.part_id,
            num_parts=args.num_parts,
            progress=not args.no_progress,
        )
        print(
            f"{summary['segmented']} segmented, {summary['skipped']} already done, "
            f"{len(summary['failed'])} failed (of {summary['cases']} in this part) -> {args.out}"
        )
        for case, err in summary["failed"].items():
            print(f"  {case}: {err}")
        return 1 if summary["failed"] else 0
    result = segment_volume(image, prompts, predictor, config, progress=not args.no_progress)
    paths = write_result(
        result,
        image,
        args.out,
        save_probabilities=args.save_probabilities,
        info={**info, "image": str(args.image), "prompts": str(args.prompts)},
    )
    if args.dicom_seg is not None:
        from slidesam.data.dicom import write_dicom_seg

        if result.labels.any():
            write_dicom_seg(result.labels, image, args.dicom_seg)
        else:
            print(f"{args.dicom_seg}: not written, the mask is empty")
    labels = sorted({r.label for r in result.records})
    print(
        f"{paths.mask}: labels {labels}, {len(result.windows)} windows, "
        f"{result.encoder_passes} encoder passes; records in {paths.sidecar}"
    )
    return 0
