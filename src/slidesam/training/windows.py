"""Slide-SAM training data: three-slice windows written by ``slidesam prepare``.

One *sample* is one (window, target) pair. A window record of ``meta/CASE.jsonl`` with K kept
targets (``masks/CASE/<axis>_<slice>.npz`` holds ``masks`` (K, 3, size, size)) gives K samples,
target k seeing the same image with its own three-slice mask. Only finished cases (those with
``meta/CASE.done.json``) are listed, so a dataset still being prepared can already be read.

Conventions (every tensor of a ``WindowSample``):

- ``image``: float32 ``(3, S, S)``, values 0..255 (channel c = slice ``slice_index - 1 + c``;
  not normalised: the model subtracts its own pixel mean and divides by its std);
- ``mask``: float32 ``(3, S, S)``, values exactly 0 or 1, the same slices as the image;
- ``indicator``: float32 ``(3,)``, which of the three mask slices are labelled: ``[1, 1, 1]``
  for 3D labels, e.g. ``[0, 1, 0]`` for a 2D (pseudo-)label of the centre slice only.

Rows and columns are those of the prepared image: row 0 at the top, x = column, y = row.

Several prepared folders are concatenated in the order given (``WindowDataset.dataset_sizes``);
``WeightedMixSampler`` draws from them in proportion to per-dataset weights.

Augmentation (``AugmentConfig``) is seeded, uses no global random state and runs on CPU with
torch (no torchvision): crop-by-positive/negative then resize, and a random affine (rotation,
scale, shear), composed into one resampling (image bilinear, mask nearest), then an intensity
and contrast shift of the image only. ``WindowDataset`` seeds each sample from
``(seed, epoch, index)``, so a DataLoader gives the same batches whatever its number of workers.
"""

from __future__ import annotations

import json
import logging
import math
import operator
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset, Sampler

from slidesam.core import InputError
from slidesam.data.roi import Roi, crop, roi_for_box

__all__ = [
    "AugmentConfig",
    "WeightedMixSampler",
    "WindowDataset",
    "WindowSample",
    "augment_window",
    "mixed_indices",
]

log = logging.getLogger(__name__)

_REQUIRED_KEYS = ("case", "image", "mask", "labels", "class_names", "axis", "slice_index")


class WindowSample(NamedTuple):
    """One training sample: a three-slice window and one target's three-slice mask.

    A NamedTuple, so ``torch.utils.data.default_collate`` batches it field by field: tensors
    gain a leading batch dimension ``B``, ints become ``(B,)`` int64 tensors, strings lists.

    Attributes:
        image: float32 (3, S, S), 0..255, channels = slices (slice_index - 1, +0, +1).
        mask: float32 (3, S, S), 0/1, the target on the same three slices.
        indicator: float32 (3,), 1 where the mask slice is labelled, 0 where it is not.
        dataset: name of the prepared dataset folder.
        case: case identifier.
        axis: slicing axis of the source volume (0 = z, 1 = y, 2 = x of its (z, y, x) array).
        slice_index: index of the centre slice along ``axis``.
        label: target index in the dataset's ``prepare.json`` targets.
        class_name: target name (from ``dataset.json``).
        prompt_mask: float32 (S, S), 0/1, what the prompt is simulated from: the target's
            centre slice, or for a *negative* sample (``AugmentConfig.negative_p``) the
            target's mask on a nearby slice, where ``mask`` is empty.
    """

    image: torch.Tensor
    mask: torch.Tensor
    indicator: torch.Tensor
    dataset: str
    case: str
    axis: int
    slice_index: int
    label: int
    class_name: str
    prompt_mask: torch.Tensor


# --------------------------------------------------------------------------------------------
# augmentation


