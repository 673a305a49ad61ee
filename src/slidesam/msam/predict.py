"""Whole-volume M-SAM inference: resample, crop around the prompt, tile and blend, paste back.

:class:`MSamPredictor` wraps a stateless ``Sam3D`` with its preprocessing. ``segment`` does:

1. **Working grid**: the image is resampled (linear) to ``preprocess.spacing`` on the standard
   axial grid (:func:`slidesam.msam.data.to_working_grid`) and z-normalised.
2. **Prompts** (``slidesam.core.prompts.Prompt``, the ``slidesam segment`` JSON): points are
   (x, y) on slice z of the input; a box becomes a positive click at its centre plus mask-free
   refinement; both are mapped through world coordinates to working-grid voxels. Prompts with the
   same label are one object.
3. **Crop and tiles**: crops are cubes of the model's input size on a lattice with stride
   ``size * (1 - overlap)``, starting with the tiles that cover the prompts' extent (a box's
   side, the spread of the clicks). A tile holding clicks is refined ``iterations`` times with
   them; a tile without clicks starts from the blended logits already predicted there (mask-only
   refinement) and is skipped if they hold no object. Whenever a tile predicts object voxels on a
   face that lies inside the volume, the unvisited neighbour across it is added (up to
   ``max_tiles``): objects larger than one crop are followed across tiles.
4. **Blending**: each tile's logits (upsampled from the low-resolution output) are weighted by a
   separable Hann window ``sin^2(pi (i + 0.5) / size)`` that falls to ~0 at the tile faces, summed
   and divided by the summed weights. Every tile's contribution fades out continuously before its
   border, so the blended map has no seams (a constant output stays constant, a smooth one
   smooth); voxels no tile covered are background.
5. **Paste back**: the blended logits are resampled (linear) onto the input's own grid and
   thresholded at 0; several objects take the label of the largest logit. The mask has exactly
   the input's shape, spacing, origin and direction.
"""

from __future__ import annotations

import heapq
import logging
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from slidesam.core import Geometry, InputError, Volume
from slidesam.core.prompts import Prompt
from slidesam.modeling.sam3d import Sam3D
from slidesam.msam.config import PreprocessConfig
from slidesam.msam.data import crop_or_pad, paste_box, to_working_grid
from slidesam.msam.refine import refine, upsample
from slidesam.stage1.unet import resample

__all__ = ["MSamPredictor", "ObjectClicks", "hann_window"]

log = logging.getLogger(__name__)
_OUTSIDE = -20.0  # logit of voxels no tile covered


def hann_window(size: int) -> np.ndarray:
    """(size, size, size) float32 separable ``sin^2(pi (i + 0.5) / size)`` weights."""
    w = np.sin(np.pi * (np.arange(size) + 0.5) / size) ** 2
    return (w[:, None, None] * w[None, :, None] * w[None, None, :]).astype(np.float32)


@dataclass
class ObjectClicks:
    """One object's clicks on the working grid: (N, 3) (z, y, x) voxels, labels (N,) 1 / 0, and
    the extent (lo, hi) the prompts span (box sides, click spread)."""

    label: int
    points: np.ndarray
    labels: np.ndarray
    lo: np.ndarray
    hi: np.ndarray


@dataclass
class _Blend:
    logits: np.ndarray  # weighted sum of tile logits
    weights: np.ndarray  # sum of weights
    done: set = field(default_factory=set)

    def value(self) -> np.ndarray:
        out = np.full(self.logits.shape, _OUTSIDE, dtype=np.float32)
        np.divide(self.logits, self.weights, out=out, where=self.weights > 1e-12)
        return out


