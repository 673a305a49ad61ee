"""SSA stage 2 with a stub predictor whose masks are known exactly."""

from __future__ import annotations

import numpy as np
import pytest

from slidesam.core import Geometry, InputError, Volume
from slidesam.evaluation.metrics import binary_scores
from slidesam.ssa.confidence import box_iou, mask_box
from slidesam.ssa.pipeline import SSAConfig, run_ssa
from tests.inference.stub import ThresholdPredictor

CENTRE = np.array([10.0, -5.0, 30.0])  # world LPS mm of the tumour centre
RADIUS = 9.0


def _phase(geometry: Geometry) -> Volume:
    """1.0 inside the tumour sphere (sampled at voxel centres), 0 elsewhere."""
    index = np.indices(geometry.shape).reshape(3, -1).T
    world = geometry.index_to_world(index)
    inside = np.linalg.norm(world - CENTRE, axis=1) <= RADIUS
    return Volume(inside.reshape(geometry.shape).astype(np.float32), geometry)


ARTERIAL = Geometry(shape=(16, 40, 40), spacing=(2.0, 1.0, 1.0), origin=(-10, -25, 14))
# another grid: other spacing, a non-integer origin shift and a flipped x axis
PLAIN = Geometry(
    shape=(12, 36, 44),
    spacing=(2.5, 1.2, 1.1),
    origin=(33.3, -26.1, 15.7),
    direction=np.array([[0.0, 0, -1], [0, 1, 0], [1, 0, 0]]),  # columns z, y, x: x runs to -x
)


def _stage1(volume: Volume) -> Volume:
    return Volume((volume.array > 0.5).astype(np.uint8) * 2, volume.geometry)


@pytest.fixture
def phases():
    return {"arterial": _phase(ARTERIAL), "plain": _phase(PLAIN)}


def test_box_iou_and_mask_box_by_hand():
    assert box_iou((0, 0, 9, 9), (0, 0, 9, 9)) == 1.0
    assert box_iou((0, 0, 9, 9), (5, 0, 14, 9)) == pytest.approx(50 / 150)
    assert box_iou((0, 0, 1, 1), (5, 5, 6, 6)) == 0.0
    assert box_iou(None, (0, 0, 1, 1)) == 0.0
    m = np.zeros((6, 8), bool)
    m[2:4, 3:7] = True
    assert mask_box(m) == (3, 2, 6, 3)
    assert mask_box(np.zeros((3, 3), bool)) is None


def test_tumour_found_on_another_grid_through_world_space(phases):
    out = run_ssa(
        phases,
        _stage1(phases["arterial"]),
        ThresholdPredictor(grow=0),
        SSAConfig(threshold=0.0),
    )
    plain = out.phases["plain"]
    assert plain.mask.shape == PLAIN.shape
    assert plain.mask.dtype == np.uint8
    truth = phases["plain"].array > 0.5
    # the stub segments exactly the bright voxels inside each slice's box: if the box was moved
    # by array index (or the flip ignored) it would miss much of the tumour
    assert binary_scores(plain.mask > 0, truth, spacing=PLAIN.spacing).dice > 0.95
    assert all(s["accepted"] for s in plain.slices)
    assert plain.axis == 0
    np.testing.assert_array_equal(out.phases["arterial"].mask, phases["arterial"].array > 0.5)


def test_confidence_rejects_the_poles_of_a_sphere(phases):
    stage1 = _stage1(phases["arterial"])
    out = run_ssa(
        phases, stage1, ThresholdPredictor(grow=0), SSAConfig(box_mode="3d", rejected="empty")
    )
    art = out.phases["arterial"]
    for rec in art.slices:
        # 3D box: the same rectangle on every slice; the mask's box shrinks towards the poles
        mask = art.mask[rec["slice"]] > 0
        expected = box_iou(
            mask_box(phases["arterial"].array[rec["slice"]] > 0.5), rec["prompt_box"]
        )
        assert rec["confidence"] == pytest.approx(expected, abs=1e-4)
        assert rec["accepted"] == (expected >= 0.8)
        assert mask.any() == rec["accepted"]  # rejected -> empty
    kept = [r["slice"] for r in art.slices if r["accepted"]]
    rejected = [r["slice"] for r in art.slices if not r["accepted"]]
    assert min(kept) > min(rejected)  # the poles go
    assert max(kept) < max(rejected)


