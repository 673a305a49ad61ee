"""Reading and writing volumes with their geometry intact (SimpleITK underneath).

Supported inputs: NIfTI (``.nii``, ``.nii.gz``), NRRD (``.nrrd``, ``.nhdr``), MetaImage
(``.mha``, ``.mhd``) and a folder holding one DICOM series. Every reader returns a
:class:`~slidesam.core.Volume` whose array is ``(z, y, x)`` (see ``slidesam.core.geometry``).

Every error a user can cause is an :class:`~slidesam.core.InputError` with one line that names
the file and what to do.

Precision: a mask written with :func:`write_mask` and read back has its reference's geometry bit
for bit whenever the direction is axis-aligned (identity, flips, permutations: almost all CT).
An oblique direction is stored by NIfTI as float32 (and by NRRD as direction x spacing), so each
write/read may move it by that format's rounding (~1e-7 for NIfTI, one ulp for NRRD), never more.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from slidesam.core import Geometry, InputError, Volume

__all__ = [
    "IMAGE_SUFFIXES",
    "check_ct_intensities",
    "from_sitk",
    "image_suffix",
    "read_image",
    "read_label",
    "strip_suffix",
    "to_sitk",
    "write_image",
    "write_mask",
]

log = logging.getLogger(__name__)

#: file endings we read and write, longest first so ``.nii.gz`` wins over ``.gz``
IMAGE_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


def image_suffix(path: str | Path) -> str:
    """The supported ending of ``path`` (``.nii.gz``, ...), or ``""`` if it has none."""
    name = str(path).lower()
    for suffix in IMAGE_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return ""


def strip_suffix(path: str | Path) -> str:
    """File name without its image ending: ``case_001.nii.gz`` -> ``case_001``."""
    name = Path(path).name
    suffix = image_suffix(name)
    return name[: len(name) - len(suffix)] if suffix else name


# ----------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------
def _sitk_to_volume(img: sitk.Image, source: str, source_files=()) -> Volume:
    dim = img.GetDimension()
    if dim != 3:
        raise InputError(
            f"{source}: expected a 3D image, got {dim}D with size {img.GetSize()}"
            + (" (a 4D series: pass one 3D volume)" if dim == 4 else "")
        )
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"{source}: expected a scalar image, got {img.GetNumberOfComponentsPerPixel()} "
            "components per voxel (RGB or vector image)"
        )
    geometry = Geometry.from_itk(
        img.GetSize(), img.GetSpacing(), img.GetOrigin(), img.GetDirection()
    )
    return Volume(
        array=sitk.GetArrayFromImage(img),
        geometry=geometry,
        source=source,
        source_files=tuple(source_files),
    )


def _read_file(path: Path) -> sitk.Image:
    if not image_suffix(path):
        if path.suffix.lower() in (".dcm", ".ima") or path.name.lower() == "dicomdir":
            raise InputError(
                f"{path}: a single DICOM file; pass the folder that holds the whole series"
            )
        raise InputError(
            f"{path}: unsupported file type; use one of {', '.join(IMAGE_SUFFIXES)} "
            "or a DICOM series folder"
        )
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputError(f"{path}: not a readable image ({_first_line(exc)})") from None


def _first_line(exc: Exception) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    # ITK messages start with a location line; the useful text is the last "Description" line.
    for ln in reversed(lines):
        if ln.lower().startswith("description:"):
            return ln.split(":", 1)[1].strip()
    return lines[-1] if lines else type(exc).__name__


def read_image(path: str | Path, *, modality: str | None = "CT") -> Volume:
    """Read a 3D image from a file or a DICOM series folder.

    Args:
        path: image file or DICOM folder.
        modality: ``"CT"`` checks that the values look like Hounsfield units and logs a warning
            if not (see :func:`check_ct_intensities`); ``None`` skips the check.

    Returns:
        Volume with the stored values (DICOM: rescale slope and intercept applied).
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if path.is_dir():
        from slidesam.data.dicom import read_dicom_series  # DICOM code stays in one module

        volume = read_dicom_series(path)
    else:
        volume = _sitk_to_volume(_read_file(path), str(path))
    if modality is not None and modality.upper() == "CT":
        warning = check_ct_intensities(volume.array)
        if warning:
            log.warning("%s: %s", path, warning)
    return volume


