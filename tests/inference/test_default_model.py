"""The embedded default Slide-SAM: shipped, small, and able to find a phantom tumour."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import numpy as np
import pytest

from slidesam.core.prompts import Prompt
from slidesam.data.phantom import PhantomConfig, generate_case
from slidesam.evaluation.metrics import binary_scores
from slidesam.inference.models import DEFAULT_MODEL_FILE, default_model
from slidesam.inference.predictor import SlideSAMPredictor
from slidesam.inference.propagation import PropagationConfig, VolumeSegmenter
from slidesam.training.config import load_train_config


def test_shipped_with_its_card_and_small():
    weights = files("slidesam") / "weights"
    assert (weights / DEFAULT_MODEL_FILE).is_file()
    assert (weights / "MODEL_CARD_slidesam.md").is_file()
    assert (weights / DEFAULT_MODEL_FILE).stat().st_size <= 20 * 2**20


def test_segments_a_new_phantom_tumour_from_boxes():
    model = default_model()
    assert model.config.variant == "tiny"
    assert model.config.roi_context == 2.0
    case = generate_case(0, seed=31337, config=PhantomConfig())  # not a training seed
    image, tumor = case.phases["arterial"], case.labels["arterial"].array == 2
    prompts = []
    for z in np.flatnonzero(tumor.any(axis=(1, 2))):
        ys, xs = np.nonzero(tumor[z])
        prompts.append(Prompt(slice=int(z), box=(xs.min(), ys.min(), xs.max(), ys.max())))
    out = VolumeSegmenter(SlideSAMPredictor(model), PropagationConfig(mode="per-slice")).segment(
        image, prompts
    )
    # measured 0.8-0.95 on typical cases; an untrained model scores near 0
    assert binary_scores(out.labels > 0, tumor, spacing=image.spacing).dice > 0.6


def test_committed_recipe_describes_the_shipped_model():
    """configs/train_tiny_phantom.yaml is the recipe the model card quotes: same variant and
    field of view as the shipped weights, and what made the model meet its targets."""
    recipe = Path(__file__).parents[2] / "configs" / "train_tiny_phantom.yaml"
    if not recipe.is_file():
        pytest.skip("the configs/ folder is not next to the tests (installed package)")
    config = load_train_config(recipe)
    model = default_model()
    assert (config.model.variant, config.model.roi_context) == (
        model.config.variant,
        model.config.roi_context,
    )
    assert config.model.init_checkpoint is None  # from scratch: no SAM weights at this size
    assert config.data.class_weights == {"tumor": 3.0}
    assert config.run.select_by == "window_dice"  # dice3d on 3 volumes picked a fluke epoch
    assert len(config.data.folders) == 6  # 3 phases x (uniform cohort, small-tumor cohort)
