"""``train(config)``: the Slide-SAM training loop (paper §2.3 and Appendix C), on one device.

One step, for a batch of B windows (images (B, 3, S, S) 0..255, masks (B, 3, S, S) 0/1,
indicators (B, 3)):

1. ``model.encode(images)`` -> (B, C, E, E); under ``torch.no_grad`` when no encoder
   parameter trains (preset ``decoder`` / ``decoder+prompt``);
2. one prompt per sample simulated from its centre-slice mask (``simulate_prompt_batch``): the
   box and the point samples are decoded in two groups and put back in batch order;
3. the masks resized (nearest) to the logits' resolution 4E x 4E;
4. ``slidesam_loss`` (best of the K candidates, indicator-masked), AdamW, optional warm-up +
   cosine (``LambdaLR``, stepped per step), gradient clipping.

Every random draw of epoch ``e`` comes from ``(run.seed, e)``: the sampler's generator, the
augmentation (``WindowDataset.set_epoch``) and the prompts. With the optimiser, scheduler and
torch RNG state saved in ``last.pt`` after each epoch, ``resume=True`` continues exactly as if
the run had not stopped.

The run folder holds ``config.yaml``, ``log.csv`` (epoch, step, train_loss, val_dice, lr,
seconds), ``last.pt`` and ``best.pt`` (highest validation Dice; lowest training loss without a
validation set), and ``epoch_NNNN.pt`` every ``run.save_every`` epochs. Checkpoints are our
format (``slidesam.load_model`` reads them); the training state sits under the extra key
``"training"`` as plain tensors and containers, so ``weights_only=True`` loading still works.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

from slidesam.core.errors import InputError
from slidesam.inference.checkpoint import read_checkpoint, save_checkpoint
from slidesam.inference.models import build_slidesam
from slidesam.modeling import Sam, set_trainable
from slidesam.training.config import TrainConfig
from slidesam.training.losses import LossConfig, LossOutput, slidesam_loss
from slidesam.training.prompt_sim import PromptBatch, PromptSimConfig, simulate_prompt_batch
from slidesam.training.windows import AugmentConfig, WindowDataset, mixed_indices

__all__ = [
    "LOG_COLUMNS",
    "batch_loss",
    "build_training_model",
    "decode_prompts",
    "lr_factor",
    "train",
    "validation_dice",
]

log = logging.getLogger(__name__)

LOG_COLUMNS = ("epoch", "step", "train_loss", "val_dice", "lr", "seconds")
_VAL_SEED = 7919  # validation prompts: the same every epoch, so epochs are comparable


# ----------------------------------------------------------------------------------------------
# one step


def decode_prompts(
    model: Sam, embeddings: torch.Tensor, prompts: PromptBatch
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode the box and the point samples of a batch separately; outputs in batch order.

    Args:
        embeddings: (B, C, E, E) image embeddings.
        prompts: one simulated prompt per sample.

    Returns:
        logits (B, K, num_slices, 4E, 4E) and IoU predictions (B, K).
    """
    logits, ious, order = [], [], []
    if prompts.box_index.numel():
        lo, io = model.decode(embeddings[prompts.box_index], boxes=prompts.boxes)
        logits.append(lo)
        ious.append(io)
        order.append(prompts.box_index)
    if prompts.point_index.numel():
        lo, io = model.decode(
            embeddings[prompts.point_index],
            points=(prompts.point_coords, prompts.point_labels),
        )
        logits.append(lo)
        ious.append(io)
        order.append(prompts.point_index)
    inverse = torch.argsort(torch.cat(order))
    return torch.cat(logits)[inverse], torch.cat(ious)[inverse]


def batch_loss(
    model: Sam,
    images: torch.Tensor,
    masks: torch.Tensor,
    indicator: torch.Tensor,
    rng: np.random.Generator,
    *,
    loss_config: LossConfig | None = None,
    prompt_config: PromptSimConfig | None = None,
    encoder_trains: bool = True,
) -> LossOutput:
    """The Slide-SAM loss of one batch with freshly simulated prompts (steps 1-3 of a step).

    Args:
        images: (B, 3, S, S) float 0..255, S = the model's input size.
        masks: (B, 3, S, S) 0/1; the centre slice (index 1) must be non-empty.
        indicator: (B, 3) 0/1, labelled slices.
        rng: draws the prompts.
        encoder_trains: False runs the encoder without gradients (it is frozen).
    """
    if encoder_trains:
        embeddings = model.encode(images)
    else:
        with torch.no_grad():
            embeddings = model.encode(images)
    prompts = simulate_prompt_batch(masks[:, 1], rng, prompt_config, device=images.device)
    logits, iou_pred = decode_prompts(model, embeddings, prompts)
    target = F.interpolate(masks.float(), size=logits.shape[-2:], mode="nearest-exact")
    return slidesam_loss(logits, target > 0.5, indicator, iou_pred, loss_config)


