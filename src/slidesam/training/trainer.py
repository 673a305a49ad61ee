"""``train(config)``: the Slide-SAM training loop (paper §2.3 and Appendix C), on one device or
data-parallel under ``torchrun``.

One step, for a batch of B windows (images (B, 3, S, S) 0..255, masks (B, 3, S, S) 0/1,
indicators (B, 3)):

1. one prompt per sample simulated from its centre-slice mask (``simulate_prompt_batch``);
2. ``model.encode(images)`` -> (B, C, E, E), under ``torch.no_grad`` when no encoder parameter
   trains (preset ``decoder`` / ``decoder+prompt``), block by block recomputed in the backward
   pass with ``model.grad_checkpointing``; the box and the point samples are decoded in two
   groups and put back in batch order; steps 1-2 run under autocast with ``optim.amp`` (CUDA);
3. the masks resized (nearest) to the logits' resolution 4E x 4E;
4. ``slidesam_loss`` in fp32 (best of the K candidates, indicator-masked), AdamW (with a dynamic
   loss scale for fp16), optional warm-up + cosine (``LambdaLR``, stepped per step), gradient
   clipping of the global norm.

Every random draw of epoch ``e`` comes from ``(run.seed, e)``: the sampler's generator, the
augmentation (``WindowDataset.set_epoch``) and the prompts. With the optimiser, scheduler, loss
scale and torch RNG state saved in ``last.pt`` after each epoch, ``resume=True`` continues
exactly as if the run had not stopped.

Validation after each epoch: the window Dice (``validation_dice``) on held-out windows, and with
``run.val_volumes`` every ``run.val_volumes_every`` epochs the 3D Dice of a propagation through
held-out volumes (``propagation_dice``: ground-truth box on each class's largest slice,
``VolumeSegmenter`` with the default ``PropagationConfig``). Prompts of validation are drawn per
sample from ``run.seed``, so the numbers are the same at every epoch and for any number of
processes.

The run folder holds ``config.yaml``, ``log.csv`` (epoch, step, train_loss, val_dice, then
``val_dice3d`` and ``val_dice3d_<class>`` with val volumes, lr, seconds), ``last.pt`` and
``best.pt`` (by ``run.select_by``; lowest training loss without a validation set), ``epoch_NNNN.pt``
every ``run.save_every`` epochs and, with ``run.tensorboard``, ``tensorboard/``. Checkpoints are
our format (``slidesam.load_model`` reads them); the training state sits under the extra key
``"training"`` as plain tensors and containers, so ``weights_only=True`` loading still works.

Data parallel (``slidesam.training.distributed``): every process builds the same model (same
seed), wraps the training forward in ``DistributedDataParallel`` and takes a disjoint shard of
the epoch's sampled indices (the sampler draws the same list on every rank; rank r takes items
r, r + N, ...; the list is padded cyclically to a multiple of N). ``optim.batch_size`` is per
process. Prompts of rank r > 0 come from ``(seed, epoch, r)``. Validation is sharded too and its
sums reduced; rank 0 alone writes the log, the checkpoints and the progress bar; all ranks meet
at a barrier after each epoch's checkpoint. ``resume`` loads the same ``last.pt`` on every rank.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

from slidesam.core import Volume
from slidesam.core.errors import InputError
from slidesam.core.prompts import Prompt
from slidesam.data.io import read_image, read_label
from slidesam.data.prepare import find_cases, read_targets
from slidesam.data.preprocess import AXIS_NAMES, CT_WINDOW, choose_slicing_axes
from slidesam.inference.checkpoint import read_checkpoint, save_checkpoint
from slidesam.inference.models import build_slidesam
from slidesam.inference.predictor import SlideSAMPredictor
from slidesam.inference.propagation import PropagationConfig, VolumeSegmenter
from slidesam.modeling import Sam, set_trainable
from slidesam.training import distributed as ddp
from slidesam.training.config import TrainConfig
from slidesam.training.losses import LossConfig, LossOutput, slidesam_loss
from slidesam.training.prompt_sim import (
    PromptBatch,
    PromptSimConfig,
    simulate_prompt,
    simulate_prompt_batch,
)
from slidesam.training.windows import AugmentConfig, WindowDataset, mixed_indices

__all__ = [
    "LOG_COLUMNS",
    "ValVolume",
    "batch_loss",
    "build_training_model",
    "decode_prompts",
    "find_val_volumes",
    "log_columns",
    "lr_factor",
    "propagation_dice",
    "train",
    "validation_dice",
]

log = logging.getLogger(__name__)

#: columns of ``log.csv`` without val volumes (with them, ``log_columns(classes)``)
LOG_COLUMNS = ("epoch", "step", "train_loss", "val_dice", "lr", "seconds")
_VAL_SEED = 7919  # validation prompts: the same every epoch, so epochs are comparable


def log_columns(classes: Sequence[str] = ()) -> tuple[str, ...]:
    """Columns of ``log.csv``: with 3D validation classes, ``val_dice3d`` (their mean) and one
    ``val_dice3d_<class>`` each (non-word characters of the name as ``_``) after ``val_dice``."""
    if not classes:
        return LOG_COLUMNS
    extra = ("val_dice3d", *(_dice3d_column(c) for c in classes))
    return (*LOG_COLUMNS[:4], *extra, *LOG_COLUMNS[4:])


def _dice3d_column(name: str) -> str:
    return "val_dice3d_" + re.sub(r"\W+", "_", name)


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


class _TrainForward(nn.Module):
    """Images + prompts -> (logits, IoU predictions) as one module call, so that
    ``DistributedDataParallel`` (which hooks ``forward``) sees the whole training forward."""

    def __init__(self, model: Sam, *, encoder_trains: bool):
        super().__init__()
        self.model = model
        self.encoder_trains = encoder_trains

    def forward(
        self, images: torch.Tensor, prompts: PromptBatch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.encoder_trains:
            embeddings = self.model.encode(images)
        else:
            with torch.no_grad():
                embeddings = self.model.encode(images)
        return decode_prompts(self.model, embeddings, prompts)


def _autocast(amp: str, device: torch.device):
    """Autocast for ``optim.amp`` (``none`` -> no context)."""
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def _step_loss(
    forward: nn.Module,
    images: torch.Tensor,
    masks: torch.Tensor,
    indicator: torch.Tensor,
    rng: np.random.Generator,
    *,
    loss_config: LossConfig | None,
    prompt_config: PromptSimConfig | None,
    amp: str = "none",
    prompt_masks: torch.Tensor | None = None,
) -> LossOutput:
    # prompts come from the centre-slice target, or for negative samples from the target on a
    # nearby slice (``WindowSample.prompt_mask``)
    source = masks[:, 1] if prompt_masks is None else prompt_masks
    prompts = simulate_prompt_batch(source, rng, prompt_config, device=images.device)
    with _autocast(amp, images.device):
        logits, iou_pred = forward(images, prompts)
    target = F.interpolate(masks.float(), size=logits.shape[-2:], mode="nearest-exact")
    return slidesam_loss(logits.float(), target > 0.5, indicator, iou_pred.float(), loss_config)


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
    forward = _TrainForward(model, encoder_trains=encoder_trains)
    return _step_loss(
        forward,
        images,
        masks,
        indicator,
        rng,
        loss_config=loss_config,
        prompt_config=prompt_config,
    )


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
# validation on windows


def _prompt_batch_per_sample(
    masks: torch.Tensor,
    ids: Sequence[int],
    seed: int,
    config: PromptSimConfig | None,
    device: torch.device,
) -> PromptBatch:
    """Like ``simulate_prompt_batch``, but sample ``ids[i]`` draws from its own generator
    ``(seed, _VAL_SEED, ids[i])``: the prompts do not depend on how samples are batched."""
    arrays = masks.detach().cpu().numpy()
    prompts = [
        simulate_prompt(m, np.random.default_rng((seed, _VAL_SEED, int(i))), config)
        for m, i in zip(arrays, ids, strict=True)
    ]
    box_index = [i for i, p in enumerate(prompts) if p.kind == "box"]
    point_index = [i for i, p in enumerate(prompts) if p.kind == "point"]
    boxes = np.array([prompts[i].box for i in box_index], np.float32).reshape(-1, 4)
    coords = np.array([prompts[i].point for i in point_index], np.float32).reshape(-1, 1, 2)
    return PromptBatch(
        prompts=prompts,
        box_index=torch.tensor(box_index, dtype=torch.int64, device=device),
        boxes=torch.from_numpy(boxes).to(device),
        point_index=torch.tensor(point_index, dtype=torch.int64, device=device),
        point_coords=torch.from_numpy(coords).to(device),
        point_labels=torch.ones((len(point_index), 1), dtype=torch.int64, device=device),
    )


@torch.no_grad()
def _window_dice_sum(
    model: Sam,
    loader: DataLoader,
    ids: Sequence[int],
    *,
    seed: int,
    prompt_config: PromptSimConfig | None,
    amp: str = "none",
) -> tuple[float, int]:
    """(sum of per-sample Dice, number of samples) over ``loader`` (unshuffled), whose samples
    are named ``ids`` in order (they seed the prompts)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    try:
        for batch in loader:
            images, masks = batch.image.to(device), batch.mask.to(device)
            labelled = batch.indicator.to(device).bool()
            batch_ids = ids[count : count + images.shape[0]]
            # what the training step prompts from (the centre slice, as validation windows
            # are not augmented)
            source = batch.prompt_mask.to(device)
            prompts = _prompt_batch_per_sample(source, batch_ids, seed, prompt_config, device)
            with _autocast(amp, device):
                logits, _ = decode_prompts(model, model.encode(images), prompts)
            target = F.interpolate(masks, size=logits.shape[-2:], mode="nearest-exact") > 0.5
            pred = logits.float() > 0
            region = labelled[:, None, :, None, None]
            tgt = target[:, None]
            inter = (pred & tgt & region).sum(dim=(2, 3, 4)).float()
            sizes = ((pred & region).sum(dim=(2, 3, 4)) + (tgt & region).sum(dim=(2, 3, 4))).float()
            dice = torch.where(sizes > 0, 2 * inter / sizes.clamp(min=1), torch.ones_like(sizes))
            total += float(dice.max(dim=1).values.sum())
            count += dice.shape[0]
    finally:
        model.train(was_training)
    return total, count


