"""Training the stage-1 U-Net on nnU-Net raw datasets of one phase: :func:`train_unet`.

The recipe (the embedded arterial model's, and the per-phase baselines' on any phase):

- **Data**: one or more nnU-Net v2 raw dataset folders (``imagesTr/<case>_0000<ending>``,
  ``labelsTr/<case><ending>``, ``dataset.json``), e.g. written by ``slidesam phantom``. Every
  case is resampled once onto its network grid (``UNetConfig.target_spacing``, see
  ``slidesam.stage1.unet``) and kept in memory. ``data.val_cases`` cases, drawn with the seed,
  are held out.
- **Patches** of ``augment.patch_size`` (default ``model.patch_size``): a fraction
  ``augment.tumor_fraction`` is centred (with jitter of up to a quarter patch) on a random tumor
  voxel, the rest drawn uniformly. Intensity scale and shift, Gaussian noise, optional flips.
- **Loss and optimiser**: MONAI ``DiceCELoss`` (softmax, Dice over the batch), AdamW with a
  linear warm-up and cosine decay, gradient clipping.
- **Validation** after every ``run.val_every`` epochs: :class:`~slidesam.stage1.unet.UNetStage1`
  segments each held-out image on its own grid (the deployed path), and the tumor and kidney
  Dice (``slidesam.evaluation.metrics``) are logged. ``best.pt`` keeps the best mean tumor Dice.
- **Fine-tuning**: ``run.init_checkpoint`` starts from trained weights (``default``: the shipped
  model) with the same network; everything else (data, schedule, validation) is as above.
- **Seeding**: numpy ``Generator``\\ s for the split, patches and augmentation; the initial
  weights from ``torch.manual_seed`` inside ``torch.random.fork_rng`` (the caller's global RNG
  state is restored). ``torch.set_num_threads(run.num_threads)`` is restored on return.

Config file (YAML; every section optional except ``data``; unknown sections or keys are an
``InputError`` that names them)::

    data:    {folders: [DIR, ...], val_cases: 4}
    model:   UNetConfig fields (slidesam.stage1.unet)
    augment: {patch_size: null, tumor_fraction: 0.5, flip_p: 0.0, scale: [0.9, 1.1],
              shift: [-0.05, 0.05], noise_std: 0.02}
    loss:    {batch_dice: true, lambda_dice: 1.0, lambda_ce: 1.0}
    optim:   {lr: 0.002, weight_decay: 0.0001, batch_size: 2, epochs: 30, steps_per_epoch: 40,
              warmup_steps: 20, cosine: true, grad_clip: 12.0}
    run:     {out_dir: runs/unet, seed: 0, device: cpu, num_threads: 2, val_every: 1,
              max_minutes: null, init_checkpoint: null}

A run folder holds ``config.yaml`` (this config), ``log.csv`` (one row per epoch), ``last.pt``
and ``best.pt`` (``slidesam-unet`` checkpoints whose ``extra`` holds the epoch, the validation
scores, the case split and the training config).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from slidesam.core import InputError, Volume
from slidesam.core.configfile import SectionedConfig
from slidesam.core.runtime import torch_threads
from slidesam.data.io import read_image, read_label
from slidesam.evaluation.metrics import binary_scores
from slidesam.stage1.unet import (
    UNetConfig,
    UNetStage1,
    _as_float,
    _as_int,
    _as_seq,
    build_unet,
    load_default_unet_checkpoint,
    load_unet_checkpoint,
    network_geometry,
    normalize,
    resample,
    save_unet_checkpoint,
)

__all__ = [
    "UNetAugmentConfig",
    "UNetDataConfig",
    "UNetLossConfig",
    "UNetOptimConfig",
    "UNetRunConfig",
    "UNetTrainConfig",
    "find_cases",
    "load_unet_train_config",
    "split_cases",
    "train_unet",
]

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------
def _pair(value: Any, name: str) -> tuple[float, float]:
    lo, hi = (_as_float(v, f"{name}[{i}]") for i, v in enumerate(_as_seq(value, name, 2)))
    if lo > hi:
        raise InputError(f"{name} must be (low, high) with low <= high, got [{lo}, {hi}]")
    return lo, hi


def _fraction(value: Any, name: str) -> float:
    v = _as_float(value, name)
    if not 0 <= v <= 1:
        raise InputError(f"{name} must lie in 0..1, got {v}")
    return v


@dataclass(frozen=True)
class UNetDataConfig:
    """Training data.

    Attributes:
        folders: nnU-Net raw dataset folders (``imagesTr/``, ``labelsTr/``), all of the phase
            ``model.phase`` (a ``dataset.json`` naming another ``phase`` is refused).
        val_cases: cases held out for validation (drawn with ``run.seed``); 0 = none, then
            ``best.pt`` is the last epoch.
    """

    folders: tuple[str, ...] = ()
    val_cases: int = 4

    def __post_init__(self) -> None:
        folders = (self.folders,) if isinstance(self.folders, str) else self.folders
        folders = tuple(str(f) for f in _as_seq(folders, "data.folders"))
        if not folders:
            raise InputError("data.folders is empty: list the nnU-Net raw dataset folder(s)")
        object.__setattr__(self, "folders", folders)
        object.__setattr__(self, "val_cases", _as_int(self.val_cases, "data.val_cases", 0))


@dataclass(frozen=True)
class UNetAugmentConfig:
    """Patch sampling and augmentation (intensities are in normalised 0..1 units).

    Attributes:
        patch_size: (z, y, x) voxels of the training patches, multiples of the product of
            ``model.strides`` per axis; null = ``model.patch_size`` (the inference window).
            Keep null with instance norm: a window larger than the training patches changes the
            normalisation statistics (in our test the tumor Dice fell from 0.43 to 0.26).
        tumor_fraction: share of patches centred on a tumor voxel (cases without tumor always
            give uniform patches).
        flip_p: probability of flipping each axis (z, y, x) independently. Off by default:
            the network grid is always in the standard orientation (see
            ``slidesam.stage1.unet.network_geometry``), and mirrored anatomy (liver and spleen
            swapped) slows learning.
        scale: range of a random intensity factor.
        shift: range of a random intensity offset.
        noise_std: standard deviation of added Gaussian noise (0 = none).
    """

    patch_size: tuple[int, int, int] | None = None
    tumor_fraction: float = 0.5
    flip_p: float = 0.0
    scale: tuple[float, float] = (0.9, 1.1)
    shift: tuple[float, float] = (-0.05, 0.05)
    noise_std: float = 0.02

    def __post_init__(self) -> None:
        if self.patch_size is not None:
            patch = tuple(
                _as_int(p, f"augment.patch_size[{i}]", 1)
                for i, p in enumerate(_as_seq(self.patch_size, "augment.patch_size", 3))
            )
            object.__setattr__(self, "patch_size", patch)
        object.__setattr__(
            self, "tumor_fraction", _fraction(self.tumor_fraction, "augment.tumor_fraction")
        )
        object.__setattr__(self, "flip_p", _fraction(self.flip_p, "augment.flip_p"))
        scale = _pair(self.scale, "augment.scale")
        if scale[0] <= 0:
            raise InputError(f"augment.scale must be positive, got {list(scale)}")
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "shift", _pair(self.shift, "augment.shift"))
        noise = _as_float(self.noise_std, "augment.noise_std")
        if noise < 0:
            raise InputError(f"augment.noise_std must be >= 0, got {noise}")
        object.__setattr__(self, "noise_std", noise)


@dataclass(frozen=True)
class UNetLossConfig:
    """MONAI ``DiceCELoss`` on the softmax (soft Dice on every class, background included).

    Attributes:
        batch_dice: one Dice per class over the whole batch (stable when patches lack a
            class); false = per patch, then averaged (weighs small tumors like large ones and
            punishes tumor predicted in tumor-free patches).
        lambda_dice: weight of the Dice term.
        lambda_ce: weight of the cross-entropy term.
    """

    batch_dice: bool = True
    lambda_dice: float = 1.0
    lambda_ce: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.batch_dice, bool):
            raise InputError(f"loss.batch_dice must be true or false, got {self.batch_dice!r}")
        for name in ("lambda_dice", "lambda_ce"):
            value = _as_float(getattr(self, name), f"loss.{name}")
            if value < 0:
                raise InputError(f"loss.{name} must be >= 0, got {value}")
            object.__setattr__(self, name, value)


@dataclass(frozen=True)
class UNetOptimConfig:
    """AdamW and its schedule.

    Attributes:
        lr: peak learning rate.
        weight_decay: AdamW weight decay.
        batch_size: patches per step.
        epochs: number of epochs.
        steps_per_epoch: optimiser steps per epoch.
        warmup_steps: linear warm-up from ``lr / warmup_steps`` to ``lr``; 0 = none.
        cosine: cosine decay to 0 after the warm-up, else constant.
        grad_clip: clip the gradients' global L2 norm; null = no clipping.
    """

    lr: float = 2e-3
    weight_decay: float = 1e-4
    batch_size: int = 2
    epochs: int = 30
    steps_per_epoch: int = 40
    warmup_steps: int = 20
    cosine: bool = True
    grad_clip: float | None = 12.0

    def __post_init__(self) -> None:
        lr = _as_float(self.lr, "optim.lr")
        if lr <= 0:
            raise InputError(f"optim.lr must be > 0, got {lr}")
        wd = _as_float(self.weight_decay, "optim.weight_decay")
        if wd < 0:
            raise InputError(f"optim.weight_decay must be >= 0, got {wd}")
        object.__setattr__(self, "lr", lr)
        object.__setattr__(self, "weight_decay", wd)
        for name in ("batch_size", "epochs", "steps_per_epoch"):
            object.__setattr__(self, name, _as_int(getattr(self, name), f"optim.{name}", 1))
        object.__setattr__(
            self, "warmup_steps", _as_int(self.warmup_steps, "optim.warmup_steps", 0)
        )
        if not isinstance(self.cosine, bool):
            raise InputError(f"optim.cosine must be true or false, got {self.cosine!r}")
        if self.grad_clip is not None:
            clip = _as_float(self.grad_clip, "optim.grad_clip")
            if clip <= 0:
                raise InputError(f"optim.grad_clip must be > 0 or null, got {clip}")
            object.__setattr__(self, "grad_clip", clip)

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch


@dataclass(frozen=True)
class UNetRunConfig:
    """Where the run goes, its seed and its resources.

    Attributes:
        out_dir: run folder (``config.yaml``, ``log.csv``, ``last.pt``, ``best.pt``).
        seed: seeds the case split, the initial weights, the patches and the augmentation.
        device: ``cpu``, ``cuda``, ``cuda:1``, ...
        num_threads: torch CPU threads during the run (restored afterwards).
        val_every: validate after every this many epochs (and after the last).
        max_minutes: stop after the epoch during which this much time has passed; null = never.
        init_checkpoint: fine-tune: start from these weights instead of random ones, a
            ``slidesam-unet`` checkpoint file or ``default`` (the shipped model). Its network
            (channels, strides, residual units, norm, label names) must equal
            ``model``'s; the optimiser and the schedule start afresh. null = random weights.
    """

    out_dir: str = "runs/unet"
    seed: int = 0
    device: str = "cpu"
    num_threads: int = 2
    val_every: int = 1
    max_minutes: float | None = None
    init_checkpoint: str | None = None

    def __post_init__(self) -> None:
        if self.init_checkpoint is not None:
            if not isinstance(self.init_checkpoint, str | Path) or not str(self.init_checkpoint):
                raise InputError(
                    "run.init_checkpoint must be a checkpoint path, 'default' or null, got "
                    f"{self.init_checkpoint!r}"
                )
            object.__setattr__(self, "init_checkpoint", str(self.init_checkpoint))
        if not isinstance(self.out_dir, str | Path) or not str(self.out_dir):
            raise InputError(f"run.out_dir must be a folder path, got {self.out_dir!r}")
        object.__setattr__(self, "out_dir", str(self.out_dir))
        object.__setattr__(self, "seed", _as_int(self.seed, "run.seed", 0))
        if not isinstance(self.device, str):
            raise InputError(f"run.device must be a string (cpu, cuda, ...), got {self.device!r}")
        object.__setattr__(self, "num_threads", _as_int(self.num_threads, "run.num_threads", 1))
        object.__setattr__(self, "val_every", _as_int(self.val_every, "run.val_every", 1))
        if self.max_minutes is not None:
            minutes = _as_float(self.max_minutes, "run.max_minutes")
            if minutes <= 0:
                raise InputError(f"run.max_minutes must be > 0 or null, got {minutes}")
            object.__setattr__(self, "max_minutes", minutes)


@dataclass(frozen=True)
class UNetTrainConfig(SectionedConfig):
    """All settings of a U-Net training run (file layout in the module docstring)."""

    KIND = "a U-Net training config"
    COERCE = False  # every section checks its own values (``_as_int``, ``_as_float``...)

    data: UNetDataConfig
    model: UNetConfig = field(default_factory=UNetConfig)
    augment: UNetAugmentConfig = field(default_factory=UNetAugmentConfig)
    loss: UNetLossConfig = field(default_factory=UNetLossConfig)
    optim: UNetOptimConfig = field(default_factory=UNetOptimConfig)
    run: UNetRunConfig = field(default_factory=UNetRunConfig)

    def __post_init__(self) -> None:
        multiple = self.model.patch_multiple
        if any(p % m for p, m in zip(self.train_patch, multiple, strict=True)):
            raise InputError(
                f"augment.patch_size {list(self.train_patch)} must be multiples of the product "
                f"of model.strides {list(multiple)} (z, y, x)"
            )

    @property
    def train_patch(self) -> tuple[int, int, int]:
        """(z, y, x) voxels of the training patches."""
        return self.augment.patch_size or self.model.patch_size


def load_unet_train_config(path: str | Path) -> UNetTrainConfig:
    """Read a YAML config (``yaml.safe_load``); errors name the file and the key."""
    return UNetTrainConfig.load(path)


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CaseFiles:
    """One labelled case of an nnU-Net raw dataset."""

    case_id: str  # "<dataset folder>/<case>", unique across folders
    image: Path
    label: Path


def find_cases(folder: str | Path, *, phase: str | None = None) -> list[CaseFiles]:
    """The labelled cases of an nnU-Net raw dataset folder, sorted by name.

    Args:
        folder: dataset folder holding ``imagesTr/`` and ``labelsTr/`` (and ``dataset.json``,
            whose ``file_ending`` is used if present, else ``.nii.gz``).
        phase: if given and ``dataset.json`` names a ``phase``, they must agree.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: no such dataset folder")
    images, labels = folder / "imagesTr", folder / "labelsTr"
    if not images.is_dir() or not labels.is_dir():
        raise InputError(
            f"{folder}: not an nnU-Net raw dataset (needs imagesTr/ and labelsTr/); "
            "make one with 'slidesam phantom' or pass the Dataset*/ folder itself"
        )
    ending = ".nii.gz"
    meta_file = folder / "dataset.json"
    if meta_file.is_file():
        try:
            meta = json.loads(meta_file.read_text())
        except (OSError, ValueError):
            raise InputError(f"{meta_file}: not readable JSON") from None
        ending = str(meta.get("file_ending", ending))
        found = meta.get("phase")
        if phase is not None and found is not None and found != phase:
            raise InputError(
                f"{folder}: dataset.json says phase {found!r}, but the model is for phase "
                f"{phase!r}; set model.phase or use a {phase} dataset"
            )
    suffix = "_0000" + ending
    cases = []
    for image in sorted(images.glob("*" + suffix)):
        case = image.name[: -len(suffix)]
        label = labels / (case + ending)
        if not label.is_file():
            raise InputError(f"{image}: no label file {label}")
        cases.append(CaseFiles(case_id=f"{folder.name}/{case}", image=image, label=label))
    if not cases:
        raise InputError(f"{images}: no images named <case>_0000{ending}")
    return cases


