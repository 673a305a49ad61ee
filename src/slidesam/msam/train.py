"""Training M-SAM: :func:`train_msam` (the seed's recipe, on CPU-sized settings by default).

- **Data**: nnU-Net raw dataset folders; every case is resampled once to
  ``preprocess.spacing`` (linear image, nearest label), z-normalised over voxels above
  ``preprocess.foreground_threshold``, the object = ``data.target_labels``. ``data.val_cases``
  cases (drawn with the seed) are held out.
- **Samples**: crop-or-pad to the model's input cube, centred on the object's bounding box with a
  random offset of up to ``refine.max_shift`` voxels per axis; random flips on all three axes.
- **Refinement**: ``refine.train_iterations`` decoder passes per sample on one encoding, each with
  a new click from the previous error region and the previous low-res logits as mask prompt
  (:func:`slidesam.msam.refine.refine`); the loss is the mean over passes of MONAI ``DiceCELoss``
  (sigmoid, squared denominators as the paper's Eq. 4, weights 0.5 / 0.5) on the logits
  upsampled to the crop. Gradients flow through the whole chain of passes, as in the seed.
- **Optimiser**: AdamW, ``optim.lr`` for the encoder LoRA, neck and MEA, ``lr * low_lr_scale`` for
  the prompt encoder and decoder, weight decay 0.1, ``MultiStepLR`` at ``milestones`` (fractions of
  the epochs) with ``gamma``.
- **Validation**: per held-out case, a centred crop, one click at the object's innermost voxel,
  ``refine.val_iterations`` mask-only passes; Dice of the last pass on the crop.
- **Run folder**: ``config.yaml``, ``log.csv`` (one row per epoch), ``last.pt`` (with optimizer and
  scheduler state: ``run.resume: true`` continues from it), ``best.pt`` (best validation Dice).
  Seeded: numpy ``Generator``s and a torch ``Generator`` per epoch, initial weights under
  ``torch.random.fork_rng``.
"""

from __future__ import annotations

import csv
import logging
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from slidesam.core.errors import InputError
from slidesam.core.runtime import torch_threads
from slidesam.modeling.sam3d import (
    Sam3D,
    build_sam3d,
    param_groups,
    set_trainable_3d,
    variant3d_config,
)
from slidesam.msam.checkpoint import load_sam_med3d, save_msam
from slidesam.msam.clicks import centre_click
from slidesam.msam.config import MSamTrainConfig
from slidesam.msam.data import WorkCase, crop_or_pad, find_cases, flip, load_case
from slidesam.msam.refine import refine, upsample
from slidesam.stage1.train import split_cases

__all__ = ["evaluate_cases", "make_loss", "sample_batch", "train_msam"]

log = logging.getLogger(__name__)
_COLUMNS = ["epoch", "step", "lr", "train_loss", "val_dice", "seconds"]


def make_loss():
    """Dice + CE, 0.5 / 0.5, sigmoid, squared denominators (the seed's ``DiceCELoss``)."""
    from monai.losses import DiceCELoss

    return DiceCELoss(sigmoid=True, squared_pred=True, lambda_dice=0.5, lambda_ce=0.5)