def validation_dice(
    model: Sam,
    loader: DataLoader,
    *,
    seed: int,
    prompt_config: PromptSimConfig | None = None,
) -> float:
    """Mean Dice of the best of the K candidates (logits > 0) over the labelled slices.

    Dice is computed at the logits' resolution (masks resized nearest), ``2|P∩G| / (|P|+|G|)``,
    1 when both are empty. Sample ``i`` of the (unshuffled) loader is prompted from
    ``(seed, i)``, identically at every call.
    """
    total, count = _window_dice_sum(
        model, loader, range(len(loader.dataset)), seed=seed, prompt_config=prompt_config
    )
    return total / max(count, 1)


# ----------------------------------------------------------------------------------------------
# validation on volumes: 3D Dice of a propagation


@dataclass(frozen=True)
class ValVolume:
    """A held-out labelled volume and the classes to score on it.

    Attributes:
        case: name shown in messages.
        image, label: files (or a DICOM folder for the image); the label on the image's grid.
        targets: class name -> label values forming it (a region when several).
    """

    case: str
    image: Path
    label: Path
    targets: tuple[tuple[str, tuple[int, ...]], ...]


def find_val_volumes(
    entries: Sequence[str | Sequence[str]],
    classes: Mapping[str, Sequence[int]],
    *,
    limit: int | None = None,
) -> list[ValVolume]:
    """The volumes of ``run.val_volumes`` entries, in order, at most ``limit``.

    Args:
        entries: nnU-Net raw dataset folders (``imagesTr``/``labelsTr``; classes by name from
            their ``dataset.json``, cases sorted) or ``(image, label)`` file pairs.
        classes: the trained classes, name -> label values (used as such for pairs).

    Raises:
        InputError: a missing file or folder, a folder that is not an nnU-Net dataset or whose
            ``dataset.json`` names none of ``classes``.
    """
    out: list[ValVolume] = []
    wanted = {name: tuple(int(v) for v in values) for name, values in classes.items()}
    for entry in entries:
        if isinstance(entry, str | Path):
            folder = Path(entry)
            if not folder.is_dir():
                raise InputError(
                    f"run.val_volumes {folder}: no such folder (give an nnU-Net dataset folder "
                    "or an [image, label] pair)"
                )
            try:
                found = {t.name: t.values for t in read_targets(folder)}
            except InputError as exc:
                raise InputError(f"run.val_volumes: {exc}") from None
            targets = tuple((n, found[n]) for n in wanted if n in found)
            if not targets:
                raise InputError(
                    f"run.val_volumes {folder}: its dataset.json has none of the trained classes "
                    f"({', '.join(wanted)}); it has {', '.join(found)}"
                )
            try:
                cases = find_cases(folder)
            except InputError as exc:
                raise InputError(f"run.val_volumes: {exc}") from None
            out += [ValVolume(c.case_id, c.image, c.label, targets) for c in cases]
        else:
            image, label = (Path(p) for p in entry)
            for path in (image, label):
                if not path.exists():
                    raise InputError(f"run.val_volumes: {path}: no such file")
            out.append(ValVolume(image.name, image, label, tuple(wanted.items())))
    return out[:limit] if limit is not None else out