def _pair(value, name: str, *, low: float | None = None, high: float | None = None):
    try:
        a, b = (float(v) for v in value)
    except (TypeError, ValueError):
        raise InputError(
            f"AugmentConfig.{name} must be a (low, high) pair, got {value!r}"
        ) from None
    if not (math.isfinite(a) and math.isfinite(b)) or a > b:
        raise InputError(f"AugmentConfig.{name} must have finite low <= high, got {value!r}")
    if (low is not None and a < low) or (high is not None and b > high):
        raise InputError(f"AugmentConfig.{name} must lie within [{low}, {high}], got {value!r}")
    return (a, b)


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation of a window and its mask (defaults are mild).

    Each step happens with its own probability ``*_p``; a range ``(low, high)`` is sampled
    uniformly, so ``rotation=(90, 90)`` rotates by exactly 90 degrees.

    Attributes:
        crop_p: probability of "crop by positive/negative then resize": a square sub-window of
            side ``crop_fraction * S`` is cut out and resized back to S.
        crop_fraction: range of the crop side as a fraction of S, in (0, 1].
        crop_positive: probability that a crop is *positive* (it contains the whole
            foreground of the mask's centre slice; the side grows to fit it if needed) rather
            than *negative* (anywhere in the image).
        affine_p: probability of a random affine transform about the image centre.
        rotation: degrees; positive = counter-clockwise as displayed (row 0 at the top), so
            +90 turns the mask into ``np.rot90(mask, 1, axes=(-2, -1))``.
        scale: zoom factor; > 1 enlarges the content.
        shear: degrees of horizontal shear (x shifted in proportion to y).
        intensity_p: probability of an intensity/contrast change of the image (not the mask):
            ``clip((image - mean) * contrast + mean + shift, 0, 255)``, mean over the window.
        contrast: range of the contrast factor (> 0).
        shift: range of the additive shift, in the 0..255 units of the image.
        roi_scale: for zoomed models (``roi_context > 0``, see ``slidesam.data.roi``): range of a
            factor on the crop side around the target's centre-slice box, so the model learns
            crops that are looser or tighter than the nominal one (at inference the box comes
            from a neighbouring slice or another phase).
        roi_shift: largest shift of that crop's centre, as a fraction of its side (uniform in
            ``[-roi_shift, roi_shift]`` per axis).
        negative_p: probability that a sample becomes a *negative*: a window 1 to
            ``negative_distance`` slices away (same case and axis) none of whose three slices
            keeps the target, prompted with the target's box from the original slice; its
            target is empty on all three slices (indicator ``[1, 1, 1]``, so the IoU head
            learns that an empty mask is right there). This teaches the model to answer
            "nothing here" when propagation walks past an object's end; negatives get no
            spatial augmentation. When no such window exists the sample stays positive.
        negative_distance: farthest such neighbour, in slices.
        neighbour_prompt_p: probability that a positive sample labelled on all three slices
            is prompted from one of its *edge* slices (c - 1 or c + 1, whichever keeps the
            target; the prompt still asks for all three slices). This is what propagation
            gives at inference: the next window's box comes from the previous window's edge
            mask, which at an object's end is larger than the new centre slice (and at
            ``step`` 3 lies two slices away). Without it the model learns to fill whatever box
            it is given. For zoomed models the crop follows that prompt. Measured once on the
            phantom recipe (p = 0.35): window Dice unchanged, propagation Dice lower (the model
            answered "empty" on nearly isodense plain-phase tumours), so the default stays 0.

    Geometry is resampled once per sample (crop and affine composed): bilinear for the image,
    nearest for the mask, zeros outside the image. If the spatial steps would leave a mask
    whose centre slice had foreground with none, they are undone for that sample (the intensity
    step still applies), so a positive training target never becomes empty.
    """

    crop_p: float = 0.25
    crop_fraction: tuple[float, float] = (0.6, 1.0)
    crop_positive: float = 0.5
    affine_p: float = 0.5
    rotation: tuple[float, float] = (-10.0, 10.0)
    scale: tuple[float, float] = (0.9, 1.1)
    shear: tuple[float, float] = (-5.0, 5.0)
    intensity_p: float = 0.5
    contrast: tuple[float, float] = (0.9, 1.1)
    shift: tuple[float, float] = (-10.0, 10.0)
    roi_scale: tuple[float, float] = (0.8, 1.25)
    roi_shift: float = 0.1
    negative_p: float = 0.0
    negative_distance: int = 3
    neighbour_prompt_p: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.negative_distance, int) or self.negative_distance < 1:
            raise InputError(
                f"AugmentConfig.negative_distance must be an integer >= 1, "
                f"got {self.negative_distance!r}"
            )
        for name in (
            "crop_p",
            "crop_positive",
            "affine_p",
            "intensity_p",
            "negative_p",
            "neighbour_prompt_p",
        ):
            p = getattr(self, name)
            if not isinstance(p, int | float) or not 0.0 <= p <= 1.0:
                raise InputError(f"AugmentConfig.{name} must be a probability in [0, 1], got {p!r}")
            object.__setattr__(self, name, float(p))
        ranges = {
            "crop_fraction": (1e-3, 1.0),
            "rotation": (None, None),
            "scale": (1e-3, None),
            "shear": (-80.0, 80.0),
            "contrast": (0.0, None),
            "shift": (-255.0, 255.0),
            "roi_scale": (0.1, 10.0),
        }
        if not isinstance(self.roi_shift, int | float) or not 0.0 <= self.roi_shift <= 0.5:
            raise InputError(
                f"AugmentConfig.roi_shift must lie in [0, 0.5], got {self.roi_shift!r}"
            )
        object.__setattr__(self, "roi_shift", float(self.roi_shift))
        for name, (low, high) in ranges.items():
            object.__setattr__(self, name, _pair(getattr(self, name), name, low=low, high=high))

    @classmethod
    def none(cls) -> AugmentConfig:
        """No augmentation: every probability 0 and every range neutral."""
        return cls(
            crop_p=0.0,
            crop_fraction=(1.0, 1.0),
            crop_positive=0.0,
            affine_p=0.0,
            rotation=(0.0, 0.0),
            scale=(1.0, 1.0),
            shear=(0.0, 0.0),
            intensity_p=0.0,
            contrast=(1.0, 1.0),
            shift=(0.0, 0.0),
            roi_scale=(1.0, 1.0),
            roi_shift=0.0,
            negative_p=0.0,
            neighbour_prompt_p=0.0,
        )

    @property
    def enabled(self) -> bool:
        """True if any step can happen."""
        return self.crop_p > 0 or self.affine_p > 0 or self.intensity_p > 0 or self.negative_p > 0

    def to_dict(self) -> dict:
        """Plain JSON-ready dict (to save next to a checkpoint); ``AugmentConfig(**d)`` reads it."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _choose_crop(
    centre_mask: np.ndarray, config: AugmentConfig, rng: np.random.Generator
) -> tuple[int, int, int]:
    """(side, row0, col0) of a square crop inside an (S, S) slice."""
    size = centre_mask.shape[-1]
    side = round(size * rng.uniform(*config.crop_fraction))
    positive = rng.random() < config.crop_positive
    rows, cols = np.nonzero(centre_mask)
    if positive and rows.size:
        r0, r1, c0, c1 = rows.min(), rows.max(), cols.min(), cols.max()
        side = min(size, max(side, r1 - r0 + 1, c1 - c0 + 1))
        row0 = rng.integers(max(0, r1 + 1 - side), min(r0, size - side) + 1)
        col0 = rng.integers(max(0, c1 + 1 - side), min(c0, size - side) + 1)
    else:
        side = max(side, 1)
        row0 = rng.integers(0, size - side + 1)
        col0 = rng.integers(0, size - side + 1)
    return int(side), int(row0), int(col0)


