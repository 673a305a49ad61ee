"""``Sam``: image encoder + prompt encoder + mask decoder (plain SAM or Slide-SAM).

Stateless: the predictor (``slidesam.inference.predictor``) holds images and embeddings.
"""

from __future__ import annotations

import torch
from torch import nn

from slidesam.core.config import SamConfig
from slidesam.modeling.image_encoder import ImageEncoderViT
from slidesam.modeling.lora import LoRAQKV
from slidesam.modeling.mask_decoder import MaskDecoder
from slidesam.modeling.prompt_encoder import PromptEncoder

__all__ = ["Sam"]


class Sam(nn.Module):
    mask_threshold: float = 0.0
    #: the config it was built from (set by ``build_model``; saved with every checkpoint)
    config: SamConfig | None = None

    def __init__(
        self,
        *,
        image_encoder: ImageEncoderViT,
        prompt_encoder: PromptEncoder,
        mask_decoder: MaskDecoder,
        pixel_mean: tuple[float, float, float] = (123.675, 116.28, 103.53),
        pixel_std: tuple[float, float, float] = (58.395, 57.12, 57.375),
    ):
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @property
    def num_slices(self) -> int:
        return self.mask_decoder.num_slices

    @property
    def image_size(self) -> int:
        return self.image_encoder.img_size

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) RGB 0..255 -> normalised input of the image encoder."""
        return (images - self.pixel_mean) / self.pixel_std

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) RGB 0..255 -> image embeddings (B, C, E, E)."""
        return self.image_encoder(self.preprocess(images))

    def decode(
        self,
        image_embeddings: torch.Tensor,
        *,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
        boxes: torch.Tensor | None = None,
        mask_prompt: torch.Tensor | None = None,
        multimask_output: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks for B prompts on one image (embeddings (1, C, E, E)) or B images (B, C, E, E).

        Args:
            points: coords (B, N, 2) XY and labels (B, N) (1 positive, 0 negative, -1 padding),
                in model-input pixels.
            boxes: (B, 4) XYXY in model-input pixels.
            mask_prompt: (B, num_slices, 4E, 4E) logits.

        Returns:
            low-res logits (B, K, num_slices, 4E, 4E) and IoU predictions (B, K).
        """
        sparse, dense = self.prompt_encoder(points=points, boxes=boxes, masks=mask_prompt)
        return self.mask_decoder(
            image_embeddings=image_embeddings,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
        )

    def forward(self, images: torch.Tensor, **prompts) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode (B, 3, S, S) images and decode one prompt per image (training path)."""
        return self.decode(self.encode(images), **prompts)

    # --- LoRA -------------------------------------------------------------------------------
    def lora_layers(self) -> list[LoRAQKV]:
        return [m for m in self.modules() if isinstance(m, LoRAQKV)]

    def merge_lora(self) -> None:
        """Fold every LoRA update into its base weight (fast inference); see ``unmerge_lora``."""
        for m in self.lora_layers():
            m.merge()

    def unmerge_lora(self) -> None:
        for m in self.lora_layers():
            m.unmerge()