def split_cases(files: list, val_cases: int, seed: int) -> tuple[list, list]:
    """(training, validation) cases: ``val_cases`` drawn with ``seed``, both in input order."""
    if val_cases >= len(files):
        raise InputError(
            f"data.val_cases is {val_cases} but the data hold only {len(files)} case(s); "
            "leave at least one for training"
        )
    split = np.random.default_rng([seed, 0]).permutation(len(files))
    val = set(int(i) for i in split[:val_cases])
    return (
        [f for i, f in enumerate(files) if i not in val],
        [f for i, f in enumerate(files) if i in val],
    )


@dataclass
class _Case:
    """A training case on its network grid, padded to at least one patch."""

    case_id: str
    image: np.ndarray  # (Z, Y, X) float32, normalised 0..1
    label: np.ndarray  # (Z, Y, X) uint8 channel index
    tumor: np.ndarray  # flat indices of tumor voxels


def _channel_lut(config: UNetConfig) -> np.ndarray:
    """KiTS label value -> output channel (labels the model does not predict -> 0)."""
    lut = np.zeros(256, dtype=np.uint8)
    for channel, value in enumerate(config.label_values):
        lut[value] = channel
    return lut


def _load_train_case(files: CaseFiles, config: UNetConfig, patch: tuple[int, int, int]) -> _Case:
    image = read_image(files.image)
    label = read_label(files.label, reference=image)
    grid = network_geometry(image.geometry, config.target_spacing)
    img = normalize(
        resample(image.array.astype(np.float32), image.geometry, grid, linear=True),
        config.hu_window,
    )
    lab = _channel_lut(config)[resample(label.array, image.geometry, grid, linear=False)]
    pad = [(0, max(0, p - s)) for p, s in zip(patch, img.shape, strict=True)]
    if any(after for _, after in pad):
        img = np.pad(img, pad, mode="edge")
        lab = np.pad(lab, pad, mode="constant")
    tumor = np.flatnonzero(lab.reshape(-1) == config.tumor_channel)
    return _Case(case_id=files.case_id, image=img, label=lab, tumor=tumor)


