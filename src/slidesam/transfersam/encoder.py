"""The frozen SAM behind the cascade: built from an :class:`EncoderRef`, fingerprinted, and used
to embed CT slices in batches."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import replace

import numpy as np
import torch

from slidesam.core.config import variant_config
from slidesam.core.errors import InputError
from slidesam.modeling import Sam, build_model
from slidesam.transfersam.config import EncoderRef
from slidesam.transfersam.data import slice_to_rgb

__all__ = ["build_encoder", "embed_slices", "fingerprint"]

log = logging.getLogger(__name__)


def fingerprint(model: Sam) -> str:
    """SHA-256 (first 16 hex digits) of the image and prompt encoder weights, in key order."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        if name.startswith(("image_encoder.", "prompt_encoder.")):
            h.update(name.encode())
            h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def build_encoder(ref: EncoderRef, *, device: str = "cpu") -> tuple[Sam, EncoderRef]:
    """The frozen SAM (eval mode, no gradients) and the reference with its fingerprint.

    A reference that already carries a fingerprint must match the rebuilt weights.
    """
    if ref.checkpoint is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(ref.seed)
            model = build_model(variant_config(ref.variant))
    else:
        from slidesam.inference.models import build_sam

        model = build_sam(ref.variant, ref.checkpoint, device="cpu")
    model.eval().requires_grad_(False)
    found = fingerprint(model)
    if ref.fingerprint is not None and ref.fingerprint != found:
        raise InputError(
            f"the {ref.describe()} has fingerprint {found}, but the cache/cascade was made with "
            f"{ref.fingerprint}: another checkpoint file, or another torch version's random "
            "initialisation; re-embed with this encoder"
        )
    return model.to(device), replace(ref, fingerprint=found)


@torch.no_grad()
def embed_slices(
    model: Sam,
    volume_array: np.ndarray,
    axis: int,
    indices: np.ndarray,
    *,
    window: tuple[float, float],
    batch_size: int,
    device: str = "cpu",
    jitters: np.ndarray | None = None,
) -> np.ndarray:
    """Image embeddings of the slices ``indices`` along ``axis`` of a (Z, Y, X) HU array.

    ``jitters``: optional (N, 2) contrast factor and brightness shift per slice
    (:func:`~slidesam.transfersam.data.jitter_grey`), applied to the windowed grey values.

    Returns:
        (N, C, E, E) float16 (C = prompt dim, 256 for SAM; E = image_size / patch_size).
    """
    if batch_size < 1:
        raise InputError(f"batch size must be >= 1, got {batch_size}")
    if jitters is not None and np.shape(jitters) != (len(indices), 2):
        raise InputError(f"jitters must be ({len(indices)}, 2), got {np.shape(jitters)}")
    size = model.image_size
    out = []
    for start in range(0, len(indices), batch_size):
        chunk = indices[start : start + batch_size]
        rgb = np.stack(
            [
                slice_to_rgb(
                    np.take(volume_array, int(i), axis=axis),
                    window,
                    size,
                    None if jitters is None else tuple(jitters[start + k]),
                )
                for k, i in enumerate(chunk)
            ]
        )
        x = torch.from_numpy(rgb).permute(0, 3, 1, 2).float().to(device)
        out.append(model.encode(x).to("cpu", torch.float16).numpy())
    if not out:
        e = model.config.embedding_size if model.config else 0
        return np.zeros((0, model.prompt_encoder.embed_dim, e, e), np.float16)
    return np.concatenate(out)
