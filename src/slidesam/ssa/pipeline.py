"""SSA stage 2 and the whole case: stage-1 mask -> boxes -> Slide-SAM per phase -> filter.

``run_ssa`` takes the phases of one case (``Volume`` each, on their own grids), the stage-1
label map on the arterial phase, and a ``SlideSAMPredictor``:

1. the stage-1 tumour (label ``tumor_label``) gives 3D boxes: one per connected component, or
   one around everything (``per_component=False``, the paper), grown by ``margin_mm``;
2. each box is moved to each target phase **through world coordinates** (never by array
   index), optionally through the patient motion measured by rigid registration
   (``register=True``: arterial fixed, the target phase moving, metric restricted to the
   stage-1 foreground's box grown by ``register_margin_mm``);
3. prompts per axial slice of the target phase (the array axis closest to world z):
   ``box_mode="3d"`` gives every slice in the box's range the same rectangle (paper Eq. 1-2),
   ``"per-slice"`` each slice the box of the stage-1 mask moved onto that slice;
4. Slide-SAM predicts every prompted slice (its window centred there, the centre output);
5. confidence = IoU of the predicted mask's box and the prompt box; a slice below
   ``threshold`` (tau, paper 0.8) is rejected and becomes what ``rejected`` says
   (``slidesam.ssa.confidence.REJECTED``).

The target phases are segmented independently; each gets a binary tumour mask on exactly its
own grid, and a report (JSON-ready) says what happened on every slice.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import ndimage

from slidesam.core import PHASES, InputError, Volume
from slidesam.inference.propagation import PropagationConfig, VolumeSegmenter
from slidesam.ssa.boxes import (
    axial_axis,
    component_boxes,
    resample_mask,
    slice_prompts_3d,
    slice_prompts_per_slice,
    transfer_box,
)
from slidesam.ssa.confidence import REJECTED, box_iou, mask_box
from slidesam.ssa.register import RigidResult, register_rigid

__all__ = ["BOX_MODES", "PhaseResult", "SSAConfig", "SSAResult", "run_ssa"]

log = logging.getLogger(__name__)

BOX_MODES = ("3d", "per-slice")


@dataclass(frozen=True)
class SSAConfig:
    """Settings of stage 2 (see the module docstring).

    Attributes:
        threshold: tau of the confidence filter (0 keeps every slice).
        box_mode: ``3d`` or ``per-slice``.
        per_component: one box per connected tumour component (else one for all, the paper).
        margin_mm: grow each 3D box by this much on every side.
        min_component_voxels: ignore stage-1 components smaller than this.
        rejected: what a rejected slice becomes: ``empty``, ``stage1`` or ``neighbours``.
        register: correct patient motion between phases by rigid registration.
        register_margin_mm: the registration metric looks at the stage-1 foreground's box
            grown by this much (the region around the kidneys).
        tumor_label: the tumour's value in the stage-1 label map (KiTS: 2).
    """

    threshold: float = 0.8
    box_mode: str = "per-slice"
    per_component: bool = True
    margin_mm: float = 0.0
    min_component_voxels: int = 10
    rejected: str = "stage1"
    register: bool = False
    register_margin_mm: float = 30.0
    tumor_label: int = 2

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise InputError(f"threshold must lie in [0, 1], got {self.threshold}")
        if self.box_mode not in BOX_MODES:
            raise InputError(
                f"box_mode must be one of {', '.join(BOX_MODES)}, got {self.box_mode!r}"
            )
        if self.rejected not in REJECTED:
            raise InputError(
                f"rejected must be one of {', '.join(REJECTED)}, got {self.rejected!r}"
            )
        if self.margin_mm < 0 or self.register_margin_mm < 0:
            raise InputError("margin_mm and register_margin_mm must be >= 0")
        if self.min_component_voxels < 1 or not 1 <= self.tumor_label <= 255:
            raise InputError("min_component_voxels must be >= 1 and tumor_label in 1..255")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PhaseResult:
    """One phase's output.

    Attributes:
        phase: its name; ``mask``: uint8 0/1 tumour mask on the phase's own grid (z, y, x).
        axis: the slicing (axial) array axis.
        boxes: per 3D box, its voxel bounds on this phase (None if it fell outside the image).
        slices: one record per prompted slice: component, slice, prompt box, mask box,
            confidence, accepted, what became of it (``action``).
        registration: the rigid registration result, if run.
        seconds: wall time of this phase (registration included).
    """

    phase: str
    mask: np.ndarray
    axis: int
    boxes: list[dict | None] = field(default_factory=list)
    slices: list[dict] = field(default_factory=list)
    registration: dict | None = None
    seconds: float = 0.0

    def summary(self) -> dict:
        accepted = sum(s["accepted"] for s in self.slices)
        return {
            "axis": self.axis,
            "prompted_slices": len(self.slices),
            "accepted_slices": accepted,
            "rejected_slices": len(self.slices) - accepted,
            "tumor_voxels": int(self.mask.sum()),
            "boxes": self.boxes,
            "registration": self.registration,
            "seconds": round(self.seconds, 3),
            "slices": self.slices,
        }


@dataclass
class SSAResult:
    """Output of ``run_ssa``: per-phase results and the arterial 3D boxes (voxels and mm)."""

    phases: dict[str, PhaseResult]
    boxes: list[dict]
    config: SSAConfig
    warnings: list[str] = field(default_factory=list)

    def report(self) -> dict:
        return {
            "config": self.config.to_dict(),
            "arterial_boxes": self.boxes,
            "phases": {p: r.summary() for p, r in self.phases.items()},
            "warnings": self.warnings,
        }


def _check_phases(images: dict[str, Volume], stage1: Volume) -> None:
    unknown = sorted(set(images) - set(PHASES))
    if unknown:
        raise InputError(f"unknown phase(s) {', '.join(unknown)}; use {', '.join(PHASES)}")
    if "arterial" not in images:
        raise InputError("SSA needs the arterial phase (stage 1 runs there)")
    problem = stage1.geometry.mismatch(images["arterial"].geometry)
    if problem:
        raise InputError(f"the stage-1 mask is not on the arterial image's grid: {problem}")
    art = images["arterial"].geometry
    lo_a, hi_a = _world_bounds(art)
    for phase, volume in images.items():
        lo, hi = _world_bounds(volume.geometry)
        if np.any(np.minimum(hi, hi_a) <= np.maximum(lo, lo_a)):
            raise InputError(
                f"the {phase} image does not overlap the arterial image in space (world "
                f"extents {lo.round(1).tolist()}..{hi.round(1).tolist()} vs "
                f"{lo_a.round(1).tolist()}..{hi_a.round(1).tolist()} mm): are they the same "
                "patient and study?"
            )


def _world_bounds(geometry) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned world (LPS mm) bounds of a grid's voxel centres."""
    corners = np.array(
        [[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)], dtype=np.float64
    ) * (np.asarray(geometry.shape) - 1)
    world = geometry.index_to_world(corners)
    return world.min(axis=0), world.max(axis=0)


