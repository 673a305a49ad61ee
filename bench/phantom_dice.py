"""Tumor Dice of a Slide-SAM checkpoint on freshly generated phantom cases, by propagation.

The protocol of the Training issue's acceptance test: for each new phantom case and phase, the
ground-truth tumor box on the slice where the tumor is largest prompts the model, propagation
segments the volume, and the 3D Dice against the phantom's tumor label is reported (targets for
the embedded default model: >= 0.85 arterial, >= 0.75 plain).

    python bench/phantom_dice.py --checkpoint runs/tiny_phantom/best.pt [--cases 6] [--seed 1000]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import slidesam
from slidesam.core.prompts import Prompt
from slidesam.data.phantom import PhantomConfig, generate_case
from slidesam.evaluation.metrics import binary_scores
from slidesam.inference.models import load_any
from slidesam.inference.propagation import PropagationConfig, VolumeSegmenter


def tumor_prompt(labels: np.ndarray) -> Prompt:
    tumor = labels == 2
    z = int(np.argmax(tumor.sum(axis=(1, 2))))
    ys, xs = np.nonzero(tumor[z])
    return Prompt(slice=z, box=(xs.min(), ys.min(), xs.max(), ys.max()), label=1)


def _extent(mask: np.ndarray) -> str:
    z = np.flatnonzero(mask.any(axis=(1, 2)))
    return f"{z[0]}-{z[-1]}" if z.size else "none"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--checkpoint", help="default: the embedded model")
    ap.add_argument("--cases", type=int, default=6)
    ap.add_argument("--seed", type=int, default=1000, help="cohort seed (not a training seed)")
    ap.add_argument("--phases", nargs="+", default=["plain", "arterial", "venous"])
    ap.add_argument("--steps", nargs="+", type=int, default=[3, 1])
    ap.add_argument("--iou-thresh", type=float, default=0.4, help="stop rule (paper: 0.4)")
    ap.add_argument("--stability-thresh", type=float, default=0.6, help="stop rule (0.6)")
    ap.add_argument(
        "--per-case",
        action="store_true",
        help="also print each case: tumor diameter, slices predicted vs true, Dice",
    )
    args = ap.parse_args()
    model = load_any(args.checkpoint)
    predictor = slidesam.SlideSAMPredictor(model)
    dice: dict[tuple[str, int], list[float]] = {}
    t0 = time.perf_counter()
    for i in range(args.cases):
        case = generate_case(i, seed=args.seed, config=PhantomConfig())
        for phase in args.phases:
            image, labels = case.phases[phase], case.labels[phase].array
            prompt = tumor_prompt(labels)
            for step in args.steps:
                config = PropagationConfig(
                    step=step, iou_thresh=args.iou_thresh, stability_thresh=args.stability_thresh
                )
                seg = VolumeSegmenter(predictor, config)
                result = seg.segment(image, [prompt])
                score = binary_scores(result.labels > 0, labels == 2, spacing=image.spacing)
                dice.setdefault((phase, step), []).append(score.dice)
                if args.per_case:
                    print(
                        f"  {case.case_id} {case.truth['tumor_diameter_mm']:5.1f} mm {phase:<9} "
                        f"step {step}: slices {_extent(result.labels > 0)} (true "
                        f"{_extent(labels == 2)}, prompt {prompt.slice}), Dice {score.dice:.3f}"
                    )
    print(
        f"checkpoint {args.checkpoint or 'embedded default'}: {args.cases} new phantom cases "
        f"(seed {args.seed}), GT box on the largest tumor slice, stop below predicted IoU "
        f"{args.iou_thresh} / stability {args.stability_thresh}, {time.perf_counter() - t0:.0f} s"
    )
    for (phase, step), values in dice.items():
        v = np.asarray(values)
        print(
            f"  {phase:<9} step {step}: tumor Dice mean {v.mean():.3f}  median "
            f"{np.median(v):.3f}  min {v.min():.3f}"
        )


if __name__ == "__main__":
    main()
