"""slidesam: promptable 3D medical image segmentation (Slide-SAM, SSA, TransferSAM, M-SAM)."""

__version__ = "0.1.0"
