from __future__ import annotations

import logging

import numpy as np
import pytest
import SimpleITK as sitk

from slidesam.core import Geometry, InputError, Volume
from slidesam.data.dicom import read_dicom_series, write_dicom_seg, write_dicom_series
from slidesam.data.io import check_ct_intensities, read_image, read_label, write_image, write_mask

FLIPPED = np.array([[0, 0, -1], [0, -1, 0], [1, 0, 0]], dtype=float)  # RAS-flipped x and y
OBLIQUE = np.array([[0.0, 0.6, -0.8], [0.0, 0.8, 0.6], [1.0, 0.0, 0.0]])
SAGITTAL = np.array([[0, 0, 1], [0, -1, 0], [-1, 0, 0]], dtype=float)  # axes permuted and flipped


def _ct(shape=(5, 12, 10), direction=FLIPPED, spacing=(3.3, 0.7, 0.9), seed=0) -> Volume:
    rng = np.random.default_rng(seed)
    array = rng.integers(-1000, 1200, size=shape).astype(np.int16)
    g = Geometry(shape=shape, spacing=spacing, origin=(-120.25, 33.5, 901.125), direction=direction)
    return Volume(array=array, geometry=g)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
@pytest.mark.parametrize("direction", [FLIPPED, SAGITTAL], ids=["flipped", "sagittal"])
def test_round_trip_is_bit_for_bit(tmp_path, suffix, direction):
    vol = _ct(direction=direction)
    first = read_image(write_image(vol, tmp_path / f"img{suffix}"))
    # the format may round the header once (NIfTI stores float32); after that, nothing changes
    assert first.geometry.mismatch(vol.geometry) == ""
    np.testing.assert_array_equal(first.array, vol.array)

    mask = (first.array > 300).astype(np.uint8) + (first.array > 900)
    second = read_label(write_mask(mask, first, tmp_path / f"mask{suffix}"), reference=first)
    assert second.geometry == first.geometry  # exact, float for float
    assert second.array.dtype == np.uint8
    np.testing.assert_array_equal(second.array, mask)
    third = read_image(write_image(second, tmp_path / f"again{suffix}"), modality=None)
    assert third.geometry == second.geometry


@pytest.mark.parametrize(("suffix", "tol"), [(".nii.gz", 1e-6), (".nrrd", 1e-12), (".mha", 1e-12)])
def test_oblique_round_trip_within_format_precision(tmp_path, suffix, tol):
    # An oblique direction is stored as float32 (NIfTI) or recomputed from its product with the
    # spacing (NRRD): each write/read may move it by the format's rounding, never more.
    vol = _ct(direction=OBLIQUE)
    first = read_image(write_image(vol, tmp_path / f"img{suffix}"))
    second = read_label(write_mask(first.array > 0, first, tmp_path / f"m{suffix}"), first)
    for a, b in ((first.geometry, vol.geometry), (second.geometry, first.geometry)):
        np.testing.assert_allclose(a.direction, b.direction, atol=tol, rtol=0)
        np.testing.assert_allclose(a.spacing, b.spacing, rtol=tol)
        np.testing.assert_allclose(a.origin, b.origin, rtol=tol)
    np.testing.assert_array_equal(second.array, first.array > 0)


def test_written_mask_has_the_reference_affine_in_itk_terms(tmp_path):
    vol = _ct()
    path = write_mask(np.zeros(vol.shape, np.uint8), vol, tmp_path / "m.nii.gz")
    img = sitk.ReadImage(str(path))
    assert img.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_allclose(img.GetDirection(), (-1, 0, 0, 0, -1, 0, 0, 0, 1))
    np.testing.assert_allclose(img.GetSpacing(), (0.9, 0.7, 3.3), rtol=1e-6)
    np.testing.assert_allclose(img.GetOrigin(), (-120.25, 33.5, 901.125), rtol=1e-6)


