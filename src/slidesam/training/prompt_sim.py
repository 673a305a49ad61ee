"""Training-time prompt simulation (Slide-SAM Appendix C, after SAM's training recipe).

For each target, from its **centre-slice** mask (H, W) bool, with probability ``p_point`` a
foreground point, otherwise a noisy box:

- point: one pixel drawn uniformly from the mask, label 1 (positive);
- box: the mask's tight box plus independent Gaussian noise on each of the four coordinates,
  std = ``box_noise`` x the box side along that coordinate's axis (``x1 - x0`` for x0 and x1,
  ``y1 - y0`` for y0 and y1), each shift clipped to at most ``max_shift_px`` pixels; the box is
  then clipped to the image, its corners re-ordered if noise crossed them, and widened to at
  least 1 pixel about its centre if it became (or was) thinner, so x0 < x1 and y0 < y1 always.

Defaults are the paper's rule (10 % of the side, at most 20 px). The reference code
(github.com/Curli-quan/Slide-SAM, ``datasets/data_engine.py``) uses a much weaker jitter: one
translation of the whole box, std 1 % of the mean side, rounded to whole pixels;
``box_noise=0.01`` gives its magnitude, but still as independent corner noise.

Coordinates: boxes XYXY and points XY in the mask's pixels, x = column, y = row, inclusive (the
tight box of a mask is its min/max pixel index, as in ``slidesam.core.prompts``). Prepared
windows (``slidesam prepare --size S``) are at the model's input size, so these are model-input
pixels as ``Sam.decode`` expects; resize the coordinates yourself otherwise.

Randomness comes only from the ``numpy.random.Generator`` passed in (no global RNG), so a seeded
generator reproduces the prompts exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from slidesam.core.errors import InputError

__all__ = [
    "PromptBatch",
    "PromptSimConfig",
    "SimulatedPrompt",
    "mask_box",
    "simulate_prompt",
    "simulate_prompt_batch",
]

#: minimum side of a simulated box, pixels
MIN_BOX_SIDE = 1.0


@dataclass(frozen=True)
class PromptSimConfig:
    """How prompts are simulated.

    Attributes:
        p_point: probability of a point prompt (else a box); the paper: 0.5.
        box_noise: noise std as a fraction of the box side along each axis; the paper: 0.10
            (the reference code's translation has std 0.01 of the mean side).
        max_shift_px: largest shift of one box coordinate, pixels; the paper: 20.
    """

    p_point: float = 0.5
    box_noise: float = 0.10
    max_shift_px: float = 20.0

    def __post_init__(self) -> None:
        if not 0 <= self.p_point <= 1:
            raise InputError(f"PromptSimConfig.p_point must be in [0, 1], got {self.p_point!r}")
        if not self.box_noise >= 0:
            raise InputError(f"PromptSimConfig.box_noise must be >= 0, got {self.box_noise!r}")
        if not self.max_shift_px >= 0:
            raise InputError(
                f"PromptSimConfig.max_shift_px must be >= 0, got {self.max_shift_px!r}"
            )


@dataclass(frozen=True, eq=False)
class SimulatedPrompt:
    """One simulated prompt.

    Attributes:
        kind: ``"point"`` or ``"box"``.
        box: (4,) float64 XYXY (x0 < x1, y0 < y1, inside the image) when ``kind == "box"``.
        point: (2,) float64 XY of a mask pixel (label 1) when ``kind == "point"``.
    """

    kind: Literal["point", "box"]
    box: np.ndarray | None = None
    point: np.ndarray | None = None


@dataclass(frozen=True, eq=False)
class PromptBatch:
    """Simulated prompts of a batch, split by kind for the model.

    ``Sam.decode`` takes one kind of sparse prompt for the whole batch (boxes cannot be padded),
    so the batch is split: decode the samples in ``box_index`` with ``boxes=boxes`` and those
    in ``point_index`` with ``points=(point_coords, point_labels)``, then put the outputs back
    in order (``out[box_index] = ...``). The two index tensors partition ``range(B)``.

    Attributes:
        prompts: the B ``SimulatedPrompt`` objects, in batch order.
        box_index: (Nb,) int64 batch indices of the box prompts, ascending.
        boxes: (Nb, 4) float32 XYXY.
        point_index: (Np,) int64 batch indices of the point prompts, ascending.
        point_coords: (Np, 1, 2) float32 XY.
        point_labels: (Np, 1) int64, all 1 (foreground).
    """

    prompts: list[SimulatedPrompt]
    box_index: torch.Tensor
    boxes: torch.Tensor
    point_index: torch.Tensor
    point_coords: torch.Tensor
    point_labels: torch.Tensor


def mask_box(mask: np.ndarray) -> np.ndarray:
    """Tight box (4,) float64 XYXY, inclusive pixel indices, of a non-empty (H, W) mask."""
    return _tight_box(_check_mask(mask))


def simulate_prompt(
    mask: np.ndarray, rng: np.random.Generator, config: PromptSimConfig | None = None
) -> SimulatedPrompt:
    """A point or a noisy box for one (H, W) centre-slice mask (see the module docstring).

    Raises:
        InputError: the mask is not 2D, is smaller than 2 x 2 pixels, or is empty.
    """
    config = config or PromptSimConfig()
    if not isinstance(rng, np.random.Generator):
        raise InputError(
            f"rng must be a numpy.random.Generator (np.random.default_rng(seed)), got "
            f"{type(rng).__name__}"
        )
    mask = _check_mask(mask)
    if rng.random() < config.p_point:
        rows, cols = np.nonzero(mask)
        i = rng.integers(rows.size)
        return SimulatedPrompt(kind="point", point=np.array([cols[i], rows[i]], dtype=np.float64))
    return SimulatedPrompt(kind="box", box=_noisy_box(mask, rng, config))


def simulate_prompt_batch(
    masks: np.ndarray | torch.Tensor | Sequence[np.ndarray],
    rng: np.random.Generator,
    config: PromptSimConfig | None = None,
    *,
    device: torch.device | str | None = None,
) -> PromptBatch:
    """Prompts for a batch of (H, W) centre-slice masks, (B, H, W), split by kind for the model.

    Samples are drawn in batch order from ``rng``, so the prompts equal B successive
    ``simulate_prompt`` calls with the same generator.
    """
    if isinstance(masks, torch.Tensor):
        masks = masks.detach().cpu().numpy()
    masks = [np.asarray(m) for m in masks]
    if not masks:
        raise InputError("simulate_prompt_batch needs at least one mask")
    prompts = []
    for i, mask in enumerate(masks):
        try:
            prompts.append(simulate_prompt(mask, rng, config))
        except InputError as exc:
            raise InputError(f"mask #{i}: {exc}") from None
    box_index = [i for i, p in enumerate(prompts) if p.kind == "box"]
    point_index = [i for i, p in enumerate(prompts) if p.kind == "point"]
    boxes = np.array([prompts[i].box for i in box_index], dtype=np.float32).reshape(-1, 4)
    coords = np.array([prompts[i].point for i in point_index], dtype=np.float32).reshape(-1, 1, 2)
    return PromptBatch(
        prompts=prompts,
        box_index=torch.tensor(box_index, dtype=torch.int64, device=device),
        boxes=torch.from_numpy(boxes).to(device),
        point_index=torch.tensor(point_index, dtype=torch.int64, device=device),
        point_coords=torch.from_numpy(coords).to(device),
        point_labels=torch.ones((len(point_index), 1), dtype=torch.int64, device=device),
    )


def _noisy_box(mask: np.ndarray, rng: np.random.Generator, config: PromptSimConfig) -> np.ndarray:
    h, w = mask.shape
    box = _tight_box(mask)
    sides = np.array([box[2] - box[0], box[3] - box[1]] * 2)
    shift = rng.normal(size=4) * config.box_noise * sides
    box = box + np.clip(shift, -config.max_shift_px, config.max_shift_px)
    box = np.clip(box, 0, [w - 1, h - 1, w - 1, h - 1])
    for lo, hi, size in ((0, 2, w), (1, 3, h)):
        a, b = sorted((box[lo], box[hi]))
        if b - a < MIN_BOX_SIDE:  # widen about the centre, kept inside [0, size - 1]
            a = min(max((a + b - MIN_BOX_SIDE) / 2, 0.0), size - 1 - MIN_BOX_SIDE)
            b = a + MIN_BOX_SIDE
        box[lo], box[hi] = a, b
    return box


def _tight_box(mask: np.ndarray) -> np.ndarray:
    cols = np.flatnonzero(mask.any(axis=0))
    rows = np.flatnonzero(mask.any(axis=1))
    return np.array([cols[0], rows[0], cols[-1], rows[-1]], dtype=np.float64)


def _check_mask(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise InputError(f"mask must be 2D (H, W), got shape {mask.shape}")
    if min(mask.shape) < 2:
        raise InputError(f"mask must be at least 2 x 2 pixels, got {mask.shape}")
    mask = mask.astype(bool, copy=False)
    if not mask.any():
        raise InputError("mask is empty: no prompt can be simulated for an empty target")
    return mask
