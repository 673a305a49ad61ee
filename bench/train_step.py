"""Training-step time on this CPU, with and without gradient checkpointing of the encoder.

One step = what ``slidesam train`` does per batch: simulated prompts, encoder + decoder forward,
the Slide-SAM loss, backward, gradient clipping, AdamW. Synthetic batch: random images, one
rectangle per sample on all three slices; every step uses the same batch and prompts. Default
trainable preset ``lora`` (the paper's: LoRA + patch embedding + prompt encoder + decoder), so
the backward pass runs through every encoder block. Cases: ``tiny`` at its native 256 px,
``vit_b`` at 256 and at 1024 px (``--quick`` skips 1024).

Each case runs in its own process, in two phases:

1. checkpointing on: one warm-up step; the peak RSS so far (``resource.getrusage``, the
   process's high-water mark: model, optimiser state, the step's activations) is the "on" peak;
2. checkpointing off: one warm-up step, then N pairs of steps (off, on) alternating; the final
   peak RSS is the "off" peak.

Other jobs on a shared machine slow some steps several-fold (the load average is printed), so
the slow-down is the median over the pairs of (on / off) of two adjacent steps, which see
about the same load; s/step columns are the fastest and the median step of each mode.

vit_b at 1024 px runs batch 1 by default: without checkpointing one sample peaks at 12-18 GB
RSS (it varies with the allocator's fragmentation), so batch 2 would not fit next to other jobs
in this 23 GB machine.

    python bench/train_step.py [--quick] [--trainable lora|full] [--batch 2] [--batch-1024 1]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time


def one_case(variant: str, size: int, batch: int, pairs: int, trainable: str) -> dict:
    """Both phases of one case in this process (see the module docstring)."""
    import numpy as np
    import torch

    from slidesam.inference.models import build_slidesam
    from slidesam.modeling import set_trainable
    from slidesam.training.trainer import batch_loss

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    model = build_slidesam(variant, image_size=size, lora_rank=8, eval_mode=False)
    set_trainable(model, trainable)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, size, size, generator=g) * 255
    masks = torch.zeros(batch, 3, size, size)
    for b in range(batch):
        y0, x0 = (size // 4 + b * size // 8, size // 3)
        masks[b, :, y0 : y0 + size // 4, x0 : x0 + size // 3] = 1
    indicator = torch.ones(batch, 3)
    encoder_trains = any(p.requires_grad for p in model.image_encoder.parameters())

    def step(checkpointing: bool) -> float:
        model.image_encoder.grad_checkpointing = checkpointing
        t0 = time.perf_counter()
        out = batch_loss(
            model,
            images,
            masks,
            indicator,
            np.random.default_rng(0),  # the same prompts (and tensor shapes) every step
            encoder_trains=encoder_trains,
        )
        optimizer.zero_grad(set_to_none=True)
        out.total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        return time.perf_counter() - t0

    def peak_gb() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux

    built = peak_gb()
    step(True)  # warm-up, checkpointing on
    peak_on = peak_gb()
    step(False)  # warm-up, checkpointing off
    on, off = [], []
    for _ in range(pairs):
        off.append(step(False))
        on.append(step(True))
    return {
        "variant": variant,
        "size": size,
        "batch": batch,
        "off": off,
        "on": on,
        "rss_built_gb": built,
        "rss_on_gb": peak_on,
        "rss_off_gb": peak_gb(),
    }


def run_case(args, variant: str, size: int, batch: int, pairs: int) -> dict:
    command = [sys.executable, __file__, "--case", variant, str(size), str(batch), str(pairs)]
    command += ["--trainable", args.trainable]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"variant": variant, "size": size, "batch": batch, "error": tail}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="skip vit_b at 1024 px")
    ap.add_argument("--trainable", default="lora", choices=["lora", "full"])
    ap.add_argument("--batch", type=int, default=2, help="batch size at 256 px")
    ap.add_argument(
        "--batch-1024", type=int, default=1, help="batch size of vit_b at 1024 px (2 needs > 23 GB)"
    )
    ap.add_argument("--case", nargs=4, metavar="X", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        variant, size, batch, pairs = args.case
        print(json.dumps(one_case(variant, int(size), int(batch), int(pairs), args.trainable)))
        return

    import torch

    cases = [("tiny", 256, args.batch, 8), ("vit_b", 256, args.batch, 4)]
    if not args.quick:
        cases.append(("vit_b", 1024, args.batch_1024, 2))
    load_before = os.getloadavg()[0]
    results = [run_case(args, *case) for case in cases]
    load_after = os.getloadavg()[0]
    print(
        f"torch {torch.__version__}, {os.cpu_count()} threads, trainable {args.trainable}, "
        f"AdamW; load average (1 min) {load_before:.1f} before, {load_after:.1f} after, on "
        f"{os.cpu_count()} cores"
    )
    print(
        f"{'model':>13} {'batch':>5} | {'s/step off':>10} {'(median)':>8} | {'s/step on':>9} "
        f"{'(median)':>8} | {'on/off':>6} {'pairs':>5} | {'peak RSS off':>12} {'on':>7} "
        f"{'(built)':>7}"
    )
    for r in results:
        name = f"{r['variant']} @ {r['size']}"
        if "error" in r:
            print(f"{name:>13} {r['batch']:>5} | failed: {r['error']}")
            continue
        ratio = statistics.median(a / b for a, b in zip(r["on"], r["off"], strict=True))
        print(
            f"{name:>13} {r['batch']:>5} | {min(r['off']):10.3f} {statistics.median(r['off']):8.3f}"
            f" | {min(r['on']):9.3f} {statistics.median(r['on']):8.3f} | {ratio:5.2f}x "
            f"{len(r['on']):>5} | {r['rss_off_gb']:9.2f} GB {r['rss_on_gb']:4.2f} GB "
            f"{r['rss_built_gb']:4.2f} GB"
        )


if __name__ == "__main__":
    main()