@dataclass(frozen=True)
class _Prepared:
    """How the training windows were made (``prepare.json``), so that validation volumes are
    windowed, scaled and sliced the same way."""

    window: tuple[float, float]
    scaling: str
    axes: str
    targets: dict[str, tuple[int, ...]]  # class name -> label values, over all folders

    @classmethod
    def read(cls, folders: Sequence[str], classes: Sequence[str] | None) -> _Prepared:
        targets: dict[str, tuple[int, ...]] = {}
        first = None
        for folder in folders:
            path = Path(folder) / "prepare.json"
            try:
                settings = json.loads(path.read_text())
                first = first or settings["config"]
                for t in settings["targets"]:
                    targets.setdefault(str(t["name"]), tuple(int(v) for v in t["values"]))
            except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                raise InputError(f"{path}: unreadable prepare settings ({exc})") from None
        if classes is not None:
            targets = {n: v for n, v in targets.items() if n in classes}
        window = first.get("window") or CT_WINDOW
        return cls(
            window=(float(window[0]), float(window[1])),
            scaling=str(first.get("scaling", "fixed")),
            axes=str(first.get("axes", "auto")),
            targets=targets,
        )

    def axis(self, shape: tuple[int, ...]) -> int:
        return choose_slicing_axes(shape, self.axes if self.axes in AXIS_NAMES else "auto")[0]


