"""Cases on disk, axial slices, and the balanced slice selection of the cache. Torch-free.

Datasets accepted by :func:`find_cases`:

- an nnU-Net raw dataset folder: ``imagesTr/CASE_0000.nii.gz`` + ``labelsTr/CASE.nii.gz``
  (``slidesam phantom`` writes these);
- the KiTS23 layout: ``dataset/case_00000/imaging.nii.gz`` + ``segmentation.nii.gz``.

Slices are taken along the array axis closest to world z (axial), ``(H, W)`` in array order.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from slidesam.core import Geometry, InputError
from slidesam.data.io import IMAGE_SUFFIXES, image_suffix, strip_suffix
from slidesam.data.preprocess import resize_image, to_uint8

__all__ = [
    "CaseFiles",
    "axial_axis",
    "contrast_jitters",
    "find_cases",
    "find_images",
    "jitter_grey",
    "select_slices",
    "slice_to_rgb",
]


@dataclass(frozen=True)
class CaseFiles:
    """One case: its id, image and (for training) label map."""

    case_id: str
    image: Path
    label: Path | None = None


def find_cases(folder: str | Path) -> list[CaseFiles]:
    """The labelled cases of a dataset folder (nnU-Net raw or KiTS23 layout), sorted by id."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: no such dataset folder")
    images, labels = folder / "imagesTr", folder / "labelsTr"
    cases: list[CaseFiles] = []
    if images.is_dir() and labels.is_dir():
        for image in sorted(images.iterdir()):
            suffix = image_suffix(image)
            stem = strip_suffix(image)
            if not suffix or not stem.endswith("_0000"):
                continue
            case = stem[: -len("_0000")]
            label = labels / f"{case}{suffix}"
            if not label.is_file():
                raise InputError(f"{image}: no label map {label}")
            cases.append(CaseFiles(case, image, label))
    else:
        for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
            image, label = sub / "imaging.nii.gz", sub / "segmentation.nii.gz"
            if image.is_file() and label.is_file():
                cases.append(CaseFiles(sub.name, image, label))
    if not cases:
        raise InputError(
            f"{folder}: no labelled cases found; expected an nnU-Net raw dataset "
            "(imagesTr/CASE_0000.nii.gz + labelsTr/CASE.nii.gz) or the KiTS23 layout "
            "(case_*/imaging.nii.gz + segmentation.nii.gz)"
        )
    return cases


def find_images(path: str | Path) -> list[CaseFiles]:
    """Images to predict: one file, a folder of image files (nnU-Net ``CASE_0000`` names give
    ``CASE``; other channels are skipped), or a KiTS23 dataset folder (``imaging.nii.gz``)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such image file or folder")
    if path.is_file():
        if not image_suffix(path):
            raise InputError(
                f"{path}: unsupported file type; use one of {', '.join(IMAGE_SUFFIXES)}"
            )
        return [CaseFiles(_case_name(path), path)]
    out = []
    for p in sorted(path.iterdir()):
        if p.is_file() and image_suffix(p):
            stem = strip_suffix(p)
            if len(stem) > 5 and stem[-5] == "_" and stem[-4:].isdigit() and stem[-4:] != "0000":
                continue
            out.append(CaseFiles(_case_name(p), p))
        elif p.is_dir() and (p / "imaging.nii.gz").is_file():
            out.append(CaseFiles(p.name, p / "imaging.nii.gz"))
    if not out:
        raise InputError(f"{path}: no image files ({', '.join(IMAGE_SUFFIXES)}) to predict")
    return out


def _case_name(path: Path) -> str:
    stem = strip_suffix(path)
    return stem[: -len("_0000")] if stem.endswith("_0000") else stem


def axial_axis(geometry: Geometry) -> int:
    """Array axis (0, 1, 2 of (z, y, x)) most aligned with world z: 0 for ordinary axial CT."""
    return int(np.argmax(np.abs(geometry.direction[2, :])))


def slice_to_rgb(
    hu: np.ndarray,
    window: tuple[float, float],
    size: int,
    jitter: tuple[float, float] | None = None,
) -> np.ndarray:
    """One ``(H, W)`` CT slice in HU -> ``(size, size, 3)`` uint8 RGB: windowed to 0..255,
    contrast-jittered when ``jitter = (factor, shift)`` is given (:func:`jitter_grey`), the grey
    value on all three channels, stretched (bilinear) to the square encoder input."""
    grey = to_uint8(hu, window)
    if jitter is not None:
        grey = jitter_grey(grey, *jitter)
    return resize_image(np.stack([grey, grey, grey]), size)


def jitter_grey(grey: np.ndarray, factor: float, shift: float) -> np.ndarray:
    """Contrast and brightness jitter of a windowed ``(H, W)`` uint8 slice:
    ``clip(mean + factor * (grey - mean) + shift, 0, 255)`` rounded to uint8, ``mean`` the
    slice's mean grey value (``factor`` 1 and ``shift`` 0 leave it unchanged)."""
    g = grey.astype(np.float64)
    mean = g.mean() if g.size else 0.0
    return np.rint(np.clip(mean + factor * (g - mean) + shift, 0, 255)).astype(np.uint8)


def contrast_jitters(
    seed: int,
    case_id: str,
    indices: np.ndarray,
    copies: int,
    factor: tuple[float, float],
    shift: float,
) -> np.ndarray:
    """The (factor, shift) of each contrast copy of each slice, seeded per case and slice
    (``[seed, crc32(case_id), slice number]``), so a slice's copies do not depend on which
    other slices are cached.

    Returns:
        (copies, len(indices), 2) float64: contrast factor, brightness shift (0..255 units).
    """
    out = np.zeros((copies, len(indices), 2))
    case = zlib.crc32(case_id.encode())
    for j, i in enumerate(np.asarray(indices, dtype=np.int64)):
        rng = np.random.default_rng([seed, case, int(i)])
        out[:, j, 0] = rng.uniform(factor[0], factor[1], size=copies)
        out[:, j, 1] = rng.uniform(-shift, shift, size=copies)
    return out


def select_slices(
    positive: np.ndarray, *, max_slices: int, blank_ratio: float, rng: np.random.Generator
) -> np.ndarray:
    """Slice indices to cache: every positive slice plus random blanks, sorted.

    Args:
        positive: (N,) bool, True where the slice holds any foreground.
        max_slices: cap on the total. Too many positives: evenly spaced ones are kept.
        blank_ratio: blanks drawn per positive (1 = balanced), without replacement, as many as
            exist and fit under the cap.

    Returns:
        (K,) int64 sorted slice indices.
    """
    positive = np.asarray(positive, dtype=bool)
    pos = np.flatnonzero(positive)
    blank = np.flatnonzero(~positive)
    if pos.size > max_slices:
        keep = np.unique(np.round(np.linspace(0, pos.size - 1, max_slices)).astype(int))
        return pos[keep]
    n_blank = min(round(blank_ratio * pos.size), max_slices - pos.size, blank.size)
    drawn = rng.choice(blank, size=n_blank, replace=False) if n_blank > 0 else blank[:0]
    return np.sort(np.concatenate([pos, drawn])).astype(np.int64)
