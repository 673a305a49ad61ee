"""Traversal, stopping, fusion, anchors and records of ``VolumeSegmenter``, checked exactly with
a stub predictor whose masks are a threshold of the image inside the prompt box."""

from __future__ import annotations

import numpy as np
import pytest

from slidesam.core import Geometry, InputError, Volume
from slidesam.core.prompts import Prompt
from slidesam.inference.propagation import (
    PropagationConfig,
    VolumeSegmenter,
    denoise,
    mask_to_box,
    stability_3d,
)
from tests.inference.stub import ThresholdPredictor

N, H, W = 30, 40, 50


def tube(first=5, last=20, n=N):
    """A bright 8 x 10 px rod on slices first..last of an (n, H, W) volume."""
    a = np.zeros((n, H, W), np.float32)
    a[first : last + 1, 15:23, 20:30] = 1.0
    return Volume(a, Geometry(shape=a.shape, spacing=(2.0, 1.0, 1.0)))


BOX = (20, 15, 29, 22)


def run(volume, prompts, **cfg):
    stub = ThresholdPredictor(**cfg.pop("stub", {}))
    result = VolumeSegmenter(stub, PropagationConfig(**cfg)).segment(volume, prompts)
    return result, stub


def test_step_one_visits_every_slice_of_the_object_in_order():
    result, _stub = run(tube(), [Prompt(slice=12, box=BOX)], step=1)
    centres = [c for _, c, _ in result.windows]
    assert centres == [12, 11, 10, 9, 8, 7, 6, 5, 13, 14, 15, 16, 17, 18, 19, 20]
    assert result.encoder_passes == 16
    z = np.nonzero(result.labels.any(axis=(1, 2)))[0]
    assert (z.min(), z.max()) == (5, 20)
    np.testing.assert_array_equal(result.labels, (tube().array > 0.5).astype(np.uint8))


def test_step_three_tiles_the_volume_with_a_third_of_the_passes():
    result, stub = run(tube(), [Prompt(slice=12, box=BOX)], step=3)
    assert [(c, ok) for _, c, ok in result.windows] == [
        (12, True),
        (9, True),
        (6, True),
        (3, False),  # window 2..4 is empty: rejected
        (15, True),
        (18, True),
        (21, True),  # 20..22 still holds slice 20; edge 22 is empty
    ]
    assert result.encoder_passes == 7
    np.testing.assert_array_equal(result.labels, (tube().array > 0.5).astype(np.uint8))
    # the box of window 9 came from the edge slice 11 of window 12 (x 20..29, y 15..22), each
    # side moved in by the default 2 % of the side
    assert stub.calls[1][0] == 9
    assert stub.calls[1][1] == pytest.approx([20.2, 15.16, 28.8, 21.84])


@pytest.mark.parametrize("step", [1, 3])
def test_first_and_last_slices_are_reached(step):
    vol = tube(first=0, last=N - 1)
    result, _ = run(vol, [Prompt(slice=14, box=BOX)], step=step)
    assert result.labels[0].any()
    assert result.labels[N - 1].any()
    centres = {c for _, c, _ in result.windows}
    assert 0 in centres or 1 in centres
    assert N - 1 in centres or N - 2 in centres


def test_low_iou_stops_propagation_but_not_the_users_own_slice():
    result, _ = run(tube(), [Prompt(slice=12, box=BOX)], step=1, stub={"iou": 0.3})
    assert [(c, ok) for _, c, ok in result.windows] == [(12, True), (11, False), (13, False)]
    assert sorted(np.nonzero(result.labels.any(axis=(1, 2)))[0].tolist()) == [11, 12, 13]


def test_fusion_is_the_mean_of_window_logits():
    # gain = centre: slice 10 is covered by windows 9, 10 and 11 -> mean logit 10 inside
    result, _ = run(tube(), [Prompt(slice=12, box=BOX)], step=1, stub={"gain": lambda c: float(c)})
    p = result.probabilities[1]
    expected = 1 / (1 + np.exp(-10.0))
    np.testing.assert_allclose(p[10, 18, 25], expected, rtol=1e-6)
    np.testing.assert_allclose(p[10, 2, 2], 1 / (1 + np.exp(10.0)), rtol=1e-6)
    rec = {(r.label, r.slice): r for r in result.records}
    assert sorted(rec[(1, 10)].windows) == [9, 10, 11]
    assert rec[(1, 10)].window == 10
    assert rec[(1, 10)].source == "propagated"
    assert rec[(1, 12)].source == "prompt"
    assert rec[(1, 12)].box == list(map(float, BOX))
    assert p[0].max() == 0  # never reached


