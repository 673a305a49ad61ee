"""``slidesam ssa`` as a Python API: one case (phase files -> masks + report), or a cohort.

Output folder of a case::

    OUT/tumor_plain.nii.gz       uint8 0/1 tumour mask, exactly the plain image's geometry
    OUT/tumor_arterial.nii.gz    ... one per segmented phase
    OUT/stage1_arterial.nii.gz   the stage-1 label map (arterial grid)
    OUT/overlay_plain.png        (optional) plain slices with prompt boxes and the mask
    OUT/ssa_report.json          written last: its presence means the case is finished

The mask file ending follows the input image's (``.nii.gz``, ``.nrrd``, ``.mha``; DICOM series
give ``.nii.gz``). Files are written to temporary names and renamed.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from slidesam import __version__
from slidesam.core import PHASES, InputError, Volume
from slidesam.data.io import image_suffix, read_image, write_mask
from slidesam.ssa.pipeline import SSAConfig, run_ssa

__all__ = ["REPORT", "ssa_case", "ssa_cohort", "write_overlay"]

log = logging.getLogger(__name__)

REPORT = "ssa_report.json"


def _suffix(path: Path) -> str:
    return image_suffix(path) or ".nii.gz"  # DICOM series folders -> NIfTI


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(".tmp-" + path.name)
    write(tmp)
    os.replace(tmp, path)


def _peak_rss_mb() -> float | None:
    try:
        import resource
    except ImportError:  # Windows
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def ssa_case(
    images: dict[str, str | Path],
    out_dir: str | Path,
    stage1,
    predictor,
    config: SSAConfig | None = None,
    *,
    targets: tuple[str, ...] | None = None,
    overlays: bool = True,
    model_name: str = "",
) -> dict:
    """Run SSA on one case and write its outputs (see the module docstring).

    Args:
        images: phase -> image file or DICOM series folder; ``arterial`` is required.
        out_dir: output folder (created).
        stage1: a stage 1 (``slidesam.stage1``: ``predict(volume) -> Volume`` label map).
        predictor: ``SlideSAMPredictor``.
        targets: phases to segment (default: every phase given).

    Returns:
        the report (also written as ``ssa_report.json``).
    """
    config = config or SSAConfig()
    out_dir = Path(out_dir)
    for phase, path in images.items():
        if phase not in PHASES:
            raise InputError(f"unknown phase {phase!r}; use {', '.join(PHASES)}")
        if not Path(path).exists():
            raise InputError(f"{phase} image {path}: no such file or folder")
    if "arterial" not in images:
        raise InputError("SSA needs the arterial phase (--arterial)")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    volumes: dict[str, Volume] = {p: read_image(path) for p, path in images.items()}
    timings["read"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    labels = stage1.predict(volumes["arterial"])
    timings["stage1"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = run_ssa(volumes, labels, predictor, config, targets=targets)
    timings["stage2"] = time.perf_counter() - t0
    for p, r in result.phases.items():
        timings[f"stage2_{p}"] = r.seconds
        if r.registration is not None:
            timings[f"registration_{p}"] = r.registration["seconds"]

    out_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    art_suffix = _suffix(Path(images["arterial"]))
    stage1_path = out_dir / f"stage1_arterial{art_suffix}"
    _atomic(stage1_path, lambda t: write_mask(labels.array, labels.geometry, t))
    files["stage1"] = stage1_path.name
    for phase, r in result.phases.items():
        path = out_dir / f"tumor_{phase}{_suffix(Path(images[phase]))}"
        _atomic(path, lambda t, r=r, phase=phase: write_mask(r.mask, volumes[phase].geometry, t))
        files[f"tumor_{phase}"] = path.name
        if overlays and r.slices:
            png = out_dir / f"overlay_{phase}.png"
            _atomic(png, lambda t, r=r, phase=phase: write_overlay(volumes[phase], r, t))
            files[f"overlay_{phase}"] = png.name
    report = {
        "slidesam": __version__,
        "inputs": {p: str(Path(v)) for p, v in images.items()},
        "stage1": {
            "source": getattr(stage1, "name", type(stage1).__name__),
            "voxels_per_label": {
                int(v): int(n)
                for v, n in zip(*np.unique(labels.array, return_counts=True), strict=True)
            },
        },
        "model": model_name,
        **result.report(),
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "peak_rss_mb": _peak_rss_mb(),
        "files": files,
    }
    _atomic(out_dir / REPORT, lambda t: t.write_text(json.dumps(report, indent=2)))
    return report


def write_overlay(volume: Volume, result, path: Path, *, max_slices: int = 8) -> None:
    """PNG montage of up to ``max_slices`` prompted slices of one phase: the CT in a soft-tissue
    window, the tumour mask in yellow, prompt boxes green (accepted) or red (rejected)."""
    records = sorted(result.slices, key=lambda r: r["slice"])
    if len(records) > max_slices:
        pick = np.linspace(0, len(records) - 1, max_slices).round().astype(int)
        records = [records[i] for i in pick]
    axis = result.axis
    tiles = []
    for rec in records:
        s = rec["slice"]
        ct = np.take(volume.array, s, axis=axis).astype(np.float32)
        gray = (np.clip((ct + 200) / 600, 0, 1) * 255).astype(np.uint8)
        rgb = np.stack([gray] * 3, axis=-1)
        mask = np.take(result.mask, s, axis=axis) > 0
        rgb[mask] = (0.5 * rgb[mask] + 0.5 * np.array([255, 220, 0])).astype(np.uint8)
        img = Image.fromarray(rgb)
        draw = ImageDraw.Draw(img)
        colour = (0, 220, 0) if rec["accepted"] else (230, 0, 0)
        draw.rectangle([float(v) for v in rec["prompt_box"]], outline=colour)
        draw.text((2, 2), f"{s} {rec['confidence']:.2f}", fill=colour)
        tiles.append(img)
    w, h = tiles[0].size
    montage = Image.new("RGB", (w * len(tiles), h))
    for i, tile in enumerate(tiles):
        montage.paste(tile, (i * w, 0))
    montage.save(path, format="PNG")


def ssa_cohort(
    cases: list[tuple[str, dict[str, Path]]],
    out_dir: str | Path,
    stage1,
    predictor,
    config: SSAConfig | None = None,
    *,
    targets: tuple[str, ...] | None = None,
    overlays: bool = True,
    part_id: int = 0,
    num_parts: int = 1,
    model_name: str = "",
    progress: bool = True,
) -> list[tuple[str, str]]:
    """SSA over many cases with one loaded model; ``OUT/CASE/`` per case.

    Resumable: a case whose ``ssa_report.json`` exists is skipped. ``part_id``/``num_parts``
    split the sorted case list (case i goes to part i % num_parts) across processes or
    machines. Returns (case, status) with status ``done``, ``skipped`` or ``failed: why``; a
    failing case does not stop the others.
    """
    if not 0 <= part_id < num_parts:
        raise InputError(f"part_id must lie in 0..num_parts-1, got {part_id} of {num_parts}")
    mine = [c for i, c in enumerate(sorted(cases, key=lambda c: c[0])) if i % num_parts == part_id]
    status = []
    for case, images in tqdm(mine, desc="cases", unit="case", disable=not progress):
        out = Path(out_dir) / case
        if (out / REPORT).is_file():
            status.append((case, "skipped"))
            continue
        try:
            ssa_case(
                images,
                out,
                stage1,
                predictor,
                config,
                targets=targets,
                overlays=overlays,
                model_name=model_name,
            )
            status.append((case, "done"))
        except InputError as exc:
            log.error("%s: %s", case, exc)
            status.append((case, f"failed: {exc}"))
    return status


def load_stage1(
    *,
    arterial_mask: str | Path | None = None,
    nnunet: str | Path | None = None,
    unet: str | Path | None = None,
    device: str = "cpu",
):
    """The stage 1 a user asked for: a given mask file, an nnU-Net v2 model folder, one of our
    U-Net checkpoints, or (none given) the embedded U-Net."""
    given = [x for x in (arterial_mask, nnunet, unet) if x is not None]
    if len(given) > 1:
        raise InputError("give at most one stage 1: --arterial-mask, --nnunet or --unet")
    if arterial_mask is not None:
        from slidesam.stage1.base import MaskFileStage1

        return MaskFileStage1(arterial_mask)
    if nnunet is not None:
        from slidesam.stage1.nnunet import NnUNetStage1

        return NnUNetStage1(nnunet, device=device)
    from slidesam.stage1.unet import default_unet, load_unet

    return load_unet(unet, device=device) if unet is not None else default_unet(device=device)
