"""The cascade's decoders: copies of SAM's mask decoder (one slice) behind its frozen prompt
encoder, trained on cached embeddings with box prompts.

Decoders (``DECODERS``): ``roi`` (kidney + masses, label > 0, prompted with the fixed ROI box),
``tumor`` (label 2) and ``cyst`` (label 3), both prompted with kidney-region boxes and trained
only on (slice, box) pairs whose side of the slice holds the target.

Loss: MONAI ``DiceCELoss`` on the two-class softmax of ``[0, z]`` (z = the decoder's logit; its
softmax equals ``sigmoid(z)``), i.e. categorical cross-entropy and Dice (pooled over the batch),
both weighted by class weights proportional to ``1 / f_c``, the inverse of the measured pixel
fractions of the training targets (the larger capped at ``class_weight_cap`` times the smaller,
then scaled to average 1).

Checkpoint (``torch.save``, read back with ``weights_only=True``)::

    {"format": "slidesam-transfersam-decoder", "version": 1, "name": "tumor",
     "sam_config": {...}, "encoder_fingerprint": "...",
     "prompt_encoder": {state}, "mask_decoder": {state}, "training": {...}}
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from torch import nn
from tqdm import tqdm

from slidesam.core.config import SamConfig
from slidesam.core.errors import InputError
from slidesam.inference.checkpoint import load_strict, read_checkpoint
from slidesam.modeling import Sam
from slidesam.transfersam.boxes import (
    expand_box_mean,
    expand_box_random,
    kidney_boxes,
    roi_box,
)
from slidesam.transfersam.cache import open_cache, read_case
from slidesam.transfersam.config import (
    DECODERS,
    BoxConfig,
    DecoderTrainConfig,
    check_decoder_name,
)

__all__ = [
    "DECODER_FORMAT",
    "BoxDecoder",
    "binary_dice_ce",
    "class_weights",
    "load_decoder",
    "lr_at",
    "save_decoder",
    "train_decoder",
]

log = logging.getLogger(__name__)

DECODER_FORMAT = "slidesam-transfersam-decoder"


class BoxDecoder(nn.Module):
    """Frozen prompt encoder + trainable mask decoder: (embeddings, boxes) -> mask logits."""

    def __init__(self, *, prompt_encoder: nn.Module, mask_decoder: nn.Module, image_size: int):
        super().__init__()
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.image_size = image_size
        self.prompt_encoder.requires_grad_(False)
        self.mask_decoder.requires_grad_(True)

    @classmethod
    def from_sam(cls, sam: Sam) -> BoxDecoder:
        """A fresh copy of ``sam``'s prompt encoder and (one-slice) mask decoder."""
        if sam.num_slices != 1:
            raise InputError("TransferSAM decoders are copies of plain SAM's (num_slices = 1)")
        return cls(
            prompt_encoder=copy.deepcopy(sam.prompt_encoder),
            mask_decoder=copy.deepcopy(sam.mask_decoder),
            image_size=sam.image_size,
        )

    def forward(self, embeddings: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Logits (B, 4E, 4E) for embeddings (B, C, E, E) and boxes (B, 4) XYXY in model-input
        pixels (0..image_size)."""
        with torch.no_grad():
            sparse, dense = self.prompt_encoder(points=None, boxes=boxes, masks=None)
        masks, _ = self.mask_decoder(
            image_embeddings=embeddings,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        return masks[:, 0, 0]


# ----------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------
def save_decoder(
    decoder: BoxDecoder,
    path: str | Path,
    *,
    name: str,
    sam_config: SamConfig,
    fingerprint: str | None,
    training: dict | None = None,
) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": DECODER_FORMAT,
        "version": 1,
        "name": check_decoder_name(name),
        "sam_config": sam_config.to_dict(),
        "encoder_fingerprint": fingerprint,
        "prompt_encoder": {
            k: v.detach().cpu().clone() for k, v in decoder.prompt_encoder.state_dict().items()
        },
        "mask_decoder": {
            k: v.detach().cpu().clone() for k, v in decoder.mask_decoder.state_dict().items()
        },
        "training": json.loads(json.dumps(training or {})),
    }
    tmp = path.with_name(".tmp-" + path.name)
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def load_decoder(path: str | Path, sam: Sam, *, name: str | None = None) -> tuple[BoxDecoder, dict]:
    """A decoder checkpoint on top of ``sam`` (the frozen SAM of its cascade), strictly.

    Returns:
        (decoder in eval mode, the checkpoint's metadata without the weights).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such decoder checkpoint" + (f" ({name})" if name else ""))
    obj = read_checkpoint(path)  # weights_only; refuses arbitrary pickles with a clear error
    if not isinstance(obj, dict) or obj.get("format") != DECODER_FORMAT:
        raise InputError(f"{path}: not a TransferSAM decoder checkpoint")
    if name is not None and obj.get("name") != name:
        raise InputError(f"{path}: holds the {obj.get('name')!r} decoder, expected {name!r}")
    if sam.config is not None and SamConfig.from_dict(obj["sam_config"]) != sam.config:
        raise InputError(f"{path}: trained on another SAM variant than the cascade's encoder")
    decoder = BoxDecoder.from_sam(sam)
    load_strict(decoder.prompt_encoder, obj["prompt_encoder"], what=f"{path} (prompt encoder)")
    load_strict(decoder.mask_decoder, obj["mask_decoder"], what=f"{path} (mask decoder)")
    meta = {k: v for k, v in obj.items() if k not in ("prompt_encoder", "mask_decoder")}
    return decoder.eval(), meta


# ----------------------------------------------------------------------------------------------
# loss and schedule
# ----------------------------------------------------------------------------------------------
def class_weights(foreground_fraction: float, cap: float = 50.0) -> tuple[float, float]:
    """(background, foreground) weights proportional to the inverse pixel frequency, the larger
    capped at ``cap`` times the smaller, scaled to average 1. E.g. a foreground fraction 0.2
    gives inverse frequencies (1.25, 5) and weights (0.4, 1.6)."""
    f = float(foreground_fraction)
    if not 0.0 < f < 1.0:
        raise InputError(
            f"foreground pixel fraction must lie strictly between 0 and 1, got {f}: the training "
            "targets are all background or all foreground"
        )
    w_bg, w_fg = 1.0 / (1.0 - f), 1.0 / f
    w_fg = min(w_fg, cap * w_bg)
    w_bg = min(w_bg, cap * w_fg)
    total = w_bg + w_fg
    return 2.0 * w_bg / total, 2.0 * w_fg / total


def binary_dice_ce(
    weights: tuple[float, float], *, lambda_dice: float = 1.0, lambda_ce: float = 1.0
):
    """Loss function ``(logits (B, H, W), target (B, H, W) in {0, 1}) -> scalar`` (see module)."""
    loss = DiceCELoss(
        softmax=True,
        to_onehot_y=True,
        weight=torch.tensor(weights, dtype=torch.float32),
        lambda_dice=lambda_dice,
        lambda_ce=lambda_ce,
        batch=True,
    )

    def fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        two = torch.stack([torch.zeros_like(logits), logits], dim=1)
        return loss(two, target[:, None].float())

    return fn


def lr_at(step: int, config: DecoderTrainConfig) -> float:
    """Linear warm-up from ``lr / 200`` to ``lr`` over ``warmup_steps``, then cosine decay to
    ``min_lr`` at ``steps`` (the seed's ``CosineScheduler``)."""
    if step < config.warmup_steps:
        start = config.lr / 200
        return start + (config.lr - start) * step / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    t = min(1.0, (step - config.warmup_steps) / span)
    return config.min_lr + (config.lr - config.min_lr) * (1 + math.cos(math.pi * t)) / 2


# ----------------------------------------------------------------------------------------------
# training samples
# ----------------------------------------------------------------------------------------------
@dataclass
class _Samples:
    """(slice, box) training pairs of one decoder, targets at the logit resolution."""

    embeddings: list[np.ndarray]  # per case (N, C, E, E) float16 (memory maps)
    case: np.ndarray  # (S,) index into embeddings
    row: np.ndarray  # (S,) row of that case
    boxes: np.ndarray  # (S, 4) tight box in slice pixels (the ROI box for roi)
    shapes: np.ndarray  # (S, 2) slice (H, W)
    targets: np.ndarray  # (S, L, L) uint8 0/1
    copies: list[np.ndarray | None] | None = None  # per case (K, N, C, E, E) contrast copies

    def __len__(self) -> int:
        return len(self.case)


def _resize_target(mask: np.ndarray, size: int) -> np.ndarray:
    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    return (F.interpolate(t, size=(size, size), mode="area")[0, 0] >= 0.5).numpy().astype(np.uint8)


def build_samples(
    cache: str | Path,
    case_ids,
    name: str,
    boxes: BoxConfig,
    mask_size: int,
    *,
    negative_ratio: float = 0.0,
    seed: int = 0,
    copies: int | None = None,
) -> _Samples:
    """The decoder's training pairs from the cached cases ``case_ids``.

    ``roi``: every cached slice, target label > 0, the fixed ROI box. ``tumor``/``cyst``: the
    kidney-region boxes of the ground truth (label > 0, split left/right as at inference); a
    box is kept when its side of the slice holds the target (the seed), the target restricted
    to that side. ``negative_ratio`` > 0 adds that many kidney boxes *without* the target (empty
    target) per positive pair, drawn at random (``seed``) from all such boxes. The cases'
    contrast copies come along (``copies``: how many each case must hold, checked if given).
    """
    values = DECODERS[check_decoder_name(name)]
    embeddings, copy_embeddings = [], []
    pos: list[tuple] = []  # (case, row, box, shape, target) at slice resolution
    neg: list[tuple] = []
    for ci, case_id in enumerate(case_ids):
        cc = read_case(cache, case_id, copies=copies)
        embeddings.append(cc.embeddings)
        copy_embeddings.append(cc.copies)
        for r in range(len(cc.indices)):
            lab = cc.labels[r]
            hw = lab.shape
            target = np.isin(lab, values)
            if name == "roi":
                pos.append((ci, r, roi_box(hw, boxes), hw, target))
                continue
            if not target.any() and negative_ratio == 0:
                continue
            kb = kidney_boxes(lab > 0, boxes)
            for box, cols in zip(kb.boxes, kb.regions(hw[1]), strict=True):
                t = np.zeros_like(target)
                t[:, cols] = target[:, cols]
                (pos if t.any() else neg).append((ci, r, box, hw, t))
    if not pos:
        raise InputError(
            f"no training slices for the {name} decoder in {len(case_ids)} cached case(s)"
            + ("" if name == "roi" else f": no slice holds label {values[0]}")
        )
    n_neg = min(len(neg), round(negative_ratio * len(pos)))
    if n_neg:
        pick = np.random.default_rng(seed).choice(len(neg), size=n_neg, replace=False)
        pos += [neg[i] for i in np.sort(pick)]
    return _Samples(
        embeddings,
        np.asarray([p[0] for p in pos]),
        np.asarray([p[1] for p in pos]),
        np.asarray([p[2] for p in pos], dtype=np.float64),
        np.asarray([p[3] for p in pos]),
        np.stack([_resize_target(p[4], mask_size) for p in pos]),
        copy_embeddings,
    )


def _to_input(box: np.ndarray, hw, size: int) -> np.ndarray:
    h, w = hw
    return box * np.array([size / w, size / h, size / w, size / h])


def _affine(rng: np.random.Generator, config: DecoderTrainConfig) -> np.ndarray | None:
    """A random 2x2 rotation-zoom matrix A (output -> input, normalised coords), or None."""
    if rng.random() >= config.augment_prob:
        return None
    if config.rotate_deg == 0 and config.scale[0] == config.scale[1] == 1:
        return None
    a = math.radians(rng.uniform(-config.rotate_deg, config.rotate_deg))
    s = rng.uniform(*config.scale)
    return np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]) / s


