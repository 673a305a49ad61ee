"""M-SAM run settings: typed dataclass sections, read from YAML with unknown-key errors.

Torch-free. File layout (every section optional except ``data``)::

    data:       {folders: [DIR, ...], val_cases: 2, target_labels: [2]}
    preprocess: {spacing: [1.5, 1.5, 1.5], foreground_threshold: 0.0}
    model:      {variant: tiny, options: {}, init: null, trainable: msam}
    refine:     {train_iterations: 11, val_iterations: 3, accumulate_clicks: true,
                 max_shift: 8, flip_p: 0.5}
    optim:      {lr: 0.0008, low_lr_scale: 0.1, weight_decay: 0.1, batch_size: 2, epochs: 20,
                 steps_per_epoch: 20, milestones: [0.6, 0.9], gamma: 0.1, grad_clip: 1.0}
    run:        {out_dir: runs/msam, seed: 0, device: cpu, num_threads: 1, val_every: 1,
                 resume: false, max_minutes: null}

``data.folders`` are nnU-Net v2 raw datasets (``imagesTr/<case>_0000.nii.gz``,
``labelsTr/<case>.nii.gz``), e.g. written by ``slidesam phantom``; ``target_labels`` are the label
values that form the object (KiTS: 2 = tumor). Defaults follow the seed (lr 8e-4, x0.1 for the
prompt encoder and decoder, weight decay 0.1, multi-step decay at 60 % and 90 % of the epochs as
its 120/180 of 200, 11 clicks per training sample).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from slidesam.core.configfile import SectionedConfig
from slidesam.core.errors import InputError

__all__ = [
    "DataConfig",
    "MSamTrainConfig",
    "ModelSection",
    "OptimConfig",
    "PreprocessConfig",
    "RefineConfig",
    "RunConfig",
    "load_msam_config",
]


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise InputError(msg)


@dataclass(frozen=True)
class PreprocessConfig:
    """How a volume reaches the network (saved in every checkpoint; prediction follows it).

    Attributes:
        spacing: working voxel size (z, y, x) mm (the image is resampled to it, linear).
        foreground_threshold: z-normalisation uses the mean and std of voxels above this value
            (the seed's ``x > 0``: soft tissue in HU), then applies them to all voxels.
    """

    spacing: tuple[float, float, float] = (1.5, 1.5, 1.5)
    foreground_threshold: float = 0.0

    def __post_init__(self) -> None:
        spacing = tuple(float(s) for s in self.spacing)
        _check(len(spacing) == 3 and min(spacing) > 0, f"spacing must be 3 values > 0: {spacing}")
        object.__setattr__(self, "spacing", spacing)
        object.__setattr__(self, "foreground_threshold", float(self.foreground_threshold))


@dataclass(frozen=True)
class DataConfig:
    folders: tuple[str, ...] = ()
    val_cases: int = 2
    target_labels: tuple[int, ...] = (2,)

    def __post_init__(self) -> None:
        object.__setattr__(self, "folders", tuple(str(f) for f in self.folders))
        object.__setattr__(self, "target_labels", tuple(int(v) for v in self.target_labels))
        _check(bool(self.folders), "data.folders must list at least one dataset folder")
        _check(self.val_cases >= 0, "data.val_cases must be >= 0")
        _check(bool(self.target_labels), "data.target_labels must not be empty")


@dataclass(frozen=True)
class ModelSection:
    """``variant`` from ``VARIANTS3D`` with ``options`` overriding its fields; ``init``: a
    SAM-Med3D (or M-SAM) checkpoint to start from; ``trainable``: a ``TRAINABLE_PRESETS_3D``."""

    variant: str = "tiny"
    options: dict = field(default_factory=dict)
    init: str | None = None
    trainable: str = "msam"


@dataclass(frozen=True)
class RefineConfig:
    """Iterative refinement. ``train_iterations``: decoder passes per training sample, each
    with one new click from the previous error region (the seed: 11); ``val_iterations``: passes
    at validation (one centre click, then mask-only refinement); ``accumulate_clicks``: feed all
    clicks so far (else only the newest); ``max_shift``: random crop offset (voxels) around the
    object's centre; ``flip_p``: flip probability per axis."""

    train_iterations: int = 11
    val_iterations: int = 3
    accumulate_clicks: bool = True
    max_shift: int = 8
    flip_p: float = 0.5

    def __post_init__(self) -> None:
        _check(self.train_iterations >= 1, "refine.train_iterations must be >= 1")
        _check(self.val_iterations >= 1, "refine.val_iterations must be >= 1")
        _check(self.max_shift >= 0, "refine.max_shift must be >= 0")
        _check(0 <= self.flip_p <= 1, "refine.flip_p must lie in [0, 1]")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 8e-4
    low_lr_scale: float = 0.1
    weight_decay: float = 0.1
    batch_size: int = 2
    epochs: int = 20
    steps_per_epoch: int = 20
    milestones: tuple[float, ...] = (0.6, 0.9)
    gamma: float = 0.1
    grad_clip: float | None = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "milestones", tuple(float(m) for m in self.milestones))
        _check(self.lr > 0 and self.low_lr_scale > 0, "optim.lr and low_lr_scale must be > 0")
        _check(self.batch_size >= 1 and self.epochs >= 1, "batch_size and epochs must be >= 1")
        _check(self.steps_per_epoch >= 1, "optim.steps_per_epoch must be >= 1")
        _check(all(0 < m <= 1 for m in self.milestones), "milestones are fractions in (0, 1]")

    def milestone_epochs(self) -> list[int]:
        return sorted({max(1, round(m * self.epochs)) for m in self.milestones})


@dataclass(frozen=True)
class RunConfig:
    out_dir: str = "runs/msam"
    seed: int = 0
    device: str = "cpu"
    num_threads: int = 1
    val_every: int = 1
    resume: bool = False
    max_minutes: float | None = None

    def __post_init__(self) -> None:
        _check(self.num_threads >= 1 and self.val_every >= 1, "num_threads, val_every >= 1")


@dataclass(frozen=True)
class MSamTrainConfig(SectionedConfig):
    """All settings of an M-SAM training run (layout in the module docstring)."""

    KIND = "an M-SAM config"

    data: DataConfig
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    model: ModelSection = field(default_factory=ModelSection)
    refine: RefineConfig = field(default_factory=RefineConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)


def load_msam_config(path: str | Path) -> MSamTrainConfig:
    """Read a YAML config (``yaml.safe_load``); errors name the file and the key."""
    return MSamTrainConfig.load(path)
