"""What the UI's long actions do (no web framework here): prompt -> Slide-SAM -> label map, and
an SSA run. They run in the server's worker thread and report progress on ``session.job``.

Prompt semantics (the clinical workflow of Slide-SAM App. A):

- each object (label) keeps at most one prompt per slice: a new box on a slice replaces that
  slice's box, new points are added to that slice's points;
- a point on a slice where the object has no box yet, but a mask, is sent together with the
  box of that mask (plus a small margin): the point refines the mask you see, as in SAM;
- ``propagate=True`` re-runs the object from all its prompts (every prompted slice is an
  anchor, ``slidesam.inference.propagation``) and replaces the object's voxels everywhere;
  ``propagate=False`` predicts only the prompted slice and replaces the object there (manual
  correction of one slice, e.g. an SSA slice that was rejected). Other objects' voxels are never
  overwritten.
- both replace the object in the model layer only (``Session.model``): brush, eraser and
  restore strokes (``Session.edits``) stay on top, so hand fixes survive later prompts.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from slidesam.core import InputError, Volume
from slidesam.core.prompts import Prompt
from slidesam.inference.propagation import PropagationConfig, VolumeSegmenter, mask_to_box
from slidesam.web.state import Session, SliceReview

__all__ = ["merge_prompt", "run_segment", "run_ssa_session"]

log = logging.getLogger(__name__)


def merge_prompt(session: Session, new: Prompt) -> list[Prompt]:
    """The session's prompt list with ``new`` merged in (see the module docstring)."""
    new.check_fits(session.n_slices, session.slice_shape)
    same = [p for p in session.prompts if p.label == new.label and p.slice == new.slice]
    others = [p for p in session.prompts if not (p.label == new.label and p.slice == new.slice)]
    old = same[0] if same else None
    box = new.box if new.box is not None else (old.box if old is not None else None)
    points = (old.points if old is not None else ()) + new.points
    point_labels = (old.point_labels if old is not None else ()) + new.point_labels
    if new.box is not None:  # a new box starts the slice afresh: older points were for the old box
        points, point_labels = new.points, new.point_labels
    source = new.source
    if box is None and points:
        current = session.mask_slice(new.slice) == new.label
        if current.sum() >= 4:
            box = tuple(mask_to_box(current, 0.1, session.slice_shape))
            source = "point+mask box"
    merged = Prompt(
        slice=new.slice,
        label=new.label,
        box=box,
        points=points,
        point_labels=point_labels,
        source=source,
    )
    return [*others, merged]


def run_segment(
    session: Session, prompt: Prompt, *, propagate: bool, config: PropagationConfig
) -> None:
    """Add ``prompt``, segment its object and apply the result as one undoable action."""
    job = session.job
    with session.lock:
        prompts = merge_prompt(session, prompt)
    label = prompt.label
    anchors = [p for p in prompts if p.label == label]
    if not propagate:
        anchors = [p for p in anchors if p.slice == prompt.slice]
        config = PropagationConfig(**{**config.__dict__, "mode": "per-slice"})
    # a rough total for the progress bar: anchors' windows + a walk through the volume
    expected = len(anchors) + (session.n_slices // max(1, config.step) if propagate else 0)

    def tick(n: int) -> None:
        job.windows = n
        job.progress = min(0.95, n / max(1, expected))
        job.message = f"Slide-SAM: {n} windows"

    passes0 = session.predictor.encoder_passes
    result = VolumeSegmenter(session.predictor, config, progress=tick).segment(
        session.volume, anchors, axis=session.axis
    )
    job.encoder_passes = session.predictor.encoder_passes - passes0
    mask = result.labels == label
    with session.lock:
        new = session.model.copy()
        if propagate:
            new[new == label] = 0
            new[mask & (new == 0)] = label
        else:
            view_new = np.moveaxis(new, session.axis, 0)[prompt.slice]
            view_mask = np.moveaxis(mask, session.axis, 0)[prompt.slice]
            view_new[view_new == label] = 0
            view_new[view_mask & (view_new == 0)] = label
        kind = "box" if prompt.box is not None else "point"
        where = "propagated" if propagate else "this slice"
        session.apply(
            f"{kind} on slice {prompt.slice} (label {label}, {where})", model=new, prompts=prompts
        )


def run_ssa_session(
    session: Session,
    arterial: Volume,
    stage1,
    *,
    config=None,
) -> dict:
    """SSA on the session's volume (the plain phase) with ``arterial``: the tumour becomes
    label 1 and the per-slice confidence becomes ``session.review``, as one undoable action
    (undo removes both)."""
    from slidesam.ssa.pipeline import SSAConfig, run_ssa

    job = session.job
    config = config or SSAConfig()
    job.message, job.progress = "stage 1 on the arterial phase", 0.1
    t0 = time.perf_counter()
    labels = stage1.predict(arterial)
    if labels.geometry.mismatch(arterial.geometry):
        raise InputError("stage 1 returned a mask on another grid than the arterial image")
    job.message, job.progress = "Slide-SAM on the plain phase", 0.5
    passes0 = session.predictor.encoder_passes
    result = run_ssa(
        {"plain": session.volume, "arterial": arterial},
        labels,
        session.predictor,
        config,
        targets=("plain",),
    )
    job.encoder_passes = session.predictor.encoder_passes - passes0
    phase = result.phases["plain"]
    review = tuple(
        SliceReview(
            slice=int(r["slice"]),
            component=int(r["component"]),
            confidence=float(r["confidence"]),
            accepted=bool(r["accepted"]),
            action=str(r["action"]),
            prompt_box=tuple(float(v) for v in r["prompt_box"]),
        )
        for r in sorted(phase.slices, key=lambda r: (r["slice"], r["component"]))
    )
    with session.lock:
        new = np.where(phase.mask > 0, np.uint8(1), np.uint8(0)).astype(np.uint8)
        session.apply(
            "SSA (plain phase)", model=new, prompts=[], review=review, reviewed=frozenset()
        )
    log.info(
        "SSA session %s: %d slices, %d rejected, %.1f s",
        session.id[:6],
        len(review),
        sum(not r.accepted for r in review),
        time.perf_counter() - t0,
    )
    return {"warnings": result.warnings, "slices": len(review)}