def _spatial_theta(
    centre_mask: np.ndarray, config: AugmentConfig, rng: np.random.Generator
) -> np.ndarray | None:
    """The (2, 3) ``affine_grid`` matrix (output -> input, normalised x, y), or None if identity.

    Crop first (on the original image), then the affine about the crop's centre:
    ``p_in = crop_scale * A @ p_out + crop_centre`` with ``A = R(angle) @ Shear / scale``.
    """
    size = centre_mask.shape[-1]
    linear, offset, changed = np.eye(2), np.zeros(2), False
    if config.crop_p > 0 and rng.random() < config.crop_p:
        side, row0, col0 = _choose_crop(centre_mask, config, rng)
        if side != size:
            # normalised coordinates (align_corners=False): pixel edge p lies at -1 + 2 p / S
            linear = linear * (side / size)
            offset = np.array([-1 + (2 * col0 + side) / size, -1 + (2 * row0 + side) / size])
            changed = True
    if config.affine_p > 0 and rng.random() < config.affine_p:
        angle = math.radians(rng.uniform(*config.rotation))
        zoom = rng.uniform(*config.scale)
        shear = math.tan(math.radians(rng.uniform(*config.shear)))
        cos, sin = math.cos(angle), math.sin(angle)
        rotate = np.array([[cos, -sin], [sin, cos]])  # +90: output (x, y) reads input (-y, x)
        a = rotate @ np.array([[1.0, shear], [0.0, 1.0]]) / zoom
        linear = linear @ a
        changed = changed or not np.allclose(a, np.eye(2), rtol=0, atol=1e-12)
    if not changed:
        return None
    return np.concatenate([linear, offset[:, None]], axis=1)


