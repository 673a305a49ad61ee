"""M-SAM's Mask-Enhanced Adapter (MEA): fuse the image embedding with the mask embedding.

Paper §2.2 / Fig. 2 (Shi et al., "Mask-Enhanced Segment Anything Model for Tumor Lesion Semantic
Segmentation"). On tokens (B, N, C), N = E^3 grid cells, image stream ``I`` and mask stream ``M``:

1. **Mutual Feature Enhancement Blocks** (``mea_depth`` of them): two parallel pre-norm
   transformer blocks, one per stream, whose residual connections are *mutual*: each sub-layer's
   output is added to the *other* stream::

       I1 = M + Attn_I(LN(I))          M1 = I + Attn_M(LN(M))
       I' = M1 + MLP_I(LN(I1))         M' = I1 + MLP_M(LN(M1))

   (``mutual=False`` gives ordinary residuals, ``I1 = I + ...``: the control in the tests.)
2. Outer residual and LayerNorm: ``I'' = LN(I + I')``, ``M'' = LN(M + M')``.
3. Fusion: ``Ē = MHSA((I'' + M'') W_qkv)``, then ``X = LN(I'' + Ē)`` and the output
   ``Ê_I = X + MLP(X)``: the updated image embedding, fed to the decoder in place of SAM's
   ``image embedding + dense mask embedding``.

The released M-SAM code (``mea.py``) replaces the transformer branches by convolution branches
and adds a residual after the last MLP; we follow the paper's description (and keep that residual).
Input and output: (B, C, E, E, E).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slidesam.modeling.common import MLPBlock

__all__ = ["MaskEnhancedAdapter", "MutualFeatureEnhancementBlock", "SelfAttention"]


class SelfAttention(nn.Module):
    """Multi-head self-attention on (B, N, C) tokens with one fused ``qkv`` projection."""

    def __init__(self, *, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads {num_heads} must divide dim {dim}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class MutualFeatureEnhancementBlock(nn.Module):
    """Two parallel transformer blocks (image, mask) with mutual residual connections."""

    def __init__(self, *, dim: int, num_heads: int, mlp_ratio: float, mutual: bool = True):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.image_norm1 = nn.LayerNorm(dim)
        self.image_attn = SelfAttention(dim=dim, num_heads=num_heads)
        self.image_norm2 = nn.LayerNorm(dim)
        self.image_mlp = MLPBlock(embedding_dim=dim, mlp_dim=hidden)
        self.mask_norm1 = nn.LayerNorm(dim)
        self.mask_attn = SelfAttention(dim=dim, num_heads=num_heads)
        self.mask_norm2 = nn.LayerNorm(dim)
        self.mask_mlp = MLPBlock(embedding_dim=dim, mlp_dim=hidden)
        self.mutual = mutual

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N, C) image and mask tokens -> the enhanced pair, same shapes."""
        a_i = self.image_attn(self.image_norm1(image))
        a_m = self.mask_attn(self.mask_norm1(mask))
        if self.mutual:
            i1, m1 = mask + a_i, image + a_m
        else:
            i1, m1 = image + a_i, mask + a_m
        f_i = self.image_mlp(self.image_norm2(i1))
        f_m = self.mask_mlp(self.mask_norm2(m1))
        if self.mutual:
            return m1 + f_i, i1 + f_m
        return i1 + f_i, m1 + f_m


class MaskEnhancedAdapter(nn.Module):
    """MFEBs, residual + LayerNorm, fusion self-attention, add & norm, MLP (see module doc)."""

    def __init__(self, *, dim: int, depth: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.blocks = nn.ModuleList(
            MutualFeatureEnhancementBlock(dim=dim, num_heads=num_heads, mlp_ratio=mlp_ratio)
            for _ in range(depth)
        )
        self.image_norm = nn.LayerNorm(dim)
        self.mask_norm = nn.LayerNorm(dim)
        self.fusion_attn = SelfAttention(dim=dim, num_heads=num_heads)
        self.fusion_norm = nn.LayerNorm(dim)
        self.mlp = MLPBlock(embedding_dim=dim, mlp_dim=int(dim * mlp_ratio))

    def forward(
        self, image_embeddings: torch.Tensor, mask_embeddings: torch.Tensor
    ) -> torch.Tensor:
        """(B, C, E, E, E) image and dense mask embeddings -> updated image embedding, same shape.

        A (1, C, E, E, E) image embedding is shared by a batch of B mask embeddings.
        """
        b, c, d, h, w = mask_embeddings.shape
        if image_embeddings.shape[0] != b:
            image_embeddings = image_embeddings.expand(b, -1, -1, -1, -1)
        image = image_embeddings.flatten(2).transpose(1, 2)
        mask = mask_embeddings.flatten(2).transpose(1, 2)
        i, m = image, mask
        for blk in self.blocks:
            i, m = blk(i, m)
        i = self.image_norm(image + i)
        m = self.mask_norm(mask + m)
        x = self.fusion_norm(i + self.fusion_attn(i + m))
        x = x + self.mlp(x)
        return x.transpose(1, 2).reshape(b, c, d, h, w)
