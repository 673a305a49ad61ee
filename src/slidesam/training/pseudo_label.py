"""SAM pseudo-labels for unlabelled or partially labelled volumes (Slide-SAM, Appendix B).

The output is a prepared-windows folder in exactly the layout of ``slidesam prepare`` (see
``slidesam.data.prepare``), so ``slidesam.training.windows.WindowDataset(OUT)`` trains on it
unchanged; the record's ``indicator`` says which mask slices carry labels.

For each volume:

1. **Body and statistics.** The body is every voxel above ``body_threshold`` (CT default -500
   HU: air outside the patient and in the lungs is out; MRI default: Otsu's threshold of the
   volume). ``mu`` and ``sigma`` are the mean and standard deviation of the body's intensities
   (on at most ~2 million voxels, an even subsample).
2. **Intensity windows.** One window ``(mu - k sigma, mu + k sigma)`` per ``k`` in ``sigmas``
   (default 3, 2, 1, 0.5: from wide soft-tissue-and-bone to narrow soft-tissue contrast), and one
   predictor per window (the predictor maps its window to 0..255 for the model).
3. **Slices.** Window centres ``1, 1 + stride, 1 + 2 stride, ...`` up to ``n - 2`` along each
   slicing axis (the same axes as ``prepare``), kept when at least ``body_min_fraction`` of the
   centre slice is body.
4. **Prompts** on the centre slice, per intensity window, batched ``prompt_batch`` at a time:

   - ``prompt_from_superpixel``: SLIC superpixels (``n_segments``, ``compactness``, Gaussian
     pre-smoothing ``slic_sigma``) of the centre slice mapped by that intensity window to
     [0, 1], inside the body. Superpixels with mean (windowed) intensity below
     ``dark_threshold`` are background and give no prompt. Each other superpixel gives one
     prompt: a foreground point at its pixel nearest its centroid (``point``), its bounding box
     (``box``), or both in one prompt (``point+box``);
   - ``sam_auto``: one foreground point per node of a regular ``points_per_side`` squared grid
     (SAM's automatic mask generator: cell centres), nodes outside the body skipped.

   ``prompts`` chooses ``superpixel``, ``grid`` or ``both``.
5. **Filters**, per candidate mask (all K candidates of a multimask prompt), judged on the centre
   slice, in this order; a candidate is counted under the first filter that rejects it:
   ``pred_iou`` (predicted IoU < ``pred_iou_thresh``), ``stability`` (stability score <
   ``stability_thresh``), ``area_small`` (area not above ``min_area_fraction`` of the slice,
   ``prepare``'s exact rule), ``area_large`` (area > ``max_area_fraction`` of the slice).
6. **De-duplication.** Greedy mask NMS on the centre slices: a mask whose IoU with a kept mask of
   higher predicted IoU exceeds ``nms_thresh`` is dropped (``nms``), across prompts and across
   intensity windows. As SAM's generator does per crop, it runs after each batch of prompts on the
   survivors so far plus the new batch (bounded memory); it equals one global greedy pass except
   that a mask dropped in an earlier round cannot return when its suppressor is dropped later.
   Ground-truth masks of the slice win over every pseudo-label: a pseudo-label whose IoU with a
   ground-truth mask exceeds ``nms_thresh`` is dropped (``gt_overlap``).

Ground truth (optional label maps on the image's grid; partial labels allowed): every window
centre ``1..n-2`` whose centre slice holds a target above ``min_area_fraction`` gets a ground
truth record, as ``prepare`` writes it. A slice counts as *annotated* if its label map slice
holds any non-zero voxel (or always, with ``labels_complete``); the ground truth record's
indicator is 1 on the annotated slices of its window, so ``[1, 1, 1]`` for full 3D labels.
Targets come from a ``dataset.json`` in the labels folder or its parent (as ``prepare``), else
one target ``label_V`` per label value found in the label maps (or given in ``label_names``).

Defaults for our use: ``pred_iou_thresh`` 0.88 (SAM's automatic generator); ``stability_thresh``
0.92 rather than SAM's 0.95, because the stability score (IoU of the masks at logit +1 and -1)
loses about ``2 w / r`` for a boundary band ``w`` px wide on an object of radius ``r`` px, and
small organs on a CT slice (r ~ 25 px) would all fail 0.95 with a one-pixel band;
``max_area_fraction`` 0.3 (larger masks are the body or its background, not an organ); SLIC
``compactness`` 0.3 with ``slic_sigma`` 0.5 px smoothing: of the values 0.03..0.3 and 0..1 px
tried on synthetic slices (organs on a body, Gaussian noise 3-8 % of the window), the pair whose
superpixels crossed organ boundaries least at every noise level.

Output (``OUT`` is the prepared folder itself)::

    prepare.json                   settings; "targets" = ground-truth targets, then the two
                                   pseudo-label sources as targets (class names)
    images/CASE/z_0012.jpg         the window as ``prepare`` writes it (its window and scaling)
    masks/CASE/z_0012.npz          ground truth "masks" (K, 3, size, size), "labels" (K,)
    masks/CASE/z_0012_pseudo.npz   pseudo-labels "masks" (K, 3, size, size) (centre slice only
                                   unless ``three_slice_masks``), "labels" (K,)
    meta/CASE.jsonl                one record per (window, kind): ground truth first, then pseudo
    meta/CASE.done.json            per-case counts, written last (resumable)
    summary.json                   totals, with counts kept / rejected per filter

Records have ``prepare``'s fields plus ``kind`` (``gt`` or ``pseudo``), ``sources`` (one per
mask: ``gt``, ``sam_auto`` or ``prompt_from_superpixel``) and ``mask_meta`` (one dict per mask:
its source and, for pseudo-labels, intensity window, ``k``, predicted IoU, stability, area,
candidate index and prompt). A pseudo-label record has indicator ``[0, 1, 0]`` and its class
name is its source, so ``WindowDataset(OUT, classes=["prompt_from_superpixel"])`` selects one
source.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
from tqdm import tqdm

from slidesam.core import InputError, Volume
from slidesam.data.io import IMAGE_SUFFIXES, image_suffix, read_image, read_label, strip_suffix
from slidesam.data.prepare import (
    IMAGE_FORMATS,
    Target,
    atomic_write,
    read_targets,
    save_image,
)
from slidesam.data.preprocess import (
    AXIS_NAMES,
    CT_WINDOW,
    MIN_AREA_FRACTION,
    MRI_WINDOW,
    SCALINGS,
    choose_slicing_axes,
    mask_is_kept,
    resize_image,
    resize_masks,
    scale_window,
    slice_window,
    to_uint8,
    window_centres,
)

__all__ = [
    "CT_BODY_THRESHOLD",
    "FILTERS",
    "PROMPT_MODES",
    "PSEUDO_SOURCES",
    "SUPERPIXEL_PROMPTS",
    "Candidate",
    "PseudoLabelConfig",
    "VolumeCase",
    "body_threshold",
    "find_volume_cases",
    "grid_points",
    "intensity_windows",
    "mask_iou",
    "mask_nms",
    "pseudo_label_case",
    "pseudo_label_dataset",
    "rejection_reason",
    "sam_predictor_factory",
    "superpixel_prompts",
]

log = logging.getLogger(__name__)

#: CT voxels above this (HU) are "body": excludes the air around the patient and in the lungs
CT_BODY_THRESHOLD = -500.0
#: mask sources of the pseudo-labels, also their class names (targets) in the output
PSEUDO_SOURCES = ("sam_auto", "prompt_from_superpixel")
#: reasons a candidate is rejected, in the order the filters run
FILTERS = ("pred_iou", "stability", "area_small", "area_large", "nms", "gt_overlap")
PROMPT_MODES = ("superpixel", "grid", "both")
SUPERPIXEL_PROMPTS = ("point", "box", "point+box")
_STATS_SAMPLE = 2_000_000  # voxels used for mu and sigma at most


@dataclass(frozen=True)
class PseudoLabelConfig:
    """Settings of one pseudo-labelling run (saved in ``prepare.json``; see module docstring).

    Attributes:
        size: side of the written windows in pixels (as ``prepare --size``).
        axes: slicing axes, as ``prepare``: ``auto`` (fewest voxels), ``all``, ``z``/``y``/``x``.
        modality: ``CT`` or ``MRI``: default storage window and body threshold.
        window: intensity window (low, high) of the *written* images, as ``prepare`` (None: CT
            [-200, 400], MRI [0, 600]); the model's windows come from ``sigmas``.
        scaling: ``fixed`` or ``window-minmax`` for the written images, as ``prepare``.
        image_format: ``jpg``, ``png`` or ``npz``.
        stride: pseudo-label every ``stride``-th window centre (1, 1 + stride, ...).
        prompts: ``superpixel``, ``grid`` (SAM's automatic point grid) or ``both``.
        superpixel_prompt: ``point``, ``box`` or ``point+box`` per superpixel.
        n_segments, compactness, slic_sigma: ``skimage.segmentation.slic`` settings (on the
            windowed slice in [0, 1]).
        dark_threshold: superpixels whose mean windowed intensity (0..1) is below are skipped.
        points_per_side: grid prompts: ``points_per_side ** 2`` points per slice.
        sigmas: the ``k`` of the intensity windows ``mu +- k sigma``.
        body_threshold: body = voxels above this; None = -500 (CT) or Otsu (MRI).
        body_min_fraction: a slice is pseudo-labelled if at least this fraction is body.
        multimask: ask the model for its 3 candidates per prompt (all are filtered) or 1.
        prompt_batch: prompts per model call.
        pred_iou_thresh, stability_thresh: minimum predicted IoU and stability score.
        min_area_fraction: a mask must cover more than this fraction of the slice (exact, as
            ``prepare``); also applies to ground truth.
        max_area_fraction: a pseudo-label may cover at most this fraction of the slice.
        nms_thresh: IoU above which the lower-scored of two masks is dropped.
        three_slice_masks: write the model's three slices of each pseudo-label instead of the
            centre slice alone; the indicator stays ``[0, 1, 0]`` (only the centre is trusted).
        label_names: ground truth targets to keep (names from a ``dataset.json`` or values);
            empty = all.
        labels_complete: label maps annotate every slice (3D labels): ground-truth indicator
            ``[1, 1, 1]`` even where a neighbour slice holds no label.
    """

    size: int = 256
    axes: str = "auto"
    modality: str = "CT"
    window: tuple[float, float] | None = None
    scaling: str = "fixed"
    image_format: str = "jpg"
    stride: int = 4
    prompts: str = "superpixel"
    superpixel_prompt: str = "point"
    n_segments: int = 100
    compactness: float = 0.3
    slic_sigma: float = 0.5
    dark_threshold: float = 0.1
    points_per_side: int = 16
    sigmas: tuple[float, ...] = (3.0, 2.0, 1.0, 0.5)
    body_threshold: float | None = None
    body_min_fraction: float = 0.05
    multimask: bool = True
    prompt_batch: int = 32
    pred_iou_thresh: float = 0.88
    stability_thresh: float = 0.92
    min_area_fraction: float = MIN_AREA_FRACTION
    max_area_fraction: float = 0.3
    nms_thresh: float = 0.7
    three_slice_masks: bool = False
    label_names: tuple[str, ...] = field(default_factory=tuple)
    labels_complete: bool = False

    def __post_init__(self) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise InputError(what)

        need(isinstance(self.size, int) and self.size >= 16, f"size must be >= 16, got {self.size}")
        choose_slicing_axes((1, 1, 1), self.axes)  # validates the mode
        need(self.modality.upper() in ("CT", "MRI"), f"modality must be CT or MRI: {self.modality}")
        object.__setattr__(self, "modality", self.modality.upper())
        window = self.window or (CT_WINDOW if self.modality == "CT" else MRI_WINDOW)
        window = tuple(float(v) for v in window)
        need(len(window) == 2 and window[1] > window[0], f"window must be LOW < HIGH: {window}")
        object.__setattr__(self, "window", window)
        need(self.scaling in SCALINGS, f"scaling must be one of {', '.join(SCALINGS)}")
        need(self.image_format in IMAGE_FORMATS, f"image format must be one of {IMAGE_FORMATS}")
        need(isinstance(self.stride, int) and self.stride >= 1, "stride must be an integer >= 1")
        need(self.prompts in PROMPT_MODES, f"prompts must be one of {', '.join(PROMPT_MODES)}")
        need(
            self.superpixel_prompt in SUPERPIXEL_PROMPTS,
            f"superpixel_prompt must be one of {', '.join(SUPERPIXEL_PROMPTS)}",
        )
        need(self.n_segments >= 1, "n_segments must be at least 1")
        need(self.compactness > 0, "compactness must be > 0")
        need(self.slic_sigma >= 0, "slic_sigma must be >= 0")
        need(0 <= self.dark_threshold <= 1, "dark_threshold must lie in [0, 1] (windowed units)")
        need(self.points_per_side >= 1, "points_per_side must be at least 1")
        sigmas = tuple(float(k) for k in self.sigmas)
        need(bool(sigmas) and all(k > 0 for k in sigmas), f"sigmas must be > 0, got {sigmas}")
        object.__setattr__(self, "sigmas", sigmas)
        need(0 <= self.body_min_fraction <= 1, "body_min_fraction must lie in [0, 1]")
        need(self.prompt_batch >= 1, "prompt_batch must be at least 1")
        for name in ("pred_iou_thresh", "stability_thresh", "nms_thresh"):
            need(0 <= getattr(self, name) <= 1, f"{name} must lie in [0, 1]")
        need(0 <= self.min_area_fraction < 1, "min_area_fraction must lie in [0, 1)")
        need(
            self.min_area_fraction < self.max_area_fraction <= 1,
            "max_area_fraction must lie in (min_area_fraction, 1]",
        )
        object.__setattr__(self, "label_names", tuple(str(v) for v in self.label_names))


@dataclass(frozen=True)
class VolumeCase:
    """One volume to pseudo-label, with its label map if it has one (partial labels allowed)."""

    case_id: str
    image: Path
    label: Path | None = None


@dataclass
class Candidate:
    """A pseudo-label candidate that passed the filters.

    Attributes:
        mask: (H, W) bool, the centre slice.
        score: predicted IoU (NMS order).
        source: ``sam_auto`` or ``prompt_from_superpixel``.
        meta: JSON-ready metadata (window, k, pred_iou, stability, area, candidate, prompt).
        slices: (3, H, W) bool, all slices of the window (only with ``three_slice_masks``).
    """

    mask: np.ndarray
    score: float
    source: str
    meta: dict
    slices: np.ndarray | None = None


class WindowPredictor(Protocol):
    """What the pseudo-labeller needs of a predictor (``SlideSAMPredictor`` or a test stub)."""

    def set_volume(self, volume: Volume, *, axis: int) -> None: ...

    def predict(
        self, window_center: int, *, boxes=None, points=None, point_labels=None, multimask=True
    ): ...


PredictorFactory = Callable[[tuple[float, float]], WindowPredictor]


# --------------------------------------------------------------------------------------------
# building blocks


def body_threshold(array: np.ndarray, config: PseudoLabelConfig) -> float:
    """The body threshold of a volume: ``config.body_threshold``, or -500 HU (CT), or Otsu's
    threshold of the intensities (MRI)."""
    if config.body_threshold is not None:
        return float(config.body_threshold)
    if config.modality == "CT":
        return CT_BODY_THRESHOLD
    from skimage.filters import threshold_otsu

    return float(threshold_otsu(_subsample(array)))


def _subsample(values: np.ndarray) -> np.ndarray:
    flat = values.reshape(-1)
    return flat[:: max(1, flat.size // _STATS_SAMPLE)]


def intensity_windows(
    array: np.ndarray, body: np.ndarray, sigmas: Sequence[float]
) -> list[tuple[float, float]]:
    """``(mu - k sigma, mu + k sigma)`` for each ``k``, mu/sigma over the voxels where ``body``.

    Args:
        array: (Z, Y, X) intensities; body: bool of the same shape.
    """
    values = _subsample(array)[_subsample(body)].astype(np.float64)
    if values.size == 0:
        raise InputError("no voxel inside the body (above the body threshold); check --modality")
    mu, sigma = float(values.mean()), float(values.std())
    if not sigma > 0:
        raise InputError(f"the body has one intensity ({mu:g}) only; nothing to segment")
    return [(mu - k * sigma, mu + k * sigma) for k in sigmas]


def superpixel_prompts(
    image: np.ndarray,
    *,
    n_segments: int = 100,
    compactness: float = 0.3,
    sigma: float = 0.5,
    dark_threshold: float = 0.1,
    mask: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Point and box prompts from the SLIC superpixels of one slice.

    Args:
        image: (H, W) float slice, windowed to [0, 1].
        mask: (H, W) bool region to segment (e.g. the body); None = everywhere.

    Returns:
        points (N, 2) XY: per kept superpixel, its pixel nearest its centroid (ties: first in
        row-major order), so the point lies inside it; boxes (N, 4) XYXY inclusive pixel
        bounds. Superpixels whose mean ``image`` is below ``dark_threshold`` are skipped.
        Both float32, in the order of the superpixel labels.
    """
    from skimage.segmentation import slic

    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 2:
        raise InputError(f"superpixel_prompts needs one (H, W) slice, got {image.shape}")
    if mask is not None and not mask.any():
        return np.zeros((0, 2), np.float32), np.zeros((0, 4), np.float32)
    labels = slic(
        image,
        n_segments=n_segments,
        compactness=compactness,
        sigma=sigma,
        channel_axis=None,
        start_label=1,
        mask=mask,
    )
    points, boxes = [], []
    for lab in range(1, int(labels.max()) + 1):
        rows, cols = np.nonzero(labels == lab)
        if rows.size == 0 or float(image[rows, cols].mean()) < dark_threshold:
            continue
        cy, cx = rows.mean(), cols.mean()
        i = int(np.argmin((rows - cy) ** 2 + (cols - cx) ** 2))
        points.append((cols[i], rows[i]))
        boxes.append((cols.min(), rows.min(), cols.max(), rows.max()))
    return (
        np.asarray(points, np.float32).reshape(-1, 2),
        np.asarray(boxes, np.float32).reshape(-1, 4),
    )


def grid_points(
    shape: tuple[int, int], points_per_side: int, mask: np.ndarray | None = None
) -> np.ndarray:
    """SAM's automatic-generator grid: ``points_per_side`` squared cell centres of an (H, W)
    slice, as (N, 2) XY float32 pixel coordinates; points on pixels outside ``mask`` dropped."""
    h, w = shape
    frac = (np.arange(points_per_side) + 0.5) / points_per_side
    xs, ys = np.meshgrid(frac * w - 0.5, frac * h - 0.5)
    pts = np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.float32)
    if mask is not None:
        cols = np.clip(np.rint(pts[:, 0]).astype(int), 0, w - 1)
        rows = np.clip(np.rint(pts[:, 1]).astype(int), 0, h - 1)
        pts = pts[mask[rows, cols]]
    return pts