def read_label(path: str | Path, reference: Geometry | Volume | None = None) -> Volume:
    """Read a label map (integers 0..255) and check it lies on ``reference``'s grid.

    The returned array is uint8. A label grid that differs from the reference (shape, spacing,
    origin or direction beyond header rounding) is an error: labels are never silently resampled.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if path.is_dir():
        raise InputError(f"{path}: a label map must be a file (NIfTI, NRRD, MHA), not a folder")
    volume = _sitk_to_volume(_read_file(path), str(path))
    volume.array = _as_label_array(volume.array, str(path))
    if reference is not None:
        ref = reference.geometry if isinstance(reference, Volume) else reference
        diff = ref.mismatch(volume.geometry)
        if diff:
            raise InputError(f"{path}: label grid does not match its image: {diff}")
    return volume


def _as_label_array(array: np.ndarray, what: str) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)):
            raise InputError(f"{what}: label values must be whole numbers, found fractions or NaN")
    elif not np.issubdtype(array.dtype, np.integer) and array.dtype != bool:
        raise InputError(f"{what}: label map has non-numeric type {array.dtype}")
    if array.size and (array.min() < 0 or array.max() > 255):
        raise InputError(
            f"{what}: label values must lie in 0..255, found {array.min()}..{array.max()}"
        )
    return array.astype(np.uint8)


def check_ct_intensities(array: np.ndarray) -> str:
    """Return a warning text when ``array`` does not look like CT in Hounsfield units, else "".

    CT in HU always holds fat or air below 0 and spans hundreds of HU. Data already windowed to
    0..255, z-scored, or read without the DICOM rescale intercept does not.
    """
    a = np.asarray(array)
    sample = a.reshape(-1)[:: max(1, a.size // 200_000)].astype(np.float64)
    lo, hi = np.percentile(sample, [0.5, 99.5])
    if hi - lo < 50:
        return (
            f"intensities span only {lo:.3g}..{hi:.3g}; this does not look like CT in Hounsfield "
            "units (z-scored or normalised?). Models expect HU."
        )
    if a.min() >= 0 and a.max() <= 255:
        return (
            f"intensities lie in {a.min():.3g}..{a.max():.3g}; this looks like an 8-bit/windowed "
            "image, not CT in Hounsfield units. Models expect HU."
        )
    if lo >= 0:
        return (
            f"no negative intensities (0.5th percentile {lo:.3g}); CT in Hounsfield units has fat "
            "and air below 0. Raw stored values without the rescale intercept, or not CT?"
        )
    return ""


# ----------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------
def _reference_geometry(reference: Geometry | Volume) -> Geometry:
    if isinstance(reference, Volume):
        return reference.geometry
    if isinstance(reference, Geometry):
        return reference
    raise TypeError(f"reference must be a Volume or Geometry, got {type(reference).__name__}")


def to_sitk(array: np.ndarray, geometry: Geometry) -> sitk.Image:
    """A (Z, Y, X) array as a SimpleITK image placed on ``geometry`` (spacing, origin,
    direction), for SimpleITK filters and writers."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(array))
    img.SetSpacing(geometry.itk_spacing())
    img.SetOrigin(geometry.origin)
    img.SetDirection(geometry.itk_direction())
    return img


def _prepare_out(path: str | Path) -> Path:
    path = Path(path)
    if not image_suffix(path):
        raise InputError(f"{path}: unsupported output type; use one of {', '.join(IMAGE_SUFFIXES)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def write_mask(mask: np.ndarray, reference: Geometry | Volume, path: str | Path) -> Path:
    """Write a label mask as uint8 with exactly ``reference``'s origin, spacing and direction.

    Args:
        mask: (Z, Y, X) integer or bool array, values 0..255, same shape as the reference.
        reference: the image the mask belongs to (or its geometry).
        path: output file (``.nii.gz``, ``.nrrd``, ``.mha``, ...); folders are created.
    """
    geometry = _reference_geometry(reference)
    mask = np.asarray(mask)
    if mask.shape != geometry.shape:
        raise InputError(
            f"{path}: mask shape {mask.shape} does not match the reference image {geometry.shape}"
        )
    labels = _as_label_array(mask, str(path))
    path = _prepare_out(path)
    sitk.WriteImage(to_sitk(labels, geometry), str(path), useCompression=True)
    return path


def write_image(volume: Volume, path: str | Path) -> Path:
    """Write an image with its own geometry and dtype (compressed where the format allows)."""
    path = _prepare_out(path)
    sitk.WriteImage(to_sitk(volume.array, volume.geometry), str(path), useCompression=True)
    return path


def from_sitk(img: sitk.Image, source: str = "") -> Volume:
    """A SimpleITK 3D scalar image as a Volume."""
    return _sitk_to_volume(img, source)