def test_anchors_own_their_slices_and_stop_each_other():
    # two anchors of one object: propagation between them stops before the other's window
    result, _ = run(
        tube(),
        [Prompt(slice=8, box=BOX), Prompt(slice=16, box=BOX)],
        step=1,
        stub={"gain": lambda c: float(c)},
    )
    centres = [c for _, c, _ in result.windows]
    assert centres == [
        8,
        7,
        6,
        5,
        9,
        10,
        11,
        12,
        13,
        14,
        16,
        15,
        14,
        13,
        12,
        11,
        10,
        17,
        18,
        19,
        20,
    ]
    rec = {r.slice: r for r in result.records}
    assert rec[8].windows == [8]
    assert rec[16].windows == [16]
    np.testing.assert_allclose(result.probabilities[1][16, 18, 25], 1 / (1 + np.exp(-16.0)))


def test_two_objects_on_one_structure_nms_keeps_the_more_confident():
    # both labels find the same rod; the stub is more confident for the tighter box (label 1)
    wide = (18, 13, 31, 24)
    prompts = [Prompt(slice=12, box=BOX, label=1), Prompt(slice=12, box=wide, label=2)]

    def iou(center, boxes):
        x0, y0, x1, y1 = boxes[0]
        return 0.95 if (x1 - x0) * (y1 - y0) < 100 else 0.8

    result, _ = run(tube(), prompts, step=3, stub={"iou": iou})
    assert set(np.unique(result.labels)) == {0, 1}
    by_label = {k: [r for r in result.records if r.label == k] for k in (1, 2)}
    assert all(r.area == 0 for r in by_label[2])
    # dropped wherever the rod is (5..20); beyond it both masks are empty, nothing to suppress
    assert {r.slice for r in by_label[2] if r.dropped == "nms"} == set(range(5, 21))
    assert not any(r.dropped for r in by_label[1])
    assert (result.labels == 1).sum() == 16 * 8 * 10


def test_separate_objects_both_survive():
    a = tube().array.copy()
    a[5:21, 30:36, 5:12] = 1.0  # a second rod elsewhere
    vol = Volume(a, tube().geometry)
    prompts = [Prompt(slice=12, box=BOX, label=1), Prompt(slice=12, box=(5, 30, 11, 35), label=3)]
    result, _ = run(vol, prompts, step=3, stub={"grow": 1})
    assert (result.labels == 1).sum() == 16 * 8 * 10
    assert (result.labels == 3).sum() == 16 * 6 * 7
    assert not any(r.dropped for r in result.records)


def test_per_slice_mode_is_the_n_boxes_baseline():
    prompts = [Prompt(slice=s, box=BOX) for s in (6, 7, 8)]
    result, _stub = run(tube(), prompts, mode="per-slice")
    assert [c for _, c, _ in result.windows] == [6, 7, 8]
    assert sorted(np.nonzero(result.labels.any(axis=(1, 2)))[0].tolist()) == [6, 7, 8]


def test_points_and_box_on_one_slice_are_merged(monkeypatch):
    stub = ThresholdPredictor()
    seen = []
    original = stub.predict

    def spy(center, **kw):
        seen.append(kw)
        return original(center, **kw)

    stub.predict = spy
    prompts = [Prompt(slice=12, box=BOX), Prompt(slice=12, points=((25, 18),), point_labels=(1,))]
    VolumeSegmenter(stub, PropagationConfig(step=3)).segment(tube(), prompts)
    assert seen[0]["boxes"] == [list(map(float, BOX))]
    assert seen[0]["points"] == [[(25.0, 18.0)]]
    assert seen[0]["point_labels"] == [[1]]
    with pytest.raises(InputError, match="two boxes on slice 12"):
        VolumeSegmenter(stub).segment(
            tube(), [Prompt(slice=12, box=BOX), Prompt(slice=12, box=BOX)]
        )


