"""SAM-Med3D's 3D prompt encoder: points (positive / negative) and a dense mask prompt.

Names follow SAM-Med3D's ``prompt_encoder3D.py`` (``pe_layer``, ``point_embeddings.{0,1}``,
``not_a_point_embed``, ``mask_downscaling``, ``no_mask_embed``).
Coordinates: points (B, N, 3) are voxel indices (z, y, x) of the model input (0..image_size),
labels (B, N) are 1 (object), 0 (background) or -1 (padding). Mask prompts are (B, 1, L, L, L)
logits, ``L = 4 * embedding side`` (32 for SAM-Med3D).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from slidesam.modeling.sam3d.common import LayerNorm3d

__all__ = ["PositionEmbeddingRandom3D", "PromptEncoder3D"]


class PromptEncoder3D(nn.Module):
    def __init__(
        self,
        *,
        embed_dim: int,
        image_embedding_size: int,
        input_image_size: int,
        mask_in_chans: int,
        sam_med3d_pe: bool = True,
    ):
        super().__init__()
        self.embed_dim = embed_dim
        self.input_image_size = input_image_size
        self.image_embedding_size = image_embedding_size
        self.pe_layer = PositionEmbeddingRandom3D(embed_dim // 3, sam_med3d_order=sam_med3d_pe)
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(2))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_input_size = 4 * image_embedding_size
        self.mask_downscaling = nn.Sequential(
            nn.Conv3d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm3d(mask_in_chans // 4),
            nn.GELU(),
            nn.Conv3d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm3d(mask_in_chans),
            nn.GELU(),
            nn.Conv3d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        """Positional encoding of the embedding grid, (1, embed_dim, E, E, E)."""
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    def _embed_points(self, points: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        points = points + 0.5  # to the voxel centre
        points = torch.cat([points, torch.zeros_like(points[:, :1])], dim=1)  # one padding point
        labels = torch.cat([labels, -torch.ones_like(labels[:, :1])], dim=1)
        emb = self.pe_layer.forward_with_coords(points, self.input_image_size)
        emb = torch.where((labels == -1)[..., None], self.not_a_point_embed.weight, emb)
        emb = emb + (labels == 0)[..., None] * self.point_embeddings[0].weight
        return emb + (labels == 1)[..., None] * self.point_embeddings[1].weight

    def forward(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        masks: torch.Tensor | None,
        batch_size: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sparse (B, N + 1, C) (empty (B, 0, C) without points) and dense (B, C, E, E, E)."""
        if points is not None:
            batch_size = points[0].shape[0]
        elif masks is not None:
            batch_size = masks.shape[0]
        device = self.no_mask_embed.weight.device
        if points is not None:
            sparse = self._embed_points(points[0].float(), points[1])
        else:
            sparse = torch.empty((batch_size, 0, self.embed_dim), device=device)
        if masks is not None:
            dense = self.mask_downscaling(masks)
        else:
            e = self.image_embedding_size
            dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1, 1).expand(
                batch_size, -1, e, e, e
            )
        return sparse, dense


class PositionEmbeddingRandom3D(nn.Module):
    """Random Fourier features of normalised (z, y, x) coordinates: [sin, cos, sin] (SAM-Med3D).

    ``sam_med3d_order``: SAM-Med3D's dense grid puts the axis-1 coordinate first and the axis-0
    coordinate second (points are not swapped); kept so its weights behave as trained.
    """

    def __init__(self, num_pos_feats: int, *, sam_med3d_order: bool = True):
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn((3, num_pos_feats)))
        self.sam_med3d_order = sam_med3d_order

    def _pe_encoding(self, coords: torch.Tensor) -> torch.Tensor:
        coords = (2 * coords - 1) @ self.positional_encoding_gaussian_matrix
        coords = 2 * math.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords), torch.sin(coords)], dim=-1)

    def forward(self, size: int) -> torch.Tensor:
        """(C, n, n, n) encoding of the cell centres of an n^3 grid."""
        device = self.positional_encoding_gaussian_matrix.device
        grid = torch.ones((size, size, size), device=device)
        a0 = (grid.cumsum(dim=0) - 0.5) / size
        a1 = (grid.cumsum(dim=1) - 0.5) / size
        a2 = (grid.cumsum(dim=2) - 0.5) / size
        coords = [a1, a0, a2] if self.sam_med3d_order else [a0, a1, a2]
        return self._pe_encoding(torch.stack(coords, dim=-1)).permute(3, 0, 1, 2)

    def forward_with_coords(self, coords: torch.Tensor, image_size: int) -> torch.Tensor:
        """(B, N, 3) voxel coordinates (z, y, x) -> (B, N, C)."""
        return self._pe_encoding(coords.float() / image_size)
