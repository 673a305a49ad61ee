"""``slidesam transfersam embed|train|predict``: the TransferSAM cascade (frozen SAM encoder,
cached embeddings, ROI / tumor / cyst decoders). See ``slidesam.transfersam``.

Torch is imported inside ``run`` only.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

from slidesam.core import InputError

_EPILOG = """examples:
  slidesam transfersam embed kits23/dataset --cache cache --checkpoint sam_vit_b_01ec64.pth
  slidesam transfersam train --cache cache --decoder roi --out cascade
  slidesam transfersam train --cache cache --decoder tumor --out cascade
  slidesam transfersam train --cache cache --decoder cyst --out cascade
  slidesam transfersam predict --cascade cascade imagesTs/ --out predictions/
"""


def register(sub) -> None:
    p = sub.add_parser(
        "transfersam",
        help="TransferSAM cascade: embed a dataset, train decoders, predict KiTS labels",
        description=(
            "TransferSAM: a frozen SAM encoder, embeddings cached on disk, and three trained "
            "mask decoders (roi: kidney + masses, tumor, cyst) that label CT fully "
            "automatically with KiTS labels 0/1/2/3."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ts = p.add_subparsers(dest="transfersam_command", metavar="STEP", required=True)

    e = ts.add_parser("embed", help="embed a labelled dataset into the cache (resumable)")
    e.add_argument("dataset", help="nnU-Net raw dataset folder or KiTS23 'dataset/' folder")
    e.add_argument("--cache", required=True, help="cache folder (created; re-runs resume)")
    enc = e.add_mutually_exclusive_group()
    enc.add_argument("--checkpoint", help="official SAM checkpoint, e.g. sam_vit_b_01ec64.pth")
    enc.add_argument(
        "--random-encoder",
        type=int,
        metavar="SEED",
        help="a random encoder rebuilt from (variant, SEED): tests and benchmarks only",
    )
    e.add_argument("--variant", default=None, help="SAM variant (default vit_b; tiny for tests)")
    e.add_argument("--batch-size", type=int, default=4, help="slices per encoder pass")
    e.add_argument("--max-slices", type=int, default=400, help="cap of cached slices per case")
    e.add_argument("--blank-ratio", type=float, default=1.0, help="blank slices per positive")
    e.add_argument(
        "--window", type=float, nargs=2, default=(-200.0, 400.0), metavar=("LOW", "HIGH")
    )
    e.add_argument(
        "--seed", type=int, default=0, help="seed of the blank-slice draw and contrast jitter"
    )
    e.add_argument(
        "--contrast-copies",
        type=int,
        default=0,
        metavar="N",
        help="also embed N contrast-jittered copies of every slice for training augmentation "
        "(cache size and embedding time x (1 + N); default 0)",
    )
    e.add_argument(
        "--contrast-factor",
        type=float,
        nargs=2,
        default=(0.75, 1.25),
        metavar=("LOW", "HIGH"),
        help="range of the copies' contrast factor (default 0.75 1.25)",
    )
    e.add_argument(
        "--brightness-shift",
        type=float,
        default=20.0,
        metavar="B",
        help="copies' brightness shift drawn from [-B, B] grey levels of 0..255 (default 20)",
    )
    e.add_argument("--device", default="cpu")
    e.add_argument("--no-progress", action="store_true")

    t = ts.add_parser("train", help="train one decoder into a cascade folder")
    t.add_argument("--cache", required=True, help="cache folder made by 'embed'")
    t.add_argument("--decoder", required=True, help="roi, tumor or cyst")
    t.add_argument("--out", required=True, help="cascade folder (created or completed)")
    t.add_argument("--config", help="YAML with DecoderTrainConfig keys (defaults: the seed's)")
    t.add_argument("--steps", type=int, help="override: optimiser steps")
    t.add_argument("--batch-size", type=int, help="override: samples per step")
    t.add_argument("--lr", type=float, help="override: peak learning rate")
    t.add_argument("--seed", type=int, help="override: seed")
    t.add_argument("--device", help="override: cpu or cuda")
    t.add_argument("--no-progress", action="store_true")

    r = ts.add_parser("predict", help="KiTS label maps for an image or a folder of images")
    r.add_argument("input", help="image file, folder of images, or KiTS23 dataset folder")
    r.add_argument("--cascade", required=True, help="cascade folder made by 'train'")
    r.add_argument("--out", required=True, help="output file (single input) or folder")
    r.add_argument("--batch-size", type=int, help="slices per batch (default: the cascade's)")
    r.add_argument("--device", default="cpu")
    r.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    command = args.transfersam_command
    if command == "embed":
        return _embed(args)
    if command == "train":
        return _train(args)
    return _predict(args)


def _embed(args) -> int:
    from pathlib import Path

    from slidesam.transfersam.cache import cache_settings, embed_dataset
    from slidesam.transfersam.config import EmbedConfig, EncoderRef

    variant = args.variant or "vit_b"
    if args.checkpoint is not None:
        ref = EncoderRef(variant=variant, checkpoint=args.checkpoint)
    elif args.random_encoder is not None:
        ref = EncoderRef(variant=args.variant or "tiny", seed=args.random_encoder)
    elif (Path(args.cache) / "cache.json").is_file():
        ref = cache_settings(Path(args.cache))[0]  # resuming: the cache's own encoder
    else:
        raise InputError(
            "name the encoder: --checkpoint sam_vit_b_01ec64.pth (official SAM), or "
            "--random-encoder SEED for a test encoder"
        )
    config = EmbedConfig(
        window=tuple(args.window),
        max_slices=args.max_slices,
        blank_ratio=args.blank_ratio,
        seed=args.seed,
        contrast_copies=args.contrast_copies,
        contrast_factor=tuple(args.contrast_factor),
        brightness_shift=args.brightness_shift,
    )
    summary = embed_dataset(
        args.dataset,
        args.cache,
        ref,
        config,
        batch_size=args.batch_size,
        device=args.device,
        progress=not args.no_progress,
    )
    print(json.dumps(summary, indent=2))
    return 0


def _train(args) -> int:
    from slidesam.transfersam.config import (
        DecoderTrainConfig,
        check_decoder_name,
        load_train_config,
    )
    from slidesam.transfersam.decoders import train_decoder

    check_decoder_name(args.decoder)
    config = load_train_config(args.config) if args.config else DecoderTrainConfig()
    overrides = {
        k: v
        for k, v in (
            ("steps", args.steps),
            ("batch_size", args.batch_size),
            ("lr", args.lr),
            ("seed", args.seed),
            ("device", args.device),
        )
        if v is not None
    }
    if overrides:
        config = replace(config, **overrides)
    summary = train_decoder(
        args.cache, args.decoder, args.out, config, progress=not args.no_progress
    )
    print(json.dumps(summary, indent=2))
    return 0


def _predict(args) -> int:
    from slidesam.transfersam.cascade import load_cascade, predict_path

    cascade = load_cascade(args.cascade, device=args.device)
    if args.batch_size is not None:
        if args.batch_size < 1:
            raise InputError(f"--batch-size must be >= 1, got {args.batch_size}")
        cascade.config = replace(cascade.config, batch_size=args.batch_size)
    records = predict_path(cascade, args.input, args.out, progress=not args.no_progress)
    for r in records:
        print(
            f"{r['case']}: {r['output']} ({r['roi_slices']}/{r['slices']} slices with kidney, "
            f"{r['split_slices']} split left/right)"
        )
    return 0
