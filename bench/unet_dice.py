"""Tumor Dice of a stage-1 U-Net checkpoint on freshly generated phantom cases of one phase.

Cases are generated in memory with a cohort seed different from training (training used seed 0;
the default here is 1000), segmented by ``UNetStage1.predict`` on their own grid, and scored on
label 2 (tumor) with ``slidesam.evaluation.metrics``; "kidney" is the KiTS region kidney + masses
(labels 1-3). Prints one row per case (tumor diameter, Dice, HD95, inference seconds) and the
mean. Target for the shipped arterial model: mean tumor Dice >= 0.85 on new cases; one cohort of
12 reads anywhere from 0.77 to 0.94, so score several (seeds 1000-5000: 0.854 over 60 cases).

    python bench/unet_dice.py [--checkpoint runs/unet_arterial_phantom/last.pt] [--cases 8]
        [--seed 1000] [--phase arterial] [--flips] [--mirror-axes 0 1 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from slidesam.core import KITS_REGIONS
from slidesam.data.phantom import PhantomConfig, generate_case
from slidesam.evaluation.metrics import label_scores
from slidesam.stage1.unet import default_unet, load_unet


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--checkpoint", help="U-Net checkpoint (default: the shipped default_unet.pt)")
    ap.add_argument("--cases", type=int, default=8, help="number of new cases (8)")
    ap.add_argument(
        "--seed", type=int, default=1000, help="cohort seed, not a training seed (1000)"
    )
    ap.add_argument("--phase", help="phase to segment (default: the model's own phase)")
    ap.add_argument(
        "--flips", action="store_true", help="random axis flips (non-identity direction)"
    )
    ap.add_argument("--max-tumors", type=int, help="keep only this many largest tumor components")
    ap.add_argument("--min-tumor-ml", type=float, default=0.0, help="drop smaller tumor components")
    ap.add_argument(
        "--mirror-axes",
        type=int,
        nargs="*",
        help="test-time mirroring over these network axes (0 z, 1 y, 2 x); no value = none; "
        "default: the checkpoint's model.mirror_axes",
    )
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (2)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    options = {
        "max_tumors": args.max_tumors,
        "min_tumor_ml": args.min_tumor_ml,
        "mirror_axes": None if args.mirror_axes is None else tuple(args.mirror_axes),
    }
    stage = load_unet(args.checkpoint, **options) if args.checkpoint else default_unet(**options)
    phase = args.phase or stage.config.phase
    config = PhantomConfig(phases=(phase,), random_flips=args.flips)
    regions = {"tumor": KITS_REGIONS["tumor"], "kidney": KITS_REGIONS["kidney_and_masses"]}

    print(
        f"{args.checkpoint or 'shipped default_unet.pt'} ({stage.config.phase} model) on "
        f"{args.cases} new {phase} phantom cases, seed {args.seed}"
        + (", random flips" if args.flips else "")
        + (f", mirrored over axes {list(stage.mirror_axes)}" if stage.mirror_axes else "")
        + f", {args.threads} threads"
    )
    print(
        f"{'case':<11} {'diam mm':>8} {'tumor Dice':>10} {'HD95 mm':>8} "
        f"{'kidney Dice':>11} {'s':>6}"
    )
    rows = []
    for i in range(args.cases):
        case = generate_case(i, seed=args.seed, config=config)
        image, gt = case.phases[phase], case.labels[phase]
        t0 = time.perf_counter()
        pred = stage.predict(image)
        seconds = time.perf_counter() - t0
        if pred.geometry != image.geometry:
            raise SystemExit(f"{case.case_id}: the prediction lost the image geometry")
        s = label_scores(pred.array, gt.array, spacing=image.spacing, regions=regions)
        rows.append((s["tumor"].dice, s["tumor"].hd95, s["kidney"].dice, seconds))
        print(
            f"{case.case_id:<11} {case.truth['tumor_diameter_mm']:>8.1f} {s['tumor'].dice:>10.4f} "
            f"{s['tumor'].hd95:>8.1f} {s['kidney'].dice:>11.4f} {seconds:>6.2f}"
        )
    a = np.asarray(rows)
    print(
        f"{'mean':<11} {'':>8} {a[:, 0].mean():>10.4f} {np.nanmean(a[:, 1]):>8.1f} "
        f"{a[:, 2].mean():>11.4f} {a[:, 3].mean():>6.2f}"
    )
    print(f"tumor Dice: median {np.median(a[:, 0]):.4f}, min {a[:, 0].min():.4f}")


if __name__ == "__main__":
    main()