def sample_batch(
    cases: list[WorkCase],
    size: int,
    batch_size: int,
    rng: np.random.Generator,
    *,
    max_shift: int,
    flip_p: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 1, S, S, S) float images and bool targets: random cases, offsets and flips."""
    xs, ys = [], []
    while len(xs) < batch_size:
        case = cases[int(rng.integers(len(cases)))]
        centre = np.rint(case.centre).astype(int) + rng.integers(-max_shift, max_shift + 1, 3)
        start = centre - size // 2
        x = crop_or_pad(case.image, start, size, case.pad_value)
        y = crop_or_pad(case.target, start, size, False)
        if not y.any():
            continue
        axes = tuple(a for a in range(3) if rng.random() < flip_p)
        x, y = flip([x, y], axes)
        xs.append(x)
        ys.append(y)
    return torch.from_numpy(np.stack(xs))[:, None], torch.from_numpy(np.stack(ys))[:, None]


@torch.no_grad()
def evaluate_cases(
    model: Sam3D,
    cases: list[WorkCase],
    *,
    iterations: int,
    simulated_clicks: bool = False,
    seed: int = 0,
) -> np.ndarray:
    """Dice after each pass, (cases, iterations), on a crop centred on each object.

    The first click is the object's innermost voxel. Then mask-only refinement (the clicks stay
    fixed) or, with ``simulated_clicks``, one more click per pass from the error region.
    """
    model.eval()
    size = model.image_encoder.img_size
    gen = torch.Generator().manual_seed(seed)
    scores = np.zeros((len(cases), iterations))
    for i, case in enumerate(cases):
        start = np.rint(case.centre).astype(int) - size // 2
        x = torch.from_numpy(crop_or_pad(case.image, start, size, case.pad_value))[None, None]
        y = torch.from_numpy(crop_or_pad(case.target, start, size, False))[None, None]
        click = torch.from_numpy(centre_click(y[0, 0].numpy()))[None, None]
        emb = model.encode(x)
        outs = refine(
            model,
            emb,
            iterations=iterations,
            points=(click, torch.ones((1, 1), dtype=torch.long)),
            target=y if simulated_clicks else None,
            click_from=1,
            generator=gen,
        )
        for k, low in enumerate(outs):
            scores[i, k] = _dice(upsample(low, size)[0, 0] > 0, y[0, 0])
    return scores


def _dice(pred: torch.Tensor, gt: torch.Tensor) -> float:
    s = int(pred.sum() + gt.sum())
    return 1.0 if s == 0 else 2.0 * int((pred & gt).sum()) / s


def build_for_training(config: MSamTrainConfig) -> Sam3D:
    """The model of ``config.model``: variant + options, optional SAM-Med3D init, trainable set."""
    mcfg = variant3d_config(config.model.variant, **dict(config.model.options))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.run.seed)
        model = build_sam3d(mcfg)
    if config.model.init:
        load_sam_med3d(model, config.model.init)
    set_trainable_3d(model, config.model.trainable)
    return model


def train_msam(config: MSamTrainConfig, *, progress: bool = True) -> Path:
    """Train as ``config`` says; returns ``<run.out_dir>/best.pt`` (see the module docstring)."""
    if not isinstance(config, MSamTrainConfig):
        raise TypeError(f"config must be an MSamTrainConfig, got {type(config).__name__}")
    run, optim, ref = config.run, config.optim, config.refine
    try:
        device = torch.device(run.device)
    except RuntimeError:
        raise InputError(f"run.device {run.device!r} is not a torch device") from None
    files = [c for folder in config.data.folders for c in find_cases(folder)]
    train_files, val_files = split_cases(files, config.data.val_cases, run.seed)
    out = Path(run.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config.save(out / "config.yaml")
    t0 = time.perf_counter()

    with torch_threads(run.num_threads):
        labels = config.data.target_labels

        def load(files):
            cases = [load_case(*f, config.preprocess, labels) for f in files]
            empty = [c.case_id for c in cases if not c.target.any()]
            if empty:
                log.warning("skipping %d case(s) without the object: %s", len(empty), empty)
            return [c for c in cases if c.target.any()]

        train_cases, val_cases = load(train_files), load(val_files)
        if not train_cases:
            raise InputError(f"no training case contains label(s) {list(labels)}")
        model = build_for_training(config).to(device)
        counts = {"trainable": 0, "total": 0}
        for p in model.parameters():
            counts["total"] += p.numel()
            counts["trainable"] += p.numel() if p.requires_grad else 0
        log.info(
            "%d training / %d validation cases; %d of %d parameters trainable (%.1f %%)",
            len(train_cases),
            len(val_cases),
            counts["trainable"],
            counts["total"],
            100 * counts["trainable"] / counts["total"],
        )
        opt = torch.optim.AdamW(
            param_groups(
                model, lr=optim.lr, low_lr_scale=optim.low_lr_scale, weight_decay=optim.weight_decay
            )
        )
        sched = torch.optim.lr_scheduler.MultiStepLR(
            opt, milestones=optim.milestone_epochs(), gamma=optim.gamma
        )
        loss_fn = make_loss()
        size = model.config.image_size
        rows: list[dict] = []
        best, start_epoch, step = -1.0, 1, 0
        last_path = out / "last.pt"
        if run.resume and last_path.is_file():
            from slidesam.inference.checkpoint import read_checkpoint

            obj = read_checkpoint(last_path)
            model.load_state_dict(obj["state_dict"])
            extra = obj["extra"]
            opt.load_state_dict(extra["optimizer"])
            sched_state = dict(extra["scheduler"])
            sched_state["milestones"] = Counter(sched_state["milestones"])
            sched.load_state_dict(sched_state)
            rows, best = list(extra["log"]), float(extra["best"])
            start_epoch, step = int(extra["epoch"]) + 1, int(extra["step"])
            log.info("resuming from %s after epoch %d", last_path, start_epoch - 1)
        total = optim.epochs * optim.steps_per_epoch
        bar = tqdm(total=total, initial=step, desc="msam-train", unit="step", disable=not progress)
        try:
            for epoch in range(start_epoch, optim.epochs + 1):
                model.train()
                rng = np.random.default_rng([run.seed, 1, epoch])
                gen = torch.Generator().manual_seed(run.seed * 100003 + epoch)
                losses = []
                for _ in range(optim.steps_per_epoch):
                    x, y = sample_batch(
                        train_cases,
                        size,
                        optim.batch_size,
                        rng,
                        max_shift=ref.max_shift,
                        flip_p=ref.flip_p,
                    )
                    x, y = x.to(device), y.to(device)
                    outs = refine(
                        model,
                        model.encode(x),
                        iterations=ref.train_iterations,
                        target=y,
                        accumulate_clicks=ref.accumulate_clicks,
                        generator=gen,
                    )
                    yf = y.float()
                    loss = sum(loss_fn(upsample(low, size), yf) for low in outs) / len(outs)
                    if not torch.isfinite(loss):
                        raise RuntimeError(f"loss became {loss.item()} at step {step}")
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if optim.grad_clip is not None:
                        torch.nn.utils.clip_grad_norm_(
                            [p for p in model.parameters() if p.requires_grad], optim.grad_clip
                        )
                    opt.step()
                    losses.append(float(loss.detach()))
                    step += 1
                    bar.update()
                    bar.set_postfix(epoch=epoch, loss=f"{np.mean(losses[-10:]):.3f}")
                lr = opt.param_groups[0]["lr"]
                sched.step()
                elapsed = time.perf_counter() - t0
                out_of_time = run.max_minutes is not None and elapsed > 60 * run.max_minutes
                last = epoch == optim.epochs or out_of_time
                val = None
                if val_cases and (epoch % run.val_every == 0 or last):
                    val = float(
                        evaluate_cases(model, val_cases, iterations=ref.val_iterations)[
                            :, -1
                        ].mean()
                    )
                row = {
                    "epoch": epoch,
                    "step": step,
                    "lr": round(lr, 8),
                    "train_loss": round(float(np.mean(losses)), 5),
                    "val_dice": "" if val is None else round(val, 4),
                    "seconds": round(time.perf_counter() - t0, 1),
                }
                rows.append(row)
                _write_log(out / "log.csv", rows)
                log.info(
                    "epoch %d: loss %.4f, val Dice %s", epoch, row["train_loss"], row["val_dice"]
                )
                improved = val is not None and val > best
                if improved:
                    best = val
                meta = {
                    "epoch": epoch,
                    "step": step,
                    "best": best,
                    "log": rows,
                    "train_config": config.to_dict(),
                    "train_cases": [c.case_id for c in train_cases],
                    "val_cases": [c.case_id for c in val_cases],
                }
                save_msam(
                    model,
                    last_path,
                    preprocess=config.preprocess,
                    extra={
                        **meta,
                        "optimizer": opt.state_dict(),
                        "scheduler": sched_state_of(sched),
                    },
                )
                if improved or not val_cases:
                    save_msam(model, out / "best.pt", preprocess=config.preprocess, extra=meta)
                if out_of_time and epoch < optim.epochs:
                    log.warning("run.max_minutes reached: stopped after epoch %d", epoch)
                    break
        finally:
            bar.close()
    return out / "best.pt"


def sched_state_of(sched) -> dict:
    """The scheduler state with plain containers (``weights_only`` loading refuses Counter)."""
    state = sched.state_dict()
    state["milestones"] = dict(state["milestones"])
    return state


def _write_log(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
