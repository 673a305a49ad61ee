"""``slidesam train``: train or fine-tune Slide-SAM on prepared windows, from a YAML config.

Data-parallel on N processes (GPUs, or CPU with gloo)::

    torchrun --nproc_per_node=N -m slidesam.cli.main train --config C.yaml
"""

from __future__ import annotations

import argparse
import math


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train or fine-tune Slide-SAM on windows written by 'slidesam prepare'",
        description=(
            "Slide-SAM training (hybrid CE + Dice loss on the best of 3 candidates, IoU MSE, "
            "simulated point/box prompts, AdamW). Every setting lives in the YAML config "
            "(sections data, model, loss, prompts, augment, optim, run; see "
            "configs/train_tiny_phantom.yaml). The run folder receives config.yaml, log.csv, "
            "last.pt and best.pt (readable by every --checkpoint option). Data-parallel: "
            "'torchrun --nproc_per_node=N -m slidesam.cli.main train --config C.yaml' "
            "(optim.batch_size is per process; rank 0 writes the run folder)."
        ),
    )
    p.add_argument("--config", required=True, metavar="YAML", help="training config file")
    p.add_argument("--out", metavar="DIR", help="run folder, overriding run.out_dir")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in the run folder exactly from its last.pt",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from slidesam.training.config import load_train_config
    from slidesam.training.trainer import train

    config = load_train_config(args.config)
    if args.out:
        config = config.with_out_dir(args.out)
    result = train(config, resume=args.resume, progress=not args.no_progress)
    if result["rank"] != 0:
        return 0  # one summary per run, from the process that wrote the run folder
    dice, dice3d = result["val_dice"], result["val_dice3d"]
    print(
        f"{result['out_dir']}: {result['epochs_done']} epochs, {result['steps']} steps, "
        f"train loss {result['train_loss']:.4f}"
        + ("" if math.isnan(dice) else f", val Dice {dice:.4f}")
        + ("" if math.isnan(dice3d) else f", 3D Dice {dice3d:.4f}")
        + f"; checkpoints {result['last']}, {result['best']}"
    )
    return 0
