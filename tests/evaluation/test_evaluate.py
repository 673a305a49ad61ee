"""Folder evaluation and ``slidesam evaluate`` on small label maps with an oblique geometry."""

from __future__ import annotations

import csv
import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from slidesam.cli import main as cli_main
from slidesam.core import Geometry, InputError
from slidesam.data.io import write_mask
from slidesam.evaluation.evaluate import evaluate_folders, write_results

_C, _S = math.cos(math.radians(30)), math.sin(math.radians(30))
_ROT = np.array([[_C, -_S, 0.0], [_S, _C, 0.0], [0.0, 0.0, 1.0]])
GEOMETRY = Geometry(
    shape=(8, 16, 16),
    spacing=(2.5, 0.8, 0.7),
    origin=(10.0, -20.0, 30.0),
    direction=_ROT @ np.eye(3)[:, ::-1],  # rotated 30 degrees about the patient's z axis
)
KIDNEY = (slice(2, 6), slice(2, 10), slice(2, 10))  # 256 voxels
MASS = (slice(2, 6), slice(10, 14), slice(2, 10))  # 128 voxels

#: Dice by hand. case_002 has no prediction (scored as empty with missing="empty").
EXPECTED_DICE = {
    "case_000": {"kidney": 1, "tumor": 0.5, "cyst": 1, "kidney_and_masses": 5 / 6, "masses": 0.5},
    "case_001": {"kidney": 2 / 3, "tumor": 1, "cyst": 1, "kidney_and_masses": 0.8, "masses": 1},
    "case_002": {"kidney": 0, "tumor": 1, "cyst": 1, "kidney_and_masses": 0, "masses": 1},
}
REGIONS = ["kidney", "tumor", "cyst", "kidney_and_masses", "masses"]  # KiTS "tumor" kept once


def _maps() -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """case -> (gt, pred); see EXPECTED_DICE for the hand-computed overlaps."""
    z = np.zeros(GEOMETRY.shape, np.uint8)
    gt0, pred0 = z.copy(), z.copy()
    gt0[KIDNEY], gt0[MASS] = 1, 2
    pred0[KIDNEY] = 1
    pred0[2:6, 10:14, 6:14] = 2  # tumor shifted by 4 columns: 64 of 128 voxels overlap
    # kidney_and_masses: 256 + 64 of 384 voxels overlap -> 2 * 320 / 768 = 5/6
    gt1, pred1 = z.copy(), z.copy()
    gt1[KIDNEY], gt1[MASS] = 1, 3
    pred1[2:4, 2:10, 2:10] = 1  # upper half of the kidney: 2 * 128 / 384 = 2/3
    pred1[MASS] = 3  # kidney_and_masses: 2 * 256 / (384 + 256) = 0.8
    gt2 = z.copy()
    gt2[KIDNEY] = 1
    return {"case_000": (gt0, pred0), "case_001": (gt1, pred1), "case_002": (gt2, None)}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("eval")
    gt_dir, pred_dir = root / "gt", root / "pred"
    endings = {
        "case_000": (".nii.gz", ".nii.gz"),
        "case_001": (".nrrd", ".mha"),
        "case_002": (".nii.gz", ""),
    }
    for case, (gt, pred) in _maps().items():
        write_mask(gt, GEOMETRY, gt_dir / f"{case}{endings[case][0]}")
        if pred is not None:
            write_mask(pred, GEOMETRY, pred_dir / f"{case}{endings[case][1]}")
    write_mask(np.ones(GEOMETRY.shape, np.uint8), GEOMETRY, pred_dir / "extra_case.nii.gz")
    labels = {"background": 0, "kidney": 1, "tumor": 2, "cyst": 3}
    (gt_dir / "dataset.json").write_text(json.dumps({"labels": labels}))
    (gt_dir / "notes.txt").write_text("not an image")
    (pred_dir / "readme.md").write_text("not an image")
    return pred_dir, gt_dir


@pytest.fixture
def main():
    return cli_main.main


def test_missing_prediction_is_an_error_naming_it(folders):
    pred_dir, gt_dir = folders
    with pytest.raises(InputError, match=r"1 ground-truth case\(s\) have no prediction.*case_002"):
        evaluate_folders(pred_dir, gt_dir, progress=False)


