"""``Sam3D``: composes the 3D image encoder, prompt encoder, MEA (optional) and mask decoder.

Stateless: no cached embeddings, no I/O (the M-SAM predictor in ``slidesam.msam`` holds state).
Input images are already normalised (z-score) crops (B, 1, S, S, S), axes (z, y, x).
"""

from __future__ import annotations

import torch
from torch import nn

from slidesam.modeling.lora import LoRAQKV
from slidesam.modeling.sam3d.image_encoder import ImageEncoderViT3D
from slidesam.modeling.sam3d.mask_decoder import MaskDecoder3D
from slidesam.modeling.sam3d.mea import MaskEnhancedAdapter
from slidesam.modeling.sam3d.prompt_encoder import PromptEncoder3D

__all__ = ["Sam3D"]


class Sam3D(nn.Module):
    def __init__(
        self,
        *,
        image_encoder: ImageEncoderViT3D,
        prompt_encoder: PromptEncoder3D,
        mask_decoder: MaskDecoder3D,
        mea: MaskEnhancedAdapter | None = None,
    ):
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.mea = mea

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S, S) normalised crops -> image embeddings (B, C, E, E, E)."""
        return self.image_encoder(images)

    def decode(
        self,
        image_embeddings: torch.Tensor,
        *,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask_prompt: torch.Tensor | None = None,
        multimask_output: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-res logits (B, K, L, L, L) and IoU predictions (B, K) for B prompts.

        Args:
            image_embeddings: (B, C, E, E, E), or (1, C, E, E, E) shared by the prompts.
            points: coords (B, N, 3) as (z, y, x) voxel indices of the input crop and labels
                (B, N) (1 object, 0 background, -1 padding); None for mask-only refinement.
            mask_prompt: (B, 1, L, L, L) logits of the previous iteration, L = 4E (None: SAM's
                learned "no mask" embedding; with the MEA an all-zero mask is used instead).
        """
        b = (
            points[0].shape[0]
            if points is not None
            else (mask_prompt.shape[0] if mask_prompt is not None else image_embeddings.shape[0])
        )
        if self.mea is not None and mask_prompt is None:
            size = self.prompt_encoder.mask_input_size
            mask_prompt = image_embeddings.new_zeros((b, 1, size, size, size))
        sparse, dense = self.prompt_encoder(points=points, masks=mask_prompt, batch_size=b)
        if self.mea is not None:
            image_embeddings = self.mea(image_embeddings, dense)
            dense = None
        return self.mask_decoder(
            image_embeddings=image_embeddings,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
        )

    def forward(self, images: torch.Tensor, **prompts) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode and decode one prompt per image."""
        return self.decode(self.encode(images), **prompts)

    def lora_layers(self) -> list[LoRAQKV]:
        return [m for m in self.modules() if isinstance(m, LoRAQKV)]
