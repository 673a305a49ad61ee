"""Propagation from one box vs per-slice SAM with the same encoder: time, encoder passes, memory.

No trained weights exist on this machine, and a random model stops propagating after one window.
So the real predictor runs every window (real encoder and decoder cost), and the masks that steer
the walk are replaced by the ground truth inside the prompt box (an oracle): the bench measures
the compute of the walk a good model takes, not segmentation quality.

Each configuration runs in a fresh process, so its peak RSS is its own. Targets (issue 4):
propagation / per-slice wall time <= 0.40, peak RSS of vit_b over 512 x 512 x 200 <= 3 GB.

    python bench/propagation.py [--large-variant vit_b] [--skip-large]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import tempfile
import time
from pathlib import Path

import numpy as np


def _oracle(predictor, gt_stack):
    """Wrap ``predictor.predict``: real compute, ground-truth masks inside the prompt box."""
    from slidesam.inference.predictor import WindowPrediction

    real = predictor.predict

    def predict(center, **prompts):
        out = real(center, **prompts)
        n = gt_stack.shape[0]
        idx = [min(max(i, 0), n - 1) for i in (center - 1, center, center + 1)]
        region = np.zeros(gt_stack.shape[1:], bool)
        x0, y0, x1, y1 = (round(v) for v in prompts["boxes"][0])
        region[max(0, y0 - 4) : y1 + 5, max(0, x0 - 4) : x1 + 5] = True
        lg = np.stack([np.where(gt_stack[i] & region, 5.0, -5.0) for i in idx]).astype(np.float32)
        k = out.logits.shape[1]
        lg = np.repeat(lg[None, None], k, axis=1)
        return WindowPrediction(
            center=center,
            slices=out.slices,
            masks=lg > 0,
            logits=lg,
            low_res_logits=out.low_res_logits,
            iou=np.full_like(out.iou, 0.9),
            stability=out.stability,
        )

    predictor.predict = predict


def _volume(kind: str, tmp: Path):
    from slidesam.core import Geometry, Volume
    from slidesam.data.phantom import PhantomConfig, generate_case

    if kind == "phantom":
        case = generate_case(0, seed=0, config=PhantomConfig())
        image, labels = case.phases["plain"], case.labels["plain"]
        return image, labels.array == 1  # kidneys: a long object
    shape = (200, 512, 512)
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    rng = np.random.default_rng(0)
    gt = ((z - 100) / 12.0) ** 2 + ((y - 300) / 40.0) ** 2 + ((x - 200) / 50.0) ** 2 < 1
    arr = rng.normal(40, 15, shape).astype(np.int16)
    arr[gt] += 60
    return Volume(arr, Geometry(shape=shape, spacing=(1.0, 0.8, 0.8))), gt


def _run(kind: str, variant: str, mode: str, step: int, queue) -> None:
    import torch

    import slidesam
    from slidesam.core.prompts import Prompt
    from slidesam.inference.propagation import PropagationConfig, VolumeSegmenter

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        image, gt = _volume(kind, Path(tmp))
    model = slidesam.build_slidesam(variant, lora_rank=8)
    predictor = slidesam.SlideSAMPredictor(model, batch_size=1)
    _oracle(predictor, gt)
    zs = np.nonzero(gt.any(axis=(1, 2)))[0]

    def box(s):
        ys, xs = np.nonzero(gt[s])
        return (xs.min(), ys.min(), xs.max(), ys.max())

    if mode == "per-slice":
        prompts = [Prompt(slice=int(s), box=box(s)) for s in zs]
    else:
        mid = int(zs[np.argmax(gt[zs].sum(axis=(1, 2)))])
        prompts = [Prompt(slice=mid, box=box(mid))]
    seg = VolumeSegmenter(predictor, PropagationConfig(mode=mode, step=step))
    t0 = time.perf_counter()
    result = seg.segment(image, prompts)
    seconds = time.perf_counter() - t0
    got = result.labels > 0
    dice = 2 * (got & gt).sum() / (got.sum() + gt.sum())
    queue.put(
        {
            "seconds": seconds,
            "passes": result.encoder_passes,
            "windows": len(result.windows),
            "rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "slices": len(zs),
            "dice_vs_oracle": float(dice),
        }
    )


def measure(kind: str, variant: str, mode: str, step: int) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_run, args=(kind, variant, mode, step, queue))
    proc.start()
    out = queue.get()
    proc.join()
    return out


def table(kind: str, variant: str, shape: str) -> None:
    rows = {
        "per-slice SAM (box on every slice)": measure(kind, variant, "per-slice", 1),
        "propagation, step 3 (default)": measure(kind, variant, "propagate", 3),
        "propagation, step 1 (reference code)": measure(kind, variant, "propagate", 1),
    }
    base = rows["per-slice SAM (box on every slice)"]
    print(f"\n{kind} volume {shape}, {variant}, object on {base['slices']} slices")
    for name, r in rows.items():
        print(
            f"  {name:<38} {r['seconds']:8.1f} s  {r['passes']:4d} encoder passes  "
            f"{r['windows']:4d} windows  time ratio {r['seconds'] / base['seconds']:.2f}  "
            f"peak RSS {r['rss_gb']:.2f} GB  Dice vs oracle {r['dice_vs_oracle']:.3f}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--variant", default="tiny", help="model on the phantom volume")
    ap.add_argument("--large-variant", default="vit_b", help="model on the 512x512x200 volume")
    ap.add_argument("--skip-large", action="store_true")
    args = ap.parse_args()
    table("phantom", args.variant, "48 x 160 x 160")
    if not args.skip_large:
        table("large", args.large_variant, "200 x 512 x 512")


if __name__ == "__main__":
    main()
