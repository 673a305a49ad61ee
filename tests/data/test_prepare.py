from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from slidesam.cli.main import main
from slidesam.core import Geometry, InputError, Volume
from slidesam.data.io import write_image, write_mask
from slidesam.data.prepare import PrepareConfig, prepare_dataset, read_targets

SHAPE = (6, 40, 50)  # z has the fewest voxels, so windows are axial


def _dataset(root, n_cases=2):
    """Cases with a kidney (label 1) on slices 1..4 and a 2-pixel tumor (label 2) on slice 2."""
    ds = root / "Dataset900_Toy"
    g = Geometry(
        shape=SHAPE,
        spacing=(3.0, 1.5, 1.5),
        origin=(5, 6, 7),
        direction=np.array([[0, 0, -1], [0, -1, 0], [1, 0, 0]], float),
    )
    for i in range(n_cases):
        image = np.full(SHAPE, -1000, np.int16)
        image[:, 5:35, 5:45] = 100 + 10 * i  # 100 HU -> 128
        labels = np.zeros(SHAPE, np.uint8)
        labels[1:5, 10:16, 20:25] = 1  # 30 px of 2000 -> 1.5 % > 0.14 %
        labels[2, 30, 30:32] = 2  # 2 px -> 0.1 %: discarded
        write_image(Volume(image, g), ds / "imagesTr" / f"case_{i:03d}_0000.nii.gz")
        write_mask(labels, g, ds / "labelsTr" / f"case_{i:03d}.nii.gz")
    (ds / "dataset.json").write_text(
        json.dumps(
            {
                "channel_names": {"0": "CT"},
                "labels": {"background": 0, "kidney": 1, "tumor": 2},
                "numTraining": n_cases,
                "file_ending": ".nii.gz",
            }
        )
    )
    return ds


def test_prepare_writes_windows_masks_and_metadata(tmp_path):
    ds = _dataset(tmp_path)
    cfg = PrepareConfig(size=100, image_format="png")
    summary = prepare_dataset(ds, tmp_path / "out", cfg, progress=False)
    assert summary["cases"] == 2
    assert summary["cases_failed"] == {}
    assert summary["windows"] == 8  # centres 1..4 carry the kidney, in each of 2 cases
    assert summary["masks_kept"] == {"kidney": 8, "tumor": 0}
    assert summary["masks_discarded"] == {"kidney": 0, "tumor": 2}
    assert summary["windows_without_target"] == 0

    out = tmp_path / "out" / "Dataset900_Toy"
    records = [json.loads(x) for x in (out / "meta" / "case_001.jsonl").read_text().splitlines()]
    assert [r["slice_index"] for r in records] == [1, 2, 3, 4]
    r = records[0]
    assert r["slices"] == [0, 1, 2]
    assert r["axis"] == 0
    assert r["axis_name"] == "z"
    assert r["labels"] == [0]
    assert r["class_names"] == ["kidney"]
    assert r["label_values"] == [[1]]
    assert r["source_image"].endswith("case_001_0000.nii.gz")
    assert r["slice_shape"] == [40, 50]
    assert r["indicator"] == [1, 1, 1]

    rgb = np.asarray(Image.open(out / r["image"]))
    assert rgb.shape == (100, 100, 3)
    assert rgb[50, 50].tolist() == [132, 132, 132]  # 110 HU: 310 * 255 / 600 = 131.75 -> 132
    masks = np.load(out / r["mask"])
    assert masks["masks"].shape == (1, 3, 100, 100)
    assert masks["labels"].tolist() == [0]
    assert masks["masks"][0, 0].sum() == 0  # slice 0 has no kidney
    assert masks["masks"][0, 1].sum() == 15 * 10  # 6 x 5 px, rows x2.5 and columns x2


def test_prepare_resumes_and_refuses_other_settings(tmp_path):
    ds = _dataset(tmp_path, n_cases=2)
    cfg = PrepareConfig(size=64, image_format="npz")
    first = prepare_dataset(ds, tmp_path / "out", cfg, progress=False)
    (tmp_path / "out" / "Dataset900_Toy" / "meta" / "case_000.done.json").unlink()
    second = prepare_dataset(ds, tmp_path / "out", cfg, progress=False)
    assert second["cases_resumed"] == 1
    assert second["cases_prepared"] == 1
    assert second["windows"] == first["windows"]
    with pytest.raises(InputError, match=r"other settings \(size\)"):
        prepare_dataset(
            ds, tmp_path / "out", PrepareConfig(size=32, image_format="npz"), progress=False
        )
    third = prepare_dataset(
        ds, tmp_path / "out", PrepareConfig(size=32), overwrite=True, progress=False
    )
    assert third["cases_prepared"] == 2


