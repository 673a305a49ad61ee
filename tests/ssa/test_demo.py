"""``slidesam demo``: the README's main job, end to end with the embedded models."""

from __future__ import annotations

import json

import pytest

from slidesam.cli.main import main
from slidesam.data.io import read_image, read_label


@pytest.mark.slow
def test_demo_runs_ssa_with_the_embedded_models_and_scores_it(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--cases", "1", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "stage 1 moved" in printed
    results = json.loads((out / "demo_results.json").read_text())
    assert set(results["table"]) == {"plain", "arterial", "venous"}
    for phase, row in results["table"].items():
        assert 0.0 <= row["ssa"] <= 1.0
        assert f"{phase:10s}" in printed
    # the embedded U-Net and Slide-SAM find this case's arterial tumour (measured ~0.7-0.9)
    assert results["table"]["arterial"]["ssa"] > 0.3
    case = out / "ssa" / "case_00000"
    report = json.loads((case / "ssa_report.json").read_text())
    assert report["stage1"]["source"] == "default U-Net (arterial phantoms)"
    assert report["model"] == "embedded default"
    plain = read_image(out / "cohort" / "case_00000_plain.nii.gz")
    assert read_label(case / "tumor_plain.nii.gz", reference=plain).array.any()
    # a re-run reuses the cases and the finished SSA outputs
    assert main(["demo", "--out", str(out), "--cases", "1", "--no-progress"]) == 0