def _registration(images, stage1, phase, config) -> RigidResult | None:
    if not config.register or phase == "arterial":
        return None
    art = images["arterial"]
    fg = np.argwhere(stage1.array > 0)
    if fg.size:
        world = art.geometry.index_to_world(np.stack([fg.min(0), fg.max(0)]))
        margin = config.register_margin_mm
        roi = (world.min(axis=0) - margin, world.max(axis=0) + margin)
    else:
        roi = None
    return register_rigid(art, images[phase], roi_mm=roi)


def run_ssa(
    images: dict[str, Volume],
    stage1: Volume,
    predictor,
    config: SSAConfig | None = None,
    *,
    targets: tuple[str, ...] | None = None,
) -> SSAResult:
    """Segment the tumour on each target phase (default: every phase given), see module doc.

    Args:
        images: phase name -> image; must include ``arterial``.
        stage1: label map on the arterial grid (KiTS labels or 0/1 with ``tumor_label=1``).
        predictor: a ``SlideSAMPredictor`` (or anything with its ``set_volume``/``predict``).
        config: ``SSAConfig``.
        targets: phases to segment, in order.

    Raises:
        InputError: no arterial phase, a stage-1 mask on another grid, phases that do not
            overlap in space, an unknown phase name.
    """
    config = config or SSAConfig()
    _check_phases(images, stage1)
    targets = tuple(targets) if targets is not None else tuple(p for p in PHASES if p in images)
    missing = [p for p in targets if p not in images]
    if missing:
        raise InputError(f"target phase(s) {', '.join(missing)} not given")
    art = images["arterial"].geometry
    tumor = stage1.array == config.tumor_label
    boxes = component_boxes(
        tumor,
        art,
        per_component=config.per_component,
        margin_mm=config.margin_mm,
        min_voxels=config.min_component_voxels,
    )
    result = SSAResult(phases={}, boxes=[b.to_dict(art) for b in boxes], config=config)
    if not boxes:
        msg = "no tumor found by stage 1 on the arterial phase: every output mask is empty"
        log.warning(msg)
        result.warnings.append(msg)
    components = _component_masks(tumor, boxes)
    for phase in targets:
        t0 = time.perf_counter()
        volume = images[phase]
        axis = axial_axis(volume.geometry)
        reg = _registration(images, stage1, phase, config) if boxes else None
        transform = reg.transform if reg is not None else None
        pr = PhaseResult(
            phase=phase,
            mask=np.zeros(volume.shape, np.uint8),
            axis=axis,
            registration=reg.to_dict() if reg is not None else None,
        )
        prompts, moved = [], []
        for k, (box, comp) in enumerate(zip(boxes, components, strict=True), start=1):
            on_target = transfer_box(box, art, volume.geometry, transform=transform)
            pr.boxes.append(on_target.to_dict(volume.geometry) if on_target else None)
            comp_t = resample_mask(comp, art, volume.geometry, transform=transform).astype(bool)
            moved.append(comp_t)
            if on_target is None:
                continue
            if config.box_mode == "3d":
                prompts += slice_prompts_3d(on_target, axis, label=k)
            else:
                prompts += slice_prompts_per_slice(comp_t, axis, label=k)
        if prompts:
            _segment_phase(pr, volume, prompts, moved, predictor, config)
        pr.seconds = time.perf_counter() - t0
        result.phases[phase] = pr
    return result


