"""LoRA on the fused ``qkv`` projection of the ViT: low-rank updates of q and v only.

``LoRAQKV`` *is* an ``nn.Linear`` (same ``weight``/``bias`` names as the official SAM ``qkv``)
with four extra parameters ``lora_a_q`` (r, dim), ``lora_b_q`` (dim, r), ``lora_a_v``,
``lora_b_v``. B starts at zero, so a fresh adapter changes nothing. ``merge()`` folds the update
into ``weight`` for fast inference, ``unmerge()`` takes it out again.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LoRAQKV"]


class LoRAQKV(nn.Linear):
    """``qkv = x W^T + b``, plus ``scale * B_q A_q x`` on q and ``scale * B_v A_v x`` on v."""

    def __init__(self, *, dim: int, rank: int, scale: float = 1.0, bias: bool = True):
        super().__init__(dim, 3 * dim, bias=bias)
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.dim, self.rank, self.scale = dim, rank, scale
        self.lora_a_q = nn.Parameter(torch.empty(rank, dim))
        self.lora_b_q = nn.Parameter(torch.zeros(dim, rank))
        self.lora_a_v = nn.Parameter(torch.empty(rank, dim))
        self.lora_b_v = nn.Parameter(torch.zeros(dim, rank))
        self.merged = False
        self.reset_lora()

    def reset_lora(self) -> None:
        """A: Kaiming-uniform (as nn.Linear), B: zeros -> the update starts at exactly zero."""
        for a in (self.lora_a_q, self.lora_a_v):
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b_q)
        nn.init.zeros_(self.lora_b_v)

    def delta_weight(self) -> torch.Tensor:
        """The (3*dim, dim) update the adapter adds to ``weight`` (zero rows for k)."""
        zeros = torch.zeros(self.dim, self.dim, dtype=self.weight.dtype, device=self.weight.device)
        dq = self.scale * self.lora_b_q @ self.lora_a_q
        dv = self.scale * self.lora_b_v @ self.lora_a_v
        return torch.cat([dq, zeros, dv], dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self.merged:
            return out
        q, k, v = out.split(self.dim, dim=-1)
        q = q + self.scale * F.linear(F.linear(x, self.lora_a_q), self.lora_b_q)
        v = v + self.scale * F.linear(F.linear(x, self.lora_a_v), self.lora_b_v)
        return torch.cat([q, k, v], dim=-1)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.weight += self.delta_weight()
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight -= self.delta_weight()
            self.merged = False

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, scale={self.scale}, merged={self.merged}"
