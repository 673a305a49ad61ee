from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import slidesam
from slidesam.core import Geometry, InputError, Volume
from slidesam.data.io import write_image, write_mask
from slidesam.data.prepare import PrepareConfig, prepare_dataset
from slidesam.data.roi import Roi
from slidesam.inference.predictor import stability_score

SHAPE = (6, 48, 64)  # z, y, x: axial slices are 48 rows x 64 columns


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return slidesam.build_slidesam("tiny_64", lora_rank=2)


@pytest.fixture
def volume():
    rng = np.random.default_rng(0)
    g = Geometry(shape=SHAPE, spacing=(3.0, 1.0, 1.0))
    return Volume(rng.integers(-300, 500, SHAPE).astype(np.int16), g)


def test_window_images_are_exactly_what_prepare_writes(tmp_path, model, volume):
    ds = tmp_path / "Dataset1_T"
    write_image(volume, ds / "imagesTr" / "c_0000.nii.gz")
    labels = np.zeros(SHAPE, np.uint8)
    labels[:, 10:30, 10:40] = 1
    write_mask(labels, volume.geometry, ds / "labelsTr" / "c.nii.gz")
    (ds / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "x": 1}}))
    prepare_dataset(
        ds, tmp_path / "out", PrepareConfig(size=64, image_format="png"), progress=False
    )
    predictor = slidesam.SlideSAMPredictor(model)
    predictor.set_volume(volume)
    for c in range(1, SHAPE[0] - 1):
        written = np.asarray(
            Image.open(tmp_path / "out" / ds.name / "images" / "c" / f"z_{c:04d}.png")
        )
        np.testing.assert_array_equal(predictor.window_image(c), written)


def test_prompts_are_rescaled_to_the_model_and_masks_back(model, volume, monkeypatch):
    predictor = slidesam.SlideSAMPredictor(model)
    predictor.set_volume(volume)
    seen = {}
    original = model.decode

    def spy(emb, **kw):
        seen.update(kw)
        return original(emb, **kw)

    monkeypatch.setattr(model, "decode", spy)
    out = predictor.predict(2, boxes=[8, 12, 40, 36], points=[[16, 24]], point_labels=[1])
    # slice is 48 rows (y) x 64 columns (x), model input 64 x 64: x * 1, y * 64/48
    torch.testing.assert_close(seen["boxes"], torch.tensor([[8.0, 16.0, 40.0, 48.0]]))
    torch.testing.assert_close(seen["points"][0], torch.tensor([[[16.0, 32.0]]]))
    assert out.masks.shape == (1, 3, 3, 48, 64)
    assert out.masks.dtype == bool
    assert out.logits.shape == (1, 3, 3, 48, 64)
    assert out.low_res_logits.shape == (1, 3, 3, 32, 32)
    assert out.iou.shape == (1, 3)
    assert out.stability.shape == (1, 3, 3)
    assert out.slices == (1, 2, 3)
    np.testing.assert_array_equal(out.masks, out.logits > 0)
    assert out.best().shape == (1,)


def test_edge_windows_repeat_the_edge_slice(model, volume):
    predictor = slidesam.SlideSAMPredictor(model)
    predictor.set_volume(volume)
    first = predictor.window_image(0)
    np.testing.assert_array_equal(first[..., 0], first[..., 1])  # slice 0 twice, then slice 1
    assert predictor.predict(0, boxes=[1, 1, 20, 20]).slices == (0, 0, 1)
    assert predictor.predict(5, boxes=[1, 1, 20, 20]).slices == (4, 5, 5)


def test_embeddings_lazy_batched_and_bounded(model, volume, monkeypatch):
    predictor = slidesam.SlideSAMPredictor(model, batch_size=2, cache_size=3)
    predictor.set_volume(volume)
    calls = []
    original = model.encode

    def counting(x):
        calls.append(x.shape[0])
        return original(x)

    monkeypatch.setattr(model, "encode", counting)
    emb = predictor.embeddings([0, 1, 2, 3, 4])
    assert calls == [2, 2, 1]  # five windows in batches of two
    assert emb.shape[0] == 5
    assert list(predictor.state.embeddings) == [2, 3, 4]  # LRU keeps the last three
    predictor.embeddings([3, 4])
    assert calls == [2, 2, 1]  # cached: no new encoder call
    predictor.embeddings([0])
    assert calls == [2, 2, 1, 1]
    assert list(predictor.state.embeddings) == [3, 4, 0]
    # a cached embedding equals a fresh one
    torch.testing.assert_close(predictor.embeddings([4])[0], emb[4])


def test_mask_prompt_and_multimask_switch(model, volume):
    predictor = slidesam.SlideSAMPredictor(model)
    predictor.set_volume(volume)
    mask = np.zeros((3, 48, 64), bool)
    mask[:, 10:20, 10:30] = True
    out = predictor.predict(3, mask_prompt=mask, multimask=False)
    assert out.masks.shape == (1, 1, 3, 48, 64)
    two = predictor.predict(3, boxes=[[1, 1, 10, 10], [5, 5, 30, 30]])
    assert two.masks.shape[0] == 2


