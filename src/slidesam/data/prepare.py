"""``slidesam prepare``: turn labelled volumes into Slide-SAM training windows.

Input: an nnU-Net-style dataset folder (``imagesTr/CASE_0000.nii.gz``, ``labelsTr/CASE.nii.gz``,
``dataset.json``). Output, per dataset, in ``OUT/<dataset folder name>/``::

    prepare.json                 settings and source; a re-run with other settings is refused
    images/CASE/z_0012.jpg       3 slices as RGB, size x size (JPEG 4:4:4 q95, PNG, or NPZ)
    masks/CASE/z_0012.npz        "masks": uint8 (K, 3, size, size) 0/1, "labels": (K,) ids
    meta/CASE.jsonl              one record per window (image-mask pair), see ``WindowRecord``
    meta/CASE.done.json          per-case counts; written last, so its presence = case finished
    summary.json                 totals over the dataset

Labels of interest come from ``dataset.json``'s ``labels`` (nnU-Net v2 ``name: value`` or
region ``name: [values]``, or v1 ``"value": name``), background excluded; each becomes one
binary target (label ``k`` in the records is its index in that list, plus its name and values).

JPEG note: the three channels are three different slices, so chroma subsampling would blur one
slice into another; we always write JPEG with 4:4:4 sampling.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from slidesam.core import InputError
from slidesam.data.io import read_image, read_label, strip_suffix
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
    "PrepareConfig",
    "Target",
    "atomic_write",
    "find_cases",
    "prepare_dataset",
    "read_targets",
    "save_image",
]

log = logging.getLogger(__name__)

IMAGE_FORMATS = ("jpg", "png", "npz")


@dataclass(frozen=True)
class PrepareConfig:
    """Settings of one preparation run (saved as ``prepare.json``).

    Attributes:
        size: output side in pixels (1024 for SAM vit_*, 256 for the tiny CPU models).
        axes: ``"auto"`` (fewest voxels), ``"all"``, or ``"z"``/``"y"``/``"x"``.
        modality: ``"CT"`` or ``"MRI"``; picks the default window.
        window: (low, high) intensity window; ``None`` = [-200, 400] for CT, [0, 600] for MRI.
        scaling: ``"fixed"`` (window -> 0..255, the papers' text) or ``"window-minmax"``.
        image_format: ``"jpg"`` (the paper; 4:4:4, quality 95), ``"png"`` or ``"npz"`` (lossless).
        min_area_fraction: a target is kept if its centre-slice area exceeds this (0.14 %).
        keep_empty: also write windows where no target is kept (for pseudo-labelling).
        labels: restrict to these label names or values (as strings); empty = all.
        channel: which nnU-Net channel (``_0000`` = 0) to read.
    """

    size: int = 1024
    axes: str = "auto"
    modality: str = "CT"
    window: tuple[float, float] | None = None
    scaling: str = "fixed"
    image_format: str = "jpg"
    min_area_fraction: float = MIN_AREA_FRACTION
    keep_empty: bool = False
    labels: tuple[str, ...] = field(default_factory=tuple)
    channel: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or self.size < 16:
            raise InputError(f"size must be an integer >= 16, got {self.size!r}")
        choose_slicing_axes((1, 1, 1), self.axes)  # validates the mode
        if self.modality.upper() not in ("CT", "MRI"):
            raise InputError(f"modality must be CT or MRI, got {self.modality!r}")
        object.__setattr__(self, "modality", self.modality.upper())
        if self.window is None:
            object.__setattr__(self, "window", CT_WINDOW if self.modality == "CT" else MRI_WINDOW)
        window = tuple(float(v) for v in self.window)
        if len(window) != 2 or not window[1] > window[0]:
            raise InputError(f"window must be LOW HIGH with LOW < HIGH, got {self.window}")
        object.__setattr__(self, "window", window)
        if self.scaling not in SCALINGS:
            raise InputError(f"scaling must be one of {', '.join(SCALINGS)}, got {self.scaling!r}")
        if self.image_format not in IMAGE_FORMATS:
            raise InputError(
                f"image format must be one of {', '.join(IMAGE_FORMATS)}, got {self.image_format!r}"
            )
        if not 0 <= self.min_area_fraction < 1:
            raise InputError(f"min_area_fraction must be in [0, 1), got {self.min_area_fraction}")
        object.__setattr__(self, "labels", tuple(str(v) for v in self.labels))
        if self.channel < 0:
            raise InputError(f"channel must be >= 0, got {self.channel}")


@dataclass(frozen=True)
class Target:
    """One structure to extract: a name and the label values that make it up."""

    name: str
    values: tuple[int, ...]


@dataclass(frozen=True)
class Case:
    case_id: str
    image: Path
    label: Path


def read_targets(dataset_dir: Path, only: tuple[str, ...] = ()) -> list[Target]:
    """Targets from ``dataset.json`` (or the label values found, if there is none)."""
    meta_path = dataset_dir / "dataset.json"
    targets: list[Target] = []
    if meta_path.exists():
        try:
            labels = json.loads(meta_path.read_text())["labels"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise InputError(f"{meta_path}: no readable 'labels' mapping ({exc})") from None
        for key, value in labels.items():
            if isinstance(value, str):  # nnU-Net v1: {"1": "kidney"}
                name, values = value, (int(key),)
            else:  # nnU-Net v2: {"kidney": 1} or regions {"kidney": [1, 2, 3]}
                name = key
                values = tuple(int(v) for v in (value if isinstance(value, list) else [value]))
            if values != (0,) and name.lower() != "background":
                targets.append(Target(name=name, values=values))
    if only:
        chosen = [t for t in targets if t.name in only or any(str(v) in only for v in t.values)]
        known = {t.name for t in targets} | {str(v) for t in targets for v in t.values}
        unknown = [o for o in only if o not in known]
        if targets and unknown:
            raise InputError(
                f"{meta_path}: unknown label(s) {', '.join(unknown)}; dataset.json has "
                + ", ".join(f"{t.name}={list(t.values)}" for t in targets)
            )
        if not targets:  # no dataset.json: the user names label values directly
            chosen = [Target(name=f"label_{o}", values=(int(o),)) for o in only if o.isdigit()]
        targets = chosen
    if not targets:
        raise InputError(
            f"{dataset_dir}: no labels of interest; add a dataset.json with a 'labels' mapping "
            "or pass --labels VALUE [VALUE ...]"
        )
    return targets


def find_cases(dataset_dir: Path, channel: int = 0) -> list[Case]:
    """Pair ``imagesTr/CASE_{channel:04d}.*`` with ``labelsTr/CASE.*``; skip unlabelled cases."""
    images_dir, labels_dir = dataset_dir / "imagesTr", dataset_dir / "labelsTr"
    if not images_dir.is_dir() or not labels_dir.is_dir():
        raise InputError(
            f"{dataset_dir}: not an nnU-Net dataset folder (needs imagesTr/ and labelsTr/)"
        )
    labels = {strip_suffix(p): p for p in labels_dir.iterdir() if p.is_file()}
    suffix = f"_{channel:04d}"
    cases, unlabelled = [], []
    for img in sorted(images_dir.iterdir()):
        stem = strip_suffix(img)
        if not img.is_file() or not stem.endswith(suffix) or stem == img.name:
            continue
        case_id = stem[: -len(suffix)]
        if case_id in labels:
            cases.append(Case(case_id, img, labels[case_id]))
        else:
            unlabelled.append(case_id)
    if unlabelled:
        log.warning(
            "%s: %d image(s) without a label skipped: %s",
            dataset_dir,
            len(unlabelled),
            ", ".join(unlabelled[:5]) + (" ..." if len(unlabelled) > 5 else ""),
        )
    if not cases:
        raise InputError(f"{images_dir}: no images named CASE{suffix}.<ext> with a label")
    return cases


def save_image(rgb: np.ndarray, path: Path, fmt: str) -> None:
    if fmt == "jpg":
        Image.fromarray(rgb).save(path, quality=95, subsampling=0)
    elif fmt == "png":
        Image.fromarray(rgb).save(path, compress_level=1)
    else:
        np.savez_compressed(path, image=rgb)


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def prepare_case(case: Case, out_dir: Path, targets: list[Target], config: PrepareConfig) -> dict:
    """Write all windows of one case; returns its counts (also saved as ``CASE.done.json``)."""
    image = read_image(case.image, modality=config.modality if config.modality == "CT" else None)
    labels = read_label(case.label, reference=image).array
    # Fixed scaling is the same for every window: map the whole volume once.
    volume = to_uint8(image.array, config.window) if config.scaling == "fixed" else image.array
    target_masks = [np.isin(labels, t.values) for t in targets]
    img_dir, mask_dir = out_dir / "images" / case.case_id, out_dir / "masks" / case.case_id
    img_dir.mkdir(parents=True, exist_ok=True)
    mask_dir.mkdir(parents=True, exist_ok=True)
    records: list[str] = []
    kept = dict.fromkeys((t.name for t in targets), 0)
    discarded = dict.fromkeys((t.name for t in targets), 0)
    windows = empty = 0
    for axis in choose_slicing_axes(image.shape, config.axes):
        for centre in window_centres(image.shape[axis]):
            chosen = []
            for k, (target, mask) in enumerate(zip(targets, target_masks, strict=True)):
                stack = slice_window(mask, axis, centre)
                if not stack[1].any():
                    continue
                if mask_is_kept(stack[1], config.min_area_fraction):
                    chosen.append((k, stack))
                    kept[target.name] += 1
                else:
                    discarded[target.name] += 1
            if not chosen and not config.keep_empty:
                empty += 1
                continue
            name = f"{AXIS_NAMES[axis]}_{centre:04d}"
            window = slice_window(volume, axis, centre)
            if config.scaling != "fixed":
                window = scale_window(window, config.window, config.scaling)
            image_path = img_dir / f"{name}.{config.image_format}"
            save_image(resize_image(window, config.size), image_path, config.image_format)
            mask_path = mask_dir / f"{name}.npz"
            masks = (
                resize_masks(np.stack([s for _, s in chosen]), config.size)
                if chosen
                else np.zeros((0, 3, config.size, config.size), np.uint8)
            )
            labels_kept = np.array([k for k, _ in chosen], dtype=np.int16)
            np.savez_compressed(mask_path, masks=masks, labels=labels_kept)
            record = {
                "case": case.case_id,
                "image": str(image_path.relative_to(out_dir)),
                "mask": str(mask_path.relative_to(out_dir)),
                "source_image": str(case.image.resolve()),
                "source_label": str(case.label.resolve()),
                "axis": axis,
                "axis_name": AXIS_NAMES[axis],
                "slice_index": centre,
                "slices": [centre - 1, centre, centre + 1],
                "labels": [k for k, _ in chosen],
                "class_names": [targets[k].name for k, _ in chosen],
                "label_values": [list(targets[k].values) for k, _ in chosen],
                "indicator": [1, 1, 1],
                "slice_shape": list(window.shape[1:]),
            }
            records.append(json.dumps(record))
            windows += 1
    meta_dir = out_dir / "meta"
    atomic_write(meta_dir / f"{case.case_id}.jsonl", "".join(r + "\n" for r in records))
    counts = {
        "case": case.case_id,
        "windows": windows,
        "windows_without_target": empty,
        "masks_kept": kept,
        "masks_discarded": discarded,
    }
    atomic_write(meta_dir / f"{case.case_id}.done.json", json.dumps(counts))
    return counts


def _settings(config: PrepareConfig, dataset_dir: Path, targets: list[Target]) -> dict:
    settings = {
        "config": asdict(config),
        "dataset": str(dataset_dir.resolve()),
        "targets": [asdict(t) for t in targets],
    }
    return json.loads(json.dumps(settings))  # as it reads back from prepare.json (no tuples)


def prepare_dataset(
    dataset_dir: str | Path,
    out_root: str | Path,
    config: PrepareConfig,
    *,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Prepare one nnU-Net-style dataset into ``out_root/<dataset folder name>/``.

    Resumable: finished cases (``meta/CASE.done.json``) are skipped; a re-run with different
    settings is refused unless ``overwrite``. A case that fails is reported in the summary (and
    logged) while the others go on.

    Returns:
        the summary dict (also written as ``summary.json``).
    """
    dataset_dir = Path(dataset_dir)
    if workers < 1:
        raise InputError(f"workers must be at least 1, got {workers}")
    if not dataset_dir.is_dir():
        raise InputError(f"{dataset_dir}: no such dataset folder")
    targets = read_targets(dataset_dir, config.labels)
    cases = find_cases(dataset_dir, config.channel)
    out_dir = Path(out_root) / dataset_dir.resolve().name
    settings = _settings(config, dataset_dir, targets)
    settings_path = out_dir / "prepare.json"
    if settings_path.exists() and not overwrite:
        previous = json.loads(settings_path.read_text())
        if previous != settings:
            changed = sorted(
                k
                for k in settings["config"]
                if previous.get("config", {}).get(k) != settings["config"][k]
            )
            raise InputError(
                f"{out_dir}: already prepared with other settings ({', '.join(changed) or 'source'}"
                "); use another --out or --overwrite"
            )
    if overwrite and out_dir.exists():
        shutil.rmtree(out_dir)
    (out_dir / "meta").mkdir(parents=True, exist_ok=True)
    atomic_write(settings_path, json.dumps(settings, indent=2))

    done, todo = [], []
    for case in cases:
        marker = out_dir / "meta" / f"{case.case_id}.done.json"
        (done if marker.exists() else todo).append(case)
    results = [json.loads((out_dir / "meta" / f"{c.case_id}.done.json").read_text()) for c in done]
    failures: dict[str, str] = {}
    bar = tqdm(total=len(todo), desc=f"prepare {out_dir.name}", unit="case", disable=not progress)
    if workers > 1 and len(todo) > 1:
        with ProcessPoolExecutor(max_workers=min(workers, len(todo))) as pool:
            futures = {pool.submit(prepare_case, c, out_dir, targets, config): c for c in todo}
            for fut in as_completed(futures):
                _collect(fut.result, futures[fut], results, failures)
                bar.update()
    else:
        for case in todo:
            _collect(partial(prepare_case, case, out_dir, targets, config), case, results, failures)
            bar.update()
    bar.close()
    summary = _summarise(results, failures, targets, resumed=len(done), total=len(cases))
    summary["output"] = str(out_dir)
    atomic_write(out_dir / "summary.json", json.dumps(summary, indent=2))
    return summary


def _collect(call, case: Case, results: list, failures: dict) -> None:
    try:
        results.append(call())
    except (InputError, OSError, ValueError, RuntimeError) as exc:
        failures[case.case_id] = str(exc)
        log.error("case %s failed: %s", case.case_id, exc)


def _summarise(results, failures, targets, *, resumed: int, total: int) -> dict:
    names = [t.name for t in targets]
    return {
        "cases": total,
        "cases_prepared": len(results) - resumed,
        "cases_resumed": resumed,
        "cases_failed": failures,
        "windows": sum(r["windows"] for r in results),
        "windows_without_target": sum(r["windows_without_target"] for r in results),
        "masks_kept": {n: sum(r["masks_kept"].get(n, 0) for r in results) for n in names},
        "masks_discarded": {n: sum(r["masks_discarded"].get(n, 0) for r in results) for n in names},
    }


def expand_dataset_dirs(paths: list[str | Path]) -> list[Path]:
    """Dataset folders from the given paths; a folder of ``Dataset*`` folders expands to them."""
    out: list[Path] = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise InputError(f"{p}: no such dataset folder")
        if (p / "imagesTr").is_dir():
            out.append(p)
            continue
        children = sorted(c for c in p.iterdir() if (c / "imagesTr").is_dir())
        if not children:
            raise InputError(
                f"{p}: neither a dataset folder (imagesTr/, labelsTr/) nor a folder of them"
            )
        out.extend(children)
    return out
