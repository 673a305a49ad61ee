"""``LayerNorm3d``: LayerNorm over the channel axis of a (B, C, D, H, W) tensor (SAM-Med3D's)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["LayerNorm3d"]


class LayerNorm3d(nn.Module):
    def __init__(self, num_channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None, None] * x + self.bias[:, None, None, None]