def augment_window(
    image: torch.Tensor,
    mask: torch.Tensor,
    config: AugmentConfig,
    rng: np.random.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment one window and its mask identically (see ``AugmentConfig``).

    Args:
        image: float32 (3, S, S), 0..255.
        mask: float32 (3, S, S), 0/1.
        config: which steps, how often, how strong.
        rng: the only source of randomness (draws in a fixed order: crop, affine, intensity).

    Returns:
        new (image, mask) tensors of the same shapes; image still in 0..255, mask still 0/1.
        The inputs are not modified.
    """
    if image.shape != mask.shape or image.ndim != 3 or image.shape[0] != 3:
        raise InputError(
            f"augment_window needs image and mask of shape (3, S, S), got "
            f"{tuple(image.shape)} and {tuple(mask.shape)}"
        )
    if image.shape[-1] != image.shape[-2]:
        raise InputError(f"augment_window needs square windows, got {tuple(image.shape)}")
    out_image, out_mask = image, mask
    centre = mask[1].numpy() > 0.5
    theta = _spatial_theta(centre, config, rng)
    if theta is not None:
        t = torch.as_tensor(theta, dtype=torch.float32)[None]
        grid = F.affine_grid(t, [1, *image.shape], align_corners=False)
        new_mask = F.grid_sample(
            mask[None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False
        )[0]
        if centre.any() and not bool((new_mask[1] > 0.5).any()):
            log.debug("spatial augmentation would empty the target; skipped for this sample")
        else:
            out_mask = new_mask
            out_image = F.grid_sample(
                image[None].float(),
                grid,
                mode="bilinear",
                padding_mode="zeros",
                align_corners=False,
            )[0].clamp_(0.0, 255.0)
    if config.intensity_p > 0 and rng.random() < config.intensity_p:
        contrast = float(rng.uniform(*config.contrast))
        shift = float(rng.uniform(*config.shift))
        mean = out_image.mean()
        out_image = ((out_image - mean) * contrast + mean + shift).clamp(0.0, 255.0)
    if out_image is image:
        out_image = image.clone()
    if out_mask is mask:
        out_mask = mask.clone()
    return out_image, out_mask


def _intensity_only(config: AugmentConfig) -> AugmentConfig:
    """The intensity step of ``config`` alone (for samples that skip spatial augmentation)."""
    return replace(
        AugmentConfig.none(),
        **{k: getattr(config, k) for k in ("intensity_p", "contrast", "shift")},
    )


# --------------------------------------------------------------------------------------------
# reading prepared folders


@dataclass(frozen=True)
class _Window:
    """One window record of ``meta/CASE.jsonl`` (paths relative to its dataset folder)."""

    dataset: int
    case: str
    image: str
    mask: str
    axis: int
    slice_index: int
    labels: tuple[int, ...]
    class_names: tuple[str, ...]
    indicator: tuple[float, float, float]
    source: str  # "meta/CASE.jsonl line N", for messages


def _read_settings(folder: Path) -> dict:
    settings_path = folder / "prepare.json"
    if not folder.is_dir():
        raise InputError(f"{folder}: no such prepared dataset folder")
    if not settings_path.is_file():
        raise InputError(
            f"{folder}: not a prepared dataset folder (no prepare.json); pass the "
            "OUT/<dataset> folder written by `slidesam prepare`"
        )
    try:
        settings = json.loads(settings_path.read_text())
        size = int(settings["config"]["size"])
        targets = [str(t["name"]) for t in settings["targets"]]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise InputError(f"{settings_path}: unreadable prepare settings ({exc})") from None
    return {"size": size, "targets": targets}


def _parse_record(line: str, where: str, dataset: int) -> _Window:
    try:
        r = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InputError(f"{where}: not a JSON record ({exc})") from None
    missing = [k for k in _REQUIRED_KEYS if k not in r]
    if missing:
        raise InputError(f"{where}: record without {', '.join(missing)}; re-run slidesam prepare")
    indicator = r.get("indicator", [1, 1, 1])
    try:
        indicator = tuple(float(v) for v in indicator)
    except (TypeError, ValueError):
        indicator = ()
    if len(indicator) != 3:
        raise InputError(f"{where}: indicator must be 3 numbers, got {r.get('indicator')!r}")
    labels, names = tuple(int(v) for v in r["labels"]), tuple(str(v) for v in r["class_names"])
    if len(labels) != len(names):
        raise InputError(f"{where}: {len(labels)} labels but {len(names)} class names")
    return _Window(
        dataset=dataset,
        case=str(r["case"]),
        image=str(r["image"]),
        mask=str(r["mask"]),
        axis=int(r["axis"]),
        slice_index=int(r["slice_index"]),
        labels=labels,
        class_names=names,
        indicator=indicator,  # type: ignore[arg-type]
        source=where,
    )


def _read_image(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB from a .jpg/.png (PIL) or .npz (key "image")."""
    try:
        if path.suffix == ".npz":
            with np.load(path) as z:
                return np.asarray(z["image"])
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise InputError(f"{path}: unreadable window image ({exc})") from None


def _read_mask(path: Path, position: int) -> tuple[np.ndarray, tuple[int, ...], np.ndarray]:
    """Mask ``position`` (3, S, S) uint8 of a prepared ``.npz``, the full shape, and ``labels``.

    Streams the ``masks`` member up to the wanted target instead of decompressing all K
    masks into memory (a window of a many-organ dataset at 1024 px holds tens of them).
    """
    try:
        with zipfile.ZipFile(path) as zf:
            with zf.open("labels.npy") as f:
                labels = np.lib.format.read_array(f)
            with zf.open("masks.npy") as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
                else:
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
                if len(shape) != 4 or not 0 <= position < shape[0]:
                    return np.zeros((0,), np.uint8), tuple(shape), labels
                if fortran or dtype.itemsize != 1:  # not what prepare writes: read it whole
                    f.seek(0)
                    whole = np.lib.format.read_array(f)
                    return np.asarray(whole[position], np.uint8), tuple(shape), labels
                per_mask = int(np.prod(shape[1:]))
                f.seek(position * per_mask, 1)
                data = f.read(per_mask)
        if len(data) != per_mask:
            raise ValueError("truncated masks array")
        mask = np.frombuffer(data, dtype=np.uint8).reshape(shape[1:])
        return mask, tuple(shape), labels
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise InputError(f"{path}: unreadable mask file ({exc})") from None


class WindowDataset(Dataset):
    """Samples of one or several folders written by ``slidesam prepare`` (see module docstring).

    Args:
        folders: one prepared dataset folder (``OUT/<dataset>``, holding ``prepare.json``) or
            a sequence of them; samples are concatenated in this order.
        classes: keep only targets with these class names (``dataset.json`` names); None = all.
        augment: augmentation of each sample; None = none.
        seed: base seed; sample ``index`` is augmented with
            ``np.random.default_rng((seed, epoch, index))``.
        size: output side S; None = the prepared size, which must then be the same in every
            folder. Another size resizes on reading (image bilinear, mask nearest).
        roi_context: 0 = whole windows (SAM, Slide-SAM); ``c > 0`` = for a zoomed model
            (``SamConfig.roi_context``), the square crop around the target's centre-slice box
            that the model sees at inference (``slidesam.data.roi``), jittered by the
            augmentation's ``roi_scale`` / ``roi_shift``, resized to S; before augmentation.

    Raises:
        InputError: a folder that is not a prepared dataset, an unknown class name, an
            unreadable record, or no sample at all. Missing or mis-shaped files are reported
            when the sample is read, naming the file.
    """

    def __init__(
        self,
        folders: str | Path | Sequence[str | Path],
        *,
        classes: Sequence[str] | None = None,
        augment: AugmentConfig | None = None,
        seed: int = 0,
        size: int | None = None,
        roi_context: float = 0.0,
    ) -> None:
        if not (roi_context == 0 or roi_context >= 1):
            raise InputError(f"roi_context must be 0 or >= 1, got {roi_context!r}")
        self.roi_context = float(roi_context)
        if isinstance(folders, str | Path):
            folders = [folders]
        self.folders: tuple[Path, ...] = tuple(Path(f) for f in folders)
        if not self.folders:
            raise InputError("WindowDataset needs at least one prepared dataset folder")
        if augment is not None and not isinstance(augment, AugmentConfig):
            raise InputError(f"augment must be an AugmentConfig or None, got {type(augment)}")
        if isinstance(classes, str):
            classes = [classes]
        settings = [_read_settings(f) for f in self.folders]
        known = {name for s in settings for name in s["targets"]}
        wanted = None if classes is None else set(map(str, classes))
        if wanted is not None:
            unknown = sorted(wanted - known)
            if unknown:
                raise InputError(
                    f"unknown class name(s) {', '.join(unknown)}; the datasets have "
                    + ", ".join(sorted(known))
                )
        sizes = {s["size"] for s in settings}
        if size is None and len(sizes) > 1:
            listing = ", ".join(
                f"{f.name}={s['size']}" for f, s in zip(self.folders, settings, strict=True)
            )
            raise InputError(
                f"prepared datasets have different sizes ({listing}); pass size=S to resize "
                "or prepare them at one size"
            )
        if size is not None and (not isinstance(size, int) or size < 16):
            raise InputError(f"size must be an integer >= 16, got {size!r}")
        self.size: int = size if size is not None else sizes.pop()
        self._prepared_sizes = tuple(s["size"] for s in settings)
        self.names: tuple[str, ...] = tuple(f.resolve().name for f in self.folders)
        self.augment = augment
        self.seed = int(seed)
        self.epoch = 0

        windows: list[_Window] = []
        window_ids: list[int] = []
        positions: list[int] = []
        dataset_sizes = []
        for d, folder in enumerate(self.folders):
            before = len(positions)
            meta = folder / "meta"
            metas = sorted(meta.glob("*.jsonl")) if meta.is_dir() else []
            unfinished = 0
            for jsonl in metas:
                case = jsonl.name[: -len(".jsonl")]
                if not (meta / f"{case}.done.json").is_file():
                    unfinished += 1
                    continue
                for n, line in enumerate(jsonl.read_text().splitlines(), start=1):
                    if not line.strip():
                        continue
                    w = _parse_record(line, f"{jsonl} line {n}", d)
                    kept = [j for j, c in enumerate(w.class_names) if wanted is None or c in wanted]
                    if not kept:
                        continue
                    windows.append(w)
                    window_ids.extend([len(windows) - 1] * len(kept))
                    positions.extend(kept)
            dataset_sizes.append(len(positions) - before)
            if unfinished:
                log.info("%s: %d unfinished case(s) skipped", folder, unfinished)
            log.info("%s: %d samples", folder, dataset_sizes[-1])
        if not positions:
            what = f" of class {', '.join(sorted(wanted))}" if wanted is not None else ""
            raise InputError(
                f"no samples{what} in {', '.join(map(str, self.folders))}: no finished case "
                "(meta/CASE.done.json) with a kept target; run or finish `slidesam prepare`"
            )
        self._windows = windows
        self._by_slice = {
            (w.dataset, w.case, w.axis, w.slice_index): i for i, w in enumerate(windows)
        }
        self._window_ids = np.asarray(window_ids, dtype=np.int64)
        self._positions = np.asarray(positions, dtype=np.int32)
        self.dataset_sizes: tuple[int, ...] = tuple(dataset_sizes)

    def __len__(self) -> int:
        return int(self._positions.size)

    def set_epoch(self, epoch: int) -> None:
        """Change the augmentation draws of every sample (call before each epoch).

        With a DataLoader, call it before creating the epoch's iterator and do not use
        ``persistent_workers`` (workers keep the copy of the dataset they started with).
        """
        self.epoch = int(epoch)

    def rng_for(self, index: int) -> np.random.Generator:
        """The generator that augments sample ``index`` in the current epoch."""
        return np.random.default_rng((self.seed, self.epoch, int(index)))

    def __getitem__(self, index: int) -> WindowSample:
        return self.get(index)

    def sample_cases(self) -> list[tuple[int, str]]:
        """(folder index, case) of every sample, in index order, without reading any file."""
        return [
            (self._windows[int(w)].dataset, self._windows[int(w)].case) for w in self._window_ids
        ]

    def sample_classes(self) -> list[str]:
        """Class name of every sample's target, in index order, without reading any file."""
        return [
            self._windows[int(w)].class_names[int(p)]
            for w, p in zip(self._window_ids, self._positions, strict=True)
        ]

    def get(self, index: int, *, rng: np.random.Generator | None = None) -> WindowSample:
        """Read sample ``index`` and augment it (if configured) with ``rng``.

        ``rng`` None uses ``rng_for(index)``; the result depends only on (seed, epoch, index).
        """
        index = operator.index(index)
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"sample index {index} out of range for {n} samples")
        index %= n
        w = self._windows[int(self._window_ids[index])]
        position = int(self._positions[index])
        image, mask = self._load(w, position)
        rng = rng if rng is not None else self.rng_for(index)
        aug = self.augment if self.augment is not None else AugmentConfig.none()
        indicator = torch.tensor(w.indicator, dtype=torch.float32)
        negative = self._negative(w, position, aug, rng)
        if negative is not None:
            prompt_mask = mask[1].clone()
            image = self._load_image(negative)
            mask = torch.zeros_like(mask)
            indicator = torch.ones(3)
            if self.roi_context > 0:  # the crop around the prompt (channel 1 gives the box)
                image, both = self._roi_crop(image, torch.stack([mask[1], prompt_mask]), rng)
                prompt_mask = both[1]
            if aug.intensity_p > 0:
                image, _ = augment_window(image, mask, _intensity_only(aug), rng)
        else:
            source = self._prompt_slice(mask, indicator, aug, rng)
            if self.roi_context > 0:
                image, mask = self._roi_crop(image, mask, rng, source)
            if aug.enabled:
                image, mask = augment_window(image, mask, aug, rng)
            if not mask[source].any():  # the spatial steps only keep the centre slice's target
                source = 1
            prompt_mask = mask[source].clone()
        return WindowSample(
            image=image,
            mask=mask,
            indicator=indicator,
            dataset=self.names[w.dataset],
            case=w.case if negative is None else negative.case,
            axis=w.axis,
            slice_index=w.slice_index if negative is None else negative.slice_index,
            label=w.labels[position],
            class_name=w.class_names[position],
            prompt_mask=prompt_mask,
        )

    def _negative(self, w: _Window, position: int, aug, rng) -> _Window | None:
        """A window near ``w`` whose three slices all lack its target (none of them keeps it:
        a window without records keeps no target at all), if this sample is a negative."""
        if aug.negative_p == 0 or rng.random() >= aug.negative_p:
            return None
        label = w.labels[position]

        def lacks(c: int) -> bool:
            j = self._by_slice.get((w.dataset, w.case, w.axis, c))
            return j is None or label not in self._windows[j].labels

        d = aug.negative_distance
        for offset in rng.permutation([*range(-d, 0), *range(1, d + 1)]):
            c = w.slice_index + int(offset)
            j = self._by_slice.get((w.dataset, w.case, w.axis, c))
            if j is not None and lacks(c) and lacks(c - 1) and lacks(c + 1):
                return self._windows[j]
        return None

    @staticmethod
    def _prompt_slice(mask: torch.Tensor, indicator: torch.Tensor, aug, rng) -> int:
        """Which slice of the window the prompt is simulated from: 1 (the centre), or an edge
        slice that keeps the target with probability ``aug.neighbour_prompt_p``."""
        if aug.neighbour_prompt_p == 0 or rng.random() >= aug.neighbour_prompt_p:
            return 1
        edges = [i for i in (0, 2) if indicator[i] > 0 and mask[i].any()]
        return int(rng.choice(edges)) if edges else 1

    def _roi_crop(
        self, image: torch.Tensor, mask: torch.Tensor, rng: np.random.Generator, source: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The zoomed model's view: the crop around the box of ``mask[source]`` (masks
        (C, S, S)); falls back to the whole image when that slice is empty."""
        rows, cols = np.nonzero(mask[source].numpy() > 0.5)
        if rows.size == 0:  # no centre-slice target (e.g. a label on the neighbours only)
            return image, mask
        box = (cols.min(), rows.min(), cols.max(), rows.max())
        roi = roi_for_box(box, tuple(mask.shape[-2:]), self.roi_context)
        aug = self.augment or AugmentConfig.none()
        side = roi.side * float(rng.uniform(*aug.roi_scale))
        shift = rng.uniform(-aug.roi_shift, aug.roi_shift, size=2) * side
        roi = Roi(cx=roi.cx + float(shift[0]), cy=roi.cy + float(shift[1]), side=side)
        return (
            crop(image, roi, self.size).clamp_(0.0, 255.0),
            crop(mask, roi, self.size, mode="nearest"),
        )

    def _path(self, w: _Window, name: str) -> Path:
        path = self.folders[w.dataset] / name
        if not path.is_file():
            raise InputError(
                f"{path}: missing file, listed in {w.source}; re-run slidesam prepare "
                "for this case (delete its meta/CASE.done.json first)"
            )
        return path

    def _load_image(self, w: _Window) -> torch.Tensor:
        """float32 image (3, S, S) 0..255 of a window."""
        return self._read_rgb(w)[1]

    def _read_rgb(self, w: _Window) -> tuple[np.ndarray, torch.Tensor]:
        prepared = self._prepared_sizes[w.dataset]
        image_path = self._path(w, w.image)
        rgb = _read_image(image_path)
        if rgb.shape != (prepared, prepared, 3) or rgb.dtype != np.uint8:
            raise InputError(
                f"{image_path}: expected a ({prepared}, {prepared}, 3) uint8 image as "
                f"prepare.json says, got {rgb.shape} {rgb.dtype}"
            )
        image_t = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1), np.float32))
        if self.size != prepared:
            image_t = F.interpolate(
                image_t[None], size=(self.size, self.size), mode="bilinear", antialias=True
            )[0].clamp_(0.0, 255.0)
        return rgb, image_t

    def _load(self, w: _Window, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 image (3, S, S) 0..255 and mask (3, S, S) 0/1 of one target of a window."""
        rgb, image_t = self._read_rgb(w)
        image_path, mask_path = self.folders[w.dataset] / w.image, self._path(w, w.mask)
        mask, shape, labels = _read_mask(mask_path, position)
        if len(shape) != 4 or tuple(shape[1:]) != (3, *rgb.shape[:2]):
            raise InputError(
                f"{mask_path}: masks of shape {shape} disagree with the image "
                f"{image_path.name} {rgb.shape[:2]}; expected (K, 3, {rgb.shape[0]}, "
                f"{rgb.shape[1]})"
            )
        if shape[0] != len(w.labels) or [int(v) for v in np.ravel(labels)] != list(w.labels):
            raise InputError(
                f"{mask_path}: {shape[0]} masks with labels {np.ravel(labels).tolist()} "
                f"disagree with {w.source} (labels {list(w.labels)})"
            )
        mask_t = torch.from_numpy((mask > 0).astype(np.float32))
        if self.size != self._prepared_sizes[w.dataset]:
            mask_t = F.interpolate(mask_t[None], size=(self.size, self.size), mode="nearest-exact")[
                0
            ]
        return image_t, mask_t