def test_per_case_csv_matches_hand_computed_dice(folders, tmp_path, caplog):
    pred_dir, gt_dir = folders
    with caplog.at_level(logging.WARNING):
        result = evaluate_folders(pred_dir, gt_dir, missing="empty", progress=False)
    assert "extra_case" in caplog.text
    assert result.cases == ("case_000", "case_001", "case_002")
    assert list(result.regions) == REGIONS
    assert result.regions["kidney_and_masses"] == (1, 2, 3)
    assert result.missing_predictions == ("case_002",)
    assert result.ignored_predictions == ("extra_case",)

    csv_path, _ = write_results(result, tmp_path)
    with csv_path.open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == [
        "case",
        "region",
        "dice",
        "iou",
        "hd95",
        "nsd",
        "gt_voxels",
        "pred_voxels",
    ]
    assert len(rows) == 3 * len(REGIONS)
    got = {(r["case"], r["region"]): r for r in rows}
    for case, by_region in EXPECTED_DICE.items():
        for region, dice in by_region.items():
            assert float(got[case, region]["dice"]) == pytest.approx(dice, abs=1e-6), (case, region)
    tumor0 = got["case_000", "tumor"]
    assert float(tumor0["iou"]) == pytest.approx(1 / 3, abs=1e-6)  # 64 / 192
    assert (tumor0["gt_voxels"], tumor0["pred_voxels"]) == ("128", "128")
    assert float(got["case_000", "kidney"]["hd95"]) == 0.0
    assert got["case_002", "kidney"]["hd95"] == "nan"
    assert got["case_002", "cyst"]["hd95"] == "0.000000"  # both empty


def test_summary_statistics(folders, tmp_path):
    pred_dir, gt_dir = folders
    result = evaluate_folders(pred_dir, gt_dir, missing="empty", tolerance_mm=1.5, progress=False)
    _, json_path = write_results(result, tmp_path)
    summary = json.loads(json_path.read_text())
    kidney = summary["regions"]["kidney"]
    assert kidney["labels"] == [1]
    assert kidney["dice"]["mean"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert kidney["dice"]["median"] == pytest.approx(2 / 3)
    assert kidney["dice"]["std"] == pytest.approx(np.std([1, 2 / 3, 0]))
    assert (kidney["dice"]["n"], kidney["dice"]["n_undefined"]) == (3, 0)
    assert (kidney["hd95"]["n"], kidney["hd95"]["n_undefined"]) == (2, 1)  # case_002 undefined
    k_and_m = summary["regions"]["kidney_and_masses"]["dice"]
    assert k_and_m["mean"] == pytest.approx((5 / 6 + 0.8 + 0) / 3)
    assert k_and_m["median"] == pytest.approx(0.8)
    assert summary["regions"]["tumor"]["dice"]["median"] == 1.0
    assert summary["cases"] == ["case_000", "case_001", "case_002"]
    assert summary["missing_predictions"] == ["case_002"]
    assert summary["tolerance_mm"] == 1.5
    assert "KiTS" in summary["conventions"]["source"]


def test_kits_regions_only(folders):
    pred_dir, gt_dir = folders
    result = evaluate_folders(pred_dir, gt_dir, regions="kits", missing="empty", progress=False)
    assert list(result.regions) == ["kidney_and_masses", "masses", "tumor"]
    assert result.scores["case_000"]["masses"].dice == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("dataset_json", "names"),
    [
        (None, ["label_1", "label_2"]),
        ({"labels": {"0": "background", "1": "kidney", "2": "tumor"}}, ["kidney", "tumor"]),
    ],
)
def test_label_regions_are_named_from_dataset_json_in_the_parent(tmp_path, dataset_json, names):
    gt = np.zeros(GEOMETRY.shape, np.uint8)
    gt[KIDNEY], gt[MASS] = 1, 2
    write_mask(gt, GEOMETRY, tmp_path / "labelsTr" / "a.nii.gz")
    write_mask(gt, GEOMETRY, tmp_path / "pred" / "a.nii.gz")
    if dataset_json is not None:
        (tmp_path / "dataset.json").write_text(json.dumps(dataset_json))
    result = evaluate_folders(
        tmp_path / "pred", tmp_path / "labelsTr", regions="labels", progress=False
    )
    assert list(result.regions) == names
    assert all(s.dice == 1.0 for s in result.scores["a"].values())