def test_rejected_slices_take_the_stage1_mask_or_a_neighbours_prompt(phases):
    stage1 = _stage1(phases["arterial"])
    truth = phases["arterial"].array > 0.5
    moved = run_ssa(
        phases, stage1, ThresholdPredictor(grow=0), SSAConfig(box_mode="3d", rejected="stage1")
    )
    art = moved.phases["arterial"]
    np.testing.assert_array_equal(art.mask > 0, truth)  # the stage-1 mask fills the poles
    assert {r["action"] for r in art.slices} == {"kept", "stage1"}
    again = run_ssa(
        phases, stage1, ThresholdPredictor(grow=0), SSAConfig(box_mode="3d", rejected="neighbours")
    )
    actions = {r["action"] for r in again.phases["arterial"].slices}
    assert "kept" in actions
    assert actions - {"kept"}
    for r in again.phases["arterial"].slices:
        if r["action"] == "neighbours":  # the neighbour's box agreed: the slice has a mask
            assert r["neighbour"]["confidence"] >= 0.8
            assert again.phases["arterial"].mask[r["slice"]].any()


def test_components_get_their_own_boxes():
    g = ARTERIAL
    image = np.zeros(g.shape, np.float32)
    image[3:8, 5:12, 5:12] = 1
    image[6:12, 25:35, 28:36] = 1
    vol = Volume(image, g)
    stage1 = _stage1(vol)
    two = run_ssa({"arterial": vol}, stage1, ThresholdPredictor(grow=0), SSAConfig(box_mode="3d"))
    one = run_ssa(
        {"arterial": vol},
        stage1,
        ThresholdPredictor(grow=0),
        SSAConfig(box_mode="3d", per_component=False),
    )
    assert (len(two.boxes), len(one.boxes)) == (2, 1)
    np.testing.assert_array_equal(two.phases["arterial"].mask > 0, image > 0)
    assert all(r["accepted"] for r in two.phases["arterial"].slices)
    # one box around both: the slices where only one object shows disagree with the box
    assert not all(r["accepted"] for r in one.phases["arterial"].slices)


def test_no_tumour_gives_empty_masks_and_a_warning(phases):
    empty = Volume(np.zeros(ARTERIAL.shape, np.uint8), ARTERIAL)
    out = run_ssa(phases, empty, ThresholdPredictor())
    assert out.boxes == []
    assert "no tumor" in out.warnings[0]
    assert all(not r.mask.any() for r in out.phases.values())


def test_bad_inputs(phases):
    stage1 = _stage1(phases["arterial"])
    with pytest.raises(InputError, match="arterial"):
        run_ssa({"plain": phases["plain"]}, stage1, ThresholdPredictor())
    with pytest.raises(InputError, match="grid"):
        run_ssa(phases, _stage1(phases["plain"]), ThresholdPredictor())
    far = Geometry(shape=PLAIN.shape, spacing=PLAIN.spacing, origin=(900.0, 0.0, 0.0))
    with pytest.raises(InputError, match="does not overlap"):
        run_ssa({**phases, "venous": _phase(far)}, stage1, ThresholdPredictor())
    with pytest.raises(InputError, match="threshold"):
        SSAConfig(threshold=1.5)
    with pytest.raises(InputError, match="rejected"):
        SSAConfig(rejected="maybe")


def test_per_slice_boxes_follow_the_stage1_mask_on_every_slice(phases):
    out = run_ssa(phases, _stage1(phases["arterial"]), ThresholdPredictor(grow=0), SSAConfig())
    art = out.phases["arterial"]
    assert out.config.box_mode == "per-slice"  # the default (better on phantoms)
    for rec in art.slices:  # each slice's own box: the stub's mask fills it exactly
        truth = phases["arterial"].array[rec["slice"]] > 0.5
        assert rec["prompt_box"] == list(mask_box(truth))
        assert rec["confidence"] == 1.0
