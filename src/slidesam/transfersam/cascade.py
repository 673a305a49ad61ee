"""The trained cascade: one folder, loaded with one call, predicting KiTS label maps.

Folder::

    CASCADE/cascade.json        {"format": "slidesam-transfersam", "version": 1,
                                 "encoder": EncoderRef (with fingerprint),
                                 "config": CascadeConfig, "decoders": {name: file}}
    CASCADE/decoder_roi.pt      ROI decoder (kidney + masses)
    CASCADE/decoder_tumor.pt    tumor decoder
    CASCADE/decoder_cyst.pt     cyst decoder
    CASCADE/train_*.csv|yaml    training logs and configs (not needed to predict)

Per axial slice (the seed's ``Predictor``): ROI decoder with the fixed box -> logits > threshold
-> small components removed -> empty: the slice is background; else kidney boxes (one, or left
and right when split), grown by the expected training growth -> tumor and cyst decoders on every
box, each box's logits kept on its side of the split only, the max over boxes -> per pixel
argmax over (background 0, kidney eps inside the ROI mask, tumor logit, cyst logit) -> labels
0/1/2/3. Logits are upsampled (bilinear) from the decoder's 4E x 4E to the slice's own size.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from slidesam.core import InputError, Volume
from slidesam.data.io import image_suffix, read_image, write_mask
from slidesam.modeling import Sam
from slidesam.transfersam.boxes import (
    expand_box_mean,
    kidney_boxes,
    remove_small_components,
    roi_box,
)
from slidesam.transfersam.config import (
    DECODERS,
    BoxConfig,
    CascadeConfig,
    EmbedConfig,
    EncoderRef,
)
from slidesam.transfersam.data import axial_axis, find_images
from slidesam.transfersam.decoders import BoxDecoder, load_decoder
from slidesam.transfersam.encoder import build_encoder, embed_slices

__all__ = [
    "CASCADE_FORMAT",
    "Cascade",
    "fuse_labels",
    "load_cascade",
    "predict_path",
    "update_cascade_json",
]

log = logging.getLogger(__name__)

CASCADE_FORMAT = "slidesam-transfersam"
_JSON = "cascade.json"
_KIDNEY_EPS = 1e-6


def update_cascade_json(
    folder: str | Path, encoder: EncoderRef, embed: EmbedConfig, boxes: BoxConfig
) -> Path:
    """Create ``cascade.json`` or check that an existing one has the same encoder and embed
    settings (a decoder trained on other features cannot join); the box settings are updated."""
    folder = Path(folder)
    path = folder / _JSON
    batch_size = CascadeConfig().batch_size
    if path.is_file():
        old_ref, old_cfg = _read_json(folder)
        if not old_ref.same_encoder(encoder):
            raise InputError(
                f"{folder}: a cascade on the {old_ref.describe()} ({old_ref.fingerprint}); this "
                f"cache was made with the {encoder.describe()} ({encoder.fingerprint})"
            )
        diff = old_cfg.embed.differences(embed)
        if diff:
            raise InputError(
                f"{folder}: a cascade with other embed settings than this cache ("
                + ", ".join(
                    f"{k}: {a!r} in the cascade, {b!r} in the cache" for k, (a, b) in diff.items()
                )
                + ")"
            )
        if old_cfg.boxes != boxes:
            log.warning("%s: box settings changed by this training run; updated", path)
        batch_size = old_cfg.batch_size
    folder.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": CASCADE_FORMAT,
        "version": 1,
        "encoder": encoder.to_dict(),
        "config": CascadeConfig(embed=embed, boxes=boxes, batch_size=batch_size).to_dict(),
        "decoders": {name: f"decoder_{name}.pt" for name in DECODERS},
    }
    tmp = folder / f".tmp-{_JSON}"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def _read_json(folder: Path) -> tuple[EncoderRef, CascadeConfig]:
    path = folder / _JSON
    if not path.is_file():
        raise InputError(f"{folder}: not a TransferSAM cascade folder (no {_JSON})")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        raise InputError(f"{path}: unreadable JSON") from None
    if not isinstance(meta, dict) or meta.get("format") != CASCADE_FORMAT:
        raise InputError(f"{path}: not a TransferSAM cascade description")
    return EncoderRef.from_dict(meta["encoder"]), CascadeConfig.from_dict(meta["config"])


def fuse_labels(
    roi: np.ndarray, tumor: np.ndarray, cyst: np.ndarray, eps: float = _KIDNEY_EPS
) -> np.ndarray:
    """KiTS labels from one slice's ROI mask and tumor/cyst logits (all ``(H, W)``).

    Per pixel: argmax over (0, eps if ROI else 0, tumor, cyst), ties to the lower label; so a
    pixel is tumor or cyst where that logit is positive and the larger, kidney where neither is
    positive inside the ROI, else background.
    """
    scores = np.stack(
        [np.zeros(roi.shape, np.float32), np.where(roi, eps, 0.0), tumor, cyst]
    ).astype(np.float32)
    return np.argmax(scores, axis=0).astype(np.uint8)


@dataclass
class Cascade:
    """A loaded cascade: the frozen SAM, the three decoders and the inference settings."""

    sam: Sam
    decoders: dict[str, BoxDecoder]
    config: CascadeConfig
    encoder: EncoderRef
    device: str = "cpu"

    @property
    def mask_size(self) -> int:
        return 4 * self.sam.config.embedding_size

    def _logits(self, name: str, emb: torch.Tensor, boxes: np.ndarray, hw) -> np.ndarray:
        """(B, H, W) logits of decoder ``name`` for boxes (B, 4) in slice pixels."""
        h, w = hw
        s = self.sam.image_size
        inp = boxes * np.array([s / w, s / h, s / w, s / h])
        with torch.no_grad():
            low = self.decoders[name](
                emb.to(self.device), torch.as_tensor(inp, dtype=torch.float32, device=self.device)
            )
            up = F.interpolate(low[:, None], size=(h, w), mode="bilinear", align_corners=False)
        return up[:, 0].cpu().numpy()

    def predict_slices(self, emb: torch.Tensor, hw: tuple[int, int]) -> tuple[np.ndarray, dict]:
        """Labels (B, H, W) uint8 for a batch of slice embeddings (B, C, E, E)."""
        b = emb.shape[0]
        cfg = self.config.boxes
        h, w = hw
        roi_logits = self._logits("roi", emb, np.tile(roi_box(hw, cfg), (b, 1)), hw)
        labels = np.zeros((b, h, w), np.uint8)
        owners, boxes, cols, rois = [], [], [], {}
        min_px = cfg.min_component_px * (w / 512.0) ** 2
        split = 0
        for i in range(b):
            roi = remove_small_components(roi_logits[i] > cfg.roi_threshold, min_px)
            if not roi.any():
                continue
            rois[i] = roi
            kb = kidney_boxes(roi, cfg)
            split += kb.split_x is not None
            for box, region in zip(kb.boxes, kb.regions(w), strict=True):
                owners.append(i)
                boxes.append(expand_box_mean(box, hw, cfg))
                cols.append(region)
        stats = {"roi_slices": len(rois), "split_slices": split, "boxes": len(boxes)}
        if not boxes:
            return labels, stats
        sub = emb[np.asarray(owners)]
        boxes = np.stack(boxes)
        per_class = {}
        for name in ("tumor", "cyst"):
            logits = self._logits(name, sub, boxes, hw)
            best = np.full((b, h, w), -np.inf, np.float32)
            for k, (i, region) in enumerate(zip(owners, cols, strict=True)):
                best[i][:, region] = np.maximum(best[i][:, region], logits[k][:, region])
            per_class[name] = best
        for i, roi in rois.items():
            labels[i] = fuse_labels(roi, per_class["tumor"][i], per_class["cyst"][i])
        return labels, stats

    def predict_volume(self, volume: Volume, *, progress: bool = False) -> tuple[Volume, dict]:
        """KiTS label map (uint8 0..3) of a CT volume (HU), on exactly its grid."""
        axis = axial_axis(volume.geometry)
        n = volume.shape[axis]
        out = np.zeros(volume.shape, np.uint8)
        view = np.moveaxis(out, axis, 0)  # writes go through to ``out``
        hw = view.shape[1:]
        bs = self.config.batch_size
        stats = {"slices": n, "roi_slices": 0, "split_slices": 0, "boxes": 0}
        starts = range(0, n, bs)
        for start in tqdm(starts, desc="predict", unit="batch", disable=not progress):
            idx = np.arange(start, min(start + bs, n))
            emb = embed_slices(
                self.sam,
                volume.array,
                axis,
                idx,
                window=self.config.embed.window,
                batch_size=bs,
                device=self.device,
            )
            labels, st = self.predict_slices(torch.from_numpy(emb.astype(np.float32)), hw)
            view[idx] = labels
            for k, v in st.items():
                stats[k] += v
        return volume.with_array(out), stats


def load_cascade(folder: str | Path, *, device: str = "cpu") -> Cascade:
    """Load a cascade folder: rebuild (and fingerprint-check) the encoder, load the decoders."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: no such cascade folder")
    ref, config = _read_json(folder)
    missing = [n for n in DECODERS if not (folder / f"decoder_{n}.pt").is_file()]
    if missing:
        raise InputError(
            f"{folder}: decoder(s) {', '.join(missing)} not trained yet; run "
            "'slidesam transfersam train --decoder NAME' for each"
        )
    sam, ref = build_encoder(ref, device=device)
    decoders = {}
    for name in DECODERS:
        dec, meta = load_decoder(folder / f"decoder_{name}.pt", sam, name=name)
        if meta.get("encoder_fingerprint") not in (None, ref.fingerprint):
            raise InputError(f"{folder}/decoder_{name}.pt: trained on another encoder")
        decoders[name] = dec.to(device)
    return Cascade(sam=sam, decoders=decoders, config=config, encoder=ref, device=device)


def predict_path(
    cascade: Cascade, images: str | Path, out: str | Path, *, progress: bool = True
) -> list[dict]:
    """Predict one image file or every image of a folder; write label maps with the input's
    exact geometry. A single file with an image-suffixed ``out`` is written there; otherwise
    ``out`` is a folder receiving ``CASE`` + the input's ending.

    Returns:
        one record per case: case, output path, stats.
    """
    cases = find_images(images)
    out = Path(out)
    single_file = len(cases) == 1 and Path(images).is_file() and image_suffix(out)
    records = []
    for case in tqdm(cases, desc="cases", unit="case", disable=not progress or len(cases) == 1):
        volume = read_image(case.image)
        labels, stats = cascade.predict_volume(volume, progress=progress and len(cases) == 1)
        path = (
            out if single_file else out / f"{case.case_id}{image_suffix(case.image) or '.nii.gz'}"
        )
        write_mask(labels.array, volume, path)
        records.append({"case": case.case_id, "output": str(path), **stats})
    return records
