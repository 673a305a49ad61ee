from __future__ import annotations

import json

import numpy as np
import pytest

from slidesam.core import Geometry, InputError
from slidesam.data.phantom import PhantomConfig, generate_case
from slidesam.ssa.boxes import (
    Box3D,
    axial_axis,
    component_boxes,
    resample_mask,
    slice_prompts_3d,
    slice_prompts_per_slice,
    transfer_box,
)
from slidesam.ssa.register import WorldTransform

# direction columns are the world unit vectors of array axes (z, y, x)
STANDARD = np.eye(3)[:, ::-1]  # array z -> world z, y -> y, x -> x
FLIP_X = STANDARD @ np.diag([1.0, 1.0, -1.0])  # array x runs towards world -x (right)
FLIP_ZY = STANDARD @ np.diag([-1.0, -1.0, 1.0])
# 90-degree permutation: array axis 0 -> world x, axis 1 -> world y, axis 2 -> world z
PERMUTED = np.eye(3)


def _grid(shape=(10, 12, 14), spacing=(2.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=STANDARD):
    return Geometry(shape=shape, spacing=spacing, origin=origin, direction=direction)


def _mirror(g: Geometry, axis: int) -> Geometry:
    """The same voxels in world space with array ``axis`` reversed."""
    direction = g.direction.copy()
    direction[:, axis] *= -1
    last = [0, 0, 0]
    last[axis] = g.shape[axis] - 1
    return Geometry(
        shape=g.shape, spacing=g.spacing, origin=g.index_to_world(last), direction=direction
    )


def _transposed(g: Geometry, order: tuple[int, int, int]) -> Geometry:
    """The same voxels with array axes reordered like ``np.transpose(array, order)``."""
    return Geometry(
        shape=tuple(g.shape[a] for a in order),
        spacing=tuple(g.spacing[a] for a in order),
        origin=g.origin,
        direction=g.direction[:, list(order)],
    )


# ----------------------------------------------------------------------------------------------
# Box3D
# ----------------------------------------------------------------------------------------------
def test_box_size_slices_and_dict_by_hand():
    box = Box3D(lo=(1, 2, 3), hi=(2, 2, 7), component=1, voxels=5)
    assert box.size == (2, 1, 5)
    assert np.zeros((5, 5, 9))[box.slices].shape == (2, 1, 5)
    g = _grid(spacing=(2.0, 1.0, 0.5), origin=(10.0, 20.0, 30.0))
    d = box.to_dict(g)
    json.dumps(d)
    # faces: z 0.5..2.5 -> 31..35 mm, y 1.5..2.5 -> 21.5..22.5 mm, x 2.5..7.5 -> 11.25..13.75 mm
    assert d["world_min_lps_mm"] == [11.25, 21.5, 31.0]
    assert d["world_max_lps_mm"] == [13.75, 22.5, 35.0]
    assert d["size_mm"] == [4.0, 1.0, 2.5]
    assert d["lo_zyx"] == [1, 2, 3]
    assert d["hi_zyx"] == [2, 2, 7]
    assert "world_min_lps_mm" not in box.to_dict()


@pytest.mark.parametrize(
    ("lo", "hi"), [((1, 2, 3), (1, 1, 3)), ((0, 0), (1, 1)), ((0, 0, 0.5), (1, 1, 1))]
)
def test_box_rejects_empty_or_malformed(lo, hi):
    with pytest.raises(InputError):
        Box3D(lo=lo, hi=hi)


# ----------------------------------------------------------------------------------------------
# component_boxes
# ----------------------------------------------------------------------------------------------
def _two_blobs() -> np.ndarray:
    m = np.zeros((10, 12, 14), dtype=np.uint8)
    m[2:5, 3:8, 4:10] = 1  # 3*5*6 = 90 voxels
    m[7:9, 9:11, 1:3] = 2  # 8 voxels, another label value: still foreground
    m[9, 11, 13] = 1  # one voxel, touches the 8-voxel blob? no: (9, 11, 13) vs (8, 10, 2)
    return m


def test_component_boxes_largest_first_with_counts():
    boxes = component_boxes(_two_blobs(), _grid())
    assert [(b.lo, b.hi, b.component, b.voxels) for b in boxes] == [
        ((2, 3, 4), (4, 7, 9), 1, 90),
        ((7, 9, 1), (8, 10, 2), 2, 8),
        ((9, 11, 13), (9, 11, 13), 3, 1),
    ]


def test_component_boxes_min_voxels_and_single_box():
    g = _grid()
    boxes = component_boxes(_two_blobs(), g, min_voxels=2)
    assert [b.voxels for b in boxes] == [90, 8]
    (whole,) = component_boxes(_two_blobs(), g, per_component=False)
    assert (whole.lo, whole.hi, whole.component, whole.voxels) == ((2, 3, 1), (9, 11, 13), 0, 99)
    # specks below min_voxels are dropped before the single box is taken
    (whole,) = component_boxes(_two_blobs(), g, per_component=False, min_voxels=2)
    assert (whole.lo, whole.hi, whole.voxels) == ((2, 3, 1), (8, 10, 9), 98)
    assert component_boxes(_two_blobs(), g, min_voxels=1000) == []


def test_component_boxes_uses_26_connectivity():
    m = np.zeros((4, 4, 4), dtype=bool)
    m[0, 0, 0] = m[1, 1, 1] = m[2, 2, 2] = True  # corner-touching only
    (box,) = component_boxes(m, _grid(shape=(4, 4, 4)))
    assert (box.lo, box.hi, box.voxels) == ((0, 0, 0), (2, 2, 2), 3)


@pytest.mark.parametrize(
    ("margin_mm", "lo", "hi"),
    [
        (0.0, (4, 5, 5), (5, 6, 6)),
        # spacing (3, 0.8, 0.8): 2 mm -> ceil(0.67)=1 slice, ceil(2.5)=3 pixels
        (2.0, (3, 2, 2), (6, 9, 9)),
        # 3 mm is exactly one slice and 3.75 -> 4 pixels; x clipped at 0 and 19
        (3.0, (3, 1, 1), (6, 10, 10)),
        (30.0, (0, 0, 0), (9, 19, 19)),
    ],
)
def test_component_boxes_margin_in_mm_per_axis(margin_mm, lo, hi):
    g = _grid(shape=(10, 20, 20), spacing=(3.0, 0.8, 0.8))
    m = np.zeros(g.shape, dtype=bool)
    m[4:6, 5:7, 5:7] = True
    (box,) = component_boxes(m, g, margin_mm=margin_mm)
    assert (box.lo, box.hi) == (lo, hi)


def test_component_boxes_empty_and_bad_input():
    g = _grid()
    assert component_boxes(np.zeros(g.shape, dtype=bool), g) == []
    with pytest.raises(TypeError, match="threshold"):
        component_boxes(np.zeros(g.shape, dtype=np.float32), g)
    with pytest.raises(InputError, match="does not match"):
        component_boxes(np.zeros((3, 3, 3), dtype=bool), g)
    with pytest.raises(InputError, match="margin_mm"):
        component_boxes(np.zeros(g.shape, dtype=bool), g, margin_mm=-1)


# ----------------------------------------------------------------------------------------------
# transfer_box: hand-made geometries
# ----------------------------------------------------------------------------------------------
BOX = Box3D(lo=(2, 3, 4), hi=(5, 7, 9), component=1, voxels=42)
SRC = _grid()  # (10, 12, 14), spacing (2, 1, 1), origin 0, standard direction


@pytest.mark.parametrize(
    ("target", "lo", "hi"),
    [
        (SRC, (2, 3, 4), (5, 7, 9)),
        # origin moved by +1 slice, +2 rows, -3 columns (in mm: z +2, y +2, x -3)
        (_grid(origin=(-3.0, 2.0, 2.0)), (1, 1, 7), (4, 5, 12)),
        # array x reversed: x -> 13 - x
        (_mirror(SRC, 2), (2, 3, 4), (5, 7, 9)),
        # array z and y reversed: z -> 9 - z, y -> 11 - y
        (_mirror(_mirror(SRC, 0), 1), (4, 4, 4), (7, 8, 9)),
        # half the spacing, same faces: source faces z 1.5..5.5 (3..11 mm) -> target centres
        # at 3.5 .. 10.5 mm -> indices 3..10 with origin 0.5 mm below the first source face
        (
            _grid(shape=(20, 24, 28), spacing=(1.0, 0.5, 0.5), origin=(-0.25, -0.25, -0.5)),
            (4, 6, 8),
            (11, 15, 19),
        ),
        # fewer slices: clipped at the last one
        (_grid(shape=(4, 12, 14)), (2, 3, 4), (3, 7, 9)),
    ],
)
def test_transfer_box_by_hand(target, lo, hi):
    if target is not SRC and np.allclose(target.direction, _mirror(SRC, 2).direction):
        lo, hi = (lo[0], lo[1], 13 - hi[2]), (hi[0], hi[1], 13 - lo[2])
    out = transfer_box(BOX, SRC, target)
    assert out is not None
    assert (out.lo, out.hi, out.component, out.voxels) == (lo, hi, 1, 0)


def test_transfer_box_to_permuted_axes():
    # the same voxels stored as np.transpose(array, (2, 1, 0)): array axis 0 is world x
    target = _transposed(SRC, (2, 1, 0))
    assert np.array_equal(target.direction, PERMUTED)
    out = transfer_box(BOX, SRC, target)
    assert (out.lo, out.hi) == ((4, 3, 2), (9, 7, 5))
    back = transfer_box(out, target, SRC)
    assert (back.lo, back.hi) == (BOX.lo, BOX.hi)


@pytest.mark.parametrize(
    "target",
    [
        SRC,
        _mirror(SRC, 0),
        _mirror(_mirror(SRC, 1), 2),
        _transposed(SRC, (2, 0, 1)),
        _transposed(_mirror(SRC, 2), (1, 2, 0)),
        _grid(shape=(30, 36, 42), spacing=(1.0, 0.5, 0.25), origin=(-0.375, -0.25, -0.5)),
        _grid(shape=(10, 12, 14), origin=(2.0, -1.0, 2.0)),  # whole-voxel shift
    ],
)
def test_transfer_round_trip_when_grids_align(target):
    there = transfer_box(BOX, SRC, target)
    back = transfer_box(there, target, SRC)
    assert (back.lo, back.hi) == (BOX.lo, BOX.hi)


def test_transfer_box_through_transform_moves_by_world_shift():
    shift = WorldTransform.translation((3.0, -2.0, 4.0))  # source world -> target world, mm
    out = transfer_box(BOX, SRC, SRC, transform=shift)
    # x +3 columns, y -2 rows, z +4 mm = +2 slices
    assert (out.lo, out.hi) == ((4, 1, 7), (7, 5, 12))
    # the same through a flipped target: array x reversed
    out = transfer_box(BOX, SRC, _mirror(SRC, 2), transform=shift)
    assert (out.lo, out.hi) == ((4, 1, 13 - 12), (7, 5, 13 - 7))


def test_transfer_box_off_grid_clipped_and_thin():
    far = _grid(origin=(1000.0, 0.0, 0.0))
    assert transfer_box(BOX, SRC, far) is None
    # partial overlap: target starts at source column 8
    part = transfer_box(BOX, SRC, _grid(origin=(8.0, 0.0, 0.0)))
    assert (part.lo, part.hi) == ((2, 3, 0), (5, 7, 1))
    # a one-voxel box onto a grid 5x coarser keeps the nearest voxel instead of vanishing
    one = Box3D(lo=(3, 3, 3), hi=(3, 3, 3))
    fine = _grid(shape=(20, 20, 20), spacing=(1.0, 1.0, 1.0))
    coarse = _grid(shape=(4, 4, 4), spacing=(5.0, 5.0, 5.0), origin=(2.0, 2.0, 2.0))
    out = transfer_box(one, fine, coarse)
    assert (out.lo, out.hi) == ((0, 0, 0), (0, 0, 0))


def test_transfer_box_oblique_contains_every_covered_centre():
    c, s = np.cos(np.radians(30)), np.sin(np.radians(30))
    rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])  # 30 degrees about world z
    target = Geometry(
        shape=(16, 30, 30),
        spacing=(1.5, 0.7, 0.9),
        origin=(-4.0, -6.0, 1.0),
        direction=rot @ STANDARD,
    )
    out = transfer_box(BOX, SRC, target)
    # brute force: target voxel centres inside the source box's continuous extent
    idx = np.stack(np.meshgrid(*map(np.arange, target.shape), indexing="ij"), -1).reshape(-1, 3)
    src_idx = SRC.world_to_index(target.index_to_world(idx))
    inside = np.all((src_idx >= np.subtract(BOX.lo, 0.5)) & (src_idx <= np.add(BOX.hi, 0.5)), 1)
    hit = idx[inside]
    assert len(hit) > 0
    assert np.all(hit.min(0) >= out.lo)
    assert np.all(hit.max(0) <= out.hi)
    # and the box is the axis-aligned bound of the rotated extent, not much more
    assert np.all(hit.min(0) - np.array(out.lo) <= 4)
    assert np.all(np.array(out.hi) - hit.max(0) <= 4)


