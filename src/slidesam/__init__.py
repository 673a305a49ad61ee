"""slidesam: promptable 3D medical image segmentation (Slide-SAM, SSA, TransferSAM, M-SAM).

The public model API is importable from here; it is loaded on first use so that
``import slidesam`` (and the CLI's start-up) does not import torch.
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "build_sam": "slidesam.inference.models",
    "build_slidesam": "slidesam.inference.models",
    "load_model": "slidesam.inference.models",
    "SlideSAMPredictor": "slidesam.inference.predictor",
    "WindowPrediction": "slidesam.inference.predictor",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'slidesam' has no attribute {name!r}")
