"""`slidesam ssa` end to end: files in; masks on each phase's exact grid and a report out."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import slidesam
from slidesam.cli.main import main
from slidesam.data.io import read_image, read_label, write_image, write_mask
from slidesam.inference.checkpoint import save_checkpoint
from slidesam.ssa.pipeline import SSAConfig
from slidesam.ssa.run import REPORT, ssa_case, ssa_cohort
from slidesam.stage1.base import MaskFileStage1
from tests.inference.stub import ThresholdPredictor
from tests.ssa.test_pipeline import ARTERIAL, PLAIN, _phase


def _write_case(folder, name="case_a"):
    paths = {}
    for phase, g in (("arterial", ARTERIAL), ("plain", PLAIN)):
        paths[phase] = folder / f"{name}_{phase}.nii.gz"
        write_image(_phase(g), paths[phase])
    mask = folder / f"{name}_arterial_mask.nii.gz"
    write_mask((_phase(ARTERIAL).array > 0.5).astype(np.uint8), ARTERIAL, mask)
    return paths, mask


def test_case_outputs_keep_each_phases_geometry(tmp_path):
    paths, mask = _write_case(tmp_path)
    out = tmp_path / "out"
    report = ssa_case(
        paths, out, MaskFileStage1(mask), ThresholdPredictor(grow=0), SSAConfig(threshold=0.5)
    )
    for phase, path in paths.items():
        image = read_image(path)
        tumor = read_label(out / f"tumor_{phase}.nii.gz", reference=image)  # refuses other grids
        assert tumor.geometry.mismatch(image.geometry) == ""
        assert set(np.unique(tumor.array)) <= {0, 1}
        assert tumor.array.sum() == report["phases"][phase]["tumor_voxels"] > 0
        assert Image.open(out / f"overlay_{phase}.png").size[1] == image.shape[1]
    on_disk = json.loads((out / REPORT).read_text())
    assert on_disk["stage1"]["source"] == f"mask file {mask.name}"
    assert on_disk["stage1"]["voxels_per_label"]["2"] > 0
    assert len(on_disk["arterial_boxes"]) == 1
    assert len(on_disk["arterial_boxes"][0]["world_min_lps_mm"]) == 3
    plain = on_disk["phases"]["plain"]
    assert plain["accepted_slices"] + plain["rejected_slices"] == len(plain["slices"]) > 0
    assert {"stage1", "stage2", "stage2_plain"} <= set(on_disk["timings_s"])


def test_cohort_splits_parts_and_resumes(tmp_path):
    cases = []
    for name in ("a", "b", "c"):
        paths, mask = _write_case(tmp_path, name)
        cases.append((name, paths))
    stage1 = MaskFileStage1(mask)  # the same grid for every case: one mask serves all
    pred = ThresholdPredictor(grow=0)
    first = ssa_cohort(cases, tmp_path / "o", stage1, pred, part_id=1, num_parts=2, progress=False)
    assert first == [("b", "done")]
    again = ssa_cohort(cases, tmp_path / "o", stage1, pred, progress=False)
    assert again == [("a", "done"), ("b", "skipped"), ("c", "done")]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = slidesam.build_slidesam("tiny_64", lora_rank=0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(model, model.config, path)
    return path


def test_cli_runs_the_real_model_and_reports(tmp_path, tiny_checkpoint, capsys):
    paths, mask = _write_case(tmp_path)
    out = tmp_path / "out"
    argv = ["ssa", "--plain", str(paths["plain"]), "--arterial", str(paths["arterial"])]
    argv += ["--arterial-mask", str(mask), "--checkpoint", str(tiny_checkpoint)]
    assert main([*argv, "--out", str(out), "--threshold", "0"]) == 0
    assert "slices accepted" in capsys.readouterr().out
    report = json.loads((out / REPORT).read_text())
    # tau 0 keeps every prompted slice: the untrained model's masks are what they are
    assert report["phases"]["plain"]["rejected_slices"] == 0
    assert read_label(out / "tumor_plain.nii.gz", reference=read_image(paths["plain"]))


def test_cli_errors_name_the_problem(tmp_path, tiny_checkpoint, capsys):
    paths, mask = _write_case(tmp_path)
    missing = tmp_path / "nope_plain.nii.gz"
    argv = ["ssa", "--plain", str(missing), "--arterial", str(paths["arterial"])]
    assert main([*argv, "--arterial-mask", str(mask), "--out", str(tmp_path / "o")]) == 2
    assert "--plain" in capsys.readouterr().err
    assert main(["ssa", "--plain", str(paths["plain"]), "--out", str(tmp_path / "o")]) == 2
    assert "--arterial" in capsys.readouterr().err
    wrong = tmp_path / "wrong_mask.nii.gz"
    write_mask(np.ones(PLAIN.shape, np.uint8), PLAIN, wrong)  # on the plain grid, not arterial
    argv = ["ssa", "--arterial", str(paths["arterial"]), "--arterial-mask", str(wrong)]
    assert main([*argv, "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "o")]) == 2
    assert "grid" in capsys.readouterr().err


def test_cli_cohort_mode_finds_phases_by_suffix(tmp_path, tiny_checkpoint, capsys):
    from slidesam.stage1.unet import UNetConfig, build_unet, save_unet_checkpoint

    cohort = tmp_path / "cohort"
    cohort.mkdir()
    for name in ("p1", "p2"):
        paths, mask = _write_case(cohort, name)
        mask.unlink()
        paths["arterial"].rename(cohort / f"{name}_ART.nii.gz")  # the user's own ending
    torch.manual_seed(0)
    config = UNetConfig(channels=(4, 8), strides=(2,), num_res_units=0, patch_size=(16, 32, 32))
    unet = save_unet_checkpoint(build_unet(config), config, tmp_path / "unet.pt")
    argv = ["ssa", "--cohort", str(cohort), "--unet", str(unet)]
    argv += ["--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "o"), "--no-progress"]
    assert main([*argv, "--suffixes", "plain=_plain,arterial:_ART"]) == 2
    assert "PHASE=VALUE pairs" in capsys.readouterr().err
    assert main([*argv, "--channels", "plain=zero"]) == 2
    assert "'zero' is not a valid value" in capsys.readouterr().err
    assert main([*argv, "--suffixes", "plain=_plain,arterial=_ART"]) == 0
    assert "2 case(s): 2 ok" in capsys.readouterr().out
    for name in ("p1", "p2"):
        assert (tmp_path / "o" / name / REPORT).is_file()