def test_transfer_box_rejects_a_sitk_transform():
    import SimpleITK as sitk

    with pytest.raises(TypeError, match="WorldTransform"):
        transfer_box(BOX, SRC, SRC, transform=sitk.TranslationTransform(3))


# ----------------------------------------------------------------------------------------------
# axial axis and slice prompts
# ----------------------------------------------------------------------------------------------
def _tilted(deg: float) -> np.ndarray:
    c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
    return np.array([[1.0, 0, 0], [0, c, -s], [0, s, c]]) @ STANDARD  # tilt about world x


@pytest.mark.parametrize(
    ("direction", "axis"),
    [(STANDARD, 0), (FLIP_ZY, 0), (PERMUTED, 2), (np.eye(3)[:, [1, 2, 0]], 1), (_tilted(25), 0)],
)
def test_axial_axis(direction, axis):
    assert axial_axis(_grid(direction=direction)) == axis


@pytest.mark.parametrize(
    ("axis", "slices", "rect"),
    [
        (0, range(2, 6), (4.0, 3.0, 9.0, 7.0)),  # rows y, columns x
        (1, range(3, 8), (4.0, 2.0, 9.0, 5.0)),  # rows z, columns x
        (2, range(4, 10), (3.0, 2.0, 7.0, 5.0)),  # rows z, columns y
    ],
)
def test_slice_prompts_3d_by_hand(axis, slices, rect):
    prompts = slice_prompts_3d(BOX, axis, label=2)
    assert [p.slice for p in prompts] == list(slices)
    assert all(p.box == rect and p.label == 2 and p.source == "ssa" for p in prompts)
    shape = np.array(SRC.shape)
    plane = tuple(np.delete(shape, axis))
    for p in prompts:
        p.check_fits(int(shape[axis]), plane)


