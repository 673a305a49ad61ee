"""The embedding cache: SAM image embeddings of selected slices, computed once per case.

Layout (no pickle anywhere: ``np.load(..., allow_pickle=False)``)::

    CACHE/cache.json                 encoder reference (with fingerprint), EmbedConfig, dataset
    CACHE/CASE/embeddings.npy        (N, C, E, E) float16, memory-mapped when training
    CACHE/CASE/slices.npz            indices (N,) int64 slice numbers along ``axis``,
                                     positive (N,) bool (any label > 0), labels (N, H, W) uint8
                                     KiTS labels of those slices, axis () int64;
                                     with contrast copies also contrast (K, N, 2) float64:
                                     each copy's contrast factor and brightness shift
    CACHE/CASE/contrast.npy          (K, N, C, E, E) float16: embeddings of the K =
                                     ``contrast_copies`` contrast-jittered copies of each
                                     slice (only when K > 0; a cache with K = 0 is unchanged)

A case folder is written as ``.tmp-CASE`` and renamed when complete, so an interrupted run
leaves no half case and a re-run skips the finished ones (resumable).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from slidesam.core import InputError
from slidesam.data.io import read_image, read_label
from slidesam.transfersam.config import EmbedConfig, EncoderRef
from slidesam.transfersam.data import axial_axis, contrast_jitters, find_cases, select_slices

__all__ = [
    "CACHE_FORMAT",
    "CacheInfo",
    "CaseCache",
    "cache_settings",
    "embed_dataset",
    "open_cache",
    "read_case",
]

log = logging.getLogger(__name__)

CACHE_FORMAT = "slidesam-transfersam-cache"
_META = "cache.json"


@dataclass(frozen=True)
class CacheInfo:
    """A cache folder's metadata and its finished cases (sorted)."""

    folder: Path
    encoder: EncoderRef
    embed: EmbedConfig
    cases: tuple[str, ...]


@dataclass
class CaseCache:
    """One case of the cache.

    Attributes:
        embeddings: (N, C, E, E) float16 (a read-only memory map when ``mmap``).
        indices: (N,) slice numbers along ``axis`` of the case's (z, y, x) array.
        positive: (N,) True where the slice holds foreground (else a blank slice).
        labels: (N, H, W) uint8 KiTS labels of those slices.
        axis: the slicing (axial) array axis.
        copies: (K, N, C, E, E) float16 embeddings of the K contrast-jittered copies of each
            slice (memory-mapped like ``embeddings``), ``None`` when the cache has none.
        jitters: (K, N, 2) contrast factor and brightness shift of each copy, or ``None``.
    """

    case_id: str
    embeddings: np.ndarray
    indices: np.ndarray
    positive: np.ndarray
    labels: np.ndarray
    axis: int
    copies: np.ndarray | None = None
    jitters: np.ndarray | None = None


def _write_meta(folder: Path, encoder: EncoderRef, embed: EmbedConfig, dataset: str) -> None:
    meta = {
        "format": CACHE_FORMAT,
        "version": 1,
        "encoder": encoder.to_dict(),
        "embed": embed.to_dict(),
        "dataset": dataset,
    }
    tmp = folder / f".tmp-{_META}"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, folder / _META)


def cache_settings(folder: Path) -> tuple[EncoderRef, EmbedConfig]:
    path = folder / _META
    if not path.is_file():
        raise InputError(
            f"{folder}: no embedding cache here (no {_META}); run 'slidesam transfersam embed' "
            "first"
        )
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        raise InputError(f"{path}: unreadable cache metadata") from None
    if not isinstance(meta, dict) or meta.get("format") != CACHE_FORMAT:
        raise InputError(f"{path}: not a TransferSAM cache")
    return EncoderRef.from_dict(meta["encoder"]), EmbedConfig.from_dict(meta["embed"])


