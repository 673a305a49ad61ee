"""Throughput of ``slidesam prepare``: windows per second on 512 x 512 x 200 synthetic volumes.

Single process on one case, then all cores (one process per case, as ``prepare`` parallelises)
on as many copies of the case as there are cores. Paper settings: 1024 x 1024 JPEG output.
Target (issue 2): >= 20 windows/s with all cores.

    python bench/prepare.py [--size 1024] [--slices 200] [--format jpg]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from slidesam.core import Geometry, Volume
from slidesam.data.io import write_image, write_mask
from slidesam.data.prepare import PrepareConfig, prepare_dataset


def make_dataset(root: Path, n_cases: int, n_slices: int) -> Path:
    shape = (n_slices, 512, 512)
    rng = np.random.default_rng(0)
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    body = ((y - 256) / 200.0) ** 2 + ((x - 256) / 240.0) ** 2 < 1
    image = np.broadcast_to(np.where(body, 40, -1000), shape).astype(np.int16)
    image += rng.normal(0, 15, shape).astype(np.int16)
    organ = ((z - n_slices / 2) / (0.4 * n_slices)) ** 2 + ((y - 300) / 60.0) ** 2 + (
        (x - 180) / 50.0
    ) ** 2 < 1
    lesion = ((z - n_slices / 2) / (0.1 * n_slices)) ** 2 + ((y - 300) / 20.0) ** 2 + (
        (x - 180) / 20.0
    ) ** 2 < 1
    labels = organ.astype(np.uint8) + lesion.astype(np.uint8)
    g = Geometry(shape=shape, spacing=(1.0, 0.8, 0.8))
    ds = root / "Dataset999_Bench"
    first_image = write_image(Volume(image, g), ds / "imagesTr" / "case_000_0000.nii.gz")
    first_label = write_mask(labels, g, ds / "labelsTr" / "case_000.nii.gz")
    for i in range(1, n_cases):  # copies: same work per case
        os.link(first_image, ds / "imagesTr" / f"case_{i:03d}_0000.nii.gz")
        os.link(first_label, ds / "labelsTr" / f"case_{i:03d}.nii.gz")
    (ds / "dataset.json").write_text(
        json.dumps({"labels": {"background": 0, "organ": 1, "lesion": 2}})
    )
    return ds


def run(ds: Path, out: Path, config: PrepareConfig, workers: int) -> tuple[int, float]:
    t0 = time.perf_counter()
    summary = prepare_dataset(ds, out, config, workers=workers, progress=False)
    return summary["windows"], time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--slices", type=int, default=200)
    ap.add_argument("--format", default="jpg")
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    config = PrepareConfig(size=args.size, image_format=args.format)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        single = make_dataset(tmp / "one", 1, args.slices)
        many = make_dataset(tmp / "many", cores, args.slices)
        w1, t1 = run(single, tmp / "out1", config, workers=1)
        wn, tn = run(many, tmp / "outn", config, workers=cores)
    print(f"volume 512x512x{args.slices}, output {args.size}px {args.format}, {cores} cores")
    print(f"single process : {w1:5d} windows in {t1:6.1f} s = {w1 / t1:6.1f} windows/s")
    print(f"all cores ({cores})  : {wn:5d} windows in {tn:6.1f} s = {wn / tn:6.1f} windows/s")
    print(
        f"speed-up        : {(wn / tn) / (w1 / t1):.2f}x; target >= 20 windows/s with all cores: "
        f"{'met' if wn / tn >= 20 else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