def rejection_reason(
    pred_iou: float, stability: float, mask: np.ndarray, config: PseudoLabelConfig
) -> str | None:
    """The first filter that rejects a candidate (see ``FILTERS``), or None if it is kept.

    Args:
        pred_iou: the model's predicted IoU; stability: the centre slice's stability score.
        mask: (H, W) bool centre slice of the candidate.
    """
    if pred_iou < config.pred_iou_thresh:
        return "pred_iou"
    if stability < config.stability_thresh:
        return "stability"
    if not mask_is_kept(mask, config.min_area_fraction):
        return "area_small"
    if np.count_nonzero(mask) > config.max_area_fraction * mask.size:
        return "area_large"
    return None


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two bool masks of one shape; 0 when both are empty."""
    union = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / union if union else 0.0


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    rows, cols = np.any(mask, axis=1), np.any(mask, axis=0)
    if not rows.any():
        return None
    r = np.flatnonzero(rows)
    c = np.flatnonzero(cols)
    return int(r[0]), int(r[-1]), int(c[0]), int(c[-1])


def _boxes_overlap(a, b) -> bool:
    return (
        a is not None
        and b is not None
        and a[0] <= b[1]
        and b[0] <= a[1]
        and a[2] <= b[3]
        and (b[2] <= a[3])
    )


def mask_nms(masks: Sequence[np.ndarray], scores: Sequence[float], iou_thresh: float) -> list[int]:
    """Greedy mask non-maximum suppression.

    Masks are visited by decreasing score (ties: lower index first); one is kept unless its IoU
    with an already kept mask *exceeds* ``iou_thresh``.

    Args:
        masks: N (H, W) bool masks; scores: N numbers (higher wins).

    Returns:
        indices of the kept masks, highest score first.
    """
    if len(masks) != len(scores):
        raise InputError(f"mask_nms: {len(masks)} masks but {len(scores)} scores")
    order = sorted(range(len(masks)), key=lambda i: (-float(scores[i]), i))
    boxes = [_bbox(m) for m in masks]
    kept: list[int] = []
    for i in order:
        if all(
            not _boxes_overlap(boxes[i], boxes[j]) or mask_iou(masks[i], masks[j]) <= iou_thresh
            for j in kept
        ):
            kept.append(i)
    return kept


def sam_predictor_factory(model, *, device: str = "cpu", **options) -> PredictorFactory:
    """Predictors of ``model`` (a ``Sam``), one per intensity window: ``factory((low, high))``.

    ``options`` go to ``SlideSAMPredictor`` (e.g. ``batch_size``, ``roi_context``).
    """
    from slidesam.inference.predictor import SlideSAMPredictor

    options.setdefault("cache_size", 4)

    def make(window: tuple[float, float]) -> WindowPredictor:
        return SlideSAMPredictor(model, device=device, window=window, scaling="fixed", **options)

    return make


# --------------------------------------------------------------------------------------------
# inputs


def _case_id(path: Path) -> str:
    stem = strip_suffix(path) if image_suffix(path) else path.name
    return stem[: -len("_0000")] if stem.endswith("_0000") else stem


def _is_other_channel(path: Path) -> bool:
    stem = strip_suffix(path)
    tail = stem[-5:]
    return len(stem) > 5 and tail[0] == "_" and tail[1:].isdigit() and tail != "_0000"


def find_volume_cases(images: str | Path, labels: str | Path | None = None) -> list[VolumeCase]:
    """The volumes under ``images`` paired with their label maps.

    Args:
        images: one image file, one DICOM series folder, or a folder of image files (NIfTI,
            NRRD, MHA; not recursive). ``CASE_0000.nii.gz`` (nnU-Net channel 0) is case
            ``CASE``; other channels (``_0001`` ...) are skipped.
        labels: None; a label file (for one image); or a folder of label maps named ``CASE.*``
            (or like the image). In a folder, images without a label are unlabelled cases.
    """
    images = Path(images)
    if not images.exists():
        raise InputError(f"{images}: no such image file or folder")
    labels = None if labels is None else Path(labels)
    if labels is not None and not labels.exists():
        raise InputError(f"{labels}: no such label file or folder")
    files = sorted(p for p in images.iterdir() if p.is_file()) if images.is_dir() else [images]
    volumes = [p for p in files if image_suffix(p)]
    if images.is_dir() and not volumes:
        volumes = [images]  # a DICOM series folder is one volume
    volumes = [p for p in volumes if not (p.is_file() and _is_other_channel(p))]
    if not volumes:
        raise InputError(f"{images}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    ids = [_case_id(p) for p in volumes]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise InputError(f"{images}: several images for case(s) {', '.join(duplicates)}")
    if labels is None:
        return [VolumeCase(i, p) for i, p in zip(ids, volumes, strict=True)]
    if labels.is_file():
        if len(volumes) != 1:
            raise InputError(
                f"{labels}: one label file for {len(volumes)} images; pass a folder of label "
                "maps named like the images"
            )
        return [VolumeCase(ids[0], volumes[0], labels)]
    by_name = {strip_suffix(p): p for p in labels.iterdir() if p.is_file() and image_suffix(p)}
    cases = []
    for case_id, path in zip(ids, volumes, strict=True):
        label = by_name.get(case_id) or by_name.get(strip_suffix(path))
        cases.append(VolumeCase(case_id, path, label))
    if len(volumes) == 1 and cases[0].label is None:
        raise InputError(f"{labels}: no label map named {ids[0]}.* for {volumes[0]}")
    unlabelled = [c.case_id for c in cases if c.label is None]
    if unlabelled:
        log.info("%d case(s) without a label map: pseudo-labels only", len(unlabelled))
    return cases


def _gt_targets(cases: list[VolumeCase], labels: Path | None, only: tuple[str, ...]):
    """Ground-truth targets: from a ``dataset.json`` next to the labels, else one per label
    value (``label_V``), the values given in ``only`` or found in the label maps."""
    labelled = [c for c in cases if c.label is not None]
    if not labelled:
        if only:
            raise InputError("label names given, but no label maps (pass --labels)")
        return []
    folder = labels if labels.is_dir() else labels.parent
    for d in (folder, folder.parent):
        if (d / "dataset.json").is_file():
            return read_targets(d, only)
    if only:
        bad = [o for o in only if not o.isdigit()]
        if bad:
            raise InputError(
                f"label name(s) {', '.join(bad)} need a dataset.json next to the labels; "
                "give label values instead"
            )
        values = sorted({int(o) for o in only})
    else:
        found: set[int] = set()
        for c in labelled:
            found.update(int(v) for v in np.unique(read_label(c.label).array))
        values = sorted(found - {0})
    return [Target(name=f"label_{v}", values=(v,)) for v in values]


# --------------------------------------------------------------------------------------------
# one case


def _slice_annotated(labels: np.ndarray | None, axis: int, complete: bool) -> np.ndarray:
    n = labels.shape[axis] if labels is not None else 0
    if labels is None:
        return np.zeros(0, bool)
    if complete:
        return np.ones(n, bool)
    return np.moveaxis(labels, axis, 0).reshape(n, -1).any(axis=1)


def _prompt_sets(
    config: PseudoLabelConfig, slice01: np.ndarray, body: np.ndarray
) -> list[tuple[str, dict, list[dict]]]:
    """(source, predict kwargs + ``meta`` list) per prompt family for one windowed slice."""
    out = []
    if config.prompts in ("superpixel", "both"):
        points, boxes = superpixel_prompts(
            slice01,
            n_segments=config.n_segments,
            compactness=config.compactness,
            sigma=config.slic_sigma,
            dark_threshold=config.dark_threshold,
            mask=body,
        )
        kinds = config.superpixel_prompt.split("+")
        kwargs: dict = {}
        meta = [{} for _ in range(len(points))]
        if "point" in kinds:
            kwargs["points"] = points[:, None, :]
            kwargs["point_labels"] = np.ones((len(points), 1), np.int64)
            for m, p in zip(meta, points, strict=True):
                m["point"] = [int(p[0]), int(p[1])]
        if "box" in kinds:
            kwargs["boxes"] = boxes
            for m, b in zip(meta, boxes, strict=True):
                m["box"] = [int(v) for v in b]
        out.append(("prompt_from_superpixel", kwargs, meta))
    if config.prompts in ("grid", "both"):
        pts = grid_points(slice01.shape, config.points_per_side, body)
        kwargs = {
            "points": pts[:, None, :],
            "point_labels": np.ones((len(pts), 1), np.int64),
        }
        meta = [{"point": [round(float(p[0]), 2), round(float(p[1]), 2)]} for p in pts]
        out.append(("sam_auto", kwargs, meta))
    return out


def _candidates_for_slice(
    predictors: list[WindowPredictor],
    windows: list[tuple[float, float]],
    stack: np.ndarray,
    body_slice: np.ndarray,
    centre: int,
    gt_masks: list[np.ndarray],
    config: PseudoLabelConfig,
    counts: dict,
) -> list[Candidate]:
    """Filtered, de-duplicated pseudo-label candidates of one window centre."""
    pool: list[Candidate] = []
    for predictor, window, k in zip(predictors, windows, config.sigmas, strict=True):
        slice01 = to_uint8(stack[centre], window).astype(np.float32) / 255.0
        for source, kwargs, metas in _prompt_sets(config, slice01, body_slice):
            n = len(metas)
            counts["prompts"][source] += n
            for start in range(0, n, config.prompt_batch):
                part = {key: v[start : start + config.prompt_batch] for key, v in kwargs.items()}
                pred = predictor.predict(centre, multimask=config.multimask, **part)
                sc = pred.masks.shape[2] // 2  # the centre slice (0 for a one-slice model)
                new: list[Candidate] = []
                for i in range(pred.masks.shape[0]):
                    for j in range(pred.masks.shape[1]):
                        counts["candidates"] += 1
                        mask = pred.masks[i, j, sc]
                        iou, stab = float(pred.iou[i, j]), float(pred.stability[i, j, sc])
                        reason = rejection_reason(iou, stab, mask, config)
                        if reason is not None:
                            counts["rejected"][reason] += 1
                            continue
                        meta = {
                            "source": source,
                            "intensity_window": [round(window[0], 2), round(window[1], 2)],
                            "window_sigma": k,
                            "pred_iou": round(iou, 4),
                            "stability": round(stab, 4),
                            "area": int(np.count_nonzero(mask)),
                            "candidate": j,
                            "prompt": metas[start + i],
                        }
                        slices = None
                        if config.three_slice_masks:
                            slices = np.zeros((3, *mask.shape), bool)
                            slices[1] = mask
                            if pred.masks.shape[2] == 3:
                                slices[0], slices[2] = pred.masks[i, j, 0], pred.masks[i, j, 2]
                        new.append(Candidate(mask.copy(), iou, source, meta, slices))
                if not new:
                    continue
                merged = pool + new
                kept = mask_nms(
                    [c.mask for c in merged], [c.score for c in merged], config.nms_thresh
                )
                counts["rejected"]["nms"] += len(merged) - len(kept)
                pool = [merged[i] for i in kept]
    if gt_masks and pool:
        survivors = []
        for c in pool:
            if any(mask_iou(c.mask, g) > config.nms_thresh for g in gt_masks):
                counts["rejected"]["gt_overlap"] += 1
            else:
                survivors.append(c)
        pool = survivors
    return pool


def _new_counts(case_id: str, gt_names: list[str]) -> dict:
    return {
        "case": case_id,
        "windows": 0,
        "records_gt": 0,
        "records_pseudo": 0,
        "slices_pseudo_labelled": 0,
        "slices_outside_body": 0,
        "prompts": dict.fromkeys(PSEUDO_SOURCES, 0),
        "candidates": 0,
        "rejected": dict.fromkeys(FILTERS, 0),
        "kept": dict.fromkeys(("gt", *PSEUDO_SOURCES), 0),
        "gt_masks_kept": dict.fromkeys(gt_names, 0),
        "gt_masks_discarded": dict.fromkeys(gt_names, 0),
    }


def pseudo_label_case(
    case: VolumeCase,
    out_dir: Path,
    gt_targets: list[Target],
    config: PseudoLabelConfig,
    make_predictor: PredictorFactory,
    *,
    progress: bool = False,
) -> dict:
    """Write the windows, masks and records of one case; returns its counts (also saved as
    ``meta/CASE.done.json``, written last)."""
    modality = "CT" if config.modality == "CT" else None
    image = read_image(case.image, modality=modality)
    labels = None if case.label is None else read_label(case.label, reference=image).array
    arr = image.array
    body = arr > body_threshold(arr, config)
    windows = intensity_windows(arr, body, config.sigmas)
    predictors = [make_predictor(w) for w in windows]
    stored = to_uint8(arr, config.window) if config.scaling == "fixed" else arr
    n_gt = len(gt_targets)
    if labels is None:
        gt_targets = []  # an unlabelled case: pseudo-labels only
    target_masks = [np.isin(labels, t.values) for t in gt_targets]
    img_dir, mask_dir = out_dir / "images" / case.case_id, out_dir / "masks" / case.case_id
    img_dir.mkdir(parents=True, exist_ok=True)
    mask_dir.mkdir(parents=True, exist_ok=True)
    counts = _new_counts(case.case_id, [t.name for t in gt_targets])
    records: list[str] = []
    for axis in choose_slicing_axes(image.shape, config.axes):
        for p in predictors:
            p.set_volume(image, axis=axis)
        stack = np.moveaxis(arr, axis, 0)
        body_stack = np.moveaxis(body, axis, 0)
        annotated = _slice_annotated(labels, axis, config.labels_complete)
        n = image.shape[axis]
        pseudo_centres = set(window_centres(n)[:: config.stride])
        centres = window_centres(n)
        bar = tqdm(
            centres,
            desc=f"{case.case_id} {AXIS_NAMES[axis]}",
            leave=False,
            disable=not progress,
            unit="slice",
        )
        for centre in bar:
            gt, gt_centre = [], []
            for k, (target, tm) in enumerate(zip(gt_targets, target_masks, strict=True)):
                window_mask = slice_window(tm, axis, centre)
                if not window_mask[1].any():
                    continue
                if mask_is_kept(window_mask[1], config.min_area_fraction):
                    gt.append((k, window_mask))
                    gt_centre.append(window_mask[1])
                    counts["gt_masks_kept"][target.name] += 1
                else:
                    counts["gt_masks_discarded"][target.name] += 1
            pseudo: list[Candidate] = []
            if centre in pseudo_centres:
                if body_stack[centre].mean() < config.body_min_fraction:
                    counts["slices_outside_body"] += 1
                else:
                    counts["slices_pseudo_labelled"] += 1
                    pseudo = _candidates_for_slice(
                        predictors,
                        windows,
                        stack,
                        body_stack[centre],
                        centre,
                        gt_centre,
                        config,
                        counts,
                    )
            if not gt and not pseudo:
                continue
            name = f"{AXIS_NAMES[axis]}_{centre:04d}"
            window = slice_window(stored, axis, centre)
            if config.scaling != "fixed":
                window = scale_window(window, config.window, config.scaling)
            image_path = img_dir / f"{name}.{config.image_format}"
            save_image(resize_image(window, config.size), image_path, config.image_format)
            counts["windows"] += 1
            common = {
                "case": case.case_id,
                "image": str(image_path.relative_to(out_dir)),
                "source_image": str(case.image.resolve()),
                "source_label": None if case.label is None else str(case.label.resolve()),
                "axis": axis,
                "axis_name": AXIS_NAMES[axis],
                "slice_index": centre,
                "slices": [centre - 1, centre, centre + 1],
                "slice_shape": list(window.shape[1:]),
            }
            if gt:
                mask_path = mask_dir / f"{name}.npz"
                labels_kept = [k for k, _ in gt]
                np.savez_compressed(
                    mask_path,
                    masks=resize_masks(np.stack([m for _, m in gt]), config.size),
                    labels=np.array(labels_kept, dtype=np.int16),
                )
                indicator = [int(annotated[s]) for s in (centre - 1, centre, centre + 1)]
                indicator[1] = 1  # the centre holds the target
                record = {
                    **common,
                    "kind": "gt",
                    "mask": str(mask_path.relative_to(out_dir)),
                    "labels": labels_kept,
                    "class_names": [gt_targets[k].name for k in labels_kept],
                    "label_values": [list(gt_targets[k].values) for k in labels_kept],
                    "indicator": indicator,
                    "sources": ["gt"] * len(gt),
                    "mask_meta": [
                        {"source": "gt", "label_values": list(gt_targets[k].values)}
                        for k in labels_kept
                    ],
                }
                records.append(json.dumps(record))
                counts["records_gt"] += 1
                counts["kept"]["gt"] += len(gt)
            if pseudo:
                mask_path = mask_dir / f"{name}_pseudo.npz"
                stacks = []
                for c in pseudo:
                    if c.slices is not None:
                        stacks.append(c.slices)
                    else:
                        s = np.zeros((3, *c.mask.shape), bool)
                        s[1] = c.mask
                        stacks.append(s)
                labels_kept = [n_gt + PSEUDO_SOURCES.index(c.source) for c in pseudo]
                np.savez_compressed(
                    mask_path,
                    masks=resize_masks(np.stack(stacks), config.size),
                    labels=np.array(labels_kept, dtype=np.int16),
                )
                record = {
                    **common,
                    "kind": "pseudo",
                    "mask": str(mask_path.relative_to(out_dir)),
                    "labels": labels_kept,
                    "class_names": [c.source for c in pseudo],
                    "label_values": [[] for _ in pseudo],
                    "indicator": [0, 1, 0],
                    "sources": [c.source for c in pseudo],
                    "mask_meta": [c.meta for c in pseudo],
                }
                records.append(json.dumps(record))
                counts["records_pseudo"] += 1
                for c in pseudo:
                    counts["kept"][c.source] += 1
    meta_dir = out_dir / "meta"
    meta_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(meta_dir / f"{case.case_id}.jsonl", "".join(r + "\n" for r in records))
    atomic_write(meta_dir / f"{case.case_id}.done.json", json.dumps(counts))
    return counts


# --------------------------------------------------------------------------------------------
# a dataset


def pseudo_label_dataset(
    images: str | Path,
    out_dir: str | Path,
    config: PseudoLabelConfig,
    *,
    make_predictor: PredictorFactory,
    labels: str | Path | None = None,
    model_name: str = "",
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Pseudo-label every volume under ``images`` into the prepared folder ``out_dir``.

    Args:
        images, labels: see ``find_volume_cases``.
        make_predictor: ``window -> predictor`` (``sam_predictor_factory(model)``).
        model_name: recorded in ``prepare.json`` (e.g. the checkpoint path); part of the
            settings a resumed run must match.
        overwrite: delete an output made with other settings instead of refusing.

    Resumable: finished cases (``meta/CASE.done.json``) are skipped; a re-run with other
    settings is refused unless ``overwrite``. A failing case is logged and listed in the summary
    (``cases_failed``) while the others go on.

    Returns:
        the summary (also ``summary.json``): case counts, ``windows``, records, prompts,
        ``candidates`` = sum of ``rejected`` + pseudo-labels ``kept``, per-target ground truth.
    """
    if not isinstance(config, PseudoLabelConfig):
        raise TypeError(f"config must be a PseudoLabelConfig, got {type(config).__name__}")
    out_dir = Path(out_dir)
    cases = find_volume_cases(images, labels)
    gt = _gt_targets(cases, None if labels is None else Path(labels), config.label_names)
    clash = [t.name for t in gt if t.name in PSEUDO_SOURCES]
    if clash:
        raise InputError(f"label name(s) {', '.join(clash)} clash with the pseudo-label sources")
    targets = [{**asdict(t), "source": "gt"} for t in gt]
    targets += [{"name": s, "values": [], "source": s} for s in PSEUDO_SOURCES]
    settings = json.loads(
        json.dumps(
            {
                "kind": "pseudo-label",
                "config": asdict(config),
                "images": str(Path(images).resolve()),
                "labels": None if labels is None else str(Path(labels).resolve()),
                "model": model_name,
                "targets": targets,
            }
        )
    )
    settings_path = out_dir / "prepare.json"
    if settings_path.exists() and not overwrite:
        previous = json.loads(settings_path.read_text())
        if previous != settings:
            old = previous.get("config", {})
            changed = [k for k, v in settings["config"].items() if old.get(k) != v]
            changed += [
                k
                for k in ("images", "labels", "model", "targets")
                if previous.get(k) != settings[k]
            ]
            raise InputError(
                f"{out_dir}: already written with other settings ({', '.join(changed)}); use "
                "another --out or --overwrite"
            )
    if overwrite and out_dir.exists():
        shutil.rmtree(out_dir)
    (out_dir / "meta").mkdir(parents=True, exist_ok=True)
    atomic_write(settings_path, json.dumps(settings, indent=2))

    meta = out_dir / "meta"
    done = [c for c in cases if (meta / f"{c.case_id}.done.json").is_file()]
    todo = [c for c in cases if c not in done]
    results = [json.loads((meta / f"{c.case_id}.done.json").read_text()) for c in done]
    failures: dict[str, str] = {}
    for case in tqdm(todo, desc=f"pseudo-label {out_dir.name}", unit="case", disable=not progress):
        try:
            results.append(
                pseudo_label_case(case, out_dir, gt, config, make_predictor, progress=progress)
            )
        except (InputError, OSError, ValueError, RuntimeError) as exc:
            failures[case.case_id] = str(exc)
            log.error("case %s failed: %s", case.case_id, exc)
    summary = {"cases": len(cases)}
    summary.update(_summarise(results, failures, [t.name for t in gt], resumed=len(done)))
    summary["output"] = str(out_dir)
    atomic_write(out_dir / "summary.json", json.dumps(summary, indent=2))
    return summary


def _summarise(results: list[dict], failures: dict, gt_names: list[str], *, resumed: int) -> dict:
    def total(key: str) -> int:
        return sum(r[key] for r in results)

    def per(key: str, names) -> dict:
        return {n: sum(r[key].get(n, 0) for r in results) for n in names}

    return {
        "cases_done": len(results) - resumed,
        "cases_resumed": resumed,
        "cases_failed": failures,
        "windows": total("windows"),
        "records_gt": total("records_gt"),
        "records_pseudo": total("records_pseudo"),
        "slices_pseudo_labelled": total("slices_pseudo_labelled"),
        "slices_outside_body": total("slices_outside_body"),
        "prompts": per("prompts", PSEUDO_SOURCES),
        "candidates": total("candidates"),
        "rejected": per("rejected", FILTERS),
        "kept": per("kept", ("gt", *PSEUDO_SOURCES)),
        "gt_masks_kept": per("gt_masks_kept", gt_names),
        "gt_masks_discarded": per("gt_masks_discarded", gt_names),
    }
