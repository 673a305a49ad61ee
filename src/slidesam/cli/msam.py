"""``slidesam msam``: M-SAM, a 3D SAM with a Mask-Enhanced Adapter and iterative refinement.

``train`` runs :func:`slidesam.msam.train.train_msam` from a YAML config; ``predict`` segments a
volume from a prompts JSON (the ``slidesam segment`` format) with :class:`MSamPredictor`.
Torch is imported inside ``run`` only.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from slidesam.core import InputError

log = logging.getLogger(__name__)

_DESCRIPTION = """\
M-SAM (Shi et al.): a SAM-Med3D-shaped 3D SAM whose image embedding is fused with the mask
embedding by a Mask-Enhanced Adapter, refining its own mask over several passes.

  slidesam msam train --config CONFIG.yaml [--out DIR]
  slidesam msam predict --model best.pt --image ct.nii.gz --prompts prompts.json --out mask.nii.gz

prompts.json (as for 'slidesam segment'; points are clicks, a box becomes a click at its centre
plus mask-free refinement; prompts with the same label are one object):
  {"prompts": [{"slice": 30, "points": [[x, y]], "point_labels": [1], "label": 2},
               {"slice": 27, "box": [x0, y0, x1, y1], "label": 2}]}
Training config sections: data, preprocess, model, refine, optim, run (docs/msam.md).
"""


def register(sub) -> None:
    p = sub.add_parser(
        "msam",
        help="M-SAM: 3D SAM with a Mask-Enhanced Adapter and iterative refinement",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = p.add_subparsers(dest="msam_command", metavar="ACTION", required=True)

    t = actions.add_parser("train", help="train from a YAML config")
    t.add_argument(
        "--config", required=True, type=Path, help="YAML config (sections in docs/msam.md)"
    )
    t.add_argument(
        "--out", "--out-dir", dest="out_dir", type=Path, help="run folder (overrides run.out_dir)"
    )
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(func=run)

    q = actions.add_parser("predict", help="segment a volume from prompts")
    q.add_argument("--model", required=True, type=Path, help="M-SAM checkpoint (best.pt)")
    q.add_argument("--image", required=True, type=Path, help="image file or DICOM folder")
    q.add_argument("--prompts", required=True, type=Path, help="prompts JSON")
    q.add_argument("--out", required=True, type=Path, help="output mask (.nii.gz, .nrrd, .mha)")
    q.add_argument(
        "--iterations", type=int, default=3, help="refinement passes per crop (default 3)"
    )
    q.add_argument(
        "--spacing",
        type=float,
        nargs="+",
        help="working spacing in mm, 1 or 3 values (z y x); default: the model's (1.5)",
    )
    q.add_argument("--overlap", type=float, default=0.5, help="tile overlap fraction (default 0.5)")
    q.add_argument("--max-tiles", type=int, default=27, help="tiles per object at most")
    q.add_argument("--device", default="cpu", choices=("cpu", "cuda", "mps"))
    q.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    q.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.msam_command == "train":
        return _train(args)
    return _predict(args)


def _train(args: argparse.Namespace) -> int:
    from slidesam.msam.config import load_msam_config
    from slidesam.msam.train import train_msam

    config = load_msam_config(args.config)
    if args.out_dir is not None:
        config = config.with_out_dir(args.out_dir)
    best = train_msam(config, progress=not args.no_progress)
    print(f"best checkpoint: {best}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from dataclasses import replace

    import torch

    from slidesam.data.io import read_image, write_mask
    from slidesam.data.prompts import read_prompts
    from slidesam.msam.checkpoint import load_msam
    from slidesam.msam.predict import MSamPredictor

    if args.threads is not None:
        if args.threads < 1:
            raise InputError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    model, preprocess, _ = load_msam(args.model)
    if args.spacing is not None:
        if len(args.spacing) not in (1, 3) or min(args.spacing) <= 0:
            raise InputError(f"--spacing takes 1 or 3 positive values, got {args.spacing}")
        spacing = tuple(args.spacing) * (3 if len(args.spacing) == 1 else 1)
        if spacing != preprocess.spacing:
            log.warning(
                "working spacing %s differs from the model's %s", spacing, preprocess.spacing
            )
        preprocess = replace(preprocess, spacing=spacing)
    image = read_image(args.image)
    prompts = read_prompts(args.prompts, image.geometry)
    predictor = MSamPredictor(
        model,
        preprocess,
        iterations=args.iterations,
        overlap=args.overlap,
        max_tiles=args.max_tiles,
        device=args.device,
    )
    mask = predictor.segment(image, prompts)
    out = write_mask(mask, image, args.out)
    labels = sorted(int(v) for v in set(mask.reshape(-1).tolist()) - {0})
    print(f"wrote {out} (labels {labels}, {int((mask > 0).sum())} voxels)")
    return 0
