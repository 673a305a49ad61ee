"""Model loading and prediction: checkpoints (official SAM, released Slide-SAM, ours), the
public constructors and ``SlideSAMPredictor``."""

from slidesam.inference.models import build_sam, build_slidesam, load_model
from slidesam.inference.predictor import SlideSAMPredictor, WindowPrediction

__all__ = ["SlideSAMPredictor", "WindowPrediction", "build_sam", "build_slidesam", "load_model"]
