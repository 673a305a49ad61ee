"""SAM's ViT image encoder (windowed and global attention with decomposed relative positions).

Names follow the official ``segment_anything/modeling/image_encoder.py``. Attention runs through
``F.scaled_dot_product_attention`` with the relative-position bias passed as an additive mask,
which is the same computation as SAM's explicit ``softmax(q k^T * scale + bias) v``.
Input (B, 3, S, S) normalised image -> output (B, out_chans, S/16, S/16).

``grad_checkpointing`` (an attribute, not a weight: checkpoints do not store it) recomputes
each block's activations in the backward pass instead of keeping them
(``torch.utils.checkpoint``, non-reentrant): the same numbers, less memory, more time.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from slidesam.modeling.common import LayerNorm2d, MLPBlock, linear
from slidesam.modeling.lora import LoRAQKV

__all__ = ["ImageEncoderViT"]


class ImageEncoderViT(nn.Module):
    def __init__(
        self,
        *,
        img_size: int = 1024,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        out_chans: int = 256,
        qkv_bias: bool = True,
        window_size: int = 14,
        global_attn_indexes: tuple[int, ...] = (),
        lora_rank: int = 0,
        lora_scale: float = 1.0,
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        self.img_size = img_size
        #: recompute block activations in backward (saves memory when training the encoder)
        self.grad_checkpointing = grad_checkpointing
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, embed_dim))
        self.blocks = nn.ModuleList(
            Block(
                dim=embed_dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                window_size=0 if i in global_attn_indexes else window_size,
                input_size=(grid, grid),
                lora_rank=lora_rank,
                lora_scale=lora_scale,
            )
            for i in range(depth)
        )
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x) + self.pos_embed
        remat = self.grad_checkpointing and torch.is_grad_enabled()
        for blk in self.blocks:
            x = checkpoint(blk, x, use_reentrant=False) if remat else blk(x)
        return self.neck(x.permute(0, 3, 1, 2))


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, H/p, W/p, embed_dim)."""

    def __init__(self, *, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class Block(nn.Module):
    """Pre-norm transformer block; windowed attention when ``window_size > 0``."""

    def __init__(
        self,
        *,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        qkv_bias: bool,
        window_size: int,
        input_size: tuple[int, int],
        lora_rank: int = 0,
        lora_scale: float = 1.0,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(
            dim=dim,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            input_size=input_size if window_size == 0 else (window_size, window_size),
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
            # SAM zero-pads x to whole windows before attention and crops after it. The padded
            # tokens' q, k, v are qkv(0) = the qkv bias, so we project first and pad q, k, v with
            # the bias (same result), and project the output after cropping: no linear work is
            # spent on padding (64 -> 70 tokens a side at 1024 px, 20 % more tokens).
            h, w = x.shape[1], x.shape[2]
            qkv = linear(self.attn.qkv, x)
            windows, pad_hw = window_partition(qkv, self.window_size, pad_value=self.attn.qkv.bias)
            x = window_unpartition(self.attn.attend(windows), self.window_size, pad_hw, (h, w))
            x = linear(self.attn.proj, x)
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class Attention(nn.Module):
    """Multi-head attention over a (B, H, W, C) grid with decomposed relative positions."""

    def __init__(
        self,
        *,
        dim: int,
        num_heads: int,
        qkv_bias: bool,
        input_size: tuple[int, int],
        lora_rank: int = 0,
        lora_scale: float = 1.0,
    ):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        if lora_rank > 0:
            self.qkv = LoRAQKV(dim=dim, rank=lora_rank, scale=lora_scale, bias=qkv_bias)
        else:
            self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C), every position attending to every other."""
        return linear(self.proj, self.attend(linear(self.qkv, x)))

    def attend(self, qkv: torch.Tensor) -> torch.Tensor:
        """Projected (B, H, W, 3C) -> attention output (B, H, W, C), before ``proj``.

        The relative-position bias (B, heads, HW, HW) is built and used a block of query rows at
        a time, at most ``_BIAS_CHUNK_BYTES``: exact (rows are independent), and for vit_b's
        global blocks at 1024 px it replaces an 805 MB tensor per block by 63 MB ones.
        """
        b, h, w, _ = qkv.shape
        # (3, B, heads, HW, head_dim)
        q, k, v = qkv.reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        rh = get_rel_pos(h, h, self.rel_pos_h)
        rw = get_rel_pos(w, w, self.rel_pos_w)
        row_bytes = b * self.num_heads * w * h * w * q.element_size()
        rows = max(1, min(h, _BIAS_CHUNK_BYTES // row_bytes))
        if rows >= h:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=decomposed_rel_pos(q, rh, rw, h, w)
            )
        else:
            out = torch.empty_like(q)
            # inference: one bias buffer for every chunk (a fresh large tensor per chunk can cost
            # more in page faults than the add that fills it); training keeps each chunk's bias
            # for the backward pass, so each gets its own
            buffer = None
            if not torch.is_grad_enabled():
                buffer = q.new_empty(b * self.num_heads * rows * w * h * w)
            for r0 in range(0, h, rows):
                r1 = min(h, r0 + rows)
                part = slice(r0 * w, r1 * w)
                bias = decomposed_rel_pos(q[:, :, part], rh[r0:r1], rw, r1 - r0, w, out=buffer)
                out[:, :, part] = F.scaled_dot_product_attention(
                    q[:, :, part], k, v, attn_mask=bias
                )
        return out.transpose(1, 2).reshape(b, h, w, -1)


#: largest relative-position bias block built at once (bytes); see ``Attention.attend``
_BIAS_CHUNK_BYTES = 64 * 2**20


def window_partition(
    x: torch.Tensor, window_size: int, pad_value: torch.Tensor | None = None
) -> tuple[torch.Tensor, tuple[int, int]]:
    """(B, H, W, C) -> (B * nW, ws, ws, C) windows, padding H and W up to multiples of ws.

    Padding is zero, or ``pad_value`` (C,) broadcast over the padded positions.
    """
    b, h, w, c = x.shape
    pad_h = (window_size - h % window_size) % window_size
    pad_w = (window_size - w % window_size) % window_size
    if pad_h or pad_w:
        if pad_value is None:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        else:
            padded = pad_value.to(x.dtype).expand(b, h + pad_h, w + pad_w, c).clone()
            padded[:, :h, :w] = x
            x = padded
    hp, wp = h + pad_h, w + pad_w
    x = x.view(b, hp // window_size, window_size, wp // window_size, window_size, c)
    windows = x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size, window_size, c)
    return windows, (hp, wp)


def window_unpartition(
    windows: torch.Tensor, window_size: int, pad_hw: tuple[int, int], hw: tuple[int, int]
) -> torch.Tensor:
    """Inverse of ``window_partition``, dropping the padding."""
    hp, wp = pad_hw
    h, w = hw
    b = windows.shape[0] // (hp * wp // window_size // window_size)
    x = windows.view(b, hp // window_size, wp // window_size, window_size, window_size, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)
    return x[:, :h, :w, :].contiguous() if (hp > h or wp > w) else x


def get_rel_pos(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Relative-position embeddings (q_size, k_size, C), interpolated if the table is resized."""
    max_rel_dist = int(2 * max(q_size, k_size) - 1)
    if rel_pos.shape[0] != max_rel_dist:
        rel_pos = (
            F.interpolate(
                rel_pos.reshape(1, rel_pos.shape[0], -1).permute(0, 2, 1),
                size=max_rel_dist,
                mode="linear",
            )
            .reshape(-1, max_rel_dist)
            .permute(1, 0)
        )
    q_coords = torch.arange(q_size, device=rel_pos.device)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size, device=rel_pos.device)[None, :] * max(q_size / k_size, 1.0)
    relative = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return rel_pos[relative.long()]


def decomposed_rel_pos(
    q: torch.Tensor,
    rh: torch.Tensor,
    rw: torch.Tensor,
    q_rows: int,
    width: int,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Additive attention bias from MViTv2's decomposed relative positions (SAM's ``rel_h`` +
    ``rel_w``), for a block of ``q_rows`` full query rows of a square-or-not grid.

    Args:
        q: (B, heads, q_rows * width, C) unscaled queries (as in SAM).
        rh: (q_rows, k_h, C) rows of ``get_rel_pos`` for these query rows.
        rw: (width, k_w, C) from ``get_rel_pos``.
        out: optional flat buffer of at least as many elements as the bias, to write it into
            (no autograd through it).

    Returns:
        (B, heads, q_rows * width, k_h * k_w), contiguous.
    """
    b, heads, _, dim = q.shape
    k_h, k_w = rh.shape[1], rw.shape[1]
    r_q = q.reshape(b, heads, q_rows, width, dim)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, rh).contiguous()
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, rw).contiguous()
    # einsum returns permuted strides, and a broadcast add would inherit them, making the final
    # reshape copy the whole bias again; from contiguous inputs the sum is contiguous (a view).
    shape = (b, heads, q_rows, width, k_h, k_w)
    if out is None:
        bias = rel_h.unsqueeze(-1) + rel_w.unsqueeze(-2)
    else:
        bias = torch.add(
            rel_h.unsqueeze(-1), rel_w.unsqueeze(-2), out=out[: math.prod(shape)].view(shape)
        )
    return bias.view(b, heads, q_rows * width, k_h * k_w)
