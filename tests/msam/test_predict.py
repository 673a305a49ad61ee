"""Whole-volume inference: seamless tile blending, growth across tiles, exact paste-back."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slidesam.core import Geometry, Volume
from slidesam.core.prompts import Prompt
from slidesam.data.io import read_label, write_mask
from slidesam.modeling.sam3d import build_sam3d, variant3d_config
from slidesam.msam.config import PreprocessConfig
from slidesam.msam.data import crop_or_pad
from slidesam.msam.predict import MSamPredictor, ObjectClicks, hann_window


def _predictor(**kw) -> MSamPredictor:
    torch.manual_seed(0)
    model = build_sam3d(variant3d_config("tiny_32"))
    return MSamPredictor(model, PreprocessConfig(spacing=(2.0, 2.0, 2.0)), **kw)


def _object(lo, hi) -> ObjectClicks:
    lo, hi = np.asarray(lo, float), np.asarray(hi, float)
    return ObjectClicks(
        label=1, points=((lo + hi) / 2)[None].astype(np.float32), labels=np.ones(1, np.int64),
        lo=lo, hi=hi,
    )  # fmt: skip


def test_hann_window_is_smooth_and_vanishes_at_faces():
    w = hann_window(32)
    assert w.max() <= 1
    assert w[16, 16, 16] > 0.99
    assert w[0, 16, 16] < 3e-3
    assert np.abs(np.diff(w, axis=0)).max() < 0.1


def test_constant_logit_model_gives_a_constant_map_across_tile_borders():
    pred = _predictor(overlap=0.5)
    calls = []

    def constant(image, pad, start, clicks, prompt):
        calls.append(tuple(start))
        return np.full((32, 32, 32), 3.0, np.float32)

    pred._tile_logits = constant
    image = np.zeros((40, 100, 100), np.float32)
    out = pred._segment_object(image, 0.0, _object((5, 10, 10), (35, 90, 90)))
    assert len(calls) >= 9  # the extent needs several tiles in y and x
    covered = out > -20
    assert covered[5:35, 10:90, 10:90].all()
    np.testing.assert_allclose(out[covered], 3.0, rtol=1e-6)


def test_disagreeing_tiles_blend_without_seams():
    """Tiles that disagree by a constant offset (0 or 10, a checkerboard over the lattice): a
    hard paste would jump by 10 at tile borders; the blend changes by a small fraction per voxel,
    and a smooth global field passes through unchanged."""
    pred = _predictor(overlap=0.5)
    z, y, x = np.meshgrid(np.arange(40), np.arange(100), np.arange(100), indexing="ij")
    # positive: tiles without clicks refine what the blend already holds (else they are skipped)
    field = (5.0 + np.sin(y / 15.0) + np.cos(x / 20.0) + z / 40.0).astype(np.float32)

    def smooth(image, pad, start, clicks, prompt):
        return crop_or_pad(field, start, 32, 0.0)

    pred._tile_logits = smooth
    obj = _object((5, 10, 10), (35, 90, 90))
    out = pred._segment_object(field, 0.0, obj)
    inner = (slice(6, 34), slice(12, 88), slice(12, 88))
    np.testing.assert_allclose(out[inner], field[inner], atol=1e-5)

    anchor, _ = pred._first_tiles(obj)

    def offset(image, pad, start, clicks, prompt):
        t = (np.asarray(start) - anchor) // pred.stride
        return crop_or_pad(field, start, 32, 0.0) + 10.0 * (int(t.sum()) % 2)

    pred._tile_logits = offset
    out = pred._segment_object(field, 0.0, obj)
    steps = [np.abs(np.diff(out[inner], axis=a)).max() for a in range(3)]
    field_steps = [np.abs(np.diff(field[inner], axis=a)).max() for a in range(3)]
    assert max(steps) < 2.5, steps  # a hard cut would jump by ~10
    assert max(s - f for s, f in zip(steps, field_steps, strict=True)) < 2.0


def test_object_larger_than_a_crop_is_followed_across_tiles():
    pred = _predictor(overlap=0.5)
    seen = []

    def slab(image, pad, start, clicks, prompt):
        seen.append((tuple(start), clicks is not None, prompt is not None))
        z = np.arange(32)[:, None, None] + start[0]
        return np.broadcast_to(np.where((z >= 10) & (z < 80), 5.0, -5.0), (32, 32, 32)).copy()

    pred._tile_logits = slab
    image = np.zeros((90, 32, 32), np.float32)
    out = pred._segment_object(image, 0.0, _object((40, 16, 16), (40, 16, 16)))
    assert seen[0][1]
    assert any(p for _, c, p in seen if not c)
    fg = np.nonzero((out > 0).any(axis=(1, 2)))[0]
    assert fg.min() == 10
    assert fg.max() == 79


def _oblique_volume() -> tuple[Volume, np.ndarray]:
    """A bright ball in a grid with anisotropic spacing, an offset origin and a flipped,
    permuted direction."""
    direction = np.array([[0.0, 0.0, -1.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]])
    geom = Geometry(shape=(30, 44, 40), spacing=(2.5, 1.6, 1.8), origin=(10.0, -20.0, 30.0),
                    direction=direction)  # fmt: skip
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in geom.shape], indexing="ij"), -1)
    world = geom.index_to_world(idx)
    centre = geom.index_to_world(np.array([14.0, 20.0, 22.0]))
    ball = np.linalg.norm(world - centre, axis=-1) < 14.0
    image = np.where(ball, 100.0, -100.0).astype(np.int16)
    return Volume(array=image, geometry=geom), ball


def test_paste_back_has_the_input_geometry_and_lands_on_the_object(tmp_path):
    volume, ball = _oblique_volume()
    pred = _predictor(overlap=0.5)

    def threshold(image, pad, start, clicks, prompt):  # "segment what is bright"
        mid = (image.max() + image.min()) / 2
        return np.where(crop_or_pad(image, start, 32, pad) > mid, 4.0, -4.0).astype(np.float32)

    pred._tile_logits = threshold
    c = np.argwhere(ball).mean(0)
    mask = pred.segment(volume, [Prompt(slice=int(c[0]), label=3, points=((c[2], c[1]),),
                                        point_labels=(1,))])  # fmt: skip
    assert mask.shape == volume.shape
    assert set(np.unique(mask)) == {0, 3}
    dice = 2 * ((mask == 3) & ball).sum() / ((mask == 3).sum() + ball.sum())
    assert dice > 0.9, dice
    back = read_label(write_mask(mask, volume, tmp_path / "mask.mha"))
    assert back.geometry == volume.geometry  # bit for bit: spacing, origin, direction
    np.testing.assert_array_equal(back.array, mask)
    nifti = read_label(write_mask(mask, volume, tmp_path / "mask.nii.gz"))
    assert nifti.geometry.mismatch(volume.geometry) == ""  # NIfTI stores float32 spacing


def test_box_prompt_becomes_a_centre_click_and_sets_the_extent():
    volume, _ = _oblique_volume()
    pred = _predictor()
    from slidesam.msam.data import to_working_grid

    _, work = to_working_grid(volume, pred.preprocess)
    (obj,) = pred.object_clicks([Prompt(slice=14, box=(10, 12, 30, 28))], volume.geometry, work)
    expected = work.world_to_index(volume.geometry.index_to_world(np.array([14.0, 20.0, 20.0])))
    np.testing.assert_allclose(obj.points[0], expected, atol=1e-4)
    assert obj.labels.tolist() == [1]
    assert np.all(obj.hi - obj.lo > 5)  # the box spans the extent, not just the click


def test_real_model_segment_runs_and_keeps_shape():
    volume, _ = _oblique_volume()
    mask = _predictor(iterations=2, max_tiles=2).segment(
        volume, [Prompt(slice=14, points=((22, 20),), point_labels=(1,))]
    )
    assert mask.shape == volume.shape
    assert mask.dtype == np.uint8


def test_bad_arguments_are_input_errors():
    from slidesam.core.errors import InputError

    with pytest.raises(InputError, match="iterations"):
        _predictor(iterations=0)
    volume, _ = _oblique_volume()
    with pytest.raises(InputError, match="no positive"):
        _predictor().segment(volume, [Prompt(slice=3, points=((5, 5),), point_labels=(0,))])