def test_parallel_equals_serial(tmp_path):
    ds = _dataset(tmp_path, n_cases=3)
    cfg = PrepareConfig(size=48, image_format="png", axes="all", keep_empty=True)
    a = prepare_dataset(ds, tmp_path / "a", cfg, workers=1, progress=False)
    b = prepare_dataset(ds, tmp_path / "b", cfg, workers=2, progress=False)
    assert a["windows"] == b["windows"] == 3 * (4 + 38 + 48)  # all axes, empty windows kept
    for case in ("case_000", "case_002"):
        ra = (tmp_path / "a" / "Dataset900_Toy" / "meta" / f"{case}.jsonl").read_text()
        rb = (tmp_path / "b" / "Dataset900_Toy" / "meta" / f"{case}.jsonl").read_text()
        assert ra.replace(str(tmp_path / "a"), "") == rb.replace(str(tmp_path / "b"), "")


def test_targets_from_dataset_json_variants(tmp_path):
    (tmp_path / "dataset.json").write_text(
        json.dumps({"labels": {"background": 0, "kidney": [1, 2, 3], "masses": [2, 3], "tumor": 2}})
    )
    t = read_targets(tmp_path)
    assert [(x.name, x.values) for x in t] == [
        ("kidney", (1, 2, 3)),
        ("masses", (2, 3)),
        ("tumor", (2,)),
    ]
    assert [x.name for x in read_targets(tmp_path, ("tumor",))] == ["tumor"]
    with pytest.raises(InputError, match="unknown label"):
        read_targets(tmp_path, ("liver",))
    (tmp_path / "dataset.json").write_text(
        json.dumps({"labels": {"0": "background", "1": "liver"}})
    )
    assert [(x.name, x.values) for x in read_targets(tmp_path)] == [("liver", (1,))]


def test_cli_prepare_and_errors(tmp_path, capsys):
    ds = _dataset(tmp_path, n_cases=1)
    assert (
        main(
            [
                "prepare",
                "--dataset",
                str(tmp_path),
                "--out",
                str(tmp_path / "o"),
                "--size",
                "32",
                "--workers",
                "1",
                "--no-progress",
            ]
        )
        == 0
    )
    assert "4 windows" in capsys.readouterr().out
    assert main(["prepare", "--dataset", str(tmp_path / "nope"), "--out", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("slidesam: error:")
    assert err.count("\n") == 1
    (ds / "labelsTr" / "case_000.nii.gz").write_bytes(b"garbage")
    assert (
        main(
            [
                "prepare",
                "--dataset",
                str(ds),
                "--out",
                str(tmp_path / "o2"),
                "--workers",
                "1",
                "--no-progress",
            ]
        )
        == 1
    )  # the failed case is reported


def test_prepare_real_ct_with_kidney_labels(real_fixtures, tmp_path):
    ds = tmp_path / "Dataset001_Real"
    (ds / "imagesTr").mkdir(parents=True)
    (ds / "labelsTr").mkdir()
    (ds / "imagesTr" / "ct_0000.nii.gz").symlink_to(real_fixtures / "abdomen_ct_3mm.nii.gz")
    (ds / "labelsTr" / "ct.nii.gz").symlink_to(
        real_fixtures / "abdomen_ct_3mm_totalseg_labels.nii.gz"
    )
    (ds / "dataset.json").write_text(
        json.dumps({"labels": {"background": 0, "kidney_right": 2, "kidney_left": 3}})
    )
    summary = prepare_dataset(
        ds, tmp_path / "out", PrepareConfig(size=128, image_format="npz"), progress=False
    )
    # kidneys on slices 0..22 of 30 axial slices: window centres 1..22 at most
    assert 15 <= summary["windows"] <= 22
    records = [
        json.loads(x)
        for x in (tmp_path / "out" / ds.name / "meta" / "ct.jsonl").read_text().splitlines()
    ]
    assert all(r["axis_name"] == "z" and r["slice_shape"] == [101, 122] for r in records)
    assert {n for r in records for n in r["class_names"]} == {"kidney_right", "kidney_left"}
    assert max(r["slice_index"] for r in records) <= 22


def test_real_dicom_series_makes_one_window(real_fixtures):
    from slidesam.data.io import read_image
    from slidesam.data.preprocess import resize_image, slice_window, to_uint8

    ct = read_image(real_fixtures / "dicom_ct_3slice")
    window = to_uint8(slice_window(ct.array, 0, 1), (-200, 400))
    rgb = resize_image(window, 512)  # 512 -> 512: no resampling, channels are the slices
    for c in range(3):
        np.testing.assert_array_equal(rgb[..., c], to_uint8(ct.array[c], (-200, 400)))
    assert 0 < rgb.mean() < 255
