"""M-SAM ablation on renal phantoms, tiny models on CPU (issue 8 acceptance).

Trains two ``tiny`` models with the same data, seed and steps: M-SAM (with the Mask-Enhanced
Adapter) and the "w/o MEA" baseline (SAM-Med3D's ``image + dense mask embedding``). Both are
trained from scratch with every part trainable (preset ``full``): no SAM-Med3D weights are
available offline, and a frozen random ViT learns nothing. Then, on held-out phantoms, the tumor
Dice (on a crop centred on the tumor, one click at its innermost voxel) after

- 1 pass,
- N passes of mask-only refinement (the click fixed, the previous mask fed back),
- N passes with one simulated corrective click per pass (the seed's training protocol),

and the trainable-parameter fraction of the full-size model under the seed's recipe (encoder
LoRA r=4 on q/v + neck + MEA + prompt encoder + decoder), computed on the meta device.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python bench/msam.py`` (about 15 min at 1 thread).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import torch

from slidesam.data.phantom import PhantomConfig, write_cohort
from slidesam.modeling.sam3d import VARIANTS3D, build_sam3d, set_trainable_3d
from slidesam.msam.checkpoint import load_msam
from slidesam.msam.config import MSamTrainConfig
from slidesam.msam.data import find_cases, load_case
from slidesam.msam.train import evaluate_cases, train_msam


def trainable_fraction(variant: str, preset: str, **options) -> tuple[float, int]:
    with torch.device("meta"):
        model = build_sam3d(VARIANTS3D[variant].with_options(**options))
    c = set_trainable_3d(model, preset)
    total = c["trainable"] + c["frozen"]
    return c["trainable"] / total, total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/msam_bench"))
    ap.add_argument("--train-cases", type=int, default=24)
    ap.add_argument("--test-cases", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--steps", type=int, default=20, help="steps per epoch")
    ap.add_argument("--train-iterations", type=int, default=5)
    ap.add_argument("--eval-iterations", type=int, default=5)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    t0 = time.perf_counter()

    phantom = PhantomConfig(
        shape=(45, 100, 100),
        spacing=(3.0, 2.8, 2.8),
        phases=("venous",),
        tumor_diameter_mm=(20.0, 50.0),
        motion_mm=0.0,
        vary_z_spacing=False,
        cyst_probability=0.3,
    )
    n = args.train_cases + args.test_cases
    summary = write_cohort(
        args.out / "phantom", cases=n, seed=args.seed, config=phantom, progress=False
    )
    folder = Path(summary["datasets"]["venous"])
    # the last test_cases cases are the test set; training sees only the others
    train_dir = args.out / "train_data"
    for sub in ("imagesTr", "labelsTr"):
        (train_dir / sub).mkdir(parents=True, exist_ok=True)
    for _case_id, image, label in find_cases(folder)[: args.train_cases]:
        for src, sub in ((image, "imagesTr"), (label, "labelsTr")):
            dst = train_dir / sub / src.name
            if not dst.exists():
                dst.symlink_to(src)
    test_files = find_cases(folder)[args.train_cases :]

    base = {
        "data": {"folders": [str(train_dir)], "val_cases": 3, "target_labels": [2]},
        "preprocess": {"spacing": [2.0, 2.0, 2.0]},
        "refine": {"train_iterations": args.train_iterations, "val_iterations": 3},
        "optim": {
            "lr": args.lr,
            "low_lr_scale": 1.0,
            "epochs": args.epochs,
            "steps_per_epoch": args.steps,
            "batch_size": 2,
        },
        "run": {"seed": args.seed, "num_threads": 1, "val_every": 5},
    }
    results = {}
    for name, use_mea in (("M-SAM (MEA)", True), ("w/o MEA", False)):
        cfg = dict(base)
        cfg["model"] = {"variant": "tiny", "options": {"use_mea": use_mea}, "trainable": "full"}
        cfg["run"] = {**base["run"], "out_dir": str(args.out / ("mea" if use_mea else "nomea"))}
        t = time.perf_counter()
        best = train_msam(MSamTrainConfig.from_dict(cfg), progress=False)
        train_min = (time.perf_counter() - t) / 60
        model, pre, extra = load_msam(best)
        cases = [load_case(*f, pre, (2,)) for f in test_files]
        cases = [c for c in cases if c.target.any()]
        mask_only = evaluate_cases(model, cases, iterations=args.eval_iterations)
        clicks = evaluate_cases(
            model, cases, iterations=args.eval_iterations, simulated_clicks=True, seed=1
        )
        results[name] = (mask_only, clicks, train_min, extra["log"][-1]["train_loss"])

    k = args.eval_iterations
    print(
        f"\nM-SAM ablation: tiny (64^3 crop, 2 mm), {args.train_cases} training phantoms, "
        f"{len(cases)} test tumors, {args.epochs * args.steps} steps x batch 2, "
        f"{args.train_iterations} refinement passes per training sample"
    )
    print(
        f"{'model':<14}{'train min':>10}{'loss':>8}{'Dice 1 pass':>13}"
        f"{f'{k} mask-only':>14}{f'{k} +clicks':>12}"
    )
    for name, (mo, ck, minutes, loss) in results.items():
        print(
            f"{name:<14}{minutes:>10.1f}{loss:>8.3f}{mo[:, 0].mean():>13.3f}"
            f"{mo[:, -1].mean():>14.3f}{ck[:, -1].mean():>12.3f}"
        )
    for name, (mo, ck, _, _) in results.items():
        print(f"{name} per-pass mean Dice, mask-only: {np.round(mo.mean(0), 3).tolist()}")
        print(f"{name} per-pass mean Dice, +clicks:   {np.round(ck.mean(0), 3).tolist()}")
    frac, total = trainable_fraction("sam_med3d", "msam")
    frac0, total0 = trainable_fraction("sam_med3d", "msam", use_mea=False)
    tiny, tiny_total = trainable_fraction("tiny", "msam")
    print(
        f"trainable (seed recipe) full size: {100 * frac:.1f} % of {total / 1e6:.1f} M "
        f"(w/o MEA {100 * frac0:.1f} % of {total0 / 1e6:.1f} M); tiny: {100 * tiny:.1f} % of "
        f"{tiny_total / 1e3:.0f} k (bench trains all of tiny)"
    )
    print(f"total runtime {(time.perf_counter() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