def _sample_batch(
    cases: list[_Case],
    config: UNetTrainConfig,
    rng: np.random.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 1, *patch) float32 images and (B, 1, *patch) int64 channel labels."""
    patch = np.asarray(config.train_patch)
    aug = config.augment
    images, labels = [], []
    for _ in range(config.optim.batch_size):
        case = cases[int(rng.integers(len(cases)))]
        shape = np.asarray(case.image.shape)
        high = shape - patch
        if case.tumor.size and rng.random() < aug.tumor_fraction:
            center = np.array(np.unravel_index(int(rng.choice(case.tumor)), case.image.shape))
            jitter = rng.integers(-(patch // 4), patch // 4 + 1)
            start = np.clip(center - patch // 2 + jitter, 0, high)
        else:
            start = rng.integers(0, high + 1)
        box = tuple(slice(int(a), int(a + p)) for a, p in zip(start, patch, strict=True))
        img, lab = case.image[box], case.label[box]
        flips = tuple(a for a in range(3) if rng.random() < aug.flip_p)
        if flips:
            img, lab = np.flip(img, flips), np.flip(lab, flips)
        img = img * np.float32(rng.uniform(*aug.scale)) + np.float32(rng.uniform(*aug.shift))
        if aug.noise_std > 0:
            img = img + rng.normal(0.0, aug.noise_std, size=img.shape).astype(np.float32)
        images.append(np.ascontiguousarray(img, dtype=np.float32))
        labels.append(np.ascontiguousarray(lab, dtype=np.int64))
    return torch.from_numpy(np.stack(images)[:, None]), torch.from_numpy(np.stack(labels)[:, None])


def _lr_at(step: int, optim: UNetOptimConfig) -> float:
    """Learning rate of optimiser step ``step`` (0-based)."""
    if optim.warmup_steps and step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    if not optim.cosine:
        return optim.lr
    done = (step - optim.warmup_steps) / max(1, optim.total_steps - optim.warmup_steps)
    return optim.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, done)))


def _validate(stage: UNetStage1, cases: list[tuple[str, Volume, Volume]]) -> dict[str, Any]:
    """Tumor and kidney Dice of each held-out case (the deployed predict path)."""
    tumor, kidney = [], []
    for _, image, label in cases:
        pred = stage.predict(image).array
        gt = label.array
        tumor.append(binary_scores(pred == 2, gt == 2, spacing=image.spacing).dice)
        kidney.append(binary_scores(pred > 0, gt > 0, spacing=image.spacing).dice)
    return {
        "tumor_dice": float(np.mean(tumor)),
        "kidney_dice": float(np.mean(kidney)),
        "tumor_dice_per_case": [round(d, 4) for d in tumor],
    }


# ----------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------
def train_unet(config: UNetTrainConfig, *, progress: bool = True) -> Path:
    """Train a U-Net as ``config`` says and return the path of ``best.pt``.

    Args:
        config: the run's settings (see the module docstring).
        progress: show a tqdm bar over steps with the running loss and validation Dice.

    Returns:
        ``<run.out_dir>/best.pt`` (best mean validation tumor Dice; the last epoch when
        ``data.val_cases`` is 0). ``last.pt``, ``log.csv`` and ``config.yaml`` sit next to it.
    """
    from monai.losses import DiceCELoss

    if not isinstance(config, UNetTrainConfig):
        raise TypeError(f"config must be a UNetTrainConfig, got {type(config).__name__}")
    mcfg, run, optim = config.model, config.run, config.optim
    try:
        device = torch.device(run.device)
    except RuntimeError:
        raise InputError(f"run.device {run.device!r} is not a torch device") from None
    files = [c for folder in config.data.folders for c in find_cases(folder, phase=mcfg.phase)]
    train_files, val_files = split_cases(files, config.data.val_cases, run.seed)
    if mcfg.mirror_axes and config.augment.flip_p == 0:
        log.warning(
            "model.mirror_axes %s asks for test-time mirroring of a model trained without flips "
            "(augment.flip_p 0): mirrored inputs are new to it",
            list(mcfg.mirror_axes),
        )
    # checked before anything is written or loaded: a wrong init checkpoint fails at once
    init = None if run.init_checkpoint is None else _init_weights(mcfg, run.init_checkpoint)

    out = Path(run.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config.save(out / "config.yaml")
    log_path = out / "log.csv"
    columns = [
        "epoch",
        "step",
        "lr",
        "train_loss",
        "val_tumor_dice",
        "val_kidney_dice",
        "seconds",
        "cpu_seconds",
    ]

    t_start, cpu_start = time.perf_counter(), time.process_time()
    with torch_threads(run.num_threads):
        train_cases = [
            _load_train_case(f, mcfg, config.train_patch)
            for f in tqdm(train_files, desc="loading", unit="case", disable=not progress)
        ]
        val_cases = []
        for f in val_files:
            image = read_image(f.image)
            val_cases.append((f.case_id, image, read_label(f.label, reference=image)))
        if not any(c.tumor.size for c in train_cases):
            log.warning("no tumor voxel in any training case: the tumor class cannot be learned")
        log.info(
            "%d training and %d validation cases loaded in %.1f s",
            len(train_cases),
            len(val_cases),
            time.perf_counter() - t_start,
        )

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(run.seed)
            model = build_unet(mcfg)
        if init is not None:
            model.load_state_dict(init)
        model = model.to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=optim.lr, weight_decay=optim.weight_decay)
        loss_fn = DiceCELoss(
            to_onehot_y=True,
            softmax=True,
            batch=config.loss.batch_dice,
            lambda_dice=config.loss.lambda_dice,
            lambda_ce=config.loss.lambda_ce,
        )
        rng = np.random.default_rng([run.seed, 1])
        # one pass: validating with model.mirror_axes would cost 2 ** len(mirror_axes) passes
        stage = UNetStage1(model, mcfg, device=run.device, name="validation", mirror_axes=())

        extra_base = {
            "train_config": config.to_dict(),
            "train_cases": [f.case_id for f in train_files],
            "val_cases": [f.case_id for f in val_files],
        }
        best_dice, best_epoch = -1.0, 0
        rows: list[dict] = []
        step = 0
        bar = tqdm(total=optim.total_steps, desc="unet-train", unit="step", disable=not progress)
        try:
            for epoch in range(1, optim.epochs + 1):
                model.train()
                losses = []
                for _ in range(optim.steps_per_epoch):
                    lr = _lr_at(step, optim)
                    for group in opt.param_groups:
                        group["lr"] = lr
                    x, y = _sample_batch(train_cases, config, rng)
                    opt.zero_grad(set_to_none=True)
                    loss = loss_fn(model(x.to(device)), y.to(device))
                    if not torch.isfinite(loss):
                        raise RuntimeError(f"loss became {loss.item()} at step {step}")
                    loss.backward()
                    if optim.grad_clip is not None:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
                    opt.step()
                    losses.append(float(loss.detach()))
                    step += 1
                    bar.update()
                    bar.set_postfix(epoch=epoch, loss=f"{np.mean(losses[-10:]):.3f}")
                elapsed = time.perf_counter() - t_start
                out_of_time = run.max_minutes is not None and elapsed > 60 * run.max_minutes
                last = epoch == optim.epochs or out_of_time
                row = {
                    "epoch": epoch,
                    "step": step,
                    "lr": round(lr, 8),
                    "train_loss": round(float(np.mean(losses)), 5),
                    "val_tumor_dice": "",
                    "val_kidney_dice": "",
                }
                scores = None
                if val_cases and (epoch % run.val_every == 0 or last):
                    scores = _validate(stage, val_cases)
                    model.train()
                    row["val_tumor_dice"] = round(scores["tumor_dice"], 4)
                    row["val_kidney_dice"] = round(scores["kidney_dice"], 4)
                    bar.set_postfix(epoch=epoch, loss=row["train_loss"], val=row["val_tumor_dice"])
                row["seconds"] = round(time.perf_counter() - t_start, 1)
                row["cpu_seconds"] = round(time.process_time() - cpu_start, 1)
                rows.append(row)
                _write_log(log_path, columns, rows)
                log.info(
                    "epoch %d: loss %.4f, val tumor Dice %s, kidney Dice %s, %.0f s",
                    epoch,
                    row["train_loss"],
                    "-" if scores is None else f"{scores['tumor_dice']:.4f}",
                    "-" if scores is None else f"{scores['kidney_dice']:.4f}",
                    row["seconds"],
                )
                extra = {
                    **extra_base,
                    "epoch": epoch,
                    "step": step,
                    "seconds": row["seconds"],
                    "cpu_seconds": row["cpu_seconds"],
                    "train_loss": row["train_loss"],
                    "validation": scores,
                    "log": rows,
                }
                save_unet_checkpoint(model, mcfg, out / "last.pt", extra=extra)
                improved = scores is not None and scores["tumor_dice"] > best_dice
                if improved or not val_cases:
                    if scores is not None:
                        best_dice, best_epoch = scores["tumor_dice"], epoch
                    save_unet_checkpoint(model, mcfg, out / "best.pt", extra=extra)
                if out_of_time and not epoch == optim.epochs:
                    log.warning(
                        "run.max_minutes (%.1f) reached: stopped after epoch %d of %d",
                        run.max_minutes,
                        epoch,
                        optim.epochs,
                    )
                    break
        finally:
            bar.close()
    total = time.perf_counter() - t_start
    if val_cases:
        log.info(
            "done in %.1f min: best validation tumor Dice %.4f at epoch %d -> %s",
            total / 60,
            best_dice,
            best_epoch,
            out / "best.pt",
        )
    return out / "best.pt"


_NETWORK_FIELDS = ("channels", "strides", "num_res_units", "norm", "label_names")


def _init_weights(config: UNetConfig, source: str) -> dict[str, torch.Tensor]:
    """The state dict of checkpoint ``source`` (a path or ``default``) for ``config``'s network.

    Raises:
        InputError: an unreadable checkpoint, or one whose network differs from ``config``'s
            (the message names each differing field with both values).
    """
    if source == "default":
        ckpt, where = load_default_unet_checkpoint(), "the shipped default U-Net"
    else:
        if not Path(source).is_file():
            raise InputError(f"run.init_checkpoint {source}: no such file")
        ckpt, where = load_unet_checkpoint(source), f"run.init_checkpoint {source}"
    theirs, ours = ckpt.config.to_dict(), config.to_dict()
    differ = [
        f"{k}: {theirs[k]} there, {ours[k]} here" for k in _NETWORK_FIELDS if theirs[k] != ours[k]
    ]
    if differ:
        raise InputError(
            f"{where} has another network than this run's model section ("
            + "; ".join(differ)
            + "); copy its model section into the config to fine-tune it"
        )
    for key in ("target_spacing", "hu_window", "phase"):
        if theirs[key] != ours[key]:
            log.warning(
                "fine-tuning %s with model.%s %s (it was trained with %s)",
                where,
                key,
                ours[key],
                theirs[key],
            )
    log.info("initial weights from %s", where)
    return ckpt.model.state_dict()


def _write_log(path: Path, columns: list[str], rows: list[dict]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
