"""TransferSAM on fresh phantoms: cache throughput and size, decoder training, KiTS-region Dice,
and SSA's tumour Dice on the same arterial-phase cases.

1. ``--train-cases`` phantom cases (arterial phase, seed ``--train-seed``) are embedded with a
   seeded random tiny encoder (no pretrained weights exist at that size: this measures the
   pipeline, not SAM's features); throughput (slices/s) and cache size per case are printed.
2. The roi, tumor and cyst decoders are trained on the cache (``--steps`` each), the seed's
   way (tumor/cyst on positive boxes only); then tumor and cyst again with
   ``negative_ratio=1`` (as many kidney boxes without the target), into a second cascade that
   shares the ROI decoder (``--no-negatives`` skips it).
3. ``--test-cases`` fresh cases (seed ``--test-seed``, default the demo's 4242, which the
   embedded SSA models never saw) are predicted by both cascades; Dice and NSD (2 mm) of the
   KiTS regions kidney+masses, masses, tumor, averaged over cases.
4. SSA (embedded stage-1 U-Net + embedded Slide-SAM, ``SSAConfig()`` defaults) segments the
   tumour on the same arterial images; its tumour Dice is printed next to TransferSAM's.

    OMP_NUM_THREADS=1 python bench/transfersam.py [--train-cases 16] [--steps 1500]
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from slidesam.core import KITS_REGIONS
from slidesam.data.phantom import PhantomConfig, generate_case, write_cohort
from slidesam.evaluation.metrics import binary_scores, label_scores
from slidesam.transfersam.cache import embed_dataset
from slidesam.transfersam.cascade import load_cascade
from slidesam.transfersam.config import DecoderTrainConfig, EmbedConfig, EncoderRef
from slidesam.transfersam.decoders import train_decoder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/transfersam_bench")
    ap.add_argument("--variant", default="tiny")
    ap.add_argument("--train-cases", type=int, default=16)
    ap.add_argument("--test-cases", type=int, default=6)
    ap.add_argument("--train-seed", type=int, default=7001)
    ap.add_argument("--test-seed", type=int, default=4242)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-ssa", action="store_true")
    ap.add_argument("--no-negatives", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    t_all = time.perf_counter()
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    phantom = PhantomConfig(phases=("arterial",))

    t0 = time.perf_counter()
    info = write_cohort(
        out / "train", cases=args.train_cases, seed=args.train_seed, config=phantom, progress=False
    )
    print(f"phantoms: {args.train_cases} training cases in {time.perf_counter() - t0:.1f} s")

    ref = EncoderRef(variant=args.variant, seed=0)
    emb = embed_dataset(
        info["datasets"]["arterial"],
        out / "cache",
        ref,
        EmbedConfig(),
        batch_size=8,
        progress=False,
    )
    print(
        f"embed ({ref.describe()}, {args.threads} thread): {emb['slices']} slices in "
        f"{emb['seconds']:.1f} s = {emb['slices_per_s']:.1f} slices/s; cache "
        f"{emb['mb_per_case']:.2f} MB/case ({emb['slices'] / args.train_cases:.0f} slices/case)"
    )

    config = DecoderTrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=max(1, args.steps // 20),
        validate_every=max(1, args.steps // 5),
        val_fraction=0.15,
    )
    runs = [("seed", "cascade", config, ("roi", "tumor", "cyst"))]
    if not args.no_negatives:
        neg = replace(config, negative_ratio=1.0)
        runs.append(("+negatives", "cascade_neg", neg, ("tumor", "cyst")))
    for label, folder, cfg, names in runs:
        if folder != "cascade":  # shares the seed cascade's ROI decoder
            (out / folder).mkdir()
            for f in ("cascade.json", "decoder_roi.pt"):
                shutil.copy(out / "cascade" / f, out / folder / f)
        for name in names:
            s = train_decoder(out / "cache", name, out / folder, cfg, progress=False)
            print(
                f"train {name:5s} ({label}): {s['train_samples']} samples, loss "
                f"{s['first_train_loss']:.3f} -> {s['last_train_loss']:.3f}, val Dice (logit "
                f"res.) untrained {s.get('untrained_val_dice', float('nan')):.3f} -> best "
                f"{s.get('best_val_dice', float('nan')):.3f}, {s['seconds']:.0f} s"
            )

    cascades = {label: load_cascade(out / folder) for label, folder, _, _ in runs}
    rows: dict[str, list] = {label: [] for label in cascades}
    ssa_rows = []
    stage1 = predictor = None
    if not args.no_ssa:
        from slidesam.inference.models import default_model
        from slidesam.inference.predictor import SlideSAMPredictor
        from slidesam.ssa.pipeline import SSAConfig, run_ssa
        from slidesam.stage1.unet import default_unet

        stage1 = default_unet(device="cpu")
        predictor = SlideSAMPredictor(default_model(device="cpu"), device="cpu")
    t_pred = t_ssa = 0.0
    for i in range(args.test_cases):
        case = generate_case(i, seed=args.test_seed, config=phantom)
        image, gt = case.phases["arterial"], case.labels["arterial"].array
        for label, cascade in cascades.items():
            t0 = time.perf_counter()
            pred, _ = cascade.predict_volume(image)
            t_pred += time.perf_counter() - t0
            scores = label_scores(pred.array, gt, spacing=image.spacing, regions=KITS_REGIONS)
            rows[label].append({k: (v.dice, v.nsd) for k, v in scores.items()})
        if stage1 is not None:
            t0 = time.perf_counter()
            s1 = stage1.predict(image)
            res = run_ssa({"arterial": image}, s1, predictor, SSAConfig(), targets=("arterial",))
            t_ssa += time.perf_counter() - t0
            ssa_rows.append(
                {
                    "ssa": binary_scores(
                        res.phases["arterial"].mask > 0, gt == 2, spacing=image.spacing
                    ).dice,
                    "stage1": binary_scores(s1.array == 2, gt == 2, spacing=image.spacing).dice,
                }
            )

    n = args.test_cases
    print(
        f"\nKiTS regions on {n} fresh phantom cases (seed {args.test_seed}, arterial), "
        f"TransferSAM {t_pred / n / len(cascades):.1f} s/case, Dice / NSD 2 mm:"
    )
    print(f"{'region':18s}" + "".join(f" {label:>15s}" for label in cascades))
    summary: dict = {label: {} for label in cascades}
    for region in KITS_REGIONS:
        line = f"{region:18s}"
        for label in cascades:
            d = float(np.mean([r[region][0] for r in rows[label]]))
            s = float(np.mean([r[region][1] for r in rows[label]]))
            summary[label][region] = {"dice": d, "nsd": s}
            line += f"   {d:5.3f} / {s:5.3f}"
        print(line)
    if ssa_rows:
        ssa = float(np.mean([r["ssa"] for r in ssa_rows]))
        s1 = float(np.mean([r["stage1"] for r in ssa_rows]))
        summary["ssa_tumor_dice"], summary["stage1_tumor_dice"] = ssa, s1
        mine = ", ".join(f"{k} {summary[k]['tumor']['dice']:.3f}" for k in cascades)
        print(
            f"\ntumor Dice, arterial, same cases: TransferSAM ({mine}) | SSA {ssa:.3f} "
            f"(its stage-1 U-Net alone {s1:.3f}), SSA {t_ssa / n:.1f} s/case"
        )
    (out / "bench_results.json").write_text(json.dumps(summary, indent=2))
    print(f"\ntotal {time.perf_counter() - t_all:.0f} s")


if __name__ == "__main__":
    main()
