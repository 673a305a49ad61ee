"""``slidesam segment`` as a Python API: one image + prompts file -> label map, or a cohort.

Outputs per case (``OUT`` = the mask path):

- ``OUT`` (e.g. ``mask.nii.gz``): uint8 labels with exactly the image's geometry;
- ``<stem>.json`` beside it: settings, per-slice records (window, anchor, box, predicted IoU,
  stability), windows visited, encoder passes, timings;
- with ``save_probabilities``: ``<stem>_prob.nii.gz`` (one label) or
  ``<stem>_prob_label<k>.nii.gz``.

Files are written to a temporary name and renamed, the mask last, so an interrupted run never
leaves a mask that looks finished; a cohort re-run skips cases whose mask exists.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from slidesam.core import InputError, Volume
from slidesam.data.io import image_suffix, read_image, strip_suffix, write_image, write_mask
from slidesam.data.prompts import read_prompts
from slidesam.inference.predictor import SlideSAMPredictor
from slidesam.inference.propagation import PropagationConfig, SegmentationResult, VolumeSegmenter

__all__ = ["find_cohort", "output_paths", "segment_cohort", "segment_volume", "write_result"]

log = logging.getLogger(__name__)


def segment_volume(
    volume: Volume,
    prompts,
    predictor: SlideSAMPredictor,
    config: PropagationConfig,
    *,
    progress: bool = False,
) -> SegmentationResult:
    """Segment one volume (slices along z, the prompts' convention)."""
    bar = tqdm(desc="windows", unit="win", disable=not progress, leave=False)

    def tick(n: int) -> None:
        bar.n = n
        bar.refresh()

    try:
        return VolumeSegmenter(predictor, config, progress=tick).segment(volume, prompts, axis=0)
    finally:
        bar.close()


@dataclass(frozen=True)
class OutputPaths:
    mask: Path
    sidecar: Path
    stem: Path  # mask path without its image ending

    def probability(self, label: int, n_labels: int) -> Path:
        tail = "_prob" if n_labels == 1 else f"_prob_label{label}"
        return self.stem.with_name(self.stem.name + tail + self.mask.name[len(self.stem.name) :])


def output_paths(mask: str | Path) -> OutputPaths:
    mask = Path(mask)
    if not image_suffix(mask):
        raise InputError(f"{mask}: the output must end in .nii.gz, .nii, .nrrd or .mha")
    stem = mask.with_name(strip_suffix(mask))
    return OutputPaths(mask=mask, sidecar=stem.with_name(stem.name + ".json"), stem=stem)


def _replace_into(path: Path, write) -> None:
    tmp = path.with_name(".tmp-" + path.name)
    write(tmp)
    os.replace(tmp, path)


def write_result(
    result: SegmentationResult,
    image: Volume,
    out: str | Path,
    *,
    info: dict,
    save_probabilities: bool = False,
) -> OutputPaths:
    """Write the label map (last), the JSON sidecar and optional probabilities."""
    paths = output_paths(out)
    paths.mask.parent.mkdir(parents=True, exist_ok=True)
    sidecar = {
        **info,
        "encoder_passes": result.encoder_passes,
        "windows": [{"label": k, "center": c, "accepted": ok} for k, c, ok in result.windows],
        "records": [r.to_dict() for r in result.records],
        "labels_written": sorted(int(v) for v in np.unique(result.labels) if v),
    }
    _replace_into(paths.sidecar, lambda p: p.write_text(json.dumps(sidecar, indent=1) + "\n"))
    if save_probabilities:
        for k, prob in result.probabilities.items():
            target = paths.probability(k, len(result.probabilities))
            _replace_into(target, lambda p, a=prob: write_image(image.with_array(a), p))
    _replace_into(paths.mask, lambda p: write_mask(result.labels, image, p))
    return paths


def find_cohort(images: Path, prompts: Path) -> list[tuple[str, Path, Path]]:
    """(case, image, prompts file) for every image in a folder (files or DICOM sub-folders).

    ``CASE_0000.nii.gz`` (nnU-Net naming) is case ``CASE``; its prompts are ``CASE.json`` (or
    ``CASE_0000.json``). Images without a prompts file are an error naming them.
    """
    if not prompts.is_dir():
        raise InputError(
            f"{prompts}: with a folder of images, --prompts must be a folder of JSON files"
        )
    cases, missing = [], []
    for path in sorted(images.iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_file() and image_suffix(path):
            name = strip_suffix(path)
        elif path.is_dir():
            name = path.name
        else:
            continue
        case = name[:-5] if name.endswith("_0000") else name
        found = next(
            (c for c in (prompts / f"{case}.json", prompts / f"{name}.json") if c.is_file()), None
        )
        if found is None:
            missing.append(case)
        else:
            cases.append((case, path, found))
    if missing:
        raise InputError(
            f"{len(missing)} image(s) in {images} have no prompts file in {prompts}: "
            + ", ".join(missing[:10])
            + (" ..." if len(missing) > 10 else "")
        )
    if not cases:
        raise InputError(f"{images}: no images (.nii.gz, .nii, .nrrd, .mha or DICOM folders)")
    return cases


def segment_cohort(
    cases: list[tuple[str, Path, Path]],
    out_dir: Path,
    predictor: SlideSAMPredictor,
    config: PropagationConfig,
    *,
    info: dict,
    overwrite: bool = False,
    save_probabilities: bool = False,
    part_id: int = 0,
    num_parts: int = 1,
    progress: bool = True,
) -> dict:
    """Segment cases ``part_id::num_parts`` into ``out_dir/CASE.nii.gz``; skip finished ones.

    A failing case is logged and listed; the others go on. Returns counts and failures.
    """
    if not 0 <= part_id < num_parts:
        raise InputError(f"--part-id must be in 0..{num_parts - 1}, got {part_id}")
    mine = cases[part_id::num_parts]
    done, skipped, failed = 0, 0, {}
    for case, image_path, prompts_path in tqdm(
        mine, desc="segment", unit="case", disable=not progress
    ):
        out = out_dir / f"{case}.nii.gz"
        if out.exists() and not overwrite:
            skipped += 1
            continue
        try:
            t0 = time.perf_counter()
            image = read_image(image_path)
            prompts = read_prompts(prompts_path, image.geometry)
            result = segment_volume(image, prompts, predictor, config)
            write_result(
                result,
                image,
                out,
                save_probabilities=save_probabilities,
                info={
                    **info,
                    "image": str(image_path),
                    "prompts": str(prompts_path),
                    "seconds": round(time.perf_counter() - t0, 3),
                },
            )
            done += 1
        except (InputError, OSError, RuntimeError, ValueError) as exc:
            failed[case] = str(exc)
            log.error("case %s failed: %s", case, exc)
    return {"cases": len(mine), "segmented": done, "skipped": skipped, "failed": failed}


def run_info(config: PropagationConfig, checkpoint: str | None) -> dict:
    """Settings recorded in every sidecar."""
    from slidesam import __version__

    return {"slidesam": __version__, "checkpoint": checkpoint, "propagation": asdict(config)}
