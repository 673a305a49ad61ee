"""M-SAM's iterative refinement loop (paper §2.3).

Start from an all-zero mask prompt; each pass decodes with the clicks so far and the previous
pass's low-resolution logits as the mask prompt (through the MEA when the model has one). With a
ground truth (training, simulated evaluation) every pass first adds a click drawn from the error
region of the previous prediction; without one (inference) the user's clicks stay fixed, or are
absent (mask-only refinement).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slidesam.modeling.sam3d import Sam3D
from slidesam.msam.clicks import sample_clicks

__all__ = ["refine", "upsample"]


def upsample(low_res: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 1, L, L, L) logits -> (B, 1, size, size, size), trilinear."""
    return F.interpolate(low_res, size=(size,) * 3, mode="trilinear", align_corners=False)


def refine(
    model: Sam3D,
    image_embeddings: torch.Tensor,
    *,
    iterations: int,
    points: tuple[torch.Tensor, torch.Tensor] | None = None,
    target: torch.Tensor | None = None,
    mask_prompt: torch.Tensor | None = None,
    accumulate_clicks: bool = True,
    click_from: int = 0,
    generator: torch.Generator | None = None,
) -> list[torch.Tensor]:
    """Run ``iterations`` decoder passes; returns each pass's low-res logits (B, 1, L, L, L).

    Args:
        model: the 3D SAM (with or without MEA).
        image_embeddings: (B, C, E, E, E) from ``model.encode``, computed once.
        points: fixed clicks, coords (B, N, 3) (z, y, x) in crop voxels and labels (B, N).
        target: (B, 1, S, S, S) bool; when given, each pass adds a click sampled from the error
            region of the previous prediction (``accumulate_clicks``: all clicks so far are fed,
            else only the newest plus ``points``).
        mask_prompt: (B, 1, L, L, L) initial mask logits (default all zeros).
        click_from: first pass that adds a simulated click (1: pass 0 uses ``points`` only).
        generator: RNG of the simulated clicks.
    """
    b = image_embeddings.shape[0] if points is None else points[0].shape[0]
    if target is not None:
        b = target.shape[0]
    size_l = model.prompt_encoder.mask_input_size
    size = model.image_encoder.img_size
    mask = mask_prompt
    if mask is None:
        mask = image_embeddings.new_zeros((b, 1, size_l, size_l, size_l))
    fixed = points
    clicks: tuple[torch.Tensor, torch.Tensor] | None = None
    outputs = []
    for it in range(iterations):
        if target is not None and it >= click_from:
            prev = upsample(mask, size) > 0 if it > 0 else torch.zeros_like(target)
            new = sample_clicks(prev.detach(), target, generator)
            if clicks is None or not accumulate_clicks:
                clicks = new
            else:
                clicks = (torch.cat([clicks[0], new[0]], 1), torch.cat([clicks[1], new[1]], 1))
        pts = _join(fixed, clicks)
        low, _ = model.decode(image_embeddings, points=pts, mask_prompt=mask)
        outputs.append(low)
        mask = low
    return outputs


def _join(a, b):
    if a is None:
        return b
    if b is None:
        return a
    return torch.cat([a[0], b[0]], 1), torch.cat([a[1], b[1]], 1)
