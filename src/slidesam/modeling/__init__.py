"""Pure ``nn.Module``s: SAM building blocks with official names, the Slide-SAM decoder, LoRA.

No file I/O and no numpy preprocessing here (see ``slidesam.inference`` for both).
"""

from slidesam.modeling.build import TRAINABLE_PRESETS, build_model, set_trainable
from slidesam.modeling.sam import Sam

__all__ = ["TRAINABLE_PRESETS", "Sam", "build_model", "set_trainable"]
