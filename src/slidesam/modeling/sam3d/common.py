"""``LayerNorm3d``: LayerNorm over the channel axis of a (B, C, D, H, W) tensor (SAM-Med3D's
name for it; the 2D module already handles any number of spatial axes)."""

from __future__ import annotations

from slidesam.modeling.common import LayerNorm2d

__all__ = ["LayerNorm3d"]


class LayerNorm3d(LayerNorm2d):
    """LayerNorm over the channel axis of a (B, C, D, H, W) tensor."""