@torch.no_grad()
def validation_dice(
    model: Sam,
    loader: DataLoader,
    *,
    seed: int,
    prompt_config: PromptSimConfig | None = None,
) -> float:
    """Mean Dice of the best of the K candidates (logits > 0) over the labelled slices.

    Dice is computed at the logits' resolution (masks resized nearest), ``2|P∩G| / (|P|+|G|)``,
    1 when both are empty. Prompts are drawn from ``seed``, identically at every call.
    """
    was_training = model.training
    model.eval()
    rng = np.random.default_rng((seed, _VAL_SEED))
    total, count = 0.0, 0
    device = next(model.parameters()).device
    try:
        for batch in loader:
            images, masks = batch.image.to(device), batch.mask.to(device)
            labelled = batch.indicator.to(device).bool()
            prompts = simulate_prompt_batch(masks[:, 1], rng, prompt_config, device=device)
            logits, _ = decode_prompts(model, model.encode(images), prompts)
            target = F.interpolate(masks, size=logits.shape[-2:], mode="nearest-exact") > 0.5
            pred = logits > 0
            region = labelled[:, None, :, None, None]
            tgt = target[:, None]
            inter = (pred & tgt & region).sum(dim=(2, 3, 4)).float()
            sizes = ((pred & region).sum(dim=(2, 3, 4)) + (tgt & region).sum(dim=(2, 3, 4))).float()
            dice = torch.where(sizes > 0, 2 * inter / sizes.clamp(min=1), torch.ones_like(sizes))
            total += float(dice.max(dim=1).values.sum())
            count += dice.shape[0]
    finally:
        model.train(was_training)
    return total / max(count, 1)


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, cosine: bool) -> float:
    """Factor on the peak lr at optimiser step ``step`` (0-based): linear warm-up, then cosine."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if not cosine:
        return 1.0
    span = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / span, 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------------------------
# set-up


def build_training_model(config: TrainConfig) -> Sam:
    """The model to train, seeded, with ``model.trainable`` applied, in train mode.

    Raises:
        InputError: an unreadable or incompatible ``init_checkpoint`` (other variant, missing or
            unexpected keys), or a preset the model cannot take.
    """
    m = config.model
    torch.manual_seed(config.run.seed)
    checkpoint = m.init_checkpoint
    if checkpoint is not None and not Path(checkpoint).exists():
        raise InputError(f"model.init_checkpoint {checkpoint}: no such file")
    try:
        model = build_slidesam(
            m.variant,
            checkpoint,
            device=config.run.device,
            eval_mode=False,
            lora_rank=m.lora_rank,
        )
    except InputError as exc:
        where = f"model.init_checkpoint {checkpoint}" if checkpoint else "model"
        raise InputError(f"{where}: {exc}") from None
    counts = set_trainable(model, m.trainable)
    log.info(
        "model %s: %d trainable, %d frozen parameters (preset %s)",
        m.variant,
        counts["trainable"],
        counts["frozen"],
        m.trainable,
    )
    return model.train()


@dataclass
class _Data:
    dataset: WindowDataset
    train_index: list[np.ndarray]  # per folder: global sample indices used for training
    val_dataset: WindowDataset | None
    val_index: np.ndarray


def _prepare_data(config: TrainConfig, size: int) -> _Data:
    d, run = config.data, config.run
    if d.image_size is not None and d.image_size != size:
        raise InputError(
            f"data.image_size {d.image_size} differs from the model's input size {size}; "
            "leave it null (prompts are in model-input pixels)"
        )
    augment = config.augment
    dataset = WindowDataset(d.folders, classes=d.classes, augment=augment, seed=run.seed, size=size)
    cases = dataset.sample_cases()
    per_folder = np.cumsum((0, *dataset.dataset_sizes))
    held_out: set[tuple[int, str]] = set()
    val_dataset, val_index = None, np.zeros(0, np.int64)
    if run.val_folders:
        val_dataset = WindowDataset(
            run.val_folders, classes=d.classes, augment=AugmentConfig.none(), size=size
        )
        val_index = np.arange(len(val_dataset))
    elif run.val_fraction > 0:
        unique = sorted(set(cases))
        n_val = max(1, round(run.val_fraction * len(unique)))
        if n_val >= len(unique):
            raise InputError(
                f"run.val_fraction {run.val_fraction} holds out {n_val} of {len(unique)} "
                "case(s), leaving none to train on; lower it, set it to 0 or give run.val_folders"
            )
        pick = np.random.default_rng((run.seed, 1)).permutation(len(unique))[:n_val]
        held_out = {unique[i] for i in pick}
        val_dataset = WindowDataset(
            d.folders, classes=d.classes, augment=AugmentConfig.none(), size=size
        )
        val_index = np.array([i for i, c in enumerate(cases) if c in held_out], np.int64)
        log.info("validation: %d case(s), %d samples held out", n_val, val_index.size)
    train_index = [
        np.array(
            [i for i in range(per_folder[f], per_folder[f + 1]) if cases[i] not in held_out],
            np.int64,
        )
        for f in range(len(dataset.dataset_sizes))
    ]
    empty = [d.folders[f] for f, idx in enumerate(train_index) if idx.size == 0]
    if empty:
        raise InputError(
            f"no training samples left in {', '.join(empty)} after holding out validation cases"
        )
    return _Data(dataset, train_index, val_dataset, val_index)


class _MixSampler(Sampler[int]):
    """The training indices of each folder, mixed by weight, redrawn from (seed, epoch)."""

    def __init__(self, index: Sequence[np.ndarray], weights, num_samples: int, seed: int):
        self.index = np.concatenate(list(index))
        self.sizes = [int(i.size) for i in index]
        self.weights = list(weights) if weights is not None else list(self.sizes)
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        local = mixed_indices(self.sizes, self.weights, self.num_samples, generator=g)
        yield from self.index[local.numpy()].tolist()

    def __len__(self) -> int:
        return self.num_samples


# ----------------------------------------------------------------------------------------------
# checkpoints and the log


def _save(model: Sam, path: Path, training: dict) -> None:
    """Write ``path`` (and its ``.config.json``) atomically: a crash leaves the old file."""
    tmp = path.with_name(f".{path.stem}.tmp.pt")
    save_checkpoint(model, model.config, tmp, extra={"training": training})
    os.replace(tmp, path)
    os.replace(tmp.with_name(tmp.stem + ".config.json"), path.with_name(path.stem + ".config.json"))


def _write_log(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=LOG_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def _read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


_RESUMABLE_CHANGES = {"optim.epochs", "run.num_workers", "run.save_every", "run.out_dir"}


def _config_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(old) | set(new))
    out = []
    for k in keys:
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _config_changes(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}")
    return out


# ----------------------------------------------------------------------------------------------
# the loop


def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    stop_after: int | None = None,
    progress: bool = True,
) -> dict:
    """Train as ``config`` says; the run folder is ``config.run.out_dir``.

    Args:
        resume: continue the run in ``out_dir`` from ``last.pt`` (model, optimiser, scheduler,
            torch RNG, epoch). Only ``optim.epochs``, ``run.num_workers``, ``run.save_every`` and
            ``run.out_dir`` may differ from the saved config.
        stop_after: end this call after this many epochs (the run can be resumed later).
        progress: show a tqdm bar per epoch.

    Returns:
        ``{"out_dir", "epochs_done", "steps", "train_loss", "val_dice", "best_metric", "last",
        "best", "history"}`` (history: the rows of ``log.csv``).

    Raises:
        InputError: bad data, config or init checkpoint, or a run folder that already holds a
            run (without ``resume``) or none (with it) -- all before any training step.
    """
    out = Path(config.run.out_dir)
    last_path, best_path, log_path = out / "last.pt", out / "best.pt", out / "log.csv"
    state = None
    if resume:
        if not last_path.is_file():
            raise InputError(f"{out}: nothing to resume (no last.pt); run without --resume")
        state = read_checkpoint(last_path).get("training")
        if not isinstance(state, dict):
            raise InputError(f"{last_path}: no training state inside; cannot resume from it")
        changed = [
            k
            for k in _config_changes(state["config"], config.to_dict())
            if k not in _RESUMABLE_CHANGES
        ]
        if changed:
            raise InputError(
                f"cannot resume {out} with a different config: {', '.join(changed)} changed"
            )
    elif last_path.exists():
        raise InputError(
            f"{out} already holds a run (last.pt); pass --resume to continue it or choose "
            "another --out"
        )

    model = build_training_model(config)
    data = _prepare_data(config, model.image_size)
    o, run = config.optim, config.run
    num_samples = config.data.samples_per_epoch or sum(int(i.size) for i in data.train_index)
    sampler = _MixSampler(data.train_index, config.data.weights, num_samples, run.seed)
    loader = DataLoader(
        data.dataset,
        batch_size=o.batch_size,
        sampler=sampler,
        num_workers=run.num_workers,
    )
    val_loader = None
    if data.val_dataset is not None and data.val_index.size:
        val_loader = DataLoader(
            torch.utils.data.Subset(data.val_dataset, data.val_index.tolist()),
            batch_size=o.batch_size,
            num_workers=run.num_workers,
        )
    steps_per_epoch = len(loader)
    total_steps = steps_per_epoch * o.epochs
    warmup_steps = round(o.warmup_epochs * steps_per_epoch)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(
            step, warmup_steps=warmup_steps, total_steps=total_steps, cosine=o.cosine
        ),
    )
    encoder_trains = any(p.requires_grad for p in model.image_encoder.parameters())
    device = next(model.parameters()).device

    start_epoch, step, best_metric = 0, 0, -math.inf
    rows: list[dict] = []
    if state is not None:
        model.load_state_dict(read_checkpoint(last_path)["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        start_epoch, step = int(state["epoch"]), int(state["step"])
        best_metric = float(state["best_metric"])
        rows = [r for r in _read_log(log_path) if int(r["epoch"]) <= start_epoch]
        log.info("resuming %s after epoch %d (step %d)", out, start_epoch, step)
    out.mkdir(parents=True, exist_ok=True)
    config.save(out / "config.yaml")
    _write_log(log_path, rows)

    end_epoch = o.epochs if stop_after is None else min(o.epochs, start_epoch + stop_after)
    train_loss = val_dice = float("nan")
    for epoch in range(start_epoch, end_epoch):
        started = time.perf_counter()
        data.dataset.set_epoch(epoch)
        sampler.epoch = epoch
        rng = np.random.default_rng((run.seed, epoch))
        losses = []
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{o.epochs}", disable=not progress, leave=False)
        for batch in bar:
            out_loss = batch_loss(
                model,
                batch.image.to(device),
                batch.mask.to(device),
                batch.indicator.to(device),
                rng,
                loss_config=config.loss,
                prompt_config=config.prompts,
                encoder_trains=encoder_trains,
            )
            optimizer.zero_grad(set_to_none=True)
            out_loss.total.backward()
            if o.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, o.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            losses.append(float(out_loss.total.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        bar.close()
        train_loss = float(np.mean(losses))
        val_dice = (
            validation_dice(model, val_loader, seed=run.seed, prompt_config=config.prompts)
            if val_loader is not None
            else float("nan")
        )
        metric = val_dice if val_loader is not None else -train_loss
        row = {
            "epoch": epoch + 1,
            "step": step,
            "train_loss": f"{train_loss:.6f}",
            "val_dice": f"{val_dice:.6f}",
            "lr": f"{optimizer.param_groups[0]['lr']:.6e}",
            "seconds": f"{time.perf_counter() - started:.3f}",
        }
        rows.append(row)
        _write_log(log_path, rows)
        is_best = metric > best_metric
        best_metric = max(best_metric, metric)
        training = {
            "epoch": epoch + 1,
            "step": step,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "best_metric": best_metric,
            "config": config.to_dict(),
        }
        _save(model, last_path, training)
        if is_best:
            _save(model, best_path, training)
        if run.save_every and (epoch + 1) % run.save_every == 0:
            _save(model, out / f"epoch_{epoch + 1:04d}.pt", training)
        log.info(
            "epoch %d/%d: train loss %.4f, val Dice %.4f, %s s",
            epoch + 1,
            o.epochs,
            train_loss,
            val_dice,
            row["seconds"],
        )
    return {
        "out_dir": str(out),
        "epochs_done": end_epoch if end_epoch > start_epoch else start_epoch,
        "steps": step,
        "train_loss": train_loss,
        "val_dice": val_dice,
        "best_metric": best_metric,
        "last": str(last_path),
        "best": str(best_path),
        "history": rows,
    }