def test_bad_inputs_give_one_line_errors(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_image(tmp_path / "absent.nii.gz")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match="unsupported file type"):
        read_image(tmp_path / "notes.txt")
    (tmp_path / "fake.nii.gz").write_bytes(b"this is not an image")
    with pytest.raises(InputError, match="not a readable image"):
        read_image(tmp_path / "fake.nii.gz")
    sitk.WriteImage(sitk.Image(8, 8, sitk.sitkInt16), str(tmp_path / "flat.nii.gz"))
    with pytest.raises(InputError, match="3D image, got 2D"):
        read_image(tmp_path / "flat.nii.gz")
    sitk.WriteImage(sitk.Image([4, 4, 4, 2], sitk.sitkInt16), str(tmp_path / "four.nii.gz"))
    with pytest.raises(InputError, match="got 4D"):
        read_image(tmp_path / "four.nii.gz")
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(InputError, match="no DICOM series"):
        read_image(empty)
    with pytest.raises(InputError, match="unsupported output type"):
        write_mask(np.zeros((5, 12, 10)), _ct(), tmp_path / "mask.png")
    with pytest.raises(InputError, match="does not match the reference"):
        write_mask(np.zeros((5, 12, 11)), _ct(), tmp_path / "mask.nii.gz")
    with pytest.raises(InputError, match=r"0\.\.255"):
        write_mask(np.full((5, 12, 10), 300), _ct(), tmp_path / "mask.nii.gz")
    for line in [str(e) for e in (InputError("x"),)]:
        assert "\n" not in line


def test_label_grid_must_match_image(tmp_path):
    vol = _ct()
    shifted = Geometry(
        shape=vol.shape,
        spacing=vol.spacing,
        origin=np.add(vol.geometry.origin, (0, 0, 1.0)),
        direction=FLIPPED,
    )
    path = write_mask(np.zeros(vol.shape, np.uint8), shifted, tmp_path / "lab.nii.gz")
    with pytest.raises(InputError, match=r"label grid does not match its image: origin"):
        read_label(path, reference=vol)
    other = write_mask(
        np.zeros((5, 12, 9), np.uint8),
        Geometry(shape=(5, 12, 9), spacing=(1, 1, 1)),
        tmp_path / "small.nii.gz",
    )
    with pytest.raises(InputError, match="shape"):
        read_label(other, reference=vol)
    frac = Volume(array=np.full(vol.shape, 0.5, np.float32), geometry=vol.geometry)
    with pytest.raises(InputError, match="whole numbers"):
        read_label(write_image(frac, tmp_path / "frac.nrrd"))


@pytest.mark.parametrize(
    ("array", "fragment"),
    [
        (np.random.default_rng(0).normal(0, 1, (4, 20, 20)), "z-scored"),
        (np.random.default_rng(0).integers(0, 256, (4, 20, 20)), "8-bit"),
        (np.random.default_rng(0).integers(0, 4000, (4, 20, 20)), "no negative"),
        (np.random.default_rng(0).integers(-1000, 1500, (4, 20, 20)), ""),
    ],
)
def test_intensity_check(array, fragment):
    warning = check_ct_intensities(array)
    assert (fragment in warning) if fragment else warning == ""


def test_non_hu_input_logs_a_warning(tmp_path, caplog):
    g = Geometry(shape=(3, 8, 8), spacing=(1, 1, 1))
    u8 = np.random.default_rng(0).integers(0, 256, (3, 8, 8)).astype(np.uint8)
    path = write_image(Volume(array=u8, geometry=g), tmp_path / "u8.nii.gz")
    with caplog.at_level(logging.WARNING):
        read_image(path)
    assert "8-bit/windowed" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        read_image(path, modality=None)
    assert caplog.text == ""


# ---------------------------------------------------------------------------------- DICOM
def test_dicom_series_round_trip_keeps_hu_and_geometry(tmp_path):
    vol = _ct(shape=(6, 16, 12), spacing=(2.5, 0.8, 0.8))
    write_dicom_series(vol, tmp_path / "series")
    back = read_image(tmp_path / "series")
    assert back.geometry.mismatch(vol.geometry) == ""
    np.testing.assert_array_equal(back.array, vol.array)
    assert len(back.source_files) == 6


def test_dicom_series_sorted_by_position_not_name(tmp_path):
    vol = _ct(shape=(5, 8, 8), direction=np.eye(3)[:, ::-1], spacing=(2.0, 1, 1))
    files = write_dicom_series(vol, tmp_path / "s")
    for i, f in enumerate(files):  # rename so that name order is the reverse of position order
        f.rename(f.with_name(f"x{len(files) - i:02d}.dcm"))
    back = read_image(tmp_path / "s")
    np.testing.assert_array_equal(back.array, vol.array)


