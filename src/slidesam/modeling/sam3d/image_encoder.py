"""SAM-Med3D's 3D ViT image encoder, with optional LoRA on q and v.

Names follow SAM-Med3D's ``image_encoder3D.py`` (``patch_embed.proj``, ``pos_embed``,
``blocks.{i}.attn.qkv`` / ``proj`` / ``rel_pos_{d,h,w}``, ``neck.{0..3}``), so its checkpoints load
by name. MONAI's ``PatchEmbeddingBlock`` / ``ViT`` compute the same patch projection but name it
``patch_embeddings`` with a flat position table, which would need renaming on every load; the
blocks are therefore written here, on top of our 2D SAM code's ``MLPBlock`` and ``LoRAQKV``.

Input (B, in_chans, S, S, S) normalised image, axes (z, y, x) -> (B, out_chans, S/p, S/p, S/p).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slidesam.modeling.common import MLPBlock
from slidesam.modeling.lora import LoRAQKV
from slidesam.modeling.sam3d.common import LayerNorm3d

__all__ = ["ImageEncoderViT3D"]


class ImageEncoderViT3D(nn.Module):
    def __init__(
        self,
        *,
        img_size: int = 128,
        patch_size: int = 16,
        in_chans: int = 1,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        out_chans: int = 384,
        window_size: int = 14,
        global_attn_indexes: tuple[int, ...] = (),
        lora_rank: int = 0,
        lora_scale: float = 1.0,
    ):
        super().__init__()
        self.img_size = img_size
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed3D(
            patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim
        )
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, grid, embed_dim))
        self.blocks = nn.ModuleList(
            Block3D(
                dim=embed_dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                window_size=0 if (i in global_attn_indexes or window_size <= 0) else window_size,
                grid=grid,
                lora_rank=lora_rank,
                lora_scale=lora_scale,
            )
            for i in range(depth)
        )
        self.neck = nn.Sequential(
            nn.Conv3d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm3d(out_chans),
            nn.Conv3d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm3d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.neck(x.permute(0, 4, 1, 2, 3))


class PatchEmbed3D(nn.Module):
    """(B, C, D, H, W) -> (B, D/p, H/p, W/p, embed_dim)."""

    def __init__(self, *, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 4, 1)


class Block3D(nn.Module):
    """Pre-norm transformer block over a (B, D, H, W, C) grid; cubic windows if ``window_size``.

    A window larger than the grid (SAM-Med3D: 14 over 8) zero-pads the normalised tokens to the
    window, as the released code does; padded tokens then take part in attention as keys.
    """

    def __init__(
        self,
        *,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        window_size: int,
        grid: int,
        lora_rank: int = 0,
        lora_scale: float = 1.0,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention3D(
            dim=dim,
            num_heads=num_heads,
            input_size=grid if window_size == 0 else window_size,
            lora_rank=lora_rank,
            lora_scale=lora_scale,
        )
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(embedding_dim=dim, mlp_dim=int(dim * mlp_ratio))
        self.window_size = window_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            d, h, w = x.shape[1:4]
            windows, padded = window_partition3d(x, self.window_size)
            x = window_unpartition3d(self.attn(windows), self.window_size, padded, (d, h, w))
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class Attention3D(nn.Module):
    """Multi-head attention over a cubic (B, n, n, n, C) grid with decomposed relative positions."""

    def __init__(
        self,
        *,
        dim: int,
        num_heads: int,
        input_size: int,
        lora_rank: int = 0,
        lora_scale: float = 1.0,
    ):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        if lora_rank > 0:
            self.qkv = LoRAQKV(dim=dim, rank=lora_rank, scale=lora_scale, bias=True)
        else:
            self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_d = nn.Parameter(torch.zeros(2 * input_size - 1, head_dim))
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size - 1, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, d, h, w, c = x.shape
        n = d * h * w
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, heads, N, head_dim)
        bias = _rel_pos_bias(q, (self.rel_pos_d, self.rel_pos_h, self.rel_pos_w), (d, h, w))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(b, d, h, w, c))


def _rel_table(size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """(size, size, head_dim) embeddings of the relative offsets q - k along one axis."""
    idx = torch.arange(size, device=rel_pos.device)
    return rel_pos[(idx[:, None] - idx[None, :]) + (size - 1)]


def _rel_pos_bias(q: torch.Tensor, tables, size: tuple[int, int, int]) -> torch.Tensor:
    """Additive attention bias (B, heads, N, N) of decomposed relative positions (MViTv2)."""
    b, heads, n, dim = q.shape
    d, h, w = size
    rq = q.reshape(b, heads, d, h, w, dim)
    rd = torch.einsum("bndhwc,dkc->bndhwk", rq, _rel_table(d, tables[0]))
    rh = torch.einsum("bndhwc,hkc->bndhwk", rq, _rel_table(h, tables[1]))
    rw = torch.einsum("bndhwc,wkc->bndhwk", rq, _rel_table(w, tables[2]))
    bias = (
        rd[..., :, None, None] + rh[..., None, :, None] + rw[..., None, None, :]
    )  # (B, heads, d, h, w, kd, kh, kw)
    return bias.reshape(b, heads, n, n)


def window_partition3d(x: torch.Tensor, ws: int) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """(B, D, H, W, C) -> (B * windows, ws, ws, ws, C), zero-padding to whole windows."""
    b, d, h, w, c = x.shape
    pd, ph, pw = (-d) % ws, (-h) % ws, (-w) % ws
    if pd or ph or pw:
        x = F.pad(x, (0, 0, 0, pw, 0, ph, 0, pd))
    dp, hp, wp = d + pd, h + ph, w + pw
    x = x.view(b, dp // ws, ws, hp // ws, ws, wp // ws, ws, c)
    return x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, ws, ws, ws, c), (dp, hp, wp)


def window_unpartition3d(
    windows: torch.Tensor, ws: int, padded: tuple[int, int, int], size: tuple[int, int, int]
) -> torch.Tensor:
    """Inverse of :func:`window_partition3d`, cropping the padding: -> (B, D, H, W, C)."""
    dp, hp, wp = padded
    d, h, w = size
    b = windows.shape[0] // ((dp // ws) * (hp // ws) * (wp // ws))
    x = windows.view(b, dp // ws, hp // ws, wp // ws, ws, ws, ws, -1)
    x = x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, dp, hp, wp, -1)
    return x[:, :d, :h, :w].contiguous()