def test_slice_prompts_3d_box_matches_the_numpy_slice():
    m = np.zeros(SRC.shape, dtype=bool)
    m[BOX.slices] = True
    for axis in range(3):
        for p in slice_prompts_3d(BOX, axis):
            plane = np.take(m, p.slice, axis=axis)
            rows, cols = np.flatnonzero(plane.any(1)), np.flatnonzero(plane.any(0))
            assert p.box == (cols[0], rows[0], cols[-1], rows[-1])


def test_slice_prompts_per_slice_by_hand():
    m = np.zeros((5, 8, 10), dtype=np.uint8)
    m[1, 2:4, 3:6] = 1
    m[3, 0:2, 7:10] = 4
    prompts = slice_prompts_per_slice(m, 0)
    assert [(p.slice, p.box) for p in prompts] == [(1, (3, 2, 5, 3)), (3, (7, 0, 9, 1))]
    # margin grows each side and is clipped to the 10 x 8 (x, y) slice
    prompts = slice_prompts_per_slice(m, 0, label=3, margin_px=1.5)
    assert [(p.slice, p.box) for p in prompts] == [(1, (1.5, 0.5, 6.5, 4.5)), (3, (5.5, 0, 9, 2.5))]
    assert all(p.label == 3 for p in prompts)
    # along x: slice 7..9 hold the second blob (rows z = 3, columns y = 0..1)
    prompts = slice_prompts_per_slice(m, 2)
    assert [(p.slice, p.box) for p in prompts] == [
        (3, (2, 1, 3, 1)),
        (4, (2, 1, 3, 1)),
        (5, (2, 1, 3, 1)),
        (7, (0, 3, 1, 3)),
        (8, (0, 3, 1, 3)),
        (9, (0, 3, 1, 3)),
    ]
    assert slice_prompts_per_slice(np.zeros((2, 3, 4), dtype=bool), 0) == []


