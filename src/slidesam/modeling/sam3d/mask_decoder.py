"""SAM-Med3D's 3D mask decoder (names as in its ``mask_decoder3D.py``).

The two-way transformer is our 2D SAM's ``TwoWayTransformer``: it works on flattened tokens, so
it is the same module (and the same state-dict names) for a 3D grid. Four mask tokens (token 0:
single mask; 1..3: multimask candidates), hypernetwork MLPs, an IoU head, and a 3D transposed-conv
upscaling from the E^3 embedding grid to the (4E)^3 low-resolution logits.
"""

from __future__ import annotations

import torch
from torch import nn

from slidesam.modeling.common import MLP
from slidesam.modeling.sam3d.common import LayerNorm3d
from slidesam.modeling.transformer import TwoWayTransformer

__all__ = ["MaskDecoder3D"]


class MaskDecoder3D(nn.Module):
    def __init__(
        self,
        *,
        transformer_dim: int,
        transformer: TwoWayTransformer,
        num_multimask_outputs: int = 3,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
    ):
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = transformer
        self.num_multimask_outputs = num_multimask_outputs
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.num_mask_tokens = num_multimask_outputs + 1
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose3d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm3d(transformer_dim // 4),
            nn.GELU(),
            nn.ConvTranspose3d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(
                input_dim=transformer_dim,
                hidden_dim=transformer_dim,
                output_dim=transformer_dim // 8,
                num_layers=3,
            )
            for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(
            input_dim=transformer_dim,
            hidden_dim=iou_head_hidden_dim,
            output_dim=self.num_mask_tokens,
            num_layers=iou_head_depth,
        )

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor | None,
        multimask_output: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks from image and prompt embeddings.

        Args:
            image_embeddings: (B_img, C, E, E, E); B_img is 1 (shared) or B.
            image_pe: (1, C, E, E, E).
            sparse_prompt_embeddings: (B, N, C).
            dense_prompt_embeddings: (B, C, E, E, E) added to the image embeddings (SAM-Med3D),
                or None when they were already fused into ``image_embeddings`` (M-SAM's MEA).
            multimask_output: the 3 candidates (True) or the single-mask token (False).

        Returns:
            low-res logits (B, K, 4E, 4E, 4E) and IoU predictions (B, K), K = 3 or 1.
        """
        b = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens[None].expand(b, -1, -1), sparse_prompt_embeddings], 1)
        src = image_embeddings
        if src.shape[0] != b:
            src = torch.repeat_interleave(src, b, dim=0)
        if dense_prompt_embeddings is not None:
            src = src + dense_prompt_embeddings
        pos_src = torch.repeat_interleave(image_pe, b, dim=0)
        _, c, d, h, w = src.shape
        hs, src = self.transformer(src, pos_src, tokens)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens, :]
        up = self.output_upscaling(src.transpose(1, 2).reshape(b, c, d, h, w))
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)],
            dim=1,
        )
        _, cu, du, hu, wu = up.shape
        masks = (hyper_in @ up.reshape(b, cu, du * hu * wu)).reshape(b, -1, du, hu, wu)
        iou_pred = self.iou_prediction_head(iou_token_out)
        sl = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, sl], iou_pred[:, sl]
