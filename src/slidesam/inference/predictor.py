"""``SlideSAMPredictor``: a volume, its cached window embeddings, and prompt -> masks.

Coordinates (one convention for every prompt and output):

- a *window* is named by its centre slice ``c`` along the slicing axis and holds slices
  ``(c-1, c, c+1)``; at the ends of the volume the missing neighbour repeats the edge slice, so
  every slice ``0..n-1`` can be a centre;
- a *slice* is the 2D array left when the slicing axis is removed from the ``(z, y, x)`` array,
  e.g. ``(y, x)`` for axial slices; its pixel coordinates are ``x`` = column, ``y`` = row;
- boxes are ``(N, 4)`` XYXY and points ``(N, P, 2)`` XY in those slice pixels (a box around a
  mask is ``(x_min, y_min, x_max, y_max)`` of its pixel indices); the predictor rescales them to
  the model's input and the masks back to the slice size.

Windows are prepared by the same functions as ``slidesam prepare`` (window, scaling, resize), so
the model sees at inference what it saw in training. A zoomed model (``SamConfig.roi_context >
0``) sees, per prompt, the square crop around it that ``slidesam.data.roi`` defines (the same
function its training used); its masks are pasted back into the slice (background outside).
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from slidesam.core import InputError, Volume
from slidesam.data.preprocess import (
    CT_WINDOW,
    SCALINGS,
    choose_slicing_axes,
    resize_image,
    scale_window,
    slice_window,
    to_uint8,
)
from slidesam.data.roi import Roi, crop, paste_logits, roi_for_box
from slidesam.modeling import Sam

__all__ = ["SlideSAMPredictor", "WindowPrediction", "stability_score"]

#: logit given to a binary mask prompt (inside +, outside -), about what SAM's decoder emits
MASK_PROMPT_LOGIT = 10.0


@dataclass(frozen=True)
class WindowPrediction:
    """Masks of N prompts on one window.

    Attributes:
        center: the window's centre slice; ``slices`` are the slice indices of the outputs:
            the three slices of the window (clamped at the volume ends), or the centre alone for
            a one-slice (plain SAM) model.
        masks: (N, K, S, H, W) bool, K candidates (3 multimask or 1), S = 3 slices in window
            order (1 for plain SAM).
        logits: (N, K, 3, H, W) float32 logits at slice resolution (mask = logits > 0).
        low_res_logits: (N, K, 3, 4E, 4E) float32 model-resolution logits (for mask prompts);
            for a zoomed model, in the frame of each prompt's crop (``rois``).
        iou: (N, K) predicted IoU per candidate (shared by the three slices).
        stability: (N, K, 3) stability score per candidate and slice (IoU of the masks
            thresholded at +1 and -1).
    """

    center: int
    slices: tuple[int, ...]
    masks: np.ndarray
    logits: np.ndarray
    low_res_logits: np.ndarray
    iou: np.ndarray
    stability: np.ndarray
    rois: tuple[Roi, ...] | None = None

    def best(self) -> np.ndarray:
        """(N,) index of the candidate with the highest predicted IoU."""
        return self.iou.argmax(axis=1)


@dataclass
class _VolumeState:
    """What the predictor holds for the current volume."""

    volume: Volume
    axis: int
    images: np.ndarray  # uint8 (fixed scaling) or raw values (window-minmax), (z, y, x)
    # key: window centre, or (centre, roi key) for a zoomed model
    embeddings: OrderedDict[object, torch.Tensor] = field(default_factory=OrderedDict)

    @property
    def n_slices(self) -> int:
        return self.volume.shape[self.axis]

    @property
    def slice_shape(self) -> tuple[int, int]:
        return tuple(s for a, s in enumerate(self.volume.shape) if a != self.axis)


class SlideSAMPredictor:
    """Wraps a (Slide-)SAM model; holds one volume and its window embeddings.

    Args:
        model: a ``Sam`` from ``slidesam.build_slidesam`` / ``load_model`` (3 slices), or a
            plain SAM (1 slice: it sees the 3-slice window as RGB and predicts the centre slice).
        device: ``cpu``, ``cuda`` or ``mps``.
        precision: ``fp32``, or ``bf16``/``fp16`` autocast (GPU only).
        window: intensity window (low, high); CT [-200, 400] by default.
        scaling: ``fixed`` or ``window-minmax``, as in ``slidesam prepare``.
        batch_size: windows encoded per forward pass.
        cache_size: most window embeddings kept (least recently used dropped first), so memory
            stays bounded on long volumes.
        merge_lora: fold LoRA into the weights for faster inference (changes ``model`` in place).
        roi_context: override the model's field of view (``SamConfig.roi_context``; 0 = whole
            slices); None = the model's own, which is what it was trained on.
    """

    def __init__(
        self,
        model: Sam,
        *,
        device: str = "cpu",
        precision: str = "fp32",
        window: tuple[float, float] = CT_WINDOW,
        scaling: str = "fixed",
        batch_size: int = 4,
        cache_size: int = 32,
        merge_lora: bool = True,
        roi_context: float | None = None,
    ):
        if not isinstance(model, Sam):
            raise TypeError(f"model must be a slidesam Sam module, got {type(model).__name__}")
        if scaling not in SCALINGS:
            raise InputError(f"scaling must be one of {', '.join(SCALINGS)}, got {scaling!r}")
        if precision not in ("fp32", "bf16", "fp16"):
            raise InputError(f"precision must be fp32, bf16 or fp16, got {precision!r}")
        self.device = torch.device(device)
        if precision != "fp32" and self.device.type != "cuda":
            raise InputError(f"precision {precision} needs a CUDA device; use fp32 on {device}")
        if batch_size < 1 or cache_size < 1:
            raise InputError("batch_size and cache_size must be at least 1")
        self.model = model.to(self.device).eval()
        if merge_lora:
            self.model.merge_lora()
        self.precision = precision
        self.window = (float(window[0]), float(window[1]))
        self.scaling = scaling
        self.batch_size = batch_size
        self.cache_size = cache_size
        context = model.config.roi_context if roi_context is None else float(roi_context)
        if not (context == 0 or context >= 1):
            raise InputError(f"roi_context must be 0 (whole slice) or >= 1, got {roi_context!r}")
        self.roi_context = context
        self.encoder_passes = 0  # windows encoded so far (cache hits are free)
        self._state: _VolumeState | None = None

    # --- volume and embeddings -------------------------------------------------------------
    def set_volume(self, volume: Volume, *, axis: int | str | None = None) -> None:
        """Hold ``volume``; slice along ``axis`` (0/1/2 or z/y/x; default: fewest voxels)."""
        if not isinstance(volume, Volume):
            raise TypeError(f"volume must be a slidesam Volume, got {type(volume).__name__}")
        if axis is None or isinstance(axis, str):
            axis = choose_slicing_axes(volume.shape, axis or "auto")[0]
        if axis not in (0, 1, 2):
            raise InputError(f"axis must be 0, 1 or 2 (z, y, x), got {axis!r}")
        images = to_uint8(volume.array, self.window) if self.scaling == "fixed" else volume.array
        self._state = _VolumeState(volume=volume, axis=int(axis), images=images)

    @property
    def state(self) -> _VolumeState:
        if self._state is None:
            raise InputError("no volume set: call set_volume(volume) first")
        return self._state

    def window_image(self, center: int, roi: Roi | None = None) -> np.ndarray:
        """(S, S, 3) model input of the window at ``center``: uint8, as ``slidesam prepare``;
        or float32 0..255, the crop ``roi`` of the window (zoomed models)."""
        st = self.state
        window = slice_window(st.images, st.axis, center, clamp=True)
        if self.scaling != "fixed":
            window = scale_window(window, self.window, self.scaling)
        if roi is None:
            return resize_image(window, self.model.image_size)
        chw = torch.from_numpy(np.ascontiguousarray(window, np.float32))  # (3, H, W)
        return crop(chw, roi, self.model.image_size).clamp_(0, 255).permute(1, 2, 0).numpy()

    def _autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def embeddings(self, centers, rois: list[Roi] | None = None) -> torch.Tensor:
        """Image embeddings (len(centers), C, E, E) for window centres (and, for a zoomed
        model, one crop per centre), computed lazily in batches and cached (LRU, at most
        ``cache_size``)."""
        st = self.state
        centers = [int(c) for c in centers]
        for c in centers:
            if not 0 <= c < st.n_slices:
                raise InputError(f"window centre {c} outside 0..{st.n_slices - 1}")
        if rois is None:
            rois = [None] * len(centers)
        elif len(rois) != len(centers):
            raise InputError(f"{len(centers)} window centres but {len(rois)} crops")
        keys = [c if r is None else (c, r.key()) for c, r in zip(centers, rois, strict=True)]
        todo = {k: (c, r) for k, c, r in zip(keys, centers, rois, strict=True)}
        todo = [(k, c, r) for k, (c, r) in todo.items() if k not in st.embeddings]
        for i in range(0, len(todo), self.batch_size):
            chunk = todo[i : i + self.batch_size]
            batch = np.stack([self.window_image(c, r) for _, c, r in chunk])  # (B, S, S, 3)
            x = torch.from_numpy(batch).to(self.device).permute(0, 3, 1, 2).float()
            with torch.inference_mode(), self._autocast():
                emb = self.model.encode(x).float()
            self.encoder_passes += len(chunk)
            for (k, _, _), e in zip(chunk, emb, strict=True):
                st.embeddings[k] = e
        out = []
        for k in keys:
            st.embeddings.move_to_end(k)
            out.append(st.embeddings[k])
        result = torch.stack(out)
        while len(st.embeddings) > self.cache_size:
            st.embeddings.popitem(last=False)
        return result

    # --- prompts -> masks --------------------------------------------------------------------
    def predict(
        self,
        window_center: int,
        *,
        boxes=None,
        points=None,
        point_labels=None,
        mask_prompt=None,
        multimask: bool = True,
    ) -> WindowPrediction:
        """Masks for N prompts on the window centred at ``window_center``.

        Args:
            boxes: (N, 4) or (4,) XYXY in slice pixels.
            points: (N, P, 2) or (P, 2) XY in slice pixels, with ``point_labels`` (N, P) or (P,):
                1 foreground, 0 background.
            mask_prompt: (N, S, H, W) or (S, H, W) at slice resolution, S = the model's slices
                (3 for Slide-SAM): bool masks (inside -> +10, outside -> -10 logits) or logits.
            multimask: the 3 candidates (True) or the single-mask output (False).
        """
        st = self.state
        h, w = st.slice_shape
        box_np = pts = lab = mask_t = None
        n = None
        if boxes is not None:
            box_np = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
            n = box_np.shape[0]
        if points is not None:
            if point_labels is None:
                raise InputError("points need point_labels (1 foreground, 0 background)")
            pts = np.asarray(points, dtype=np.float32)
            lab = np.asarray(point_labels)
            pts = pts[None] if pts.ndim == 2 else pts
            lab = lab[None] if lab.ndim == 1 else lab
            if pts.ndim != 3 or pts.shape[-1] != 2 or lab.shape != pts.shape[:2]:
                raise InputError(
                    f"points must be (N, P, 2) with labels (N, P); got {pts.shape} and {lab.shape}"
                )
            if n is not None and pts.shape[0] != n:
                raise InputError(f"{n} boxes but {pts.shape[0]} point sets: give one per prompt")
            n = pts.shape[0]
            lab = lab.astype(np.int64)
        if mask_prompt is not None:
            mask_t = self._mask_prompt(mask_prompt, (h, w))
            if n is not None and mask_t.shape[0] != n:
                raise InputError(f"{n} prompts but {mask_t.shape[0]} mask prompts")
            n = mask_t.shape[0]
        if n is None:
            raise InputError("give at least one prompt: boxes, points or mask_prompt")
        if self.roi_context == 0:
            size = self.model.image_size
            scale = np.array([size / w, size / h], np.float32)
            emb = self.embeddings([window_center])
            low, iou = self._decode(
                emb,
                None if box_np is None else (box_np.reshape(-1, 2, 2) * scale).reshape(-1, 4),
                None if pts is None else pts * scale,
                lab,
                None if mask_t is None else self._mask_side(mask_t, None),
                multimask,
            )
            b, k, s, lh, lw = low.shape
            logits = F.interpolate(
                low.reshape(b, k * s, lh, lw), size=(h, w), mode="bilinear", align_corners=False
            ).reshape(b, k, s, h, w)
            return self._result(window_center, low, iou, logits, None)
        # zoomed model: one crop, one embedding and one decoding per prompt
        size = self.model.image_size
        rois = [
            self._roi(
                None if box_np is None else box_np[i],
                None if pts is None else pts[i][lab[i] == 1],
                None if mask_t is None else mask_t[i],
            )
            for i in range(n)
        ]
        emb_all = self.embeddings([window_center] * n, rois=rois)
        lows, ious, outs = [], [], []
        for i, roi in enumerate(rois):
            low, iou = self._decode(
                emb_all[i : i + 1],
                None
                if box_np is None
                else roi.to_crop(box_np[i : i + 1].reshape(-1, 2), size).reshape(-1, 4),
                None if pts is None else roi.to_crop(pts[i : i + 1], size),
                None if lab is None else lab[i : i + 1],
                None if mask_t is None else self._mask_side(mask_t[i : i + 1], roi),
                multimask,
            )
            b, k, s, lh, lw = low.shape
            logits = paste_logits(low.reshape(b, k * s, lh, lw), roi, (h, w))
            lows.append(low)
            ious.append(iou)
            outs.append(logits.reshape(b, k, s, h, w))
        return self._result(
            window_center, torch.cat(lows), torch.cat(ious), torch.cat(outs), tuple(rois)
        )

    def _roi(self, box, fg_points, mask) -> Roi:
        """The crop of a zoomed model for one prompt: around its box, else its foreground
        points, else its mask prompt's foreground."""
        if box is None and fg_points is not None and len(fg_points):
            (x0, y0), (x1, y1) = fg_points.min(axis=0), fg_points.max(axis=0)
            box = (x0, y0, x1, y1)
        if box is None and mask is not None:
            ys, xs = np.nonzero((mask > 0).any(dim=0).cpu().numpy())
            if ys.size:
                box = (xs.min(), ys.min(), xs.max(), ys.max())
        if box is None:
            raise InputError(
                "a zoomed model (roi_context > 0) needs a box, a foreground point or a non-empty "
                "mask prompt to know where to look"
            )
        return roi_for_box(box, self.state.slice_shape, self.roi_context)

    def _decode(self, emb, boxes, points, labels, mask, multimask):
        dev = self.device
        with torch.inference_mode(), self._autocast():
            low, iou = self.model.decode(
                emb,
                points=None
                if points is None
                else (torch.from_numpy(points).to(dev), torch.from_numpy(labels).to(dev)),
                boxes=None if boxes is None else torch.from_numpy(boxes).to(dev),
                mask_prompt=None if mask is None else mask.to(dev),
                multimask_output=multimask,
            )
        return low.float(), iou.float()

    def _result(self, center, low, iou, logits, rois) -> WindowPrediction:
        n_slices = self.state.n_slices
        slices = tuple(min(max(i, 0), n_slices - 1) for i in (center - 1, center, center + 1))
        logits_np = logits.cpu().numpy()
        return WindowPrediction(
            center=int(center),
            slices=slices if logits_np.shape[2] == 3 else (int(center),),
            masks=logits_np > self.model.mask_threshold,
            logits=logits_np,
            low_res_logits=low.cpu().numpy(),
            iou=iou.cpu().numpy(),
            stability=stability_score(logits_np, self.model.mask_threshold),
            rois=rois,
        )

    def _mask_prompt(self, mask_prompt, slice_shape: tuple[int, int]) -> torch.Tensor:
        """(N, S, H, W) float logits at slice resolution."""
        m = np.asarray(mask_prompt)
        s = self.model.num_slices
        m = m[None] if m.ndim == 3 else m
        if m.ndim != 4 or m.shape[1] != s or m.shape[2:] != slice_shape:
            raise InputError(
                f"mask_prompt must be (N, {s}, {slice_shape[0]}, {slice_shape[1]}) at slice "
                f"resolution, got {m.shape}"
            )
        return torch.from_numpy(
            np.where(m, MASK_PROMPT_LOGIT, -MASK_PROMPT_LOGIT)
            if m.dtype == bool
            else m.astype(np.float32)
        ).float()

    def _mask_side(self, mask: torch.Tensor, roi: Roi | None) -> torch.Tensor:
        """Mask prompt logits at the decoder's mask-input side (4 x the embedding side)."""
        side = 4 * self.model.image_encoder.pos_embed.shape[1]
        if roi is not None:
            # outside the slice the crop pads zeros: give it background logits instead
            return crop(mask + MASK_PROMPT_LOGIT, roi, side) - MASK_PROMPT_LOGIT
        return F.interpolate(mask, size=(side, side), mode="bilinear", align_corners=False)


def stability_score(logits: np.ndarray, threshold: float = 0.0, offset: float = 1.0) -> np.ndarray:
    """IoU of the masks at ``threshold + offset`` and ``threshold - offset``, over the last two
    axes (SAM's stability score); 0 where even the loose mask is empty."""
    tight = (logits > threshold + offset).sum(axis=(-2, -1))
    loose = (logits > threshold - offset).sum(axis=(-2, -1))
    return np.where(loose > 0, tight / np.maximum(loose, 1), 0.0).astype(np.float32)