def propagation_dice(
    model: Sam,
    image: Volume,
    labels: np.ndarray,
    targets: Sequence[tuple[str, Sequence[int]]],
    *,
    axis: int,
    window: tuple[float, float] = CT_WINDOW,
    scaling: str = "fixed",
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    config: PropagationConfig | None = None,
) -> dict[str, float]:
    """3D Dice per class of one volume segmented from one ground-truth box per class.

    Each class present in ``labels`` is prompted with the tight box (XYXY, slice pixels) of its
    largest slice along ``axis`` and propagated through the volume (``VolumeSegmenter``,
    ``SlideSAMPredictor`` with ``window``/``scaling`` as the training windows were made). The
    classes are one segmentation call (they share the embedding cache) but scored each on its own
    fused logits > 0, before the label map's overlap resolution, so a class's Dice does not
    depend on the others.

    Args:
        image: the volume, (z, y, x).
        labels: (z, y, x) integer label map on the image's grid.
        targets: (class name, label values) pairs.

    Returns:
        class name -> Dice ``2|P∩G| / (|P| + |G|)`` for the classes present; absent ones left out.
    """
    prompts, names = [], {}
    for name, values in targets:
        gt = np.isin(labels, np.asarray(values))
        if not gt.any():
            continue
        areas = gt.sum(axis=tuple(a for a in range(3) if a != axis))
        s = int(np.argmax(areas))
        plane = np.take(gt, s, axis=axis)
        rows, cols = np.flatnonzero(plane.any(axis=1)), np.flatnonzero(plane.any(axis=0))
        label = len(names) + 1
        box = (float(cols[0]), float(rows[0]), float(cols[-1]), float(rows[-1]))
        prompts.append(Prompt(slice=s, label=label, box=box, source="validation"))
        names[label] = (name, gt)
    if not prompts:
        return {}
    was_training = model.training
    try:
        predictor = SlideSAMPredictor(
            model,
            device=str(device),
            precision=precision,
            window=window,
            scaling=scaling,
            merge_lora=False,  # the model keeps training: never change its weights
        )
        result = VolumeSegmenter(predictor, config).segment(image, prompts, axis=axis)
    finally:
        model.train(was_training)
    dice = {}
    for label, (name, gt) in names.items():
        pred = result.probabilities[label] > 0.5  # fused logit > 0
        size = int(pred.sum()) + int(gt.sum())
        dice[name] = 2.0 * int((pred & gt).sum()) / size
    return dice


def _volume_dice_sums(
    model: Sam,
    volumes: Sequence[ValVolume],
    classes: Sequence[str],
    prepared: _Prepared,
    *,
    device: torch.device,
    precision: str,
) -> list[float]:
    """Per class: [sum of Dice, number of volumes], flattened in ``classes`` order."""
    sums = [0.0] * (2 * len(classes))
    index = {name: i for i, name in enumerate(classes)}
    for v in volumes:
        image = read_image(v.image, modality=None)
        labels = read_label(v.label, reference=image).array
        dice = propagation_dice(
            model,
            image,
            labels,
            v.targets,
            axis=prepared.axis(image.shape),
            window=prepared.window,
            scaling=prepared.scaling,
            device=device,
            precision=precision,
        )
        for name, d in dice.items():
            sums[2 * index[name]] += d
            sums[2 * index[name] + 1] += 1
        log.debug("3D Dice of %s: %s", v.case, dice)
    return sums


# ----------------------------------------------------------------------------------------------
# set-up


def build_training_model(config: TrainConfig, *, device: str | torch.device | None = None) -> Sam:
    """The model to train, seeded, with ``model.trainable`` and ``model.grad_checkpointing``
    applied, in train mode, on ``device`` (default ``run.device``).

    Raises:
        InputError: an unreadable or incompatible ``init_checkpoint`` (other variant, missing or
            unexpected keys), or a preset the model cannot take.
    """
    m = config.model
    torch.manual_seed(config.run.seed)
    checkpoint = m.init_checkpoint
    if checkpoint is not None and not Path(checkpoint).exists():
        raise InputError(f"model.init_checkpoint {checkpoint}: no such file")
    options = {} if m.roi_context is None else {"roi_context": m.roi_context}
    try:
        model = build_slidesam(
            m.variant,
            checkpoint,
            device=config.run.device if device is None else device,
            eval_mode=False,
            lora_rank=m.lora_rank,
            **options,
        )
    except InputError as exc:
        where = f"model.init_checkpoint {checkpoint}" if checkpoint else "model"
        raise InputError(f"{where}: {exc}") from None
    counts = set_trainable(model, m.trainable)
    model.image_encoder.grad_checkpointing = m.grad_checkpointing
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