def open_cache(folder: str | Path) -> CacheInfo:
    """The cache's metadata and finished cases; an ``InputError`` if there is none or no case."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: no such cache folder; run 'slidesam transfersam embed' first")
    encoder, embed = cache_settings(folder)
    cases = tuple(
        sorted(p.name for p in folder.iterdir() if p.is_dir() and (p / "slices.npz").is_file())
    )
    if not cases:
        raise InputError(f"{folder}: the cache holds no embedded case yet")
    return CacheInfo(folder, encoder, embed, cases)


def read_case(
    folder: str | Path, case_id: str, *, mmap: bool = True, copies: int | None = None
) -> CaseCache:
    """Load one cached case (embeddings memory-mapped unless ``mmap=False``).

    ``copies``: the number of contrast copies the cache's settings promise; checked when given.
    """
    case_dir = Path(folder) / case_id
    mode = "r" if mmap else None
    copy_emb = jitters = None
    try:
        emb = np.load(case_dir / "embeddings.npy", mmap_mode=mode, allow_pickle=False)
        with np.load(case_dir / "slices.npz", allow_pickle=False) as z:
            indices, positive, labels, axis = (
                z["indices"],
                z["positive"],
                z["labels"],
                int(z["axis"]),
            )
            if "contrast" in z.files:
                jitters = z["contrast"]
        if jitters is not None:
            copy_emb = np.load(case_dir / "contrast.npy", mmap_mode=mode, allow_pickle=False)
    except (OSError, KeyError, ValueError) as exc:
        raise InputError(
            f"{case_dir}: unreadable cache entry ({exc}); delete it and re-embed"
        ) from None
    if not (len(emb) == len(indices) == len(positive) == len(labels)):
        raise InputError(f"{case_dir}: inconsistent cache entry; delete it and re-embed")
    if copy_emb is not None and (
        copy_emb.shape[1:] != emb.shape or jitters.shape != (len(copy_emb), len(emb), 2)
    ):
        raise InputError(f"{case_dir}: inconsistent contrast copies; delete it and re-embed")
    found = 0 if copy_emb is None else len(copy_emb)
    if copies is not None and found != copies:
        raise InputError(
            f"{case_dir}: holds {found} contrast copies per slice, the cache's settings say "
            f"{copies}; delete the case folder and re-embed"
        )
    return CaseCache(case_id, emb, indices, positive.astype(bool), labels, axis, copy_emb, jitters)


def _case_rng(seed: int, case_id: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(case_id.encode())])


def embed_dataset(
    dataset: str | Path,
    cache: str | Path,
    encoder: EncoderRef,
    config: EmbedConfig | None = None,
    *,
    batch_size: int = 4,
    device: str = "cpu",
    progress: bool = True,
) -> dict:
    """Embed the selected slices of every labelled case of ``dataset`` into ``cache``.

    Finished cases are skipped (resumable); a cache made with another encoder or other embed
    settings (window, slice selection, contrast copies and their jitter range) is refused.
    With ``config.contrast_copies = K`` > 0 each kept slice is also embedded K times with a
    seeded contrast/brightness jitter (``contrast.npy``), costing K more encoder passes and
    K times the embedding storage. Slices: every slice with any label > 0 plus ``blank_ratio``
    times as many random blank slices, at most ``max_slices`` per case (``select_slices``).

    Returns:
        summary: cases, embedded, skipped, slices embedded, contrast copies embedded, seconds
        (encoder time, copies included), slices_per_s (encoder passes per second),
        mb_per_case (mean size on disk of the embedded cases), encoder fingerprint.
    """
    from slidesam.transfersam.encoder import build_encoder, embed_slices

    config = config or EmbedConfig()
    cases = find_cases(dataset)
    cache = Path(cache)
    if cache.exists() and not cache.is_dir():
        raise InputError(f"{cache}: exists and is not a folder")
    if (cache / _META).is_file():
        old_enc, old_embed = cache_settings(cache)
        if old_embed.differences(config):
            diff = ", ".join(
                f"{k}: {a!r} in the cache, {b!r} asked"
                for k, (a, b) in old_embed.differences(config).items()
            )
            raise InputError(
                f"{cache}: made with other embed settings ({diff}); use another cache folder "
                "or the same settings"
            )
        if not old_enc.same_encoder(encoder):
            raise InputError(
                f"{cache}: made with the {old_enc.describe()}, not the {encoder.describe()}; "
                "use another cache folder"
            )
        encoder = old_enc if encoder.fingerprint is None else encoder
    todo = [c for c in cases if not (cache / c.case_id / "slices.npz").is_file()]
    summary = {
        "cases": len(cases),
        "embedded": 0,
        "skipped": len(cases) - len(todo),
        "slices": 0,
        "contrast_copies": 0,
        "seconds": 0.0,
    }
    sizes = []
    t_embed = 0.0
    if todo:
        model, encoder = build_encoder(encoder, device=device)
        cache.mkdir(parents=True, exist_ok=True)
        _write_meta(cache, encoder, config, str(dataset))
        for case in tqdm(todo, desc="embed", unit="case", disable=not progress):
            image = read_image(case.image)
            label = read_label(case.label, reference=image)
            axis = axial_axis(image.geometry)
            positive_all = np.moveaxis(label.array, axis, 0).reshape(label.shape[axis], -1).any(1)
            idx = select_slices(
                positive_all,
                max_slices=config.max_slices,
                blank_ratio=config.blank_ratio,
                rng=_case_rng(config.seed, case.case_id),
            )
            t0 = time.perf_counter()
            emb = embed_slices(
                model,
                image.array,
                axis,
                idx,
                window=config.window,
                batch_size=batch_size,
                device=device,
            )
            jitters = contrast_jitters(
                config.seed,
                case.case_id,
                idx,
                config.contrast_copies,
                config.contrast_factor,
                config.brightness_shift,
            )
            copies = [
                embed_slices(
                    model,
                    image.array,
                    axis,
                    idx,
                    window=config.window,
                    batch_size=batch_size,
                    device=device,
                    jitters=jitters[k],
                )
                for k in range(config.contrast_copies)
            ]
            t_embed += time.perf_counter() - t0
            # (N, H, W), H and W the remaining axes in array order
            labels = np.moveaxis(np.take(label.array, idx, axis=axis), axis, 0)
            tmp = cache / f".tmp-{case.case_id}"
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
            np.save(tmp / "embeddings.npy", emb, allow_pickle=False)
            extra = {}
            if copies:
                np.save(tmp / "contrast.npy", np.stack(copies), allow_pickle=False)
                extra["contrast"] = jitters
            np.savez_compressed(
                tmp / "slices.npz",
                indices=idx.astype(np.int64),
                positive=positive_all[idx],
                labels=np.ascontiguousarray(labels, dtype=np.uint8),
                axis=np.int64(axis),
                **extra,
            )
            final = cache / case.case_id
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            sizes.append(sum(f.stat().st_size for f in final.iterdir()) / 1e6)
            summary["embedded"] += 1
            summary["slices"] += len(idx)
            summary["contrast_copies"] += len(idx) * config.contrast_copies
    summary["seconds"] = round(t_embed, 3)
    passes = summary["slices"] + summary["contrast_copies"]  # encoder passes, copies included
    summary["slices_per_s"] = round(passes / t_embed, 2) if t_embed > 0 else None
    summary["mb_per_case"] = round(float(np.mean(sizes)), 3) if sizes else None
    summary["fingerprint"] = encoder.fingerprint
    log.info(
        "embedded %d case(s) (%d slices), skipped %d finished",
        summary["embedded"],
        summary["slices"],
        summary["skipped"],
    )
    return summary