class MSamPredictor:
    """An M-SAM model with its preprocessing; ``segment`` a volume from prompts.

    Args:
        model: the 3D SAM (eval mode is set here).
        preprocess: working spacing and normalisation (from the checkpoint).
        iterations: decoder passes per tile (1 = no refinement).
        overlap: fraction of the crop shared by neighbouring tiles, in [0, 0.9].
        max_tiles: tiles per object at most.
        device: torch device.
    """

    def __init__(
        self,
        model: Sam3D,
        preprocess: PreprocessConfig,
        *,
        iterations: int = 3,
        overlap: float = 0.5,
        max_tiles: int = 27,
        device: str = "cpu",
    ):
        if iterations < 1:
            raise InputError(f"iterations must be >= 1, got {iterations}")
        if not 0 <= overlap <= 0.9:
            raise InputError(f"overlap must lie in [0, 0.9], got {overlap}")
        if max_tiles < 1:
            raise InputError(f"max_tiles must be >= 1, got {max_tiles}")
        self.model = model.eval().to(device)
        self.preprocess = preprocess
        self.iterations = iterations
        self.size = int(model.image_encoder.img_size)
        self.stride = max(1, round(self.size * (1 - overlap)))
        self.max_tiles = max_tiles
        self.device = torch.device(device)
        self.window = hann_window(self.size)

    # --- prompts --------------------------------------------------------------------------
    def object_clicks(self, prompts: list[Prompt], source: Geometry, work: Geometry) -> list:
        """Group prompts by label and map them to working-grid voxels (see module doc)."""
        groups: dict[int, list[Prompt]] = defaultdict(list)
        for p in prompts:
            if p.mask is not None:
                raise InputError(
                    f"prompt (label {p.label}): mask prompts are not supported by msam"
                )
            p.check_fits(source.shape[0], source.shape[1:])
            groups[p.label].append(p)
        objects = []
        for label, items in sorted(groups.items()):
            pts, labs, extent = [], [], []
            for p in items:
                for (x, y), lab in zip(p.points, p.point_labels, strict=True):
                    pts.append((p.slice, y, x))
                    labs.append(lab)
                if p.box is not None:
                    x0, y0, x1, y1 = p.box
                    pts.append((p.slice, (y0 + y1) / 2, (x0 + x1) / 2))
                    labs.append(1)
                    # the box's in-plane extent; its z extent is unknown: assume its larger side
                    half_z = max((x1 - x0) * source.spacing[2], (y1 - y0) * source.spacing[1]) / 2
                    dz = half_z / source.spacing[0]
                    for z in (p.slice - dz, p.slice + dz):
                        extent += [(z, y0, x0), (z, y1, x1)]
            if not any(v == 1 for v in labs):
                raise InputError(f"object with label {label} has no positive point or box")
            world = source.index_to_world(np.asarray(pts, dtype=np.float64))
            w_pts = work.world_to_index(world)
            w_ext = w_pts
            if extent:
                w_ext = np.concatenate(
                    [w_pts, work.world_to_index(source.index_to_world(np.asarray(extent)))]
                )
            pos = w_ext[
                np.concatenate([np.asarray(labs) == 1, np.ones(len(w_ext) - len(labs), bool)])
            ]
            objects.append(
                ObjectClicks(
                    label=label,
                    points=w_pts.astype(np.float32),
                    labels=np.asarray(labs, dtype=np.int64),
                    lo=pos.min(0),
                    hi=pos.max(0),
                )
            )
        return objects

    # --- tiles ----------------------------------------------------------------------------
    def _first_tiles(self, obj: ObjectClicks) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
        """Lattice anchor (start of tile (0, 0, 0)) and the tiles covering the prompts' extent."""
        extent = obj.hi - obj.lo
        counts = [
            1 if e + 1 <= self.size else int(np.ceil((e + 1 - self.size) / self.stride)) + 1
            for e in extent
        ]
        span = np.asarray([(n - 1) * self.stride + self.size for n in counts])
        centre = (obj.lo + obj.hi) / 2
        anchor = np.rint(centre - (span - 1) / 2).astype(int)
        tiles = [
            (i, j, k) for i in range(counts[0]) for j in range(counts[1]) for k in range(counts[2])
        ]
        return anchor, tiles

    def _tile_logits(
        self, image: np.ndarray, pad: float, start: np.ndarray, clicks, mask_prompt
    ) -> np.ndarray:
        """(S, S, S) logits of one tile (the refinement loop on one encoding)."""
        x = torch.from_numpy(crop_or_pad(image, start, self.size, pad))[None, None].to(self.device)
        with torch.no_grad():
            emb = self.model.encode(x)
            points = None
            if clicks is not None:
                pts, labs = clicks
                points = (
                    torch.from_numpy(pts)[None].to(self.device),
                    torch.from_numpy(labs)[None].to(self.device),
                )
            prompt = None
            if mask_prompt is not None:
                m = torch.from_numpy(mask_prompt)[None, None].to(self.device)
                size_l = self.model.prompt_encoder.mask_input_size
                prompt = F.interpolate(m, size=(size_l,) * 3, mode="trilinear", align_corners=False)
            outs = refine(
                self.model, emb, iterations=self.iterations, points=points, mask_prompt=prompt
            )
            return upsample(outs[-1], self.size)[0, 0].float().cpu().numpy()

    def _segment_object(self, image: np.ndarray, pad: float, obj: ObjectClicks) -> np.ndarray:
        anchor, first = self._first_tiles(obj)
        blend = _Blend(np.zeros(image.shape, np.float32), np.zeros(image.shape, np.float32))
        centre = (obj.lo + obj.hi) / 2
        queue: list = []
        for t in first:
            start = anchor + np.asarray(t) * self.stride
            heapq.heappush(queue, (0, float(np.abs(start + self.size / 2 - centre).sum()), t))
        queued = set(first)
        while queue and len(blend.done) < self.max_tiles:
            _, _, t = heapq.heappop(queue)
            start = anchor + np.asarray(t) * self.stride
            local = obj.points - start
            inside = np.all((local >= -0.5) & (local <= self.size - 0.5), axis=1)
            box = paste_box(start, self.size, image.shape)
            if box is None:
                continue
            src, dst = box
            clicks, prompt = None, None
            if inside.any():
                clicks = (local[inside].astype(np.float32), obj.labels[inside])
            else:
                prior = crop_or_pad(blend.value(), start, self.size, _OUTSIDE)
                if not (prior > 0).any():
                    continue
                prompt = prior
            logits = self._tile_logits(image, pad, start, clicks, prompt)
            blend.logits[src] += (self.window * logits)[dst]
            blend.weights[src] += self.window[dst]
            blend.done.add(t)
            fg = logits > 0
            for axis in range(3):
                for side, face in ((-1, 0), (1, self.size - 1)):
                    n = list(t)
                    n[axis] += side
                    n = tuple(n)
                    g = int(start[axis]) + face  # the face's index in the volume
                    if n in queued or not 0 < g < image.shape[axis] - 1:
                        continue  # done, or nothing lies beyond the volume's border
                    if not np.take(fg, face, axis=axis)[dst[:axis] + dst[axis + 1 :]].any():
                        continue
                    nstart = anchor + np.asarray(n) * self.stride
                    if paste_box(nstart, self.size, image.shape) is None:
                        continue
                    queued.add(n)
                    heapq.heappush(queue, (1, float(np.abs(nstart - start).sum()), n))
        if queue and len(blend.done) >= self.max_tiles:
            log.warning(
                "object %d: max_tiles (%d) reached; the mask may be cut", obj.label, self.max_tiles
            )
        log.debug("object %d: %d tile(s)", obj.label, len(blend.done))
        return blend.value()

    # --- the public call --------------------------------------------------------------------
    def segment(self, volume: Volume, prompts: list[Prompt]) -> np.ndarray:
        """Label mask (uint8, the input's (z, y, x) shape and grid) of the prompted objects."""
        if not prompts:
            raise InputError("no prompts given; M-SAM needs at least one point or box per object")
        image, work = to_working_grid(volume, self.preprocess)
        objects = self.object_clicks(prompts, volume.geometry, work)
        pad = float(image.min())
        best = np.full(volume.shape, 0.0, dtype=np.float32)
        out = np.zeros(volume.shape, dtype=np.uint8)
        for obj in objects:
            logits = self._segment_object(image, pad, obj)
            back = resample(logits, work, volume.geometry, linear=True)
            win = back > best
            out[win] = obj.label
            best = np.maximum(best, back)
        return out
