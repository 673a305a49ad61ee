"""SAM's mask decoder with ``num_slices`` upscaling branches (Slide-SAM: 3, one per slice).

The two-way transformer, the 4 mask tokens (token 0: single-mask output; tokens 1..3: the
multimask candidates), the hypernetwork MLPs and the IoU head are SAM's and are shared by all
slices. Only the upscaling path is per slice: ``output_upscaling`` (slice 0, SAM's name),
``output_upscaling2`` and ``output_upscaling3`` (the names of the Slide-SAM release).
One IoU prediction per candidate is shared by the slices.
"""

from __future__ import annotations

import torch
from torch import nn

from slidesam.modeling.common import MLP, LayerNorm2d
from slidesam.modeling.transformer import TwoWayTransformer

__all__ = ["MaskDecoder", "upscaling_name"]


def upscaling_name(slice_index: int) -> str:
    """Attribute name of the upscaling branch of slice ``i`` (0 -> ``output_upscaling``)."""
    return "output_upscaling" if slice_index == 0 else f"output_upscaling{slice_index + 1}"


def _upscaling(dim: int) -> nn.Sequential:
    return nn.Sequential(
        nn.ConvTranspose2d(dim, dim // 4, kernel_size=2, stride=2),
        LayerNorm2d(dim // 4),
        nn.GELU(),
        nn.ConvTranspose2d(dim // 4, dim // 8, kernel_size=2, stride=2),
        nn.GELU(),
    )


class MaskDecoder(nn.Module):
    def __init__(
        self,
        *,
        transformer_dim: int,
        transformer: TwoWayTransformer,
        num_multimask_outputs: int = 3,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
        num_slices: int = 1,
    ):
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = transformer
        self.num_multimask_outputs = num_multimask_outputs
        self.num_slices = num_slices
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.num_mask_tokens = num_multimask_outputs + 1
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        for i in range(num_slices):
            self.add_module(upscaling_name(i), _upscaling(transformer_dim))
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
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Predict masks from image and prompt embeddings.

        Args:
            image_embeddings: (B_img, C, E, E); B_img is 1 (shared by all prompts) or B.
            image_pe: (1, C, E, E).
            sparse_prompt_embeddings: (B, N, C).
            dense_prompt_embeddings: (B, C, E, E).
            multimask_output: the 3 candidates (True) or the single-mask token (False).

        Returns:
            low-res mask logits (B, K, num_slices, 4E, 4E) and IoU predictions (B, K), K = 3 or 1.
        """
        masks, iou_pred = self.predict_masks(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings
        )
        sl = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, sl], iou_pred[:, sl]

    def predict_masks(
        self, image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat([output_tokens[None].expand(b, -1, -1), sparse_prompt_embeddings], 1)
        if image_embeddings.shape[0] == b:
            src = image_embeddings
        else:
            src = torch.repeat_interleave(image_embeddings, b, dim=0)
        src = src + dense_prompt_embeddings
        pos_src = torch.repeat_interleave(image_pe, b, dim=0)
        _, c, h, w = src.shape
        hs, src = self.transformer(src, pos_src, tokens)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens, :]
        src = src.transpose(1, 2).reshape(b, c, h, w)
        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)],
            dim=1,
        )  # (B, K, C/8), shared by the slices
        per_slice = []
        for i in range(self.num_slices):
            up = getattr(self, upscaling_name(i))(src)  # (B, C/8, 4h, 4w)
            _, cu, hu, wu = up.shape
            per_slice.append((hyper_in @ up.reshape(b, cu, hu * wu)).reshape(b, -1, hu, wu))
        masks = torch.stack(per_slice, dim=2)
        return masks, self.iou_prediction_head(iou_token_out)