@pytest.fixture
def shifted_origin(tmp_path) -> tuple[Path, Path]:
    gt = np.zeros(GEOMETRY.shape, np.uint8)
    gt[KIDNEY] = 1
    write_mask(gt, GEOMETRY, tmp_path / "gt" / "case_007.nii.gz")
    moved = Geometry(GEOMETRY.shape, GEOMETRY.spacing, (12.0, -20.0, 30.0), GEOMETRY.direction)
    write_mask(gt, moved, tmp_path / "pred" / "case_007.nii.gz")
    return tmp_path / "pred", tmp_path / "gt"


def test_prediction_off_the_ground_truth_grid_names_the_case(shifted_origin):
    pred_dir, gt_dir = shifted_origin
    with pytest.raises(InputError, match=r"^case case_007: .*origin"):
        evaluate_folders(pred_dir, gt_dir, progress=False)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda root: (root / "nope", root / "gt"), "does not exist"),
        (lambda root: (root / "pred", root / "empty"), "no label files"),
        (lambda root: (root / "other", root / "gt"), "no prediction .* matches"),
    ],
)
def test_bad_folders(tmp_path, make, match):
    write_mask(np.zeros(GEOMETRY.shape, np.uint8), GEOMETRY, tmp_path / "gt" / "a.nii.gz")
    write_mask(np.zeros(GEOMETRY.shape, np.uint8), GEOMETRY, tmp_path / "pred" / "a.nii.gz")
    write_mask(np.zeros(GEOMETRY.shape, np.uint8), GEOMETRY, tmp_path / "other" / "b.nii.gz")
    (tmp_path / "empty").mkdir()
    pred_dir, gt_dir = make(tmp_path)
    with pytest.raises(InputError, match=match):
        evaluate_folders(pred_dir, gt_dir, progress=False)


# --- CLI ----------------------------------------------------------------------------------------
def test_cli_geometry_mismatch_exits_2_with_one_line(main, shifted_origin, capsys):
    pred_dir, gt_dir = shifted_origin
    assert main(["evaluate", "--pred", str(pred_dir), "--gt", str(gt_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith("slidesam: error: case case_007: ")


def test_cli_missing_prediction_exits_2(main, folders, capsys):
    pred_dir, gt_dir = folders
    assert main(["evaluate", "--pred", str(pred_dir), "--gt", str(gt_dir)]) == 2
    assert "case_002" in capsys.readouterr().err


def test_cli_writes_results_and_prints_means(main, folders, tmp_path, capsys):
    pred_dir = shutil.copytree(folders[0], tmp_path / "pred")
    argv = [
        "evaluate",
        "--pred",
        str(pred_dir),
        "--gt",
        str(folders[1]),
        "--missing",
        "empty",
        "--tolerance-mm",
        "3",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    summary = json.loads((pred_dir / "evaluation" / "summary.json").read_text())
    assert summary["tolerance_mm"] == 3.0
    assert (pred_dir / "evaluation" / "per_case.csv").is_file()
    kidney_line = next(line for line in out.splitlines() if line.startswith("kidney "))
    assert kidney_line.split()[1] == f"{5 / 9:.3f}"  # mean kidney Dice
    assert "nsd@3mm" in out


def test_kits_tumor_scored_when_only_the_prediction_has_it(tmp_path, caplog):
    gt = np.zeros(GEOMETRY.shape, np.uint8)
    gt[KIDNEY] = 1
    pred = gt.copy()
    pred[MASS] = 2  # a false-positive tumor; label 2 is in no ground truth
    write_mask(gt, GEOMETRY, tmp_path / "gt" / "a.nii.gz")
    write_mask(pred, GEOMETRY, tmp_path / "pred" / "a.nii.gz")
    with caplog.at_level(logging.WARNING):
        result = evaluate_folders(tmp_path / "pred", tmp_path / "gt", progress=False)
    assert "appear in predictions but in no ground truth" in caplog.text
    assert list(result.regions) == ["label_1", "kidney_and_masses", "masses", "tumor"]
    s = result.scores["a"]
    assert s["label_1"].dice == 1.0
    assert (s["tumor"].dice, s["tumor"].pred_voxels, s["tumor"].gt_voxels) == (0.0, 128, 0)
    assert s["masses"].dice == 0.0
    assert s["kidney_and_masses"].dice == pytest.approx(2 * 256 / (256 + 384))