def _component_masks(tumor: np.ndarray, boxes) -> list[np.ndarray]:
    """The stage-1 voxels behind each box: its connected component (the one filling the box),
    or all the tumour for a box over everything (``component == 0``)."""
    if all(b.component == 0 for b in boxes):
        return [tumor for _ in boxes]
    labels, _ = ndimage.label(tumor, structure=np.ones((3, 3, 3), bool))
    out = []
    for b in boxes:
        if b.component == 0:
            out.append(tumor)
            continue
        inside = np.bincount(labels[b.slices].ravel())
        inside[0] = 0
        out.append(labels == int(inside.argmax()))
    return out


def _segment_phase(pr: PhaseResult, volume, prompts, moved, predictor, config) -> None:
    axis = pr.axis
    seg = VolumeSegmenter(predictor, PropagationConfig(mode="per-slice"))
    out = seg.segment(volume, prompts, axis=axis)
    labels = np.moveaxis(out.labels, axis, 0)  # (slices, H, W) views from here on
    final = np.moveaxis(pr.mask, axis, 0)  # a view: writing it writes pr.mask
    boxes_by_slice = {(p.label, p.slice): p.box for p in prompts}
    records = sorted(boxes_by_slice)
    accepted: dict[int, dict[int, np.ndarray]] = {}
    rejected: list[tuple[int, int, dict]] = []
    for label, s in records:
        mask = labels[s] == label
        prompt_box = boxes_by_slice[(label, s)]
        mbox = mask_box(mask)
        conf = box_iou(mbox, prompt_box)
        ok = conf >= config.threshold
        rec = {
            "component": label,
            "slice": int(s),
            "prompt_box": [round(float(v), 2) for v in prompt_box],
            "mask_box": None if mbox is None else list(mbox),
            "confidence": round(conf, 4),
            "accepted": bool(ok),
            "action": "kept" if ok else config.rejected,
        }
        pr.slices.append(rec)
        if ok:
            final[s] |= mask
            accepted.setdefault(label, {})[s] = mask
        else:
            rejected.append((label, s, rec))
    for label, s, rec in rejected:
        if config.rejected == "stage1":
            final[s] |= np.moveaxis(moved[label - 1], axis, 0)[s]
        elif config.rejected == "neighbours":
            final[s] |= _from_neighbour(predictor, accepted.get(label, {}), s, rec, config)


def _from_neighbour(predictor, accepted: dict[int, np.ndarray], s: int, rec: dict, config):
    """Predict slice ``s`` again from the box of the nearest accepted slice's mask; keep the
    mask if it agrees with that box (confidence >= threshold), else nothing."""
    candidates = [a for a, m in accepted.items() if m.any()]
    if not candidates:
        rec["action"] = "empty (no accepted neighbour)"
        return False
    nearest = min(candidates, key=lambda a: (abs(a - s), a))
    box = mask_box(accepted[nearest])
    out = predictor.predict(s, boxes=[box], multimask=True)
    best = int(out.iou[0].argmax())
    logits = out.logits[0, best]
    mask = logits[len(logits) // 2] > 0
    conf = box_iou(mask_box(mask), box)
    rec["neighbour"] = {"slice": int(nearest), "box": list(box), "confidence": round(conf, 4)}
    if conf >= config.threshold:
        rec["action"] = "neighbours"
        return mask
    rec["action"] = "empty (neighbour prompt also rejected)"
    return False
