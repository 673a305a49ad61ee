"""``TrainConfig``: every setting of a ``slidesam train`` run, read from YAML and saved with it.

A config file has seven sections, each optional (missing keys take the defaults below)::

    data:    {folders: [OUT/Dataset001], weights: null, classes: null, image_size: null,
              samples_per_epoch: null, class_weights: null}
    model:   {variant: tiny, init_checkpoint: null, lora_rank: 8, trainable: lora,
              roi_context: null, grad_checkpointing: false}
    loss:    LossConfig fields     (slidesam.training.losses)
    prompts: PromptSimConfig fields (slidesam.training.prompt_sim)
    augment: AugmentConfig fields  (slidesam.training.windows)
    optim:   {lr: 2.0e-4, betas: [0.9, 0.999], weight_decay: 0.1, batch_size: 2, epochs: 100,
              warmup_epochs: 0, cosine: false, grad_clip: 1.0, amp: none}
    run:     {out_dir: runs/train, seed: 0, num_workers: 0, val_fraction: 0.1,
              val_folders: [], save_every: 0, device: cpu, tensorboard: false,
              val_volumes: [], val_volumes_every: 1, val_volumes_max: 4,
              select_by: window_dice}

Unknown sections or keys are an ``InputError`` that names them (with their section); a value of
the wrong type is an ``InputError`` naming the key and the expected type. Relative paths are
relative to the working directory. Torch-free: reading a config imports no torch.

Under ``torchrun`` (``slidesam.training.distributed``) the same file configures every process;
``optim.batch_size`` is per process, so a step sees ``batch_size x WORLD_SIZE`` samples.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from slidesam.core.configfile import SectionedConfig
from slidesam.core.errors import InputError
from slidesam.modeling.build import TRAINABLE_PRESETS
from slidesam.training.losses import LossConfig
from slidesam.training.prompt_sim import PromptSimConfig
from slidesam.training.windows import AugmentConfig

__all__ = [
    "DataConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "TrainConfig",
    "load_train_config",
]

_TRAINABLE = tuple(TRAINABLE_PRESETS)
AMP_MODES = ("none", "bf16", "fp16")
SELECT_BY = ("window_dice", "dice3d")


@dataclass(frozen=True)
class DataConfig:
    """Training windows.

    Attributes:
        folders: prepared dataset folders (``OUT/<dataset>`` of ``slidesam prepare``).
        weights: mixing weight of each folder (a batch draws folder d with probability
            ``w_d / sum(w)``); None = in proportion to their numbers of samples.
        classes: keep only targets of these class names; None = all.
        image_size: side of the windows fed to the model; None = the model's input size
            (the only value allowed: prompts are in model-input pixels). Windows prepared at
            another size are resized on reading.
        samples_per_epoch: samples drawn per epoch; None = the number of training samples.
        class_weights: class name -> sampling weight inside each folder (a sample of class c
            is drawn ``class_weights[c]`` times as often as under uniform drawing; classes not
            named weigh 1), e.g. ``{tumor: 3}`` when the tumor is what matters and its windows
            are a minority. The folders' mix (``weights``) stays as it is. None = uniform.
    """

    folders: tuple[str, ...] = ()
    weights: tuple[float, ...] | None = None
    classes: tuple[str, ...] | None = None
    image_size: int | None = None
    samples_per_epoch: int | None = None
    class_weights: dict[str, float] | None = None

    def __post_init__(self) -> None:
        if not self.folders:
            raise InputError("data.folders is empty: list the prepared dataset folder(s)")
        if self.weights is not None and len(self.weights) != len(self.folders):
            raise InputError(
                f"data.weights has {len(self.weights)} value(s) for {len(self.folders)} folder(s)"
            )
        if self.weights is not None and any(not w > 0 for w in self.weights):
            raise InputError(f"data.weights must be positive, got {list(self.weights)}")
        if self.class_weights is not None and any(
            isinstance(w, bool) or not isinstance(w, int | float) or not 0 < w < float("inf")
            for w in self.class_weights.values()
        ):
            raise InputError(
                f"data.class_weights must be positive numbers, got {dict(self.class_weights)}"
            )
        if self.samples_per_epoch is not None and self.samples_per_epoch < 1:
            raise InputError(f"data.samples_per_epoch must be >= 1, got {self.samples_per_epoch}")


@dataclass(frozen=True)
class ModelConfig:
    """The network and what of it trains.

    Attributes:
        variant: registry name (``slidesam.core.config.VARIANTS``), e.g. ``tiny``, ``vit_b``.
        init_checkpoint: weights to fine-tune from (official SAM, released Slide-SAM or ours);
            None = from scratch (seeded by ``run.seed``).
        lora_rank: LoRA rank on q and v of every encoder block (0 = none); a checkpoint of ours
            keeps its own rank.
        trainable: preset of ``slidesam.modeling.build.TRAINABLE_PRESETS``: ``lora`` (LoRA +
            patch embedding + prompt encoder + decoder, the paper's), ``decoder``,
            ``decoder+prompt`` or ``full``.
        roi_context: the model's field of view (``SamConfig.roi_context``): 0 = whole slices,
            ``c > 0`` = a square crop of ``c`` x the prompt box around it (zoomed models);
            None = the variant's (0) or the checkpoint's own.
        grad_checkpointing: recompute the image encoder's block activations in the backward
            pass (``torch.utils.checkpoint``, non-reentrant) instead of storing them: the same
            loss and gradients, much less activation memory, for one more encoder forward of
            compute per step (``bench/train_step.py`` measures both). Only matters when
            gradients flow through the encoder (presets ``lora`` and ``full``).
    """

    variant: str = "tiny"
    init_checkpoint: str | None = None
    lora_rank: int = 8
    trainable: str = "lora"
    roi_context: float | None = None
    grad_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.trainable not in _TRAINABLE:
            raise InputError(
                f"model.trainable {self.trainable!r} is not a preset; use one of "
                + ", ".join(_TRAINABLE)
            )
        if self.lora_rank < 0:
            raise InputError(f"model.lora_rank must be >= 0, got {self.lora_rank}")
        if self.roi_context is not None and not (
            self.roi_context == 0 or 1 <= self.roi_context <= 20
        ):
            raise InputError(
                f"model.roi_context must be 0 or lie in [1, 20], got {self.roi_context}"
            )
        if self.trainable == "lora" and self.lora_rank == 0 and self.init_checkpoint is None:
            raise InputError("model.trainable 'lora' needs model.lora_rank > 0")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW and its schedule (defaults: the Slide-SAM/SSA fine-tuning recipe).

    Attributes:
        lr: peak learning rate.
        betas, weight_decay: AdamW's (weight decay on every trained parameter).
        batch_size: samples per step *per process*: under ``torchrun`` with N processes a
            step averages the gradients of N x batch_size samples.
        epochs: total epochs of the run.
        warmup_epochs: linear warm-up from ``lr / warmup_steps`` to ``lr`` over this many epochs
            (may be fractional); 0 = none.
        cosine: cosine decay from ``lr`` to 0 over the epochs after the warm-up; else constant.
        grad_clip: clip the gradients' global L2 norm to this; None = no clipping.
        amp: mixed precision of the forward pass on a CUDA device: ``none`` (fp32), ``bf16``
            (autocast) or ``fp16`` (autocast and a dynamic loss scale, ``torch.amp.GradScaler``).
            The loss, the optimiser state and the weights stay fp32. CPU runs need ``none``.
    """

    lr: float = 2e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.1
    batch_size: int = 2
    epochs: int = 100
    warmup_epochs: float = 0.0
    cosine: bool = False
    grad_clip: float | None = 1.0
    amp: str = "none"

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise InputError(f"optim.lr must be > 0, got {self.lr}")
        if not all(0 <= b < 1 for b in self.betas):
            raise InputError(f"optim.betas must lie in [0, 1), got {list(self.betas)}")
        if self.weight_decay < 0:
            raise InputError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if self.batch_size < 1 or self.epochs < 1:
            raise InputError("optim.batch_size and optim.epochs must be >= 1")
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise InputError(
                f"optim.warmup_epochs must lie in [0, epochs={self.epochs}], got "
                f"{self.warmup_epochs}"
            )
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise InputError(f"optim.grad_clip must be > 0 or null, got {self.grad_clip}")
        if self.amp not in AMP_MODES:
            raise InputError(f"optim.amp must be one of {', '.join(AMP_MODES)}, got {self.amp!r}")


@dataclass(frozen=True)
class RunConfig:
    """Where the run goes and how it is seeded and validated.

    Attributes:
        out_dir: run folder: ``config.yaml``, ``log.csv``, ``last.pt``, ``best.pt`` (and
            ``tensorboard/``).
        seed: seeds the model's initial weights, the sampler, augmentation and prompts.
        num_workers: DataLoader worker processes (results do not depend on it).
        val_fraction: fraction of the *cases* of ``data.folders`` held out for validation
            (at least one case when > 0); ignored when ``val_folders`` is given.
        val_folders: prepared folders used for validation instead of a held-out fraction.
        save_every: also keep ``epoch_NNNN.pt`` every this many epochs; 0 = never.
        device: ``cpu``, ``cuda``, ``cuda:1``, ...; under ``torchrun``, ``cuda`` means
            ``cuda:LOCAL_RANK`` for each process.
        tensorboard: also write the logged scalars to ``out_dir/tensorboard`` (needs the
            ``tensorboard`` package; without it a warning and the run goes on).
        val_volumes: held-out volumes for the 3D Dice by propagation: an nnU-Net raw dataset
            folder (``imagesTr``/``labelsTr``, classes from its ``dataset.json``), or an
            ``[image, label]`` pair of files (classes from the prepared ``data.folders``), or a
            list of these. Empty = no 3D validation.
        val_volumes_every: run the 3D validation every this many epochs (and after the last).
        val_volumes_max: use at most this many volumes: the first ones, in the order of
            ``val_volumes`` (a folder's cases sorted by name).
        select_by: the metric that picks ``best.pt``: ``window_dice`` (the per-epoch window
            Dice; without a validation set, the lowest training loss) or ``dice3d`` (the mean
            over classes of the 3D Dice; needs ``val_volumes``).
    """

    out_dir: str = "runs/train"
    seed: int = 0
    num_workers: int = 0
    val_fraction: float = 0.1
    val_folders: tuple[str, ...] = ()
    save_every: int = 0
    device: str = "cpu"
    tensorboard: bool = False
    val_volumes: tuple[str | tuple[str, str], ...] = ()
    val_volumes_every: int = 1
    val_volumes_max: int = 4
    select_by: str = "window_dice"

    def __post_init__(self) -> None:
        if not 0 <= self.val_fraction < 1:
            raise InputError(f"run.val_fraction must lie in [0, 1), got {self.val_fraction}")
        if self.num_workers < 0 or self.save_every < 0:
            raise InputError("run.num_workers and run.save_every must be >= 0")
        if self.val_volumes_every < 1 or self.val_volumes_max < 1:
            raise InputError(
                "run.val_volumes_every and run.val_volumes_max must be >= 1, got "
                f"{self.val_volumes_every} and {self.val_volumes_max}"
            )
        if self.select_by not in SELECT_BY:
            raise InputError(
                f"run.select_by must be one of {', '.join(SELECT_BY)}, got {self.select_by!r}"
            )
        if self.select_by == "dice3d" and not self.val_volumes:
            raise InputError("run.select_by 'dice3d' needs run.val_volumes (held-out volumes)")


@dataclass(frozen=True)
class TrainConfig(SectionedConfig):
    """All settings of a training run (see the module docstring for the file layout)."""

    KIND = "a training config"

    data: DataConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    prompts: PromptSimConfig = field(default_factory=PromptSimConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        if self.optim.amp != "none" and self.run.device.split(":")[0] != "cuda":
            raise InputError(
                f"optim.amp {self.optim.amp!r} needs a CUDA device, but run.device is "
                f"{self.run.device!r}; use optim.amp: none"
            )


def load_train_config(path: str | Path) -> TrainConfig:
    """Read a YAML training config (``yaml.safe_load``); errors name the file and the key."""
    return TrainConfig.load(path)
