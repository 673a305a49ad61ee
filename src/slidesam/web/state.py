"""Per-session state of the web UI, in typed objects (no web framework imported here).

A ``Session`` holds one volume (the image the user annotates), its label map, the prompts per
object, an undo/redo history of every action, the SSA review of the slices (when the session
came from an SSA run) and the state of its one background job. Its ``SlideSAMPredictor`` keeps
the window embeddings of this volume across actions (``PinnedPredictor``), so each window is
encoded once per volume.

Axes: the view slices the array along ``axis`` (the axial one, ``slidesam.ssa.boxes.axial_axis``,
0 for ordinary CT); a slice is the 2D array ``np.take(array, s, axis)`` with x = column and
y = row, and prompts (``slidesam.core.Prompt``) are in those slice pixels.

Layers: the label map the user sees and exports (``labels``) is the model's label map
(``model``, what the prompts and SSA produced) with the hand edits (``edits``) laid over it,
voxel by voxel: ``edits`` is 0 where the model's label stands, ``ERASED`` where the eraser
cleared the voxel and the label 1..254 the brush painted there. A prompt re-runs only the model
layer of its object, so brush and eraser work survives new prompts; the restore tool sets
``edits`` back to 0 and gives those voxels back to the model.

History: every action (a prompt and the segmentation it triggers, a brush, eraser or restore
stroke, an SSA run, a review mark) is one ``HistoryEntry``: both layers before and after,
restricted to the changed range along axis 0 and zlib-compressed, plus the prompt list, the SSA
review table and the review marks before and after. Undo writes "before" back, redo "after";
both are exact (``labels`` is a function of the two layers).

``SessionStore`` enforces the limits: at most ``max_sessions`` open sessions and at most
``max_memory_mb`` of arrays, history and embeddings in all; sessions idle for
``idle_seconds`` are closed to make room, otherwise the new one is refused.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from slidesam.core import InputError, Volume
from slidesam.core.prompts import Prompt

__all__ = [
    "ERASED",
    "MAX_LABEL",
    "HistoryEntry",
    "Job",
    "PinnedPredictor",
    "ServerConfig",
    "Session",
    "SessionBusy",
    "SessionLimit",
    "SessionStore",
    "SliceReview",
    "compose_labels",
]

log = logging.getLogger(__name__)

#: value of ``Session.edits`` where the eraser cleared the voxel
ERASED = 255
#: largest object label (255 is ``ERASED`` in the edit layer)
MAX_LABEL = 254


@dataclass(frozen=True)
class ServerConfig:
    """Settings of one ``slidesam serve``.

    Attributes:
        data_dir: folder the UI may open images from and save masks to (None: uploads only,
            no saving on the server).
        max_sessions: open sessions at most (a browser tab is one session).
        max_memory_mb: arrays, undo history and embeddings of all sessions together.
        max_upload_mb: largest upload accepted.
        max_history: undo steps kept per session (oldest dropped first).
        idle_seconds: a session untouched this long may be closed to make room.
        cache_size: window embeddings kept per session (``SlideSAMPredictor.cache_size``).
    """

    data_dir: Path | None = None
    max_sessions: int = 8
    max_memory_mb: float = 4096.0
    max_upload_mb: float = 512.0
    max_history: int = 200
    idle_seconds: float = 3600.0
    cache_size: int = 256

    def __post_init__(self) -> None:
        if self.data_dir is not None:
            path = Path(self.data_dir).expanduser()
            if not path.is_dir():
                raise InputError(f"--data-dir {path}: no such folder")
            object.__setattr__(self, "data_dir", path.resolve())
        if self.max_sessions < 1 or self.max_history < 1 or self.cache_size < 1:
            raise InputError("max_sessions, max_history and cache_size must be at least 1")
        if self.max_memory_mb <= 0 or self.max_upload_mb <= 0:
            raise InputError("max_memory_mb and max_upload_mb must be positive")


class SessionLimit(InputError):
    """No room for another session (count or memory)."""


class SessionBusy(InputError):
    """The session is running a job; the action must wait until it finishes."""


@dataclass
class Job:
    """The background job of a session (one at a time).

    Attributes:
        kind: ``segment`` or ``ssa``; ``state``: ``idle``, ``running``, ``done`` or ``error``.
        progress: 0..1 (an estimate while running, 1 when done); ``message``: what it does now.
        windows: windows predicted so far; ``encoder_passes``: windows the encoder ran for
            in this job (cached windows are free).
        error: the one-line reason of a failure.
    """

    kind: str = ""
    state: str = "idle"
    progress: float = 0.0
    message: str = ""
    windows: int = 0
    encoder_passes: int = 0
    error: str | None = None
    started: float = 0.0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "state": self.state,
            "progress": round(self.progress, 3),
            "message": self.message,
            "windows": self.windows,
            "encoder_passes": self.encoder_passes,
            "error": self.error,
            "seconds": round(self.seconds, 3),
        }


@dataclass(frozen=True)
class SliceReview:
    """SSA's verdict on one prompted slice of one tumour component.

    Attributes:
        slice: index along the view axis; ``component``: the tumour component (1-based).
        confidence: 0..1; ``accepted``: confidence reached the threshold (tau).
        action: what a rejected slice became (``stage1``, ``skip``, ...).
        prompt_box: (x0, y0, x1, y1) inclusive box in slice pixels that prompted Slide-SAM.
    """

    slice: int
    component: int
    confidence: float
    accepted: bool
    action: str
    prompt_box: tuple[float, float, float, float]

    def to_dict(self) -> dict:
        return {
            "slice": self.slice,
            "component": self.component,
            "confidence": self.confidence,
            "accepted": self.accepted,
            "action": self.action,
            "prompt_box": list(self.prompt_box),
        }


@dataclass(frozen=True)
class HistoryEntry:
    """One undoable action (see the module docstring).

    ``before`` / ``after``: zlib of the uint8 block ``(2, z1 - z0, ...)``: ``model`` and
    ``edits`` of the changed range ``z0:z1`` along axis 0 (``shape`` is the block's shape).
    """

    description: str
    z0: int
    z1: int
    shape: tuple[int, ...]
    before: bytes
    after: bytes
    prompts_before: tuple[Prompt, ...]
    prompts_after: tuple[Prompt, ...]
    reviewed_before: frozenset[int]
    reviewed_after: frozenset[int]
    review_before: tuple[SliceReview, ...]
    review_after: tuple[SliceReview, ...]

    @property
    def nbytes(self) -> int:
        return len(self.before) + len(self.after)


def compose_labels(model: np.ndarray, edits: np.ndarray) -> np.ndarray:
    """The label map shown: ``model`` where ``edits`` is 0, 0 where it is ``ERASED``, else the
    painted label. Both uint8, same shape; returns a new uint8 array of that shape."""
    out = np.where(edits == 0, model, edits)
    out[edits == ERASED] = 0
    return out.astype(np.uint8, copy=False)


class PinnedPredictor:
    """A ``SlideSAMPredictor`` whose ``set_volume`` keeps the embedding cache when it is given
    the volume it already holds (``VolumeSegmenter`` calls ``set_volume`` on every run)."""

    def __init__(self, predictor) -> None:
        self.predictor = predictor

    def set_volume(self, volume: Volume, *, axis=None) -> None:
        held = getattr(self.predictor, "_state", None)
        if held is not None and held.volume is volume and held.axis == axis:
            return
        self.predictor.set_volume(volume, axis=axis)

    def __getattr__(self, name: str):
        return getattr(self.predictor, name)

    def embedding_bytes(self) -> int:
        held = getattr(self.predictor, "_state", None)
        if held is None:
            return 0
        return sum(int(e.element_size() * e.nelement()) for e in held.embeddings.values())


@dataclass
class Session:
    """One open volume and everything the user did to it (see the module docstring).

    Attributes:
        id: random URL-safe token; ``name``: file name shown in the page.
        volume: the image; ``axis``: slicing axis of the view.
        model: uint8 label map the prompts (and SSA) produced, same (z, y, x) shape and grid
            as ``volume``; ``edits``: uint8 hand edits over it (0 none, ``ERASED``, or a
            painted label); ``labels``: the two composed (``compose_labels``), what the page
            shows and export writes. All three are made here, empty.
        source: the image file inside ``--data-dir`` it was opened from (None for uploads).
        prompts: the prompts of every object (one per object and slice, merged).
        review: SSA's per-slice verdicts, if the session came from an SSA run;
            ``reviewed``: slices the user marked as accepted.
        version: increases with every change (the page refetches masks).
    """

    id: str
    name: str
    volume: Volume
    axis: int
    predictor: PinnedPredictor | None = None
    source: Path | None = None
    prompts: list[Prompt] = field(default_factory=list)
    review: tuple[SliceReview, ...] = ()
    reviewed: frozenset[int] = frozenset()
    undo_stack: list[HistoryEntry] = field(default_factory=list)
    redo_stack: list[HistoryEntry] = field(default_factory=list)
    version: int = 0
    job: Job = field(default_factory=Job)
    max_history: int = 200
    last_used: float = field(default_factory=time.monotonic)
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)
    model: np.ndarray = field(init=False, repr=False)
    edits: np.ndarray = field(init=False, repr=False)
    labels: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.model = np.zeros(self.volume.shape, np.uint8)
        self.edits = np.zeros(self.volume.shape, np.uint8)
        self.labels = np.zeros(self.volume.shape, np.uint8)

    # --- geometry of the view -------------------------------------------------------------
    @property
    def n_slices(self) -> int:
        return self.volume.shape[self.axis]

    @property
    def slice_shape(self) -> tuple[int, int]:
        return tuple(s for a, s in enumerate(self.volume.shape) if a != self.axis)

    def check_slice(self, s: int) -> int:
        if not 0 <= int(s) < self.n_slices:
            raise InputError(f"slice {s} is out of range 0..{self.n_slices - 1}")
        return int(s)

    def image_slice(self, s: int) -> np.ndarray:
        """(H, W) float32 image values of slice ``s``."""
        return np.take(self.volume.array, self.check_slice(s), axis=self.axis).astype(np.float32)

    def mask_slice(self, s: int) -> np.ndarray:
        """(H, W) uint8 labels of slice ``s``."""
        return np.ascontiguousarray(np.take(self.labels, self.check_slice(s), axis=self.axis))

    def touch(self) -> None:
        self.last_used = time.monotonic()

    @property
    def busy(self) -> bool:
        return self.job.state == "running"

    def check_idle(self) -> None:
        if self.busy:
            raise SessionBusy(f"the session is busy ({self.job.message or self.job.kind}); wait")

    # --- summaries ------------------------------------------------------------------------
    def nbytes(self) -> int:
        """Memory held: image (and the predictor's copy), the three label maps, history,
        embeddings."""
        total = self.volume.array.nbytes * 2 + 3 * self.labels.nbytes
        total += sum(e.nbytes for e in self.undo_stack) + sum(e.nbytes for e in self.redo_stack)
        if self.predictor is not None:
            total += self.predictor.embedding_bytes()
        return int(total)

    def label_slices(self) -> dict[int, list[int]]:
        """label -> the slices where it has voxels."""
        moved = np.moveaxis(self.labels, self.axis, 0)
        out: dict[int, list[int]] = {}
        for value in np.unique(moved):
            if value:
                present = (moved == value).reshape(moved.shape[0], -1).any(axis=1)
                out[int(value)] = np.flatnonzero(present).tolist()
        return out

    def to_dict(self) -> dict:
        a = self.volume.array
        finite = a[np.isfinite(a)] if np.issubdtype(a.dtype, np.floating) else a
        sample = finite.ravel()[:: max(1, finite.size // 200_000)]
        lo, hi = np.percentile(sample, [1, 99]) if sample.size else (0.0, 1.0)
        counts = np.bincount(self.labels.ravel(), minlength=1)
        return {
            "id": self.id,
            "name": self.name,
            "source": None if self.source is None else self.source.name,
            "shape": list(self.volume.shape),
            "spacing": list(self.volume.spacing),
            "axis": self.axis,
            "n_slices": self.n_slices,
            "slice_shape": list(self.slice_shape),
            "intensity": {
                "p1": float(lo),
                "p99": float(hi),
                "ct": bool(a.size and float(np.min(sample)) < -500),
            },
            "version": self.version,
            "voxels": {int(v): int(n) for v, n in enumerate(counts) if v and n},
            "hand_edits": {
                "painted": int(np.count_nonzero((self.edits != 0) & (self.edits != ERASED))),
                "erased": int(np.count_nonzero(self.edits == ERASED)),
            },
            "label_slices": {str(k): v for k, v in self.label_slices().items()},
            "prompts": [_prompt_dict(p) for p in self.prompts],
            "can_undo": bool(self.undo_stack),
            "can_redo": bool(self.redo_stack),
            "undo": self.undo_stack[-1].description if self.undo_stack else None,
            "redo": self.redo_stack[-1].description if self.redo_stack else None,
            "review": [{**r.to_dict(), "reviewed": r.slice in self.reviewed} for r in self.review],
            "job": self.job.to_dict(),
        }

    # --- changes (call with ``lock`` held) -------------------------------------------------
    def apply(
        self,
        description: str,
        *,
        model: np.ndarray | None = None,
        edits: np.ndarray | None = None,
        prompts: list[Prompt] | None = None,
        review: tuple[SliceReview, ...] | None = None,
        reviewed: frozenset[int] | None = None,
    ) -> HistoryEntry:
        """Make the given layers, prompts, review table and marks current as one undoable
        action; what is None stays as it is."""
        changed = np.zeros(self.labels.shape[0], bool)
        for new, old, name in ((model, self.model, "model"), (edits, self.edits, "edits")):
            if new is None:
                continue
            if new.shape != old.shape or new.dtype != np.uint8:
                raise InputError(f"{name} must be uint8 {old.shape}, got {new.dtype} {new.shape}")
            changed |= (new != old).reshape(new.shape[0], -1).any(axis=1)
        new_model = self.model if model is None else model
        new_edits = self.edits if edits is None else edits
        rows = np.flatnonzero(changed)
        z0, z1 = (int(rows[0]), int(rows[-1]) + 1) if rows.size else (0, 0)

        def block(m: np.ndarray, e: np.ndarray) -> bytes:
            return zlib.compress(np.stack([m[z0:z1], e[z0:z1]]).tobytes(), 1)

        entry = HistoryEntry(
            description=description,
            z0=z0,
            z1=z1,
            shape=(2, *self.labels[z0:z1].shape),
            before=block(self.model, self.edits),
            after=block(new_model, new_edits),
            prompts_before=tuple(self.prompts),
            prompts_after=tuple(self.prompts if prompts is None else prompts),
            reviewed_before=self.reviewed,
            reviewed_after=self.reviewed if reviewed is None else frozenset(reviewed),
            review_before=self.review,
            review_after=self.review if review is None else tuple(review),
        )
        self._set(entry, after=True)
        self.undo_stack.append(entry)
        del self.undo_stack[: max(0, len(self.undo_stack) - self.max_history)]
        self.redo_stack.clear()
        return entry

    def undo(self) -> HistoryEntry:
        if not self.undo_stack:
            raise InputError("nothing to undo")
        entry = self.undo_stack.pop()
        self._set(entry, after=False)
        self.redo_stack.append(entry)
        return entry

    def redo(self) -> HistoryEntry:
        if not self.redo_stack:
            raise InputError("nothing to redo")
        entry = self.redo_stack.pop()
        self._set(entry, after=True)
        self.undo_stack.append(entry)
        return entry

    def _set(self, entry: HistoryEntry, *, after: bool) -> None:
        data = entry.after if after else entry.before
        z0, z1 = entry.z0, entry.z1
        if z1 > z0:
            block = np.frombuffer(zlib.decompress(data), np.uint8).reshape(entry.shape)
            self.model[z0:z1] = block[0]
            self.edits[z0:z1] = block[1]
            self.labels[z0:z1] = compose_labels(block[0], block[1])
        self.prompts = list(entry.prompts_after if after else entry.prompts_before)
        self.reviewed = entry.reviewed_after if after else entry.reviewed_before
        self.review = entry.review_after if after else entry.review_before
        self.version += 1

    # --- manual edits -----------------------------------------------------------------------
    def paint(
        self, s: int, points, *, label: int = 1, radius: float, mode: str = "brush"
    ) -> HistoryEntry:
        """One stroke through ``points`` ((x, y) slice pixels) with a round tip of ``radius``
        pixels on slice ``s``, recorded in the edit layer: ``brush`` paints ``label``,
        ``erase`` clears every label, ``restore`` drops the hand edits under the stroke (the
        model's labels show again)."""
        s = self.check_slice(s)
        if mode not in ("brush", "erase", "restore"):
            raise InputError(f"edit mode must be brush, erase or restore, got {mode!r}")
        if not 1 <= int(label) <= MAX_LABEL:
            raise InputError(f"label must be 1..{MAX_LABEL}, got {label}")
        if not 0.5 <= float(radius) <= 200:
            raise InputError(f"brush radius must be 0.5..200 pixels, got {radius}")
        pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        if len(pts) == 0 or len(pts) > 10_000:
            raise InputError("a stroke needs 1..10000 points [[x, y], ...]")
        stroke = stroke_mask(self.slice_shape, pts, float(radius))
        new = self.edits.copy()
        view = np.moveaxis(new, self.axis, 0)[s]  # a view into ``new``
        view[stroke] = {"brush": int(label), "erase": ERASED, "restore": 0}[mode]
        what = {"brush": f"brush (label {label})", "erase": "eraser", "restore": "restore"}[mode]
        return self.apply(f"{what} on slice {s}", edits=new)


def stroke_mask(shape: tuple[int, int], points: np.ndarray, radius: float) -> np.ndarray:
    """(H, W) bool: discs of ``radius`` around ``points`` (x, y) and along the segments
    between consecutive points (sampled every half radius)."""
    h, w = shape
    pts = [points[0]]
    for a, b in itertools.pairwise(points):
        n = int(np.ceil(np.hypot(*(b - a)) / max(radius / 2, 0.5)))
        pts += [a + (b - a) * t for t in np.linspace(0, 1, n + 1)[1:]]
    yy, xx = np.mgrid[0:h, 0:w]
    out = np.zeros((h, w), bool)
    r2 = radius * radius
    for x, y in pts:
        x0, x1 = max(0, int(x - radius)), min(w, int(x + radius) + 2)
        y0, y1 = max(0, int(y - radius)), min(h, int(y + radius) + 2)
        if x0 >= x1 or y0 >= y1:
            continue
        sub = (xx[y0:y1, x0:x1] - x) ** 2 + (yy[y0:y1, x0:x1] - y) ** 2 <= r2
        out[y0:y1, x0:x1] |= sub
    return out


def _prompt_dict(p: Prompt) -> dict:
    return {
        "slice": p.slice,
        "label": p.label,
        "box": None if p.box is None else [float(v) for v in p.box],
        "points": [list(q) for q in p.points],
        "point_labels": list(p.point_labels),
        "source": p.source,
    }


class SessionStore:
    """Open sessions with their limits (see the module docstring). Thread-safe."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, session_id: str) -> Session:
        with self._lock:
            session = self._sessions.get(session_id)
        if session is None:
            raise KeyError(session_id)
        session.touch()
        return session

    def close(self, session_id: str) -> None:
        with self._lock:
            if self._sessions.pop(session_id, None) is None:
                raise KeyError(session_id)

    def memory_mb(self) -> float:
        with self._lock:
            return sum(s.nbytes() for s in self._sessions.values()) / 2**20

    def add(
        self,
        volume: Volume,
        *,
        name: str,
        axis: int,
        predictor: PinnedPredictor | None,
        source: Path | None = None,
    ) -> Session:
        """Open a session for ``volume``; closes idle sessions or raises ``SessionLimit``."""
        cfg = self.config
        # image (+ the predictor's copy), model, edits and labels, and room for history
        need = volume.array.nbytes * 2 + int(np.prod(volume.shape)) * 4
        with self._lock:
            self._evict_idle(need)
            if len(self._sessions) >= cfg.max_sessions:
                raise SessionLimit(
                    f"too many open sessions ({cfg.max_sessions}); close one (or wait for idle "
                    "ones to expire) and try again"
                )
            used = sum(s.nbytes() for s in self._sessions.values())
            if (used + need) / 2**20 > cfg.max_memory_mb:
                raise SessionLimit(
                    f"not enough memory for this volume: it needs {need / 2**20:.0f} MB and "
                    f"{used / 2**20:.0f} of {cfg.max_memory_mb:.0f} MB are in use; close a session"
                )
            session = Session(
                id=secrets.token_urlsafe(16),
                name=name,
                volume=volume,
                axis=int(axis),
                predictor=predictor,
                source=source,
                max_history=cfg.max_history,
            )
            self._sessions[session.id] = session
        log.info("session %s opened: %s %s", session.id[:6], name, volume.shape)
        return session

    def _evict_idle(self, need: int) -> None:
        cfg = self.config
        now = time.monotonic()
        idle = sorted(
            (s for s in self._sessions.values() if not s.busy),
            key=lambda s: s.last_used,
        )
        for s in idle:
            used = sum(x.nbytes() for x in self._sessions.values())
            full = len(self._sessions) >= cfg.max_sessions or (
                (used + need) / 2**20 > cfg.max_memory_mb
            )
            if not full:
                return
            if now - s.last_used >= cfg.idle_seconds:
                log.info("session %s closed after %.0f s idle", s.id[:6], now - s.last_used)
                del self._sessions[s.id]
