"""``slidesam pseudo-label``: SAM pseudo-labels of unlabelled volumes as training windows."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from slidesam.data.prepare import IMAGE_FORMATS
from slidesam.data.preprocess import SCALINGS


def register(sub: argparse._SubParsersAction) -> None:
    from slidesam.training.pseudo_label import (
        PROMPT_MODES,
        SUPERPIXEL_PROMPTS,
        PseudoLabelConfig,
    )

    d = PseudoLabelConfig()
    p = sub.add_parser(
        "pseudo-label",
        help="SAM pseudo-labels of unlabelled volumes, written as training windows",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Pseudo-labels for unlabelled or partially labelled volumes (Slide-SAM, App. B).\n\n"
            "Every --stride-th slice inside the body is segmented by the model under several\n"
            "intensity windows mu +- k sigma (--sigmas; mu, sigma over the body: voxels above\n"
            "-500 HU for CT), prompted by SLIC superpixels of the windowed slice (a point near\n"
            "each bright superpixel's centroid and/or its box: prompt_from_superpixel) and/or\n"
            "SAM's regular point grid (sam_auto). Masks are kept if their predicted IoU and\n"
            "stability pass the thresholds and their area is in range, then de-duplicated by\n"
            "mask NMS across prompts and windows. Ground-truth label maps (--labels), where\n"
            "given, win over pseudo-labels and are written as `slidesam prepare` does.\n\n"
            "Output: OUT is a prepared-windows folder in `slidesam prepare`'s layout (train on\n"
            "it with `slidesam train`): pseudo-label records have indicator [0, 1, 0] (only the\n"
            "centre slice is trusted) and class name = source; each record lists `sources` and\n"
            "`mask_meta` (window, predicted IoU, stability, prompt) per mask. Resumable per\n"
            "case; summary.json counts the masks kept and rejected per filter."
        ),
    )
    io = p.add_argument_group("input and output")
    io.add_argument(
        "--images",
        required=True,
        metavar="PATH",
        help="an image file (NIfTI, NRRD, MHA), a DICOM series folder, or a folder of image "
        "files (CASE_0000.nii.gz counts as case CASE)",
    )
    io.add_argument(
        "--labels",
        metavar="PATH",
        help="label map file, or folder of label maps named CASE.* (optional; partial labels "
        "allowed: images without one get pseudo-labels only)",
    )
    io.add_argument(
        "--checkpoint",
        metavar="CKPT",
        help="model: official SAM, released Slide-SAM or ours (default: the embedded model)",
    )
    io.add_argument("--device", default="cpu", help="cpu, cuda or mps (default cpu)")
    io.add_argument("--out", required=True, metavar="DIR", help="output prepared-windows folder")
    io.add_argument(
        "--size", type=int, default=d.size, help=f"side of written windows (default {d.size})"
    )
    io.add_argument(
        "--axes",
        default=d.axes,
        choices=("auto", "all", "z", "y", "x"),
        help="slicing axis as in prepare: fewest voxels (auto, default), all three, or one",
    )
    io.add_argument(
        "--modality",
        default=d.modality,
        choices=("CT", "MRI"),
        help="default written window (CT [-200, 400], MRI [0, 600]) and body threshold "
        "(CT -500 HU, MRI Otsu)",
    )
    io.add_argument(
        "--window",
        nargs=2,
        type=float,
        metavar=("LOW", "HIGH"),
        help="intensity window of the written images (the model's windows come from --sigmas)",
    )
    io.add_argument("--scaling", default=d.scaling, choices=SCALINGS, help="as in prepare")
    io.add_argument(
        "--format",
        dest="image_format",
        default=d.image_format,
        choices=IMAGE_FORMATS,
        help=f"image files (default {d.image_format})",
    )

    pr = p.add_argument_group("slices and prompts")
    pr.add_argument(
        "--stride", type=int, default=d.stride, help=f"every k-th slice (default {d.stride})"
    )
    pr.add_argument(
        "--prompts",
        default=d.prompts,
        choices=PROMPT_MODES,
        help="superpixel prompts (prompt_from_superpixel), SAM's point grid (sam_auto), or both "
        f"(default {d.prompts})",
    )
    pr.add_argument(
        "--superpixel-prompt",
        default=d.superpixel_prompt,
        choices=SUPERPIXEL_PROMPTS,
        help="per superpixel: a point near its centroid, its box, or both in one prompt "
        f"(default {d.superpixel_prompt})",
    )
    pr.add_argument(
        "--n-segments", type=int, default=d.n_segments, help=f"SLIC segments ({d.n_segments})"
    )
    pr.add_argument(
        "--compactness",
        type=float,
        default=d.compactness,
        help=f"SLIC compactness on the [0, 1] windowed slice ({d.compactness})",
    )
    pr.add_argument(
        "--dark-threshold",
        type=float,
        default=d.dark_threshold,
        help="skip superpixels whose mean windowed intensity (0..1) is below this "
        f"({d.dark_threshold})",
    )
    pr.add_argument(
        "--points-per-side",
        type=int,
        default=d.points_per_side,
        help=f"grid prompts: N x N points ({d.points_per_side})",
    )
    pr.add_argument(
        "--sigmas",
        nargs="+",
        type=float,
        default=list(d.sigmas),
        metavar="K",
        help="intensity windows mu +- K sigma, one predictor each (default 3 2 1 0.5)",
    )
    pr.add_argument(
        "--body-threshold",
        type=float,
        help="body = voxels above this (default: -500 for CT, Otsu for MRI)",
    )
    pr.add_argument(
        "--body-min-fraction",
        type=float,
        default=d.body_min_fraction,
        help=f"skip slices with less body than this fraction ({d.body_min_fraction})",
    )
    pr.add_argument(
        "--single-mask",
        action="store_true",
        help="one mask per prompt instead of the model's 3 candidates",
    )
    pr.add_argument(
        "--prompt-batch", type=int, default=d.prompt_batch, help="prompts per model call"
    )

    fl = p.add_argument_group("filters and output masks")
    fl.add_argument(
        "--pred-iou-thresh",
        type=float,
        default=d.pred_iou_thresh,
        help=f"minimum predicted IoU (default {d.pred_iou_thresh}, SAM's)",
    )
    fl.add_argument(
        "--stability-thresh",
        type=float,
        default=d.stability_thresh,
        help=f"minimum stability score (default {d.stability_thresh}; SAM uses 0.95)",
    )
    fl.add_argument(
        "--min-area",
        type=float,
        default=d.min_area_fraction,
        help=f"a mask must exceed this fraction of the slice ({d.min_area_fraction}, as prepare)",
    )
    fl.add_argument(
        "--max-area",
        type=float,
        default=d.max_area_fraction,
        help=f"a pseudo-label may cover at most this fraction ({d.max_area_fraction})",
    )
    fl.add_argument(
        "--nms-thresh",
        type=float,
        default=d.nms_thresh,
        help=f"mask NMS IoU threshold ({d.nms_thresh})",
    )
    fl.add_argument(
        "--three-slice-masks",
        action="store_true",
        help="write the model's 3 slices per pseudo-label (indicator stays [0, 1, 0])",
    )
    fl.add_argument(
        "--label-names",
        nargs="+",
        default=(),
        metavar="LABEL",
        help="ground truth: only these names (dataset.json next to the labels) or values",
    )
    fl.add_argument(
        "--labels-complete",
        action="store_true",
        help="label maps annotate every slice (3D labels): ground-truth indicator [1, 1, 1]; "
        "default: only slices holding a label count as annotated",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="delete an earlier output with other settings instead of refusing",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from slidesam.inference.models import load_any
    from slidesam.training.pseudo_label import (
        PseudoLabelConfig,
        find_volume_cases,
        pseudo_label_dataset,
        sam_predictor_factory,
    )

    config = PseudoLabelConfig(
        size=args.size,
        axes=args.axes,
        modality=args.modality,
        window=tuple(args.window) if args.window else None,
        scaling=args.scaling,
        image_format=args.image_format,
        stride=args.stride,
        prompts=args.prompts,
        superpixel_prompt=args.superpixel_prompt,
        n_segments=args.n_segments,
        compactness=args.compactness,
        dark_threshold=args.dark_threshold,
        points_per_side=args.points_per_side,
        sigmas=tuple(args.sigmas),
        body_threshold=args.body_threshold,
        body_min_fraction=args.body_min_fraction,
        multimask=not args.single_mask,
        prompt_batch=args.prompt_batch,
        pred_iou_thresh=args.pred_iou_thresh,
        stability_thresh=args.stability_thresh,
        min_area_fraction=args.min_area,
        max_area_fraction=args.max_area,
        nms_thresh=args.nms_thresh,
        three_slice_masks=args.three_slice_masks,
        label_names=tuple(args.label_names),
        labels_complete=args.labels_complete,
    )
    find_volume_cases(args.images, args.labels)  # bad paths fail before the model loads
    model = load_any(args.checkpoint, device=args.device)
    summary = pseudo_label_dataset(
        args.images,
        args.out,
        config,
        make_predictor=sam_predictor_factory(model, device=args.device),
        labels=args.labels,
        model_name=str(Path(args.checkpoint).resolve()) if args.checkpoint else "default",
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    failed = summary["cases_failed"]
    print(
        f"{summary['output']}: {summary['cases']} cases ({summary['cases_resumed']} already "
        f"done, {len(failed)} failed), {summary['windows']} windows; masks kept "
        f"{json.dumps(summary['kept'])}, rejected {json.dumps(summary['rejected'])}"
    )
    for case, message in failed.items():
        print(f"slidesam: case {case} failed: {message}", file=sys.stderr)
    return 1 if failed else 0