def test_stability_score_by_hand():
    logits = np.array([[[2.0, 0.5], [-0.5, -2.0]]])  # > 1: one pixel; > -1: three pixels
    np.testing.assert_allclose(stability_score(logits), [1 / 3])
    assert stability_score(np.full((1, 2, 2), -5.0))[0] == 0.0


def test_bad_calls(model, volume):
    predictor = slidesam.SlideSAMPredictor(model)
    with pytest.raises(InputError, match="no volume set"):
        predictor.predict(0, boxes=[0, 0, 1, 1])
    predictor.set_volume(volume)
    with pytest.raises(InputError, match="at least one prompt"):
        predictor.predict(1)
    with pytest.raises(InputError, match="point_labels"):
        predictor.predict(1, points=[[1, 1]])
    with pytest.raises(InputError, match=r"mask_prompt must be \(N, 3, 48, 64\)"):
        predictor.predict(1, mask_prompt=np.zeros((3, 10, 10), bool))
    with pytest.raises(InputError, match=r"outside 0\.\.5"):
        predictor.predict(6, boxes=[0, 0, 1, 1])
    with pytest.raises(InputError, match="CUDA"):
        slidesam.SlideSAMPredictor(model, precision="bf16")


def test_plain_sam_predicts_the_centre_slice(volume):
    torch.manual_seed(0)
    sam = slidesam.build_sam("tiny_64")
    predictor = slidesam.SlideSAMPredictor(sam)
    predictor.set_volume(volume, axis="z")
    out = predictor.predict(2, boxes=[8, 12, 40, 36])
    assert out.masks.shape == (1, 3, 1, 48, 64)
    assert out.slices == (2,)


def test_per_slice_baseline_runs_a_plain_sam(volume):
    from slidesam.core.prompts import Prompt
    from slidesam.inference.propagation import PropagationConfig, VolumeSegmenter

    torch.manual_seed(0)
    sam = slidesam.build_sam("tiny_64")
    predictor = slidesam.SlideSAMPredictor(sam, batch_size=2)
    batches = []
    encode = sam.encode
    sam.encode = lambda x: batches.append(x.shape[0]) or encode(x)
    prompts = [Prompt(slice=s, box=(8, 12, 40, 36)) for s in (1, 2, 3)]
    result = VolumeSegmenter(predictor, PropagationConfig(mode="per-slice")).segment(
        volume, prompts
    )
    assert [c for _, c, _ in result.windows] == [1, 2, 3]
    assert result.encoder_passes == 3
    assert batches == [2, 1]  # the independent windows are encoded in batches
    assert not result.labels[[0, 4, 5]].any()  # only the prompted slices can be labelled
    assert {r.slice for r in result.records} == {1, 2, 3}


def test_zoomed_model_crops_around_each_prompt_and_pastes_back(volume):
    torch.manual_seed(0)
    zoomed = slidesam.build_slidesam("tiny_64", lora_rank=0, roi_context=2.0)
    predictor = slidesam.SlideSAMPredictor(zoomed)
    assert predictor.roi_context == 2.0
    predictor.set_volume(volume)
    box = [20, 10, 29, 19]  # 10 x 10 px -> a 20 px crop centred on (25, 15)
    out = predictor.predict(2, boxes=box)
    assert out.rois == (Roi(cx=25.0, cy=15.0, side=20.0),)
    # the model saw the crop: the box fills the middle half of its input
    img = predictor.window_image(2, out.rois[0])
    assert img.shape == (64, 64, 3)
    assert img.dtype == np.float32
    # outside the crop (beyond a pixel of interpolation) everything is background
    assert out.logits.shape == (1, 3, 3, 48, 64)
    assert np.all(out.logits[..., :, 37:] == -20.0)
    assert np.all(out.logits[..., 27:, :] == -20.0)
    assert predictor.encoder_passes == 1
    predictor.predict(2, boxes=box)  # same crop: cached
    assert predictor.encoder_passes == 1
    two = predictor.predict(2, boxes=[box, [0, 0, 47, 39]])  # one crop each
    assert predictor.encoder_passes == 2
    assert len(two.rois) == 2
    assert two.logits.shape == (2, 3, 3, 48, 64)
    np.testing.assert_allclose(two.logits[0], out.logits[0], atol=1e-5)
    # points or a mask prompt also say where to look; nothing at all is refused
    assert predictor.predict(2, points=[[25, 15]], point_labels=[1]).rois[0].cx == 25.5
    with pytest.raises(InputError, match="needs a box"):
        predictor.predict(2, points=[[25, 15]], point_labels=[0])


def test_roi_context_zero_overrides_a_zoomed_model(volume):
    zoomed = slidesam.build_slidesam("tiny_64", lora_rank=0, roi_context=2.0)
    predictor = slidesam.SlideSAMPredictor(zoomed, roi_context=0)
    predictor.set_volume(volume)
    assert predictor.predict(2, boxes=[20, 10, 29, 19]).rois is None
