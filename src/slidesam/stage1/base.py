"""What a stage 1 is, and the simplest one: a mask that already exists.

Stage 1 of SSA segments the kidneys and the tumor on one phase (the arterial phase in the paper);
stage 2 turns its tumor mask into box prompts for Slide-SAM on the plain phase. Any object with
a ``name`` and a ``predict(volume) -> Volume`` method is a stage 1 (:class:`Stage1`), so the
embedded U-Net (``slidesam.stage1.unet.UNetStage1``), an nnU-Net adapter or a radiologist's mask
(:class:`MaskFileStage1`) are interchangeable.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from slidesam.core import KITS_LABELS, InputError, Volume
from slidesam.data.io import read_label

__all__ = ["TUMOR", "MaskFileStage1", "Stage1"]

log = logging.getLogger(__name__)

#: KiTS label value of the tumor, the class stage 2 prompts from
TUMOR = 2


@runtime_checkable
class Stage1(Protocol):
    """A stage-1 segmenter.

    Attributes:
        name: short human-readable description (for logs and reports).
    """

    name: str

    def predict(self, volume: Volume) -> Volume:
        """Segment ``volume``.

        Args:
            volume: CT image in HU, (Z, Y, X), on any grid.

        Returns:
            uint8 KiTS label map (0 background, 1 kidney, 2 tumor, 3 cyst; see
            ``slidesam.core.labels``) whose geometry is exactly ``volume.geometry`` (same shape,
            spacing, origin and direction).
        """
        ...


class MaskFileStage1:
    """Stage 1 read from a mask file: any tool's output, or a radiologist's mask.

    The mask must lie on the grid of the image it is used with: it is read with
    :func:`slidesam.data.io.read_label` against that image, so a mask on another grid (other
    shape, spacing, origin or direction) is an :class:`~slidesam.core.InputError`, never resampled.

    How the file's values become KiTS labels:

    - ``tumor_label=2`` (default): the file holds KiTS labels (0..3), kept as they are; except
      that a **binary** file (values 0 and 1 only) is taken as a tumor mask, 1 -> 2. A KiTS map
      that happens to hold only kidney (1) would be misread this way: pass ``tumor_label=None``.
    - ``tumor_label=None``: the file holds KiTS labels (0..3), kept as they are, always.
    - ``tumor_label=t`` (any other value, e.g. 1 for a binary tumor mask, 5 for another tool's
      convention): voxels equal to ``t`` become tumor (2), every other voxel background (0),
      since the meaning of the file's other values is unknown.

    Args:
        path: mask file (NIfTI, NRRD, MHA).
        tumor_label: the file's value that marks the tumor (see above), 1..255, or None.
    """

    def __init__(self, path: str | Path, *, tumor_label: int | None = TUMOR) -> None:
        if tumor_label is not None and (
            isinstance(tumor_label, bool)
            or not isinstance(tumor_label, int | np.integer)
            or not 1 <= tumor_label <= 255
        ):
            raise InputError(
                f"tumor_label must be an integer in 1..255 or None, got {tumor_label!r}"
            )
        self.path = Path(path)
        self.tumor_label = None if tumor_label is None else int(tumor_label)
        self.name = f"mask file {self.path.name}"

    def predict(self, volume: Volume) -> Volume:
        """The mask as a uint8 KiTS label map on exactly ``volume``'s geometry.

        Raises:
            InputError: the file is missing or unreadable, lies on another grid, or holds values
                outside 0..3 when read as KiTS labels.
        """
        mask = read_label(self.path, reference=volume).array
        values = np.unique(mask)
        t = self.tumor_label
        if t is None or t == TUMOR:
            if t == TUMOR and values.size and set(values.tolist()) <= {0, 1} and values.max() == 1:
                log.info("%s: binary mask, taken as the tumor (1 -> label 2)", self.path)
                out = np.where(mask == 1, TUMOR, 0).astype(np.uint8)
            else:
                extra = sorted(set(values.tolist()) - set(KITS_LABELS))
                if extra:
                    raise InputError(
                        f"{self.path}: values {extra} are not KiTS labels "
                        f"({', '.join(f'{k} {v}' for k, v in KITS_LABELS.items())}); pass "
                        "tumor_label=<the value that marks the tumor> to read another convention"
                    )
                out = mask.astype(np.uint8, copy=True)
        else:
            if t not in values:
                log.warning(
                    "%s: no voxel has the tumor value %d; the tumor mask is empty", self.path, t
                )
            out = np.where(mask == t, TUMOR, 0).astype(np.uint8)
        return volume.with_array(out)

    def __repr__(self) -> str:
        return f"MaskFileStage1({str(self.path)!r}, tumor_label={self.tumor_label!r})"
