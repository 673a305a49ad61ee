"""``slidesam unet-train``: train the stage-1 3D U-Net from a YAML config."""

from __future__ import annotations

import argparse
from dataclasses import replace


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "unet-train",
        help="train the stage-1 3D U-Net (kidney, tumor, cyst) on nnU-Net raw datasets",
        description=(
            "Train a small 3D U-Net (MONAI UNet) that segments kidney, tumor and cyst (KiTS "
            "labels) on one contrast phase: the embedded stage-1 model of SSA, or a per-phase "
            "baseline. Data: nnU-Net raw dataset folders (imagesTr/, labelsTr/), e.g. from "
            "'slidesam phantom'. Every image is resampled to the model's target spacing in a "
            "standard axial orientation; random patches (part centred on the tumor) with "
            "intensity augmentation; "
            "DiceCE loss, AdamW; held-out tumor Dice after each epoch; --init fine-tunes "
            "trained weights on your data. Writes to the run "
            "folder: config.yaml, log.csv, last.pt and best.pt (load with "
            "slidesam.stage1.load_unet). The YAML sections (data, model, augment, optim, run) "
            "are described in slidesam.stage1.train; see configs/unet_arterial_phantom.yaml."
        ),
    )
    p.add_argument("--config", required=True, metavar="CONFIG.yaml", help="training config (YAML)")
    p.add_argument("--out", metavar="DIR", help="run folder, overriding run.out_dir of the config")
    p.add_argument(
        "--data",
        nargs="+",
        metavar="DIR",
        help="nnU-Net raw dataset folder(s), overriding data.folders (e.g. the same recipe on "
        "another phase's dataset, as the per-phase baselines of bench/ssa_tables.py)",
    )
    p.add_argument(
        "--phase",
        help="the phase the data hold and the model is for, overriding model.phase",
    )
    p.add_argument(
        "--init",
        metavar="CKPT|default",
        help="fine-tune: start from this slidesam U-Net checkpoint ('default': the shipped "
        "model) instead of random weights, overriding run.init_checkpoint; the config's model "
        "section must describe the same network",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # imported here: building the CLI parser must not import torch (tests/core/test_layers.py)
    from slidesam.stage1.train import load_unet_train_config, train_unet
    from slidesam.stage1.unet import load_unet_checkpoint

    config = load_unet_train_config(args.config)
    if args.out:
        config = config.with_out_dir(args.out)
    if args.data:
        config = replace(config, data=replace(config.data, folders=tuple(args.data)))
    if args.phase:
        config = replace(config, model=replace(config.model, phase=args.phase))
    if args.init:
        config = replace(config, run=replace(config.run, init_checkpoint=args.init))
    best = train_unet(config, progress=not args.no_progress)
    extra = load_unet_checkpoint(best).extra
    scores = extra.get("validation") or {}
    dice = scores.get("tumor_dice")
    print(
        f"{best}: epoch {extra.get('epoch')}, "
        + (f"validation tumor Dice {dice:.4f}" if dice is not None else "no validation cases")
        + f", {extra.get('seconds', 0) / 60:.1f} min"
    )
    return 0
