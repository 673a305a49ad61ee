"""``slidesam segment`` end to end with a tiny seeded checkpoint: files, geometry, records,
batch mode, sharding, resumption and one-line errors that write nothing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import slidesam
from slidesam.cli.main import main
from slidesam.core import Geometry, Volume
from slidesam.data.io import read_image, read_label, write_image
from slidesam.inference.checkpoint import save_checkpoint

FLIPPED = np.array([[0, 0, -1], [0, -1, 0], [1, 0, 0]], dtype=float)
GEOM = Geometry(
    shape=(8, 40, 48), spacing=(3.0, 0.9, 0.8), origin=(12.5, -30.0, 100.0), direction=FLIPPED
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = slidesam.build_slidesam("tiny_64", lora_rank=2)
    return save_checkpoint(model, model.config, tmp_path_factory.mktemp("ckpt") / "model")


def segment(image, prompts, out, *extra) -> int:
    """``slidesam segment --image IMAGE --prompts PROMPTS --out OUT EXTRA...``: the exit code."""
    args = ["--image", image, "--prompts", prompts, "--out", out, *extra]
    return main(["segment", *map(str, args)])


def _image(path, seed=0):
    rng = np.random.default_rng(seed)
    arr = rng.integers(-150, 250, GEOM.shape).astype(np.int16)
    arr[2:7, 10:25, 12:30] += 200
    return write_image(Volume(arr, GEOM), path)


def _prompts(path, **extra):
    prompt = {"slice": 4, "box": [12, 10, 29, 24], "label": 2, **extra}
    path.write_text(json.dumps({"prompts": [prompt]}))
    return path


def test_single_case(tmp_path, checkpoint, capsys):
    img = _image(tmp_path / "ct.nii.gz")
    out = tmp_path / "res" / "mask.nii.gz"
    code = segment(
        img,
        _prompts(tmp_path / "p.json"),
        out,
        "--checkpoint",
        checkpoint,
        "--step",
        "1",
        "--iou-thresh",
        "0",
        "--stability-thresh",
        "0",
        "--save-probabilities",
        "--no-progress",
    )
    assert code == 0
    mask = read_label(out, reference=read_image(img))
    assert mask.geometry == read_image(img).geometry  # exactly the input's grid
    assert set(np.unique(mask.array)) <= {0, 2}
    sidecar = json.loads((tmp_path / "res" / "mask.json").read_text())
    anchor = [r for r in sidecar["records"] if r["window"] == r["slice"] == 4]
    assert [(r["source"], r["box"], r["label"]) for r in anchor] == [
        ("prompt", [12, 10, 29, 24], 2)
    ]
    # the anchor window's neighbours come from the prompt too, unless a window of their own ran
    for r in sidecar["records"]:
        assert r["source"] == ("prompt" if r["window"] == 4 else "propagated")
    assert sidecar["windows"][0] == {"label": 2, "center": 4, "accepted": True}
    assert sidecar["encoder_passes"] == len({w["center"] for w in sidecar["windows"]})
    assert sidecar["propagation"]["step"] == 1
    prob = read_image(tmp_path / "res" / "mask_prob.nii.gz", modality=None)
    assert prob.array.dtype == np.float32
    np.testing.assert_array_equal(prob.array > 0.5, mask.array == 2)
    assert "encoder passes" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("prompt", "fragment"),
    [
        ({"slice": 8, "box": [1, 1, 5, 5]}, "slice 8 is out of range 0..7"),
        ({"slice": 2, "box": [1, 1, 60, 5]}, "outside the 48 x 40"),
        ({"slice": 2, "box": [5, 9, 8, 5]}, "empty box"),
        ({"slice": 2, "box": [1, 1, 5, 5], "colour": "red"}, "unknown key(s) colour"),
        ({"slice": 2, "points": [[3, 3]]}, "1 points but 0 point_labels"),
        ({"box_mm": [[0, 0, 0], [1, 1, 1]]}, "lies outside the image"),
    ],
)
def test_bad_prompts_one_line_exit_2_nothing_written(
    tmp_path, checkpoint, capsys, prompt, fragment
):
    img = _image(tmp_path / "ct.nii.gz")
    (tmp_path / "p.json").write_text(json.dumps({"prompts": [prompt]}))
    out = tmp_path / "out" / "m.nii.gz"
    code = segment(str(img), str(tmp_path / "p.json"), str(out), "--checkpoint", str(checkpoint))
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("slidesam: error:")
    assert err.count("\n") == 1
    assert fragment in err
    assert not (tmp_path / "out").exists()


def test_checkpoint_of_another_family_is_refused(tmp_path, capsys):
    img = _image(tmp_path / "ct.nii.gz")
    torch.save({"encoder.conv.weight": torch.zeros(2)}, tmp_path / "unet.pth")
    code = segment(
        img,
        _prompts(tmp_path / "p.json"),
        tmp_path / "m.nii.gz",
        "--checkpoint",
        str(tmp_path / "unet.pth"),
    )
    assert code == 2
    assert "not a SAM-family checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "m.nii.gz").exists()


def test_box_in_mm_equals_box_in_pixels(tmp_path, checkpoint):
    img = _image(tmp_path / "ct.nii.gz")
    corners = GEOM.index_to_world([[4, 10, 12], [4, 24, 29]])  # (z, y, x) -> LPS mm
    (tmp_path / "mm.json").write_text(
        json.dumps({"prompts": [{"box_mm": corners.tolist(), "label": 2}]})
    )
    args = ["--image", str(img), "--checkpoint", str(checkpoint), "--no-progress"]
    assert (
        main(
            [
                "segment",
                *args,
                "--prompts",
                str(_prompts(tmp_path / "px.json")),
                "--out",
                str(tmp_path / "a.nii.gz"),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "segment",
                *args,
                "--prompts",
                str(tmp_path / "mm.json"),
                "--out",
                str(tmp_path / "b.nii.gz"),
            ]
        )
        == 0
    )
    a, b = (
        read_image(tmp_path / "a.nii.gz", modality=None),
        read_image(tmp_path / "b.nii.gz", modality=None),
    )
    np.testing.assert_array_equal(a.array, b.array)
    rec = json.loads((tmp_path / "b.json").read_text())["records"]
    assert next(r for r in rec if r["slice"] == r["window"] == 4)["box"] == pytest.approx(
        [12, 10, 29, 24], abs=1e-6
    )


def test_batch_sharding_resume_and_failures(tmp_path, checkpoint, capsys):
    images, prompts, out = tmp_path / "img", tmp_path / "prm", tmp_path / "out"
    images.mkdir()
    prompts.mkdir()
    for i in range(4):
        _image(images / f"case_{i}_0000.nii.gz", seed=i)
        _prompts(prompts / f"case_{i}.json")
    base = [
        "segment",
        "--image",
        str(images),
        "--prompts",
        str(prompts),
        "--out",
        str(out),
        "--checkpoint",
        str(checkpoint),
        "--no-progress",
    ]
    assert main([*base, "--part-id", "1", "--num-parts", "2"]) == 0
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["case_1.nii.gz", "case_3.nii.gz"]
    assert main(base) == 0
    assert "2 segmented, 2 already done" in capsys.readouterr().out
    assert len(list(out.glob("case_*.json"))) == 4
    # a broken prompts file fails its case only; the others are kept
    (prompts / "case_2.json").write_text("{not json")
    assert main([*base, "--overwrite"]) == 1
    text = capsys.readouterr().out
    assert "3 segmented" in text
    assert "case_2: " in text
    assert "not valid JSON" in text
    # an image without prompts: error before anything runs
    _image(images / "case_9_0000.nii.gz")
    assert main(base) == 2
    assert "have no prompts file" in capsys.readouterr().err


def test_default_model_runs_without_checkpoint_and_a_missing_one_is_explained(
    tmp_path, capsys, monkeypatch
):
    img = _image(tmp_path / "ct.nii.gz")
    prompts = str(_prompts(tmp_path / "p.json"))
    assert segment(str(img), prompts, str(tmp_path / "m.nii.gz")) == 0  # the embedded model
    monkeypatch.setattr("slidesam.inference.models.DEFAULT_MODEL_FILE", "absent.pt")
    assert segment(str(img), prompts, str(tmp_path / "m2.nii.gz")) == 2
    assert "no embedded default model" in capsys.readouterr().err


def test_dicom_in_dicom_seg_out(tmp_path, checkpoint, monkeypatch):
    import highdicom as hd
    import pydicom

    import slidesam.inference.segment as seg_api
    from slidesam.data.dicom import write_dicom_series
    from slidesam.inference.propagation import SegmentationResult

    rng = np.random.default_rng(0)
    arr = rng.integers(-150, 250, GEOM.shape).astype(np.int16)
    write_dicom_series(Volume(arr, GEOM), tmp_path / "series")
    known = np.zeros(GEOM.shape, np.uint8)
    known[3:6, 10:20, 12:30] = 2

    def fixed(volume, prompts, predictor, config, progress=False):
        return SegmentationResult(
            labels=known, probabilities={}, records=[], windows=[], encoder_passes=0
        )

    monkeypatch.setattr(seg_api, "segment_volume", fixed)
    out = tmp_path / "m.nii.gz"
    code = segment(
        tmp_path / "series",
        _prompts(tmp_path / "p.json"),
        out,
        "--checkpoint",
        checkpoint,
        "--dicom-seg",
        tmp_path / "seg.dcm",
        "--no-progress",
    )
    assert code == 0
    ct = read_image(tmp_path / "series")
    np.testing.assert_array_equal(read_label(out, reference=ct).array, known)
    seg = hd.seg.segread(tmp_path / "seg.dcm")
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["tumor"]
    uids = [pydicom.dcmread(f).SOPInstanceUID for f in ct.source_files]
    back = seg.get_pixels_by_source_instance(uids, combine_segments=True)
    np.testing.assert_array_equal(back > 0, known > 0)
    # a NIfTI input cannot be referenced by a DICOM SEG: refused before anything runs
    assert (
        segment(
            _image(tmp_path / "ct.nii.gz"),
            tmp_path / "p.json",
            tmp_path / "n.nii.gz",
            "--checkpoint",
            checkpoint,
            "--dicom-seg",
            str(tmp_path / "x.dcm"),
        )
        == 2
    )
    assert not (tmp_path / "n.nii.gz").exists()


def test_propagation_flags_default_to_the_config_defaults():
    # the command line keeps literal defaults (importing the config would import torch)
    from slidesam.cli.main import build_parser
    from slidesam.inference.propagation import PropagationConfig

    args = build_parser().parse_args(
        ["segment", "--image", "i.nii.gz", "--prompts", "p.json", "--out", "o.nii.gz"]
    )
    d = PropagationConfig()
    for name in ("step", "iou_thresh", "stability_thresh", "nms_thresh", "min_area", "box_margin"):
        assert getattr(args, name) == getattr(d, name), name
