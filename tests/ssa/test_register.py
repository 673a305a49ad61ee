from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from slidesam.core import Geometry, InputError, Volume
from slidesam.data.phantom import PhantomConfig, generate_case
from slidesam.ssa.boxes import component_boxes, transfer_box
from slidesam.ssa.register import RigidResult, WorldTransform, register_rigid, roi_mask

STANDARD = np.eye(3)[:, ::-1]


# ----------------------------------------------------------------------------------------------
# WorldTransform
# ----------------------------------------------------------------------------------------------
def _rotation_z(deg: float) -> np.ndarray:
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def test_world_transform_forward_inverse_by_hand():
    t = WorldTransform(matrix=_rotation_z(90), offset=(1.0, 2.0, 3.0))
    # (1, 0, 0) rotated 90 degrees about z is (0, 1, 0), then + offset
    np.testing.assert_allclose(t.forward([1.0, 0.0, 0.0]), [1.0, 3.0, 3.0], atol=1e-12)
    np.testing.assert_allclose(t.inverse([1.0, 3.0, 3.0]), [1.0, 0.0, 0.0], atol=1e-12)
    pts = np.random.default_rng(0).uniform(-100, 100, size=(20, 3))
    np.testing.assert_allclose(t.inverse(t.forward(pts)), pts, atol=1e-9)
    np.testing.assert_allclose(t.inverted().forward(pts), t.inverse(pts), atol=1e-9)
    assert t.then(t.inverted()).is_identity(atol=1e-9)
    shift = WorldTransform.translation((0.0, 0.0, -5.0))
    np.testing.assert_allclose(
        t.then(shift).forward(pts), t.forward(pts) + np.array([0.0, 0.0, -5.0]), atol=1e-9
    )


def test_world_transform_sitk_round_trip_and_dict():
    t = WorldTransform(matrix=_rotation_z(12), offset=(4.0, -2.5, 7.0))
    pts = np.random.default_rng(1).uniform(-200, 200, size=(10, 3))
    tx = t.to_sitk()
    got = np.array([tx.TransformPoint(tuple(p)) for p in pts])
    np.testing.assert_allclose(got, t.forward(pts), atol=1e-9)
    # a centred Euler transform, as registration returns it: same map after conversion
    euler = sitk.Euler3DTransform((10.0, 20.0, 30.0), 0.1, -0.05, 0.2, (3.0, -1.0, 2.0))
    w = WorldTransform.from_sitk(euler)
    expect = np.array([euler.TransformPoint(tuple(p)) for p in pts])
    np.testing.assert_allclose(w.forward(pts), expect, atol=1e-9)
    back = WorldTransform.from_dict(json.loads(json.dumps(w.to_dict())))
    np.testing.assert_allclose(back.forward(pts), expect, atol=1e-9)


def test_world_transform_rejects_bad_input():
    with pytest.raises(InputError, match="singular"):
        WorldTransform(matrix=np.zeros((3, 3)), offset=(0, 0, 0))
    with pytest.raises(InputError, match="offset"):
        WorldTransform(matrix=np.eye(3), offset=(0, 0))
    # a smooth random displacement field over the whole probed region
    disp = np.random.default_rng(2).normal(0.0, 5.0, size=(6, 6, 6, 3))
    field = sitk.GetImageFromArray(disp, isVector=True)
    field.SetSpacing((100.0, 100.0, 100.0))
    field.SetOrigin((-250.0, -250.0, -250.0))
    with pytest.raises(InputError, match="not an affine"):
        WorldTransform.from_sitk(sitk.DisplacementFieldTransform(field))


# ----------------------------------------------------------------------------------------------
# roi_mask
# ----------------------------------------------------------------------------------------------
def test_roi_mask_by_hand_on_a_flipped_grid():
    # x axis flipped: column c sits at world x = 10 - c; y = row, z = 2 * slice
    g = Geometry(
        shape=(4, 5, 6),
        spacing=(2.0, 1.0, 1.0),
        origin=(10.0, 0.0, 0.0),
        direction=STANDARD @ np.diag([1.0, 1.0, -1.0]),
    )
    m = roi_mask(g, ((6.5, 1.0, 1.0), (8.0, 3.5, 4.0)))
    expect = np.zeros(g.shape, dtype=np.uint8)
    expect[1:3, 1:4, 2:4] = 1  # z 2, 4 mm; y 1..3; x 8, 7 -> columns 2, 3
    np.testing.assert_array_equal(m, expect)
    assert not roi_mask(g, ((100, 100, 100), (110, 110, 110))).any()
    with pytest.raises(InputError, match="low < high"):
        roi_mask(g, ((0, 0, 5), (1, 1, 1)))


# ----------------------------------------------------------------------------------------------
# registration on the phantom
# ----------------------------------------------------------------------------------------------
CONFIGS = {
    "axis-aligned": PhantomConfig(
        shape=(40, 56, 88), spacing=(4.0, 3.0, 3.0), motion_mm=8.0, phases=("plain", "arterial")
    ),
    "flipped": PhantomConfig(
        shape=(40, 56, 88),
        spacing=(4.0, 3.0, 3.0),
        motion_mm=8.0,
        phases=("plain", "arterial"),
        random_flips=True,
    ),
}


def _kidney_roi(labels: Volume, margin_mm: float = 30.0):
    idx = np.argwhere(labels.array > 0)
    w = labels.geometry.index_to_world(idx)
    return w.min(axis=0) - margin_mm, w.max(axis=0) + margin_mm


@pytest.fixture(scope="module", params=[("axis-aligned", 1), ("flipped", 3)], ids=lambda p: p[0])
def registered(request):
    name, seed = request.param
    case = generate_case(0, seed=seed, config=CONFIGS[name])
    roi = _kidney_roi(case.labels["arterial"])
    result = register_rigid(case.phases["arterial"], case.phases["plain"], roi_mm=roi)
    return case, roi, result