def test_prompt_checks():
    seg = VolumeSegmenter(ThresholdPredictor())
    with pytest.raises(InputError, match="out of range"):
        seg.segment(tube(), [Prompt(slice=30, box=BOX)])
    with pytest.raises(InputError, match="outside"):
        seg.segment(tube(), [Prompt(slice=3, box=(0, 0, 60, 10))])
    with pytest.raises(InputError, match="empty box"):
        seg.segment(tube(), [Prompt(slice=3, box=(6, 5, 5, 9))])
    one_pixel = seg.segment(tube(), [Prompt(slice=12, box=(25, 18, 25, 18))])  # inclusive box
    assert one_pixel.labels[12, 18, 25] == 1
    with pytest.raises(InputError, match="no box, points or mask"):
        Prompt(slice=3)


def test_helpers_by_hand():
    m = np.zeros((10, 20), bool)
    m[2:5, 4:14] = True  # x 4..13 (10 px), y 2..4 (3 px)
    assert mask_to_box(m, 0.0, (10, 20)) == [4.0, 2.0, 13.0, 4.0]  # inclusive pixel indices
    assert mask_to_box(m, 0.1, (10, 20)) == pytest.approx([3.0, 1.7, 14.0, 4.3])  # 0.1 x side
    assert mask_to_box(m, -0.2, (10, 20)) == pytest.approx([6.0, 2.6, 11.0, 3.4])
    assert mask_to_box(m, 0.5, (10, 20)) == pytest.approx([0.0, 0.5, 18.0, 5.5])  # clipped at 0
    dot = np.zeros((10, 20), bool)
    dot[5, 7] = True
    assert mask_to_box(dot, -0.25, (10, 20)) == [7.0, 5.0, 7.0, 5.0]  # never inside out
    speck = np.zeros((30, 30), bool)
    speck[5:25, 5:25] = True
    speck[0, 0] = True  # a lone pixel: opening (radius round(sqrt(401)/10) = 2) removes it
    assert not denoise(speck)[0, 0]
    assert denoise(speck)[10:20, 10:20].all()
    assert denoise(speck, enabled=False)[0, 0]
    lg = np.array([[2.0, 0.5, -0.5, -2.0]])
    assert stability_3d(lg) == pytest.approx(1 / 3)


class EmptyFirstPredictor(ThresholdPredictor):
    """Ranks an all-empty third candidate first (predicted IoU 0.95 against 0.5), as a model
    trained with "nothing here" samples can do on a faint object."""

    def predict(self, window_center, **kwargs):
        out = super().predict(window_center, **kwargs)
        out.logits[0, 2] = -5.0
        out.masks[0, 2] = False
        out.iou[0] = [0.5, 0.5, 0.95]
        return out


def test_an_anchor_never_answers_a_prompt_with_an_empty_candidate():
    stub = EmptyFirstPredictor()
    seg = VolumeSegmenter(stub, PropagationConfig(step=1))
    result = seg.segment(tube(), [Prompt(slice=12, box=BOX)])
    # the anchor window takes the best non-empty candidate (its 3 slices are segmented) ...
    assert result.labels[11:14, 15:23, 20:30].all()
    assert result.labels.sum() == 3 * 8 * 10
    # ... but a propagated window keeps the ranking: its empty answer (stability 0) is not
    # accepted and ends both directions
    assert [(c, a) for _, c, a in result.windows] == [(12, True), (11, False), (13, False)]
    rec = {r.slice: r for r in result.records}
    assert rec[12].iou == pytest.approx(0.5)  # the kept candidate's own IoU
    # switched off (SSA's machine-made boxes may say "nothing here"): the ranking stands
    off = VolumeSegmenter(stub, PropagationConfig(step=1, anchor_nonempty=False))
    assert off.segment(tube(), [Prompt(slice=12, box=BOX)]).labels.sum() == 0
    # only empty candidates: the anchor keeps the top one (nothing to segment)
    blank = VolumeSegmenter(stub, PropagationConfig(step=1)).segment(
        tube(first=25, last=28), [Prompt(slice=12, box=BOX)]
    )
    assert blank.labels.sum() == 0
    assert blank.records[0].iou == pytest.approx(0.95)
