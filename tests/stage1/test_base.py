"""Stage 1 from a mask file: label conventions, exact geometry, refusal of foreign grids."""

from __future__ import annotations

import numpy as np
import pytest

from slidesam.core import Geometry, InputError, Volume
from slidesam.data.io import write_mask
from slidesam.stage1.base import MaskFileStage1, Stage1

# an odd grid: anisotropic, off-origin, flipped and permuted axes
GEOMETRY = Geometry(
    shape=(5, 7, 6),
    spacing=(3.3, 0.9, 1.7),
    origin=(12.5, -40.25, 7.0),
    direction=np.array([[0.0, -1.0, 0.0], [0.0, 0.0, 1.0], [-1.0, 0.0, 0.0]]),
)


def image() -> Volume:
    rng = np.random.default_rng(0)
    return Volume(array=rng.integers(-200, 300, GEOMETRY.shape).astype(np.int16), geometry=GEOMETRY)


def mask_file(tmp_path, values: dict[int, tuple], geometry: Geometry = GEOMETRY, name="m.nii.gz"):
    """A mask file holding ``value`` at each listed voxel (z, y, x), 0 elsewhere."""
    array = np.zeros(geometry.shape, dtype=np.uint8)
    for value, voxels in values.items():
        for v in voxels:
            array[v] = value
    return write_mask(array, geometry, tmp_path / name), array


def test_kits_mask_is_kept_with_the_image_geometry_exactly(tmp_path):
    path, array = mask_file(tmp_path, {1: [(0, 0, 0), (1, 2, 3)], 2: [(4, 6, 5)], 3: [(2, 2, 2)]})
    vol = image()
    stage = MaskFileStage1(path)
    assert isinstance(stage, Stage1)
    out = stage.predict(vol)
    assert out.geometry == vol.geometry  # bit for bit, not the file's float32 header
    assert out.array.dtype == np.uint8
    np.testing.assert_array_equal(out.array, array)


@pytest.mark.parametrize(
    ("tumor_label", "stored", "expected"),
    [
        (2, {1: [(1, 1, 1), (1, 1, 2)]}, {2: [(1, 1, 1), (1, 1, 2)]}),  # binary -> tumor
        (None, {1: [(1, 1, 1)]}, {1: [(1, 1, 1)]}),  # verbatim KiTS: kidney stays kidney
        (5, {5: [(0, 1, 2)], 3: [(4, 4, 4)], 1: [(2, 2, 2)]}, {2: [(0, 1, 2)]}),  # foreign
        (1, {1: [(3, 3, 3)]}, {2: [(3, 3, 3)]}),  # binary tumor mask named explicitly
        (2, {}, {}),  # empty mask -> empty
    ],
)
def test_label_conventions(tmp_path, tumor_label, stored, expected):
    path, _ = mask_file(tmp_path, stored)
    out = MaskFileStage1(path, tumor_label=tumor_label).predict(image()).array
    want = np.zeros(GEOMETRY.shape, dtype=np.uint8)
    for value, voxels in expected.items():
        for v in voxels:
            want[v] = value
    np.testing.assert_array_equal(out, want)


def test_values_outside_kits_are_refused_with_a_hint(tmp_path):
    path, _ = mask_file(tmp_path, {2: [(0, 0, 0)], 7: [(1, 1, 1)]})
    with pytest.raises(InputError, match=r"values \[7\] are not KiTS labels.*tumor_label"):
        MaskFileStage1(path).predict(image())


def test_mask_on_another_grid_is_refused(tmp_path):
    shifted = Geometry(
        shape=GEOMETRY.shape,
        spacing=GEOMETRY.spacing,
        origin=(13.5, -40.25, 7.0),
        direction=GEOMETRY.direction,
    )
    path, _ = mask_file(tmp_path, {2: [(0, 0, 0)]}, geometry=shifted)
    with pytest.raises(InputError, match="label grid does not match its image: origin"):
        MaskFileStage1(path).predict(image())
    other_shape = Geometry(shape=(5, 7, 7), spacing=GEOMETRY.spacing)
    path, _ = mask_file(tmp_path, {2: [(0, 0, 0)]}, geometry=other_shape, name="s.nii.gz")
    with pytest.raises(InputError, match="shape"):
        MaskFileStage1(path).predict(image())


def test_missing_file_and_bad_tumor_label(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        MaskFileStage1(tmp_path / "none.nii.gz").predict(image())
    for bad in (0, 256, True, "2", 2.0):
        with pytest.raises(InputError, match=r"tumor_label must be an integer in 1\.\.255 or None"):
            MaskFileStage1(tmp_path / "m.nii.gz", tumor_label=bad)
