"""TransferSAM settings: typed, frozen, JSON/YAML round-trippable. Torch-free.

- :class:`EncoderRef` names the frozen image encoder (and the prompt encoder and initial mask
  decoder that come with it): an official SAM checkpoint + variant, or a seeded random tiny
  encoder that is rebuilt from ``(variant, seed)`` alone and checked by a fingerprint.
- :class:`EmbedConfig`: which slices go into the cache and how they are turned into pixels.
- :class:`BoxConfig`: the ROI prompt, the kidney boxes at inference and the random expansion of
  training boxes. Pixel lengths are given "at 512 px width" (the seed's KiTS frame) and scaled by
  ``width / 512`` for other slice sizes.
- :class:`DecoderTrainConfig`: one decoder's training run (YAML, unknown keys are errors).
- :class:`CascadeConfig`: what a trained cascade needs at inference (saved in its folder).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from slidesam.core.configfile import from_mapping, plain, read_yaml
from slidesam.core.errors import InputError

__all__ = [
    "DECODERS",
    "BoxConfig",
    "CascadeConfig",
    "DecoderTrainConfig",
    "EmbedConfig",
    "EncoderRef",
    "load_train_config",
]

#: the three decoders of the cascade and the KiTS label values each predicts
DECODERS: dict[str, tuple[int, ...]] = {"roi": (1, 2, 3), "tumor": (2,), "cyst": (3,)}


def check_decoder_name(name: str) -> str:
    if name not in DECODERS:
        raise InputError(f"unknown decoder {name!r}; choose one of {', '.join(DECODERS)}")
    return name


def _number(value, name: str, *, low: float | None = None, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        if isinstance(value, str):  # YAML reads 5e-5 as a string
            try:
                value = float(value)
            except ValueError:
                raise InputError(f"{name} must be a number, got {value!r}") from None
        else:
            raise InputError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or (low is not None and value < low):
        raise InputError(f"{name} must be >= {low}, got {value}")
    if high is not None and value > high:
        raise InputError(f"{name} must be <= {high}, got {value}")
    return value


def _integer(value, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InputError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class EncoderRef:
    """The frozen SAM the cascade is built on.

    Attributes:
        variant: registry name (``vit_b``, ``vit_l``, ``vit_h``, ``tiny``, ``tiny_64``).
        checkpoint: path of an official SAM checkpoint; ``None`` = a random encoder built with
            ``torch.manual_seed(seed)`` (tests and benchmarks only: it has learned nothing).
        seed: seed of the random encoder (ignored with a checkpoint).
        fingerprint: SHA-256 of the image and prompt encoder weights, filled in when the cache
            is made; a rebuilt encoder that differs (another checkpoint file, another torch
            version's random init) is refused instead of silently mixing features.
    """

    variant: str = "vit_b"
    checkpoint: str | None = None
    seed: int = 0
    fingerprint: str | None = None

    def __post_init__(self) -> None:
        from slidesam.core.config import VARIANTS

        if self.variant not in VARIANTS:
            raise InputError(
                f"unknown encoder variant {self.variant!r}; choose one of {', '.join(VARIANTS)}"
            )
        _integer(self.seed, "encoder seed", 0)
        if self.checkpoint is not None:
            object.__setattr__(self, "checkpoint", str(self.checkpoint))

    def describe(self) -> str:
        if self.checkpoint is None:
            return f"random {self.variant} encoder (seed {self.seed})"
        return f"{self.variant} from {self.checkpoint}"

    def same_encoder(self, other: EncoderRef) -> bool:
        """Same weights: equal fingerprints when both have one, else equal recipes."""
        if self.fingerprint and other.fingerprint:
            return self.fingerprint == other.fingerprint
        return (self.variant, self.checkpoint, self.seed) == (
            other.variant,
            other.checkpoint,
            other.seed,
        )

    def to_dict(self) -> dict:
        return plain(asdict(self))

    @classmethod
    def from_dict(cls, d: dict) -> EncoderRef:
        return from_mapping(cls, d, "encoder reference")


_CONTRAST_KEYS = ("contrast_copies", "contrast_factor", "brightness_shift")


@dataclass(frozen=True)
class EmbedConfig:
    """Which slices are cached and how a slice becomes the encoder's input.

    Attributes:
        window: CT window (low, high) in HU, mapped linearly to 0..255 (clipped outside).
            The seed's code instead takes ``|HU|`` saturated at 255 (``cv2.convertScaleAbs``):
            air (-1000) becomes 255 like bone, and fat (-100) looks like soft tissue (+100).
        max_slices: cap of cached slices per case (positives + blanks).
        blank_ratio: blank (label 0 only) slices cached per positive slice (1 = balanced).
        seed: seed of the blank-slice draw (per case: ``[seed, case number]``) and of the
            contrast jitter (per case and slice: ``[seed, crc32(case id), slice number]``).
        contrast_copies: contrast-jittered copies embedded per cached slice besides the
            original (0 = none; training draws the original or a copy per sample). The cache
            grows by a factor ``1 + contrast_copies`` and embedding takes as much longer.
        contrast_factor: range (low, high) of the contrast factor ``c``, drawn uniformly per
            copy. A copy's windowed grey value ``g`` (0..255) becomes
            ``clip(mean + c * (g - mean) + b, 0, 255)``, rounded (``mean``: the slice's mean
            grey value).
        brightness_shift: the shift ``b`` is drawn uniformly from ``[-shift, shift]``, in the
            windowed 0..255 grey units.
    """

    window: tuple[float, float] = (-200.0, 400.0)
    max_slices: int = 400
    blank_ratio: float = 1.0
    seed: int = 0
    contrast_copies: int = 0
    contrast_factor: tuple[float, float] = (0.75, 1.25)
    brightness_shift: float = 20.0

    def __post_init__(self) -> None:
        if len(self.window) != 2:
            raise InputError(f"window must be (low, high) in HU, got {self.window!r}")
        lo, hi = (_number(v, "window") for v in self.window)
        if not hi > lo:
            raise InputError(f"window must have low < high, got {self.window!r}")
        object.__setattr__(self, "window", (lo, hi))
        _integer(self.max_slices, "max_slices", 1)
        object.__setattr__(self, "blank_ratio", _number(self.blank_ratio, "blank_ratio", low=0))
        _integer(self.seed, "seed", 0)
        _integer(self.contrast_copies, "contrast_copies", 0)
        if len(self.contrast_factor) != 2:
            raise InputError(f"contrast_factor must be (low, high), got {self.contrast_factor!r}")
        lo, hi = (_number(v, "contrast_factor", low=0.01, high=100.0) for v in self.contrast_factor)
        if lo > hi:
            raise InputError(f"contrast_factor must have low <= high, got {self.contrast_factor!r}")
        object.__setattr__(self, "contrast_factor", (lo, hi))
        shift = _number(self.brightness_shift, "brightness_shift", low=0.0, high=255.0)
        object.__setattr__(self, "brightness_shift", shift)

    def differences(self, other: EmbedConfig) -> dict[str, tuple]:
        """``{setting: (self's value, other's value)}`` of the settings that differ and matter:
        the jitter range only when either side has contrast copies."""
        a, b = plain(asdict(self)), plain(asdict(other))
        if not (self.contrast_copies or other.contrast_copies):
            for k in _CONTRAST_KEYS[1:]:
                del a[k], b[k]
        return {k: (a[k], b[k]) for k in a if a[k] != b[k]}

    def to_dict(self) -> dict:
        """The settings; the contrast keys only with copies (``contrast_copies`` > 0), so a
        cache without copies is described exactly as before contrast copies existed."""
        d = plain(asdict(self))
        if not self.contrast_copies:
            for k in _CONTRAST_KEYS:
                del d[k]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> EmbedConfig:
        return from_mapping(cls, d, "embed config")


@dataclass(frozen=True)
class BoxConfig:
    """Box prompts. Lengths in pixels at 512 px slice width, scaled by ``width / 512``.

    Attributes:
        roi_box: the ROI decoder's fixed box as fractions (x0, y0, x1, y1) of the slice width
            and height; the seed's ``[0, 100, 512, 450]`` at 512 px.
        min_component_px: ROI components smaller than this (area, scaled by ``(width/512)^2``)
            are removed before boxes are drawn (seed: 5).
        split_extent_px: the occupied x-extent must reach this to consider two kidneys (100).
        split_gap_px: ... and the largest empty x-gap must reach this (40); the split is at the
            gap's middle.
        expand_fraction: training boxes grow on each side by ``|N(0, f * extent)|`` (0.1) ...
        expand_cap_px: ... capped at this many pixels (20). At inference each side grows by the
            expected value ``f * extent * sqrt(2 / pi)``, same cap (deterministic).
        roi_threshold: logit above which a pixel is ROI (seed: 0).
    """

    roi_box: tuple[float, float, float, float] = (0.0, 100 / 512, 1.0, 450 / 512)
    min_component_px: float = 5.0
    split_extent_px: float = 100.0
    split_gap_px: float = 40.0
    expand_fraction: float = 0.1
    expand_cap_px: float = 20.0
    roi_threshold: float = 0.0

    def __post_init__(self) -> None:
        if len(self.roi_box) != 4:
            raise InputError(f"roi_box must be 4 fractions (x0, y0, x1, y1), got {self.roi_box!r}")
        box = tuple(_number(v, "roi_box", low=0.0, high=1.0) for v in self.roi_box)
        if not (box[2] > box[0] and box[3] > box[1]):
            raise InputError(f"roi_box must have x0 < x1 and y0 < y1, got {self.roi_box!r}")
        object.__setattr__(self, "roi_box", box)
        for name in (
            "min_component_px",
            "split_extent_px",
            "split_gap_px",
            "expand_fraction",
            "expand_cap_px",
        ):
            object.__setattr__(self, name, _number(getattr(self, name), name, low=0.0))
        object.__setattr__(self, "roi_threshold", _number(self.roi_threshold, "roi_threshold"))

    def to_dict(self) -> dict:
        return plain(asdict(self))

    @classmethod
    def from_dict(cls, d: dict) -> BoxConfig:
        return from_mapping(cls, d, "box config")


@dataclass(frozen=True)
class DecoderTrainConfig:
    """One decoder's training run (seed defaults; the tests and the bench shorten it).

    Attributes:
        steps: optimiser steps.
        batch_size: (slice, box) samples per step (seed: 64-160 slices).
        lr: peak learning rate after warm-up (seed 5e-5), then cosine decay to ``min_lr``.
        min_lr: floor of the cosine decay.
        warmup_steps: linear warm-up from ``lr / 200`` (seed: 200 steps).
        weight_decay, betas: AdamW (seed: 0.1, (0.9, 0.999)).
        lambda_dice, lambda_ce: weights of Dice and cross-entropy (MONAI ``DiceCELoss``).
        class_weight_cap: largest ratio of the two class weights (inverse pixel frequency).
        rotate_deg: random rotation in [-r, r] of the embedding grid and target (0 = off).
        scale: random zoom range of the embedding grid and target ((1, 1) = off).
        augment_prob: chance that a sample is rotated/zoomed.
        negative_ratio: tumor/cyst only: kidney boxes without the target (empty target) added
            per positive pair. 0 = the seed (positives only), which teaches the decoder that
            every box holds a target; see docs/transfersam.md.
        val_fraction: cases held out for validation (the last ones by name; 0 = none).
        validate_every: steps between validations (and CSV log rows).
        seed: seeds torch and numpy (sampling, box expansion, augmentation).
        device: ``cpu`` or ``cuda``.
        boxes: box settings (the ROI box and the training box expansion).
    """

    steps: int = 4000
    batch_size: int = 64
    lr: float = 5e-5
    min_lr: float = 1e-8
    warmup_steps: int = 200
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.999)
    lambda_dice: float = 1.0
    lambda_ce: float = 1.0
    class_weight_cap: float = 50.0
    rotate_deg: float = 10.0
    scale: tuple[float, float] = (0.9, 1.1)
    augment_prob: float = 0.5
    negative_ratio: float = 0.0
    val_fraction: float = 0.1
    validate_every: int = 200
    seed: int = 0
    device: str = "cpu"
    boxes: BoxConfig = field(default_factory=BoxConfig)

    def __post_init__(self) -> None:
        _integer(self.steps, "steps", 1)
        _integer(self.batch_size, "batch_size", 1)
        _integer(self.warmup_steps, "warmup_steps", 0)
        _integer(self.validate_every, "validate_every", 1)
        _integer(self.seed, "seed", 0)
        for name, low, high in (
            ("lr", 0.0, None),
            ("min_lr", 0.0, None),
            ("weight_decay", 0.0, None),
            ("lambda_dice", 0.0, None),
            ("lambda_ce", 0.0, None),
            ("class_weight_cap", 1.0, None),
            ("rotate_deg", 0.0, 180.0),
            ("augment_prob", 0.0, 1.0),
            ("negative_ratio", 0.0, 100.0),
            ("val_fraction", 0.0, 0.9),
        ):
            object.__setattr__(self, name, _number(getattr(self, name), name, low=low, high=high))
        if self.lambda_dice + self.lambda_ce <= 0:
            raise InputError("lambda_dice + lambda_ce must be > 0")
        betas = tuple(_number(b, "betas", low=0.0, high=1.0) for b in self.betas)
        scale = tuple(_number(s, "scale", low=0.1, high=10.0) for s in self.scale)
        if len(betas) != 2 or len(scale) != 2 or scale[0] > scale[1]:
            raise InputError(f"betas and scale must be pairs (scale low <= high), got {scale}")
        object.__setattr__(self, "betas", betas)
        object.__setattr__(self, "scale", scale)
        if isinstance(self.boxes, dict):
            object.__setattr__(self, "boxes", BoxConfig.from_dict(self.boxes))
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise InputError(f"device must be cpu or cuda, got {self.device!r}")

    def to_dict(self) -> dict:
        d = plain(asdict(self))
        d["boxes"] = self.boxes.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> DecoderTrainConfig:
        return from_mapping(cls, d, "train config")


def load_train_config(path: str | Path) -> DecoderTrainConfig:
    """Read a YAML decoder-training config (``yaml.safe_load``; missing keys take defaults)."""
    try:
        return DecoderTrainConfig.from_dict(read_yaml(path) or {})
    except InputError as exc:
        raise InputError(f"{path}: {exc}") from None


@dataclass(frozen=True)
class CascadeConfig:
    """What inference needs besides the weights (``cascade.json`` in a cascade folder).

    Attributes:
        embed: the slice-to-pixels settings the decoders were trained with (window).
        boxes: ROI box, component filter, kidney split, inference box growth.
        batch_size: slices encoded and decoded together at inference.
    """

    embed: EmbedConfig = field(default_factory=EmbedConfig)
    boxes: BoxConfig = field(default_factory=BoxConfig)
    batch_size: int = 8

    def __post_init__(self) -> None:
        if isinstance(self.embed, dict):
            object.__setattr__(self, "embed", EmbedConfig.from_dict(self.embed))
        if isinstance(self.boxes, dict):
            object.__setattr__(self, "boxes", BoxConfig.from_dict(self.boxes))
        _integer(self.batch_size, "batch_size", 1)

    def to_dict(self) -> dict:
        return {
            "embed": self.embed.to_dict(),
            "boxes": self.boxes.to_dict(),
            "batch_size": self.batch_size,
        }

    @classmethod
    def from_dict(cls, d: dict) -> CascadeConfig:
        return from_mapping(cls, d, "cascade config")
