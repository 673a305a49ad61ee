"""3D SAM (SAM-Med3D layout) with M-SAM's Mask-Enhanced Adapter: pure ``nn.Module``s.

No file I/O or preprocessing here; the M-SAM pipeline is ``slidesam.msam``.
"""

from slidesam.modeling.sam3d.build import (
    TRAINABLE_PRESETS_3D,
    build_sam3d,
    param_groups,
    set_trainable_3d,
)
from slidesam.modeling.sam3d.config import VARIANTS3D, Sam3DConfig, variant3d_config
from slidesam.modeling.sam3d.mea import MaskEnhancedAdapter, MutualFeatureEnhancementBlock
from slidesam.modeling.sam3d.sam3d import Sam3D

__all__ = [
    "TRAINABLE_PRESETS_3D",
    "VARIANTS3D",
    "MaskEnhancedAdapter",
    "MutualFeatureEnhancementBlock",
    "Sam3D",
    "Sam3DConfig",
    "build_sam3d",
    "param_groups",
    "set_trainable_3d",
    "variant3d_config",
]