def test_register_recovers_phantom_motion(registered):
    case, _, result = registered
    motion = np.asarray(case.truth["motion_mm"]["arterial"])  # arterial anatomy at p + motion
    assert np.linalg.norm(motion) > 5.0  # a real offset, so the identity would fail
    # fixed = arterial, moving = plain: arterial world p -> plain world p - motion
    spacing_xyz = np.asarray(case.phases["plain"].spacing[::-1])
    err = np.asarray(result.translation_mm) + motion
    assert np.all(np.abs(err) < spacing_xyz / 2), (result.translation_mm, -motion)
    assert np.max(np.abs(result.rotation_deg)) < 1.0
    # the whole map, where it matters: the tumour centroid of each phase
    centroid = case.truth["tumor_centroid_lps_mm"]
    moved = result.transform.forward(centroid["arterial"])
    assert np.linalg.norm(moved - centroid["plain"]) < 1.5
    assert result.metric < 0
    assert result.iterations > 0
    json.dumps(result.to_dict())


def test_register_is_reproducible(registered):
    case, roi, result = registered
    again = register_rigid(case.phases["arterial"], case.phases["plain"], roi_mm=roi)
    # same samples each run; only ITK's floating-point summation order may differ (~1e-9)
    np.testing.assert_allclose(again.transform.matrix, result.transform.matrix, atol=1e-6)
    np.testing.assert_allclose(again.transform.offset, result.transform.offset, atol=1e-4)
    assert again.iterations == result.iterations


def test_registered_box_lands_on_plain_tumour(registered):
    case, _, result = registered
    art, plain = case.labels["arterial"], case.labels["plain"]
    (box,) = component_boxes(art.array == 2, art.geometry, per_component=False, margin_mm=3.0)
    moved = transfer_box(box, art.geometry, plain.geometry, transform=result.transform)
    (truth,) = component_boxes(plain.array == 2, plain.geometry, per_component=False)
    # a 3 mm margin absorbs the sub-voxel registration error; tight within 2 voxels
    assert np.all(np.array(moved.lo) <= truth.lo)
    assert np.all(np.array(moved.hi) >= truth.hi)
    assert np.all(np.subtract(truth.lo, moved.lo) <= 2)
    assert np.all(np.subtract(moved.hi, truth.hi) <= 2)


def test_register_volume_to_itself_is_identity():
    case = generate_case(0, seed=5, config=CONFIGS["axis-aligned"])
    vol = case.phases["plain"]
    result = register_rigid(vol, vol, roi_mm=_kidney_roi(case.labels["plain"]))
    assert np.max(np.abs(result.translation_mm)) < 0.2
    assert np.max(np.abs(result.rotation_deg)) < 0.1
    # so the transform moves points far from the centre by little
    corners = np.array(vol.geometry.world_bounds())
    assert np.max(np.abs(result.transform.forward(corners) - corners)) < 0.5


def test_register_geometry_init_for_unrelated_frames():
    # the same scan with its origin 60 mm off: anatomy at fixed p is at moving p + (60, 0, 0)
    case = generate_case(0, seed=5, config=CONFIGS["axis-aligned"])
    vol = case.phases["plain"]
    g = vol.geometry
    far = Geometry(
        shape=g.shape,
        spacing=g.spacing,
        origin=np.add(g.origin, (60.0, 0.0, 0.0)),
        direction=g.direction,
    )
    roi = _kidney_roi(case.labels["plain"])
    result = register_rigid(vol, Volume(array=vol.array, geometry=far), roi_mm=roi, init="geometry")
    np.testing.assert_allclose(result.translation_mm, (60.0, 0.0, 0.0), atol=0.2)


def _cube(origin) -> Volume:
    rng = np.random.default_rng(0)
    g = Geometry(shape=(8, 16, 16), spacing=(4.0, 2.0, 2.0), origin=origin)
    return Volume(array=rng.integers(-100, 200, size=g.shape).astype(np.int16), geometry=g)


def test_register_rejects_non_overlapping_images():
    with pytest.raises(InputError, match="do not overlap in world space"):
        register_rigid(_cube((0.0, 0.0, 0.0)), _cube((500.0, 0.0, 0.0)))


def test_register_rejects_roi_off_the_fixed_grid_and_bad_settings():
    vol = _cube((0.0, 0.0, 0.0))
    with pytest.raises(InputError, match="holds no voxel of the fixed image"):
        register_rigid(vol, vol, roi_mm=((300, 300, 300), (350, 350, 350)))
    with pytest.raises(InputError, match="wall clock"):
        register_rigid(vol, vol, seed=0)
    with pytest.raises(InputError, match="sampling_percentage"):
        register_rigid(vol, vol, sampling_percentage=0.0)
    with pytest.raises(InputError, match="same"):
        register_rigid(vol, vol, shrink_factors=(2, 1), smoothing_sigmas_vox=(1.0,))
    with pytest.raises(TypeError, match="Volume"):
        register_rigid(vol.array, vol)


def test_rigid_result_dict_names_the_direction():
    r = RigidResult(
        transform=WorldTransform.translation((1.0, 2.0, 3.0)),
        translation_mm=(1.0, 2.0, 3.0),
        rotation_deg=(0.0, 0.0, 0.0),
        center_mm=(0.0, 0.0, 0.0),
        metric=-0.5,
        iterations=10,
        seconds=0.1,
    )
    d = json.loads(json.dumps(r.to_dict()))
    assert d["direction"] == "fixed world -> moving world (LPS mm)"
    assert d["transform"]["offset_mm"] == [1.0, 2.0, 3.0]