# --------------------------------------------------------------------------------------------
# mixing datasets


def _check_mix(sizes: Sequence[int], weights: Sequence[float], num_samples: int):
    sizes = [operator.index(s) for s in sizes]
    try:
        w = [float(v) for v in weights]
    except (TypeError, ValueError):
        raise InputError(f"weights must be numbers, got {weights!r}") from None
    if not sizes:
        raise InputError("need at least one dataset size to mix")
    if len(w) != len(sizes):
        raise InputError(f"need one weight per dataset: {len(sizes)} datasets, {len(w)} weights")
    if any(not math.isfinite(v) or v <= 0 for v in w):
        raise InputError(f"weights must be positive finite numbers, got {list(weights)}")
    empty = [i for i, s in enumerate(sizes) if s <= 0]
    if empty:
        raise InputError(f"dataset(s) {empty} have no samples but a positive weight")
    if operator.index(num_samples) < 1:
        raise InputError(f"num_samples must be at least 1, got {num_samples}")
    return sizes, w


def mixed_indices(
    sizes: Sequence[int],
    weights: Sequence[float],
    num_samples: int,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw sample indices over concatenated datasets, mixed by weight.

    Each draw picks dataset ``d`` with probability ``weights[d] / sum(weights)``, then one of its
    ``sizes[d]`` samples uniformly (with replacement). Indices are global: dataset ``d`` owns
    ``sum(sizes[:d]) .. sum(sizes[:d + 1]) - 1``, as in ``WindowDataset.dataset_sizes``.

    Returns:
        (num_samples,) int64 tensor.
    """
    sizes, w = _check_mix(sizes, weights, num_samples)
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    which = torch.multinomial(
        torch.tensor(w, dtype=torch.float64), num_samples, replacement=True, generator=generator
    )
    size_t = torch.tensor(sizes, dtype=torch.int64)
    offsets = torch.cumsum(size_t, 0) - size_t
    u = torch.rand(num_samples, generator=generator, dtype=torch.float64)
    local = torch.minimum((u * size_t[which]).long(), size_t[which] - 1)
    return offsets[which] + local


class WeightedMixSampler(Sampler[int]):
    """Sampler over ``WindowDataset`` indices mixing its datasets by weight (see ``mixed_indices``).

    Every iteration draws ``num_samples`` new indices from ``generator`` (default: a generator
    seeded 0), so epochs differ and a run with the same seed repeats exactly.

    Example::

        ds = WindowDataset([a, b])
        sampler = WeightedMixSampler(sizes=ds.dataset_sizes, weights=[3, 1], num_samples=4000,
                                     generator=torch.Generator().manual_seed(1))
        loader = DataLoader(ds, batch_size=8, sampler=sampler)
    """

    def __init__(
        self,
        *,
        sizes: Sequence[int],
        weights: Sequence[float],
        num_samples: int,
        generator: torch.Generator | None = None,
    ) -> None:
        self.sizes, self.weights = _check_mix(sizes, weights, num_samples)
        self.num_samples = int(num_samples)
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)

    def __iter__(self) -> Iterator[int]:
        yield from mixed_indices(
            self.sizes, self.weights, self.num_samples, generator=self.generator
        ).tolist()

    def __len__(self) -> int:
        return self.num_samples