# ----------------------------------------------------------------------------------------------
# resample_mask
# ----------------------------------------------------------------------------------------------
def _labels() -> np.ndarray:
    m = np.zeros(SRC.shape, dtype=np.uint8)
    m[2:6, 3:8, 4:10] = 2
    m[7, 1, 1:3] = 7
    return m


@pytest.mark.parametrize(
    ("target", "expect"),
    [
        (SRC, lambda m: m),
        (_mirror(SRC, 2), lambda m: m[:, :, ::-1]),
        (_mirror(_mirror(SRC, 0), 1), lambda m: m[::-1, ::-1]),
        (_transposed(SRC, (2, 1, 0)), lambda m: np.transpose(m, (2, 1, 0))),
        (_transposed(_mirror(SRC, 0), (1, 2, 0)), lambda m: np.transpose(m[::-1], (1, 2, 0))),
    ],
)
def test_resample_mask_onto_reoriented_grids_is_exact(target, expect):
    m = _labels()
    out = resample_mask(m, SRC, target)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, expect(m))


def test_resample_mask_transform_direction_and_bool():
    m = _labels() > 0
    # the anatomy at source world p is at target world p + (3, -2, 4) mm
    shift = WorldTransform.translation((3.0, -2.0, 4.0))
    out = resample_mask(m, SRC, SRC, transform=shift)
    assert out.dtype == np.bool_
    expect = np.zeros_like(m)
    expect[2:, :-2, 3:] = m[:-2, 2:, :-3]
    np.testing.assert_array_equal(out, expect)
    # consistent with transfer_box: the resampled component lies in the transferred box
    (box,) = component_boxes(out, SRC, min_voxels=50)
    moved = transfer_box(component_boxes(m, SRC)[0], SRC, SRC, transform=shift)
    assert (box.lo, box.hi) == (moved.lo, moved.hi)