def test_dicom_missing_slice_and_several_series(tmp_path):
    vol = _ct(shape=(6, 8, 8), spacing=(2.0, 1, 1))
    files = write_dicom_series(vol, tmp_path / "gap")
    files[3].unlink()
    with pytest.raises(InputError, match=r"missing slice\(s\): a step of 4 mm"):
        read_image(tmp_path / "gap")
    write_dicom_series(vol, tmp_path / "two" / "a", series_description="first")
    write_dicom_series(_ct(shape=(4, 8, 8)), tmp_path / "two" / "b", series_description="second")
    for f in (tmp_path / "two" / "b").iterdir():
        f.rename(tmp_path / "two" / "a" / f"b_{f.name}")
    with pytest.raises(
        InputError, match=r"holds 2 DICOM series.*'first'.*'second'|'second'.*'first'"
    ):
        read_image(tmp_path / "two" / "a")


def test_dicom_seg_references_its_series(tmp_path):
    import highdicom as hd
    import pydicom

    vol = _ct(shape=(4, 16, 16), spacing=(2.0, 0.8, 0.8))
    write_dicom_series(vol, tmp_path / "s")
    ct = read_dicom_series(tmp_path / "s")
    mask = np.zeros(ct.shape, np.uint8)
    mask[1:3, 4:9, 5:11] = 1
    mask[2, 10:12, 10:12] = 2
    path = write_dicom_seg(mask, ct, tmp_path / "seg.dcm")
    seg = hd.seg.segread(path)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["kidney", "tumor"]
    uids = [pydicom.dcmread(f).SOPInstanceUID for f in ct.source_files]
    back = seg.get_pixels_by_source_instance(uids, combine_segments=True)
    np.testing.assert_array_equal(back, mask)
    with pytest.raises(InputError, match="empty"):
        write_dicom_seg(np.zeros(ct.shape, np.uint8), ct, tmp_path / "e.dcm")
    with pytest.raises(InputError, match="source DICOM series"):
        write_dicom_seg(mask, _ct(shape=(4, 16, 16)), tmp_path / "x.dcm")


# ---------------------------------------------------------------------------- real fixtures
def test_real_nifti_with_totalsegmentator_labels(real_fixtures, tmp_path):
    ct = read_image(real_fixtures / "abdomen_ct_3mm.nii.gz")
    assert ct.shape == (30, 101, 122)
    assert ct.spacing == (3.0, 3.0, 3.0)
    # RAS+ NIfTI affine seen from LPS: x and y axes flipped
    np.testing.assert_array_equal(ct.geometry.direction, FLIPPED)
    labels = read_label(real_fixtures / "abdomen_ct_3mm_totalseg_labels.nii.gz", reference=ct)
    kidneys = np.isin(labels.array, (2, 3))
    slices_with_kidney = np.nonzero(kidneys.any(axis=(1, 2)))[0]
    assert slices_with_kidney.min() == 0
    assert slices_with_kidney.max() == 22
    kidney_hu = float(np.mean(ct.array[kidneys]))
    assert -20 < kidney_hu < 60  # non-contrast kidney parenchyma
    out = read_label(write_mask(kidneys.astype(np.uint8), ct, tmp_path / "k.nii.gz"), reference=ct)
    assert out.geometry == ct.geometry
    np.testing.assert_array_equal(out.array, kidneys)


def test_real_dicom_series(real_fixtures, tmp_path):
    ct = read_image(real_fixtures / "dicom_ct_3slice")
    assert ct.shape == (3, 512, 512)
    np.testing.assert_allclose(ct.spacing, (1.0, 0.810547, 0.810547), rtol=1e-6)
    assert ct.array.min() == -3024
    assert ct.array.max() == 1381
    z = [ct.geometry.index_to_world((k, 0, 0))[2] for k in range(3)]
    assert np.all(np.diff(z) > 0)  # sorted by position
    liver = read_label(real_fixtures / "dicom_ct_3slice_liver_seg.nrrd", reference=ct)
    assert 20 < float(np.mean(ct.array[liver.array == 1])) < 120  # liver HU
    path = write_dicom_seg(liver.array, ct, tmp_path / "liver_seg.dcm", label_names={1: "liver"})
    import highdicom as hd

    assert hd.seg.segread(path).SegmentSequence[0].SegmentLabel == "liver"