def _warp_box(box: np.ndarray, a: np.ndarray, size: int) -> np.ndarray:
    """The box (input pixels) around the warped corners: a point q appears at A^-1 q."""
    corners = np.array([[box[0], box[1]], [box[2], box[1]], [box[0], box[3]], [box[2], box[3]]])
    q = corners / size * 2 - 1
    p = q @ np.linalg.inv(a).T
    p = (p + 1) / 2 * size
    lo, hi = np.clip(p.min(0), 0, size), np.clip(p.max(0), 0, size)
    return np.array([lo[0], lo[1], hi[0], hi[1]])


def _draw_views(s: _Samples, pick: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Which view of each picked sample to train on, uniformly: 0 = the original embedding,
    k >= 1 = contrast copy k. All zeros, drawing nothing from ``rng``, without copies."""
    n_copies = np.array([0 if c is None else len(c) for c in s.copies or []], dtype=np.int64)
    if not n_copies.any():
        return np.zeros(len(pick), dtype=np.int64)
    return rng.integers(0, 1 + n_copies[s.case[pick]])


def _embedding(s: _Samples, i: int, view: int) -> np.ndarray:
    if view == 0:
        return s.embeddings[s.case[i]][s.row[i]]
    return s.copies[s.case[i]][view - 1][s.row[i]]


def _batch(
    s: _Samples,
    pick: np.ndarray,
    name: str,
    config: DecoderTrainConfig,
    size: int,
    rng: np.random.Generator | None,
    views: np.ndarray | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(embeddings, boxes in input pixels, targets) of samples ``pick``; random box growth and
    rotation/zoom when ``rng`` is given (training), the mean growth otherwise (validation).
    ``views`` (from :func:`_draw_views`) selects contrast copies; ``None`` = the originals."""
    if views is None:
        views = np.zeros(len(pick), dtype=np.int64)
    emb = torch.from_numpy(
        np.stack(
            [np.asarray(_embedding(s, i, v), np.float32) for i, v in zip(pick, views, strict=True)]
        )
    )
    tgt = torch.from_numpy(s.targets[pick].astype(np.float32))
    boxes = []
    thetas = []
    for i in pick:
        hw = tuple(s.shapes[i])
        if name == "roi":
            box = s.boxes[i]
        elif rng is not None:
            box = expand_box_random(s.boxes[i], hw, config.boxes, rng)
        else:
            box = expand_box_mean(s.boxes[i], hw, config.boxes)
        box = _to_input(box, hw, size)
        a = _affine(rng, config) if rng is not None else None
        if a is None:
            thetas.append(np.eye(2))
        else:
            thetas.append(a)
            if name != "roi":
                box = _warp_box(box, a, size)
        boxes.append(box)
    theta = np.stack(thetas)
    if not np.allclose(theta, np.eye(2)):
        th = torch.from_numpy(np.concatenate([theta, np.zeros((len(pick), 2, 1))], 2)).float()
        grid_e = F.affine_grid(th, list(emb.shape), align_corners=False)
        emb = F.grid_sample(emb, grid_e, mode="bilinear", align_corners=False)
        grid_t = F.affine_grid(th, [len(pick), 1, *tgt.shape[1:]], align_corners=False)
        tgt = (
            F.grid_sample(tgt[:, None], grid_t, mode="bilinear", align_corners=False)[:, 0] >= 0.5
        ).float()
    return emb, torch.as_tensor(np.stack(boxes), dtype=torch.float32), tgt


@torch.no_grad()
def evaluate_decoder(
    decoder: BoxDecoder,
    s: _Samples,
    name: str,
    config: DecoderTrainConfig,
    loss_fn,
    batch: int = 32,
) -> tuple[float, float]:
    """(mean loss, pooled Dice of logits > 0) over all samples, no augmentation."""
    decoder.eval()
    device = next(decoder.mask_decoder.parameters()).device
    losses, inter, total = [], 0.0, 0.0
    for start in range(0, len(s), batch):
        pick = np.arange(start, min(start + batch, len(s)))
        emb, boxes, tgt = _batch(s, pick, name, config, decoder.image_size, None)
        logits = decoder(emb.to(device), boxes.to(device)).cpu()
        losses.append(float(loss_fn(logits, tgt)) * len(pick))
        pred = logits > 0
        inter += float((pred & (tgt > 0)).sum())
        total += float(pred.sum() + (tgt > 0).sum())
    dice = 1.0 if total == 0 else 2 * inter / total
    return sum(losses) / len(s), dice


# ----------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------
def _split_cases(cases: tuple[str, ...], fraction: float) -> tuple[list[str], list[str]]:
    n_val = round(len(cases) * fraction) if fraction > 0 else 0
    n_val = min(n_val, len(cases) - 1)
    return list(cases[: len(cases) - n_val]), list(cases[len(cases) - n_val :])


def train_decoder(
    cache: str | Path,
    name: str,
    out: str | Path,
    config: DecoderTrainConfig | None = None,
    *,
    progress: bool = True,
) -> dict:
    """Train one decoder on the cache and write it into the cascade folder ``out``.

    Writes ``out/decoder_NAME.pt`` (the best validation Dice, or the last step without
    validation cases), ``out/train_NAME.csv`` (log), ``out/train_NAME.yaml`` (the config) and
    ``out/cascade.json`` (encoder reference and inference settings; created by the first
    decoder, checked by the others).

    Returns:
        summary: decoder, train/val cases and samples, class weights, first/last train loss,
        untrained and final validation loss and Dice, contrast_views (training samples drawn
        from the original embeddings, contrast copy 1, 2, ...), seconds, checkpoint path.

    With contrast copies in the cache, each training sample is the original embedding or one
    of its copies, uniformly at random (seeded); validation uses the originals only.
    """
    import yaml

    from slidesam.transfersam.cascade import update_cascade_json
    from slidesam.transfersam.encoder import build_encoder

    check_decoder_name(name)
    config = config or DecoderTrainConfig()
    info = open_cache(cache)
    out = Path(out)
    train_ids, val_ids = _split_cases(info.cases, config.val_fraction)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    sam, ref = build_encoder(info.encoder, device="cpu")
    e = sam.config.embedding_size
    mask_size, size = 4 * e, sam.image_size
    update_cascade_json(out, ref, info.embed, config.boxes)
    extra = {
        "negative_ratio": config.negative_ratio,
        "seed": config.seed,
        "copies": info.embed.contrast_copies,
    }
    train = build_samples(info.folder, train_ids, name, config.boxes, mask_size, **extra)
    val = None
    if val_ids:
        try:
            val = build_samples(info.folder, val_ids, name, config.boxes, mask_size, **extra)
        except InputError as exc:
            log.warning("no validation for the %s decoder: %s", name, exc)
    fg = float(train.targets.mean())
    weights = class_weights(fg, config.class_weight_cap)
    loss_fn = binary_dice_ce(weights, lambda_dice=config.lambda_dice, lambda_ce=config.lambda_ce)
    decoder = BoxDecoder.from_sam(sam).to(config.device)
    del sam
    params = [p for p in decoder.mask_decoder.parameters()]
    opt = torch.optim.AdamW(
        params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay
    )
    summary = {
        "decoder": name,
        "train_cases": len(train_ids),
        "val_cases": len(val_ids),
        "train_samples": len(train),
        "val_samples": 0 if val is None else len(val),
        "foreground_fraction": round(fg, 5),
        "class_weights": [round(w, 5) for w in weights],
    }
    if val is not None:
        summary["untrained_val_loss"], summary["untrained_val_dice"] = evaluate_decoder(
            decoder, val, name, config, loss_fn
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / f"train_{name}.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    columns = ["step", "lr", "train_loss", "val_loss", "val_dice", "seconds"]
    rows: list[dict] = []
    best = -1.0
    ckpt = out / f"decoder_{name}.pt"
    t0 = time.perf_counter()
    running: list[float] = []
    first_losses: list[float] = []
    view_counts = np.zeros(1 + info.embed.contrast_copies, dtype=np.int64)
    bar = tqdm(range(config.steps), desc=f"train {name}", unit="step", disable=not progress)
    for step in bar:
        decoder.train()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, config)
        pick = rng.integers(0, len(train), size=min(config.batch_size, len(train)))
        views = _draw_views(train, pick, rng)
        view_counts += np.bincount(views, minlength=len(view_counts))
        emb, boxes, tgt = _batch(train, pick, name, config, size, rng, views)
        logits = decoder(emb.to(config.device), boxes.to(config.device))
        loss = loss_fn(logits, tgt.to(config.device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running.append(loss.item())
        if step < 10:
            first_losses.append(loss.item())
        last = step + 1 == config.steps
        if (step + 1) % config.validate_every == 0 or last:
            row = {
                "step": step + 1,
                "lr": f"{lr_at(step, config):.3g}",
                "train_loss": round(float(np.mean(running)), 5),
                "val_loss": "",
                "val_dice": "",
                "seconds": round(time.perf_counter() - t0, 1),
            }
            running = []
            if val is not None:
                vl, vd = evaluate_decoder(decoder, val, name, config, loss_fn)
                row["val_loss"], row["val_dice"] = round(vl, 5), round(vd, 5)
                bar.set_postfix(loss=row["train_loss"], val_dice=row["val_dice"])
                if vd > best:
                    best = vd
                    _save(decoder, ckpt, name, ref, config, summary, row)
            elif last:
                _save(decoder, ckpt, name, ref, config, summary, row)
            rows.append(row)
            with (out / f"train_{name}.csv").open("w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=columns)
                w.writeheader()
                w.writerows(rows)
    summary["contrast_views"] = view_counts.tolist()  # samples drawn: original, copy 1, ...
    summary["first_train_loss"] = round(float(np.mean(first_losses)), 5)
    summary["last_train_loss"] = rows[-1]["train_loss"]
    if val is not None:
        summary["final_val_dice"] = rows[-1]["val_dice"]
        summary["best_val_dice"] = round(best, 5)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    summary["checkpoint"] = str(ckpt)
    return summary


def _save(decoder, ckpt, name, ref, config, summary, row) -> None:
    from slidesam.core.config import variant_config

    save_decoder(
        decoder,
        ckpt,
        name=name,
        sam_config=variant_config(ref.variant),
        fingerprint=ref.fingerprint,
        training={"config": config.to_dict(), "at": row, **summary},
    )
