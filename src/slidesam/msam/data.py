"""M-SAM preprocessing on numpy arrays: working grid, z-normalisation, crop-or-pad, flips.

Arrays are (z, y, x). The working grid is ``slidesam.stage1.unet.network_geometry`` at the
configured spacing (the input's axes reordered/flipped to the standard axial orientation, never
rotated), and resampling is that module's SimpleITK ``resample``: one implementation of both
for every pipeline of the package.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from slidesam.core import Geometry, Volume
from slidesam.data.io import read_image, read_label
from slidesam.msam.config import PreprocessConfig
from slidesam.stage1.train import find_cases as stage1_cases
from slidesam.stage1.unet import network_geometry, resample

__all__ = [
    "WorkCase",
    "crop_or_pad",
    "find_cases",
    "flip",
    "load_case",
    "paste_box",
    "to_working_grid",
    "z_normalize",
]


def z_normalize(array: np.ndarray, threshold: float) -> np.ndarray:
    """(array - mean) / std over the voxels above ``threshold`` (all voxels if fewer than 10
    are), applied to every voxel; float32, same shape."""
    a = np.asarray(array, dtype=np.float32)
    fg = a[a > threshold]
    if fg.size < 10:
        fg = a.reshape(-1)
    mean, std = float(fg.mean()), float(fg.std())
    return (a - np.float32(mean)) / np.float32(max(std, 1e-6))


def to_working_grid(volume: Volume, preprocess: PreprocessConfig) -> tuple[np.ndarray, Geometry]:
    """The image on its working grid, z-normalised: (float32 array, working geometry)."""
    geom = network_geometry(volume.geometry, preprocess.spacing)
    array = resample(volume.array.astype(np.float32), volume.geometry, geom, linear=True)
    return z_normalize(array, preprocess.foreground_threshold), geom


def crop_or_pad(
    array: np.ndarray, start: tuple[int, int, int] | np.ndarray, size: int, pad_value: float = 0.0
) -> np.ndarray:
    """The ``size``^3 block whose first voxel is ``start`` (may lie outside: padded)."""
    start = np.asarray(start, dtype=int)
    out = np.full((size, size, size), pad_value, dtype=array.dtype)
    src, dst = _overlap(start, size, array.shape)
    if src is not None:
        out[dst] = array[src]
    return out


def paste_box(start, size: int, shape) -> tuple[tuple[slice, ...], tuple[slice, ...]] | None:
    """(slices into the big array, slices into the block) where a block at ``start`` overlaps
    an array of ``shape``; None if they do not overlap."""
    src, dst = _overlap(np.asarray(start, dtype=int), size, shape)
    return None if src is None else (src, dst)


def _overlap(start: np.ndarray, size: int, shape):
    lo = np.maximum(start, 0)
    hi = np.minimum(start + size, np.asarray(shape))
    if np.any(hi <= lo):
        return None, None
    src = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    dst = tuple(slice(int(a - s), int(b - s)) for a, b, s in zip(lo, hi, start, strict=True))
    return src, dst


def flip(arrays: list[np.ndarray], axes: tuple[int, ...]) -> list[np.ndarray]:
    """Flip every (z, y, x) array along ``axes`` (copies)."""
    return [np.ascontiguousarray(np.flip(a, axis=axes)) if axes else a for a in arrays]


@dataclass
class WorkCase:
    """A training case on its working grid: z-normalised image and binary object mask."""

    case_id: str
    image: np.ndarray  # float32 (z, y, x)
    target: np.ndarray  # bool (z, y, x)
    pad_value: float  # the image minimum, used outside the volume

    @property
    def centre(self) -> np.ndarray:
        """Centre of the object's bounding box, voxel indices (z, y, x)."""
        idx = np.argwhere(self.target)
        return (idx.min(0) + idx.max(0)) / 2.0


def load_case(
    case_id: str, image_path: Path, label_path: Path, preprocess: PreprocessConfig, labels
) -> WorkCase:
    image = read_image(image_path)
    label = read_label(label_path, reference=image)
    array, geom = to_working_grid(image, preprocess)
    lab = resample(label.array, image.geometry, geom, linear=False)
    return WorkCase(
        case_id=case_id,
        image=array,
        target=np.isin(lab, list(labels)),
        pad_value=float(array.min()),
    )


def find_cases(folder: str | Path) -> list[tuple[str, Path, Path]]:
    """(case id, image, label) of an nnU-Net raw dataset folder, sorted by name (the stage-1
    trainer's reader: ``slidesam.stage1.train.find_cases``)."""
    return [(c.case_id, c.image, c.label) for c in stage1_cases(folder)]