def _prepare_data(config: TrainConfig, size: int, roi_context: float = 0.0) -> _Data:
    d, run = config.data, config.run
    if d.image_size is not None and d.image_size != size:
        raise InputError(
            f"data.image_size {d.image_size} differs from the model's input size {size}; "
            "leave it null (prompts are in model-input pixels)"
        )
    augment = config.augment
    dataset = WindowDataset(
        d.folders,
        classes=d.classes,
        augment=augment,
        seed=run.seed,
        size=size,
        roi_context=roi_context,
    )
    cases = dataset.sample_cases()
    per_folder = np.cumsum((0, *dataset.dataset_sizes))
    held_out: set[tuple[int, str]] = set()
    val_dataset, val_index = None, np.zeros(0, np.int64)
    if run.val_folders:
        val_dataset = WindowDataset(
            run.val_folders,
            classes=d.classes,
            augment=AugmentConfig.none(),
            size=size,
            roi_context=roi_context,
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
            d.folders,
            classes=d.classes,
            augment=AugmentConfig.none(),
            size=size,
            roi_context=roi_context,
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


def class_mix(
    index: Sequence[np.ndarray],
    classes: Sequence[str],
    weights: Sequence[float] | None,
    class_weights: Mapping[str, float] | None,
) -> tuple[list[np.ndarray], list[float] | None]:
    """Split each folder's training indices into one group per class, weighted so that a
    folder keeps its share of the draws (``weights``; None = in proportion to its size) and a
    sample of class c inside it is drawn ``class_weights[c]`` (default 1) times as often as
    under uniform drawing. Without ``class_weights`` the folders are returned unchanged.

    Args:
        index: per folder, global sample indices (``_Data.train_index``).
        classes: class name of every global sample index (``WindowDataset.sample_classes``).

    Returns:
        (groups, group weights) for ``_MixSampler``.
    """
    if not class_weights:
        return list(index), None if weights is None else list(weights)
    names = np.asarray(classes)
    known = sorted(set(names.tolist()))
    unknown = sorted(set(class_weights) - set(known))
    if unknown:
        raise InputError(
            f"data.class_weights names class(es) {', '.join(unknown)} that no training sample "
            f"has; the samples' classes are {', '.join(known)}"
        )
    shares = list(weights) if weights is not None else [int(i.size) for i in index]
    groups, out = [], []
    for folder, share in zip(index, shares, strict=True):
        folder_names = names[folder]
        by_class = {c: folder[folder_names == c] for c in np.unique(folder_names).tolist()}
        mass = {c: idx.size * float(class_weights.get(c, 1.0)) for c, idx in by_class.items()}
        total = sum(mass.values())
        for c, idx in by_class.items():
            groups.append(idx)
            out.append(float(share) * mass[c] / total)
    return groups, out


class _MixSampler(Sampler[int]):
    """The training indices of each folder, mixed by weight, redrawn from (seed, epoch); with
    ``world.size`` N > 1, this rank's items r, r + N, ... of the list padded cyclically to a
    multiple of N (every rank gets as many, so all take the same number of steps)."""

    def __init__(
        self,
        index: Sequence[np.ndarray],
        weights,
        num_samples: int,
        seed: int,
        world: ddp.World | None = None,
    ):
        self.index = np.concatenate(list(index))
        self.sizes = [int(i.size) for i in index]
        self.weights = list(weights) if weights is not None else list(self.sizes)
        self.num_samples = num_samples
        self.seed = seed
        self.world = world or ddp.World()
        self.epoch = 0

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        local = mixed_indices(self.sizes, self.weights, self.num_samples, generator=g)
        drawn = self.index[local.numpy()]
        if self.world.distributed:
            drawn = np.resize(drawn, len(self) * self.world.size)[
                self.world.rank :: self.world.size
            ]
        yield from drawn.tolist()

    def __len__(self) -> int:
        return -(-self.num_samples // self.world.size)


# ----------------------------------------------------------------------------------------------
# checkpoints and the log


def _save(model: Sam, path: Path, training: dict) -> None:
    """Write ``path`` (and its ``.config.json``) atomically: a crash leaves the old file."""
    tmp = path.with_name(f".{path.stem}.tmp.pt")
    save_checkpoint(model, model.config, tmp, extra={"training": training})
    os.replace(tmp, path)
    os.replace(tmp.with_name(tmp.stem + ".config.json"), path.with_name(path.stem + ".config.json"))


def _write_log(path: Path, rows: list[dict], columns: Sequence[str]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def _read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


class _TensorBoard:
    """Scalars to ``out/tensorboard`` when asked and the ``tensorboard`` package is there."""

    def __init__(self, out: Path, enabled: bool):
        self.writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.warning(
                "run.tensorboard: the tensorboard package is not installed (pip install "
                "tensorboard); logging to log.csv only"
            )
            return
        self.writer = SummaryWriter(str(out / "tensorboard"))

    def scalars(self, values: Mapping[str, float], step: int, *, flush: bool = False) -> None:
        if self.writer is None:
            return
        for tag, value in values.items():
            if not math.isnan(value):
                self.writer.add_scalar(tag, value, step)
        if flush:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


#: settings that do not change what is computed (or only how often validation runs)
_RESUMABLE_CHANGES = {
    "optim.epochs",
    "model.grad_checkpointing",
    "run.num_workers",
    "run.save_every",
    "run.out_dir",
    "run.tensorboard",
    "run.val_volumes_every",
}


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


def _resume_state(config: TrainConfig, out: Path, resume: bool) -> dict | None:
    """The checkpoint ``out/last.pt`` to resume from (None for a fresh run), after checking
    that it holds a training state and that the config may continue it."""
    last_path = out / "last.pt"
    if not resume:
        if last_path.exists():
            raise InputError(
                f"{out} already holds a run (last.pt); pass --resume to continue it or choose "
                "another --out"
            )
        return None
    if not last_path.is_file():
        raise InputError(f"{out}: nothing to resume (no last.pt); run without --resume")
    checkpoint = read_checkpoint(last_path)
    state = checkpoint.get("training")
    if not isinstance(state, dict):
        raise InputError(f"{last_path}: no training state inside; cannot resume from it")
    # a run saved before a config key existed: compare the keys it has
    saved = state["config"]
    current = _restrict(config.to_dict(), saved)
    changed = [k for k in _config_changes(saved, current) if k not in _RESUMABLE_CHANGES]
    if changed:
        raise InputError(
            f"cannot resume {out} with a different config: {', '.join(changed)} changed"
        )
    return checkpoint


def _restrict(new: dict, old: dict) -> dict:
    """``new`` without the keys that ``old`` lacks (recursively): a run saved before a config
    key existed resumes with that key at whatever value."""
    out = {}
    for k, v in new.items():
        if k not in old:
            continue
        out[k] = _restrict(v, old[k]) if isinstance(v, dict) and isinstance(old[k], dict) else v
    return out


@dataclass
class _Validator:
    """This rank's epoch-end validation: its shard of the held-out windows and volumes, whose
    sums are reduced over the ranks (every rank must call each method at the same epochs)."""

    config: TrainConfig
    world: ddp.World
    device: torch.device
    loader: DataLoader | None  # this rank's windows, or None without a validation set
    ids: list[int]  # their positions in the whole validation set (they seed the prompts)
    volumes: list[ValVolume]  # all ranks' volumes
    classes: list[str]
    prepared: _Prepared

    @classmethod
    def build(cls, config: TrainConfig, data: _Data, world: ddp.World, device: torch.device):
        run = config.run
        prepared = _Prepared.read(config.data.folders, config.data.classes)
        volumes = find_val_volumes(run.val_volumes, prepared.targets, limit=run.val_volumes_max)
        loader, ids = None, []
        if data.val_dataset is not None and data.val_index.size:
            ids = list(range(world.rank, data.val_index.size, world.size))
            loader = DataLoader(
                torch.utils.data.Subset(data.val_dataset, data.val_index[ids].tolist()),
                batch_size=config.optim.batch_size,
                num_workers=run.num_workers,
            )
        classes = list(prepared.targets) if volumes else []
        return cls(config, world, device, loader, ids, volumes, classes, prepared)

    def window_dice(self, model: Sam) -> float:
        """Mean window Dice over all ranks (NaN without a validation set)."""
        if self.loader is None:
            return float("nan")
        total, count = _window_dice_sum(
            model,
            self.loader,
            self.ids,
            seed=self.config.run.seed,
            prompt_config=self.config.prompts,
            amp=self.config.optim.amp,
        )
        total, count = ddp.all_reduce_sum([total, count], self.world, self.device)
        return total / max(count, 1)

    def dice3d(self, model: Sam, epoch: int) -> dict[str, float]:
        """Class -> mean 3D Dice over the volumes holding it (NaN: none does), after epoch
        ``epoch`` (0-based) if it is one that measures it, else ``{}``."""
        run = self.config.run
        done = epoch + 1
        if not self.volumes or (done % run.val_volumes_every and done != self.config.optim.epochs):
            return {}
        amp = self.config.optim.amp
        sums = _volume_dice_sums(
            model,
            self.volumes[self.world.rank :: self.world.size],
            self.classes,
            self.prepared,
            device=self.device,
            precision="fp32" if amp == "none" else amp,
        )
        sums = ddp.all_reduce_sum(sums, self.world, self.device)
        per_class = {
            name: sums[2 * i] / sums[2 * i + 1] if sums[2 * i + 1] else float("nan")
            for i, name in enumerate(self.classes)
        }
        if all(math.isnan(d) for d in per_class.values()):
            log.warning("3D validation: no val volume contains any of %s", self.classes)
        return per_class


def _optimiser_step(
    loss: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    params: list[torch.Tensor],
    grad_clip: float | None,
) -> None:
    """Backward, clip the global gradient norm, step (through the loss scale for fp16: a step
    whose gradients overflow is skipped and the scale lowered) and advance the schedule."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
    else:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)  # clip the true gradients
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    if scaler is None:
        optimizer.step()
    else:
        scaler.step(optimizer)
        scaler.update()
    scheduler.step()


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

    Under ``torchrun`` (``RANK``/``WORLD_SIZE`` set) every process calls this with the same
    config; the process group is created (``nccl`` on CUDA, ``gloo`` on CPU) and destroyed here
    unless the caller already set one up.

    Args:
        resume: continue the run in ``out_dir`` from ``last.pt`` (model, optimiser, scheduler,
            loss scale, torch RNG, epoch). Only ``optim.epochs``, ``model.grad_checkpointing``,
            ``run.num_workers``, ``run.save_every``, ``run.out_dir``, ``run.tensorboard`` and
            ``run.val_volumes_every`` may differ from the saved config.
        stop_after: end this call after this many epochs (the run can be resumed later).
        progress: show a progress bar (rank 0) over the run's steps: epoch, loss, ETA.

    Returns:
        ``{"out_dir", "epochs_done", "steps", "train_loss", "val_dice", "val_dice3d",
        "best_metric", "last", "best", "history", "model", "rank", "world_size"}`` (history:
        the rows of ``log.csv``; model: this process's trained ``Sam``; losses and Dice are
        over all processes).

    Raises:
        InputError: bad data, config or init checkpoint, or a run folder that already holds a
            run (without ``resume``) or none (with it) -- all before any training step.
    """
    world = ddp.world_from_env()
    device = ddp.rank_device(config.run.device, world)
    with ddp.process_group(world, device):
        return _train(
            config, world, device, resume=resume, stop_after=stop_after, progress=progress
        )


def _train(
    config: TrainConfig,
    world: ddp.World,
    device: torch.device,
    *,
    resume: bool,
    stop_after: int | None,
    progress: bool,
) -> dict:
    out = Path(config.run.out_dir)
    last_path, best_path, log_path = out / "last.pt", out / "best.pt", out / "log.csv"
    resumed = _resume_state(config, out, resume)
    o, run = config.optim, config.run

    model = build_training_model(config, device=device)
    data = _prepare_data(config, model.image_size, model.config.roi_context)
    validator = _Validator.build(config, data, world, device)
    columns = log_columns(validator.classes)

    num_samples = config.data.samples_per_epoch or sum(int(i.size) for i in data.train_index)
    groups, weights = class_mix(
        data.train_index,
        data.dataset.sample_classes(),
        config.data.weights,
        config.data.class_weights,
    )
    sampler = _MixSampler(groups, weights, num_samples, run.seed, world)
    loader = DataLoader(
        data.dataset, batch_size=o.batch_size, sampler=sampler, num_workers=run.num_workers
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
    scaler = torch.amp.GradScaler(device.type) if o.amp == "fp16" else None
    encoder_trains = any(p.requires_grad for p in model.image_encoder.parameters())
    forward: nn.Module = _TrainForward(model, encoder_trains=encoder_trains)
    if world.distributed:
        forward = nn.parallel.DistributedDataParallel(
            forward,
            device_ids=[device.index] if device.type == "cuda" else None,
            # frozen parts have no gradient, and a batch without point (or mask) prompts
            # leaves those embeddings unused
            find_unused_parameters=True,
        )

    start_epoch, step, best_metric = 0, 0, -math.inf
    rows: list[dict] = []
    if resumed is not None:
        state = resumed["training"]
        model.load_state_dict(resumed["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["torch_rng"])
        start_epoch, step = int(state["epoch"]), int(state["step"])
        best_metric = float(state["best_metric"])
        rows = [r for r in _read_log(log_path) if int(r["epoch"]) <= start_epoch]
        log.info("resuming %s after epoch %d (step %d)", out, start_epoch, step)
    main = world.is_main
    if main:
        out.mkdir(parents=True, exist_ok=True)
        config.save(out / "config.yaml")
        _write_log(log_path, rows, columns)
    ddp.barrier(world)
    board = _TensorBoard(out, run.tensorboard and main)

    end_epoch = o.epochs if stop_after is None else min(o.epochs, start_epoch + stop_after)
    bar = tqdm(
        total=steps_per_epoch * end_epoch,
        initial=step,
        desc="train",
        unit="step",
        disable=not (progress and main),
        dynamic_ncols=True,
    )
    train_loss = val_dice = dice3d = float("nan")
    try:
        for epoch in range(start_epoch, end_epoch):
            started = time.perf_counter()
            data.dataset.set_epoch(epoch)
            sampler.epoch = epoch
            seeds = (run.seed, epoch) if world.rank == 0 else (run.seed, epoch, world.rank)
            rng = np.random.default_rng(seeds)
            losses = []
            for batch in loader:
                out_loss = _step_loss(
                    forward,
                    batch.image.to(device),
                    batch.mask.to(device),
                    batch.indicator.to(device),
                    rng,
                    loss_config=config.loss,
                    prompt_config=config.prompts,
                    amp=o.amp,
                    prompt_masks=batch.prompt_mask.to(device),
                )
                _optimiser_step(out_loss.total, optimizer, scheduler, scaler, params, o.grad_clip)
                step += 1
                losses.append(float(out_loss.total.detach()))
                bar.set_postfix(
                    epoch=f"{epoch + 1}/{o.epochs}", loss=f"{losses[-1]:.4f}", refresh=False
                )
                bar.update(1)
                board.scalars({"train/loss_step": losses[-1]}, step)
            loss_sum, loss_count = ddp.all_reduce_sum(
                [math.fsum(losses), len(losses)], world, device
            )
            train_loss = loss_sum / max(loss_count, 1)

            val_dice = validator.window_dice(model)
            per_class = validator.dice3d(model, epoch)
            if per_class:
                measured = [d for d in per_class.values() if not math.isnan(d)]
                dice3d = float(np.mean(measured)) if measured else float("nan")
            if run.select_by == "dice3d":
                metric = dice3d if per_class else float("nan")
            else:
                metric = val_dice if validator.loader is not None else -train_loss

            row = {
                "epoch": epoch + 1,
                "step": step,
                "train_loss": f"{train_loss:.6f}",
                "val_dice": f"{val_dice:.6f}",
                "lr": f"{optimizer.param_groups[0]['lr']:.6e}",
                "seconds": f"{time.perf_counter() - started:.3f}",
            }
            if validator.classes:
                row["val_dice3d"] = f"{dice3d:.6f}" if per_class else ""
                for name in validator.classes:
                    row[_dice3d_column(name)] = f"{per_class[name]:.6f}" if per_class else ""
            rows.append(row)
            # best.pt exists from the first epoch on, even while the metric is not measured yet
            is_best = metric > best_metric or (main and not best_path.exists())
            if not math.isnan(metric):
                best_metric = max(best_metric, metric)
            if main:
                _write_log(log_path, rows, columns)
                training = {
                    "epoch": epoch + 1,
                    "step": step,
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "torch_rng": torch.get_rng_state(),
                    "best_metric": best_metric,
                    "config": config.to_dict(),
                }
                _save(model, last_path, training)
                if is_best:
                    _save(model, best_path, training)
                if run.save_every and (epoch + 1) % run.save_every == 0:
                    _save(model, out / f"epoch_{epoch + 1:04d}.pt", training)
                scalars = {
                    "train/loss": train_loss,
                    "val/dice": val_dice,
                    "lr": optimizer.param_groups[0]["lr"],
                }
                if per_class:
                    scalars["val/dice3d"] = dice3d
                    scalars |= {f"val/dice3d_{n}": d for n, d in per_class.items()}
                board.scalars(scalars, step, flush=True)
                log.info(
                    "epoch %d/%d: train loss %.4f, val Dice %.4f%s, %s s",
                    epoch + 1,
                    o.epochs,
                    train_loss,
                    val_dice,
                    f", 3D Dice {dice3d:.4f}" if per_class else "",
                    row["seconds"],
                )
            ddp.barrier(world)  # nobody starts the next epoch before rank 0 has saved this one
    finally:
        bar.close()
        board.close()
    return {
        "out_dir": str(out),
        "epochs_done": end_epoch if end_epoch > start_epoch else start_epoch,
        "steps": step,
        "train_loss": train_loss,
        "val_dice": val_dice,
        "val_dice3d": dice3d,
        "best_metric": best_metric,
        "last": str(last_path),
        "best": str(best_path),
        "history": rows,
        "model": model,
        "rank": world.rank,
        "world_size": world.size,
    }
