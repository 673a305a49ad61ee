"""DICOM: read a CT series folder, write a series (for tests and demos), write a DICOM SEG.

Reading goes through SimpleITK/GDCM (which sorts slices by position along the slice normal and
applies RescaleSlope/RescaleIntercept); we add the checks GDCM does not make: several series in
one folder, and missing slices (a gap in positions), both of which it would silently accept.
DICOM SEG is written with highdicom, referencing the source slices by SOP Instance UID.
"""

from __future__ import annotations

import datetime as _dt
import warnings
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk

from slidesam.core import KITS_LABELS, InputError, Volume
from slidesam.data.io import from_sitk

__all__ = ["read_dicom_series", "write_dicom_seg", "write_dicom_series"]

#: relative tolerance on the spacing between consecutive slices before we call it a gap
_GAP_TOLERANCE = 0.5


def _series_summary(folder: Path, series_id: str) -> str:
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_id)
    desc = ""
    try:
        ds = pydicom.dcmread(files[0], stop_before_pixels=True)
        desc = str(getattr(ds, "SeriesDescription", "") or "")
    except Exception:  # noqa: BLE001 - a description is only decoration in an error message
        pass
    return f"{series_id} ({len(files)} files{', ' + repr(desc) if desc else ''})"


def _slice_positions(files: list[str]) -> np.ndarray:
    """Position of each file along the slice normal (mm), in the given order."""
    positions = []
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        iop = np.asarray(ds.ImageOrientationPatient, dtype=np.float64)
        ipp = np.asarray(ds.ImagePositionPatient, dtype=np.float64)
        normal = np.cross(iop[:3], iop[3:])
        positions.append(float(ipp @ normal))
    return np.asarray(positions)


def read_dicom_series(folder: str | Path) -> Volume:
    """Read the one DICOM series in ``folder`` as a Volume (values with rescale applied).

    Raises InputError when the folder holds no series, several series (naming each), or slices
    with a gap in their positions.
    """
    folder = Path(folder)
    series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series_ids:
        raise InputError(f"{folder}: no DICOM series found in this folder")
    if len(series_ids) > 1:
        listed = "; ".join(_series_summary(folder, s) for s in series_ids)
        raise InputError(
            f"{folder}: holds {len(series_ids)} DICOM series, pass a folder with one: {listed}"
        )
    files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_ids[0]))
    try:
        positions = _slice_positions(files)
    except (AttributeError, ValueError, pydicom.errors.InvalidDicomError) as exc:
        raise InputError(
            f"{folder}: DICOM slices lack a usable position/orientation ({exc})"
        ) from None
    if len(files) >= 3:
        steps = np.diff(positions)
        if np.any(np.abs(steps) < 1e-6):
            raise InputError(f"{folder}: two slices share the same position (duplicate files?)")
        typical = float(np.median(np.abs(steps)))
        bad = np.nonzero(np.abs(np.abs(steps) - typical) > _GAP_TOLERANCE * typical)[0]
        if bad.size:
            i = int(bad[0])
            raise InputError(
                f"{folder}: missing slice(s): a step of {abs(steps[i]):.3g} mm between "
                f"{Path(files[i]).name} and {Path(files[i + 1]).name}, where slices are "
                f"{typical:.3g} mm apart"
            )
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        img = reader.Execute()
    except RuntimeError as exc:
        raise InputError(f"{folder}: could not read the DICOM series ({exc})") from None
    volume = from_sitk(img, str(folder))
    volume.source_files = tuple(files)
    return volume


