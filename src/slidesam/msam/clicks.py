"""Click simulation: the next click comes from the error region of the previous prediction.

As in the seed (SAM-Med3D's ``get_next_click3D_torch_2``): a voxel drawn uniformly from
``FN ∪ FP`` (false negatives: object voxels predicted background; false positives: the reverse);
its label is 1 (positive) if it is a false negative, 0 (negative) if a false positive. The first
click (empty prediction) is therefore a random object voxel, positive. A sample without any error
gets a padding click (label -1), which the prompt encoder ignores.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

__all__ = ["centre_click", "sample_clicks"]


def sample_clicks(
    pred: torch.Tensor, target: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One click per sample from the error region.

    Args:
        pred: (B, 1, D, H, W) bool, the previous prediction (all False before the first pass).
        target: (B, 1, D, H, W) bool ground truth.
        generator: torch RNG (CPU) for reproducible draws.

    Returns:
        coords (B, 1, 3) float (z, y, x) voxel indices and labels (B, 1) long in {1, 0, -1}.
    """
    b = pred.shape[0]
    coords = torch.zeros((b, 1, 3), dtype=torch.float32, device=pred.device)
    labels = torch.full((b, 1), -1, dtype=torch.long, device=pred.device)
    errors = (pred != target)[:, 0]
    for i in range(b):
        idx = errors[i].nonzero()
        if idx.shape[0] == 0:
            continue
        j = int(torch.randint(idx.shape[0], (1,), generator=generator))
        z, y, x = (int(v) for v in idx[j])
        coords[i, 0] = torch.tensor([z, y, x], dtype=torch.float32)
        labels[i, 0] = int(bool(target[i, 0, z, y, x]))
    return coords, labels


def centre_click(target: np.ndarray) -> np.ndarray:
    """The object voxel farthest from the background (z, y, x): a deterministic first click."""
    dist = ndimage.distance_transform_edt(np.pad(target, 1))[1:-1, 1:-1, 1:-1]
    return np.array(np.unravel_index(int(np.argmax(dist)), target.shape), dtype=np.float32)