def test_resample_mask_to_finer_grid():
    fine = _grid(shape=(20, 24, 28), spacing=(1.0, 0.5, 0.5), origin=(-0.25, -0.25, -0.5))
    m = _labels()
    out = resample_mask(m, SRC, fine)
    # every fine voxel takes the source voxel that holds its centre: a 2x2x2 repeat
    np.testing.assert_array_equal(out, m.repeat(2, 0).repeat(2, 1).repeat(2, 2))


# ----------------------------------------------------------------------------------------------
# end to end on the phantom: arterial tumour -> box -> plain grid through the true motion
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_phantom_arterial_box_lands_on_plain_tumour(seed):
    config = PhantomConfig(
        shape=(40, 56, 88),
        spacing=(4.0, 3.0, 3.0),
        motion_mm=8.0,
        phases=("plain", "arterial"),
        random_flips=True,
        tumor_diameter_mm=(15.0, 40.0),
    )
    case = generate_case(0, seed=seed, config=config)
    art, plain = case.labels["arterial"], case.labels["plain"]
    motion = np.asarray(case.truth["motion_mm"]["arterial"])
    # arterial anatomy sits at p + motion: arterial world -> plain world is p - motion
    to_plain = WorldTransform.translation(-motion)

    (truth,) = component_boxes(plain.array == 2, plain.geometry, per_component=False)

    # the same shape sampled on two grids: the box matches to a voxel on each side, either way
    (box,) = component_boxes(art.array == 2, art.geometry, per_component=False)
    moved = transfer_box(box, art.geometry, plain.geometry, transform=to_plain)
    assert np.all(np.abs(np.subtract(moved.lo, truth.lo)) <= 1)
    assert np.all(np.abs(np.subtract(moved.hi, truth.hi)) <= 1)

    # one arterial voxel of margin (3 mm: 1 slice of 4 mm, 1 pixel of 3 mm) makes it contain
    # the plain tumour and stay tight
    (grown,) = component_boxes(art.array == 2, art.geometry, per_component=False, margin_mm=3.0)
    held = transfer_box(grown, art.geometry, plain.geometry, transform=to_plain)
    assert np.all(np.array(held.lo) <= truth.lo)
    assert np.all(np.array(held.hi) >= truth.hi)
    assert np.all(np.subtract(truth.lo, held.lo) <= 2)
    assert np.all(np.subtract(held.hi, truth.hi) <= 2)

    # without the motion (several mm in these cases) a side is off by 2 voxels or more
    unmoved = transfer_box(box, art.geometry, plain.geometry)
    off = np.abs(
        np.concatenate([np.subtract(unmoved.lo, truth.lo), np.subtract(unmoved.hi, truth.hi)])
    )
    assert off.max() >= 2

    # every plain slice showing tumour gets a prompt that holds that slice's tumour
    axis = axial_axis(plain.geometry)
    prompts = {p.slice: p for p in slice_prompts_3d(held, axis, label=2)}
    for p in slice_prompts_per_slice(plain.array == 2, axis):
        outer = np.array(prompts[p.slice].box)
        assert np.all(outer[:2] <= p.box[:2])
        assert np.all(outer[2:] >= p.box[2:])