# ----------------------------------------------------------------------------------------------
# writing a CT series (phantoms as DICOM, and test inputs)
# ----------------------------------------------------------------------------------------------
def write_dicom_series(
    volume: Volume,
    folder: str | Path,
    *,
    patient_id: str = "SLIDESAM-PHANTOM",
    series_description: str = "slidesam phantom",
    rescale_intercept: float = -1024.0,
    rescale_slope: float = 1.0,
    study_uid: str | None = None,
) -> list[Path]:
    """Write a CT volume (HU) as one DICOM file per z slice, with its geometry.

    Stored values are ``(HU - intercept) / slope`` as signed 16-bit integers, so a reader that
    applies the rescale gets the HU back (rounded to ``slope``).
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    g = volume.geometry
    d_itk = np.asarray(g.itk_direction()).reshape(3, 3)
    row_dir, col_dir = d_itk[:, 0], d_itk[:, 1]  # x (columns) and y (rows) world directions
    stored = np.rint((volume.array.astype(np.float64) - rescale_intercept) / rescale_slope)
    if stored.min() < -32768 or stored.max() > 32767:
        raise InputError("values do not fit 16 bits with this rescale slope/intercept")
    stored = stored.astype(np.int16)
    study_uid = study_uid or generate_uid()
    series_uid, frame_uid = generate_uid(), generate_uid()
    now = _dt.datetime.now()
    paths = []
    for k in range(g.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.Modality = "CT"
        ds.PatientName, ds.PatientID = patient_id, patient_id
        ds.PatientBirthDate, ds.PatientSex = "", "O"
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
        ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "", ""
        ds.Manufacturer = "slidesam"
        ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
        ds.SeriesDescription = series_description
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
        ds.ImagePositionPatient = [float(v) for v in g.index_to_world([k, 0, 0])]
        ds.ImageOrientationPatient = [float(v) for v in (*row_dir, *col_dir)]
        ds.PixelSpacing = [g.spacing[1], g.spacing[2]]  # row spacing (y), column spacing (x)
        ds.SliceThickness = g.spacing[0]
        ds.Rows, ds.Columns = g.shape[1], g.shape[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = (
            rescale_intercept,
            rescale_slope,
            "HU",
        )
        ds.PixelData = stored[k].tobytes()
        path = folder / f"{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------------------------
# DICOM SEG
# ----------------------------------------------------------------------------------------------
def write_dicom_seg(
    mask: np.ndarray,
    reference: Volume,
    path: str | Path,
    *,
    label_names: dict[int, str] | None = None,
    series_description: str = "slidesam segmentation",
    algorithm_name: str = "slidesam",
) -> Path:
    """Write ``mask`` as a DICOM SEG that references the DICOM series ``reference`` was read from.

    Args:
        mask: (Z, Y, X) integer labels on ``reference``'s grid (0 = background).
        reference: a Volume read from a DICOM folder (its ``source_files`` are referenced).
        path: output ``.dcm`` file.
        label_names: label value -> segment name; defaults to the KiTS names, else "label_<k>".
    """
    import highdicom as hd
    from highdicom.sr.coding import CodedConcept
    from pydicom.sr.codedict import codes

    from slidesam import __version__

    if not reference.source_files:
        raise InputError(
            "a DICOM SEG needs the source DICOM series: read the image from its DICOM folder"
        )
    mask = np.asarray(mask)
    if mask.shape != reference.shape:
        raise InputError(f"mask shape {mask.shape} does not match the image {reference.shape}")
    names = dict(KITS_LABELS) if label_names is None else dict(label_names)
    present = [int(v) for v in np.unique(mask) if v != 0]
    if not present:
        raise InputError("the mask is empty: a DICOM SEG needs at least one segment")
    sources = [pydicom.dcmread(f) for f in reference.source_files]
    for ds in sources:  # an empty SpecificCharacterSet (seen in real series) makes highdicom fail
        if "SpecificCharacterSet" in ds and not ds.SpecificCharacterSet:
            del ds.SpecificCharacterSet
    # highdicom wants one label value per segment, numbered 1..N in the order described.
    relabelled = np.zeros(mask.shape, dtype=np.uint8)
    descriptions = []
    for number, value in enumerate(present, start=1):
        relabelled[mask == value] = number
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=names.get(value, f"label_{value}"),
                segmented_property_category=codes.SCT.Tissue,
                segmented_property_type=CodedConcept("85756007", "SCT", "Tissue"),
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=hd.AlgorithmIdentificationSequence(
                    name=algorithm_name,
                    version=__version__,
                    family=codes.cid7162.ArtificialIntelligence,
                ),
            )
        )
    with warnings.catch_warnings():  # highdicom nags about the source's patient-name format
        warnings.simplefilter("ignore", UserWarning)
        seg = _segmentation(hd, sources, relabelled, descriptions, series_description)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(path)
    return path


def _segmentation(hd, sources, pixel_array, descriptions, series_description):
    from slidesam import __version__

    return hd.seg.Segmentation(
        source_images=sources,
        pixel_array=pixel_array,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=900,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="slidesam",
        manufacturer_model_name="slidesam",
        software_versions=__version__,
        device_serial_number="0",
        series_description=series_description,
    )
