"""Cohorts -> nnU-Net raw datasets (``slidesam nnunet-export``), on a 2-case phantom cohort."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from slidesam.cli import nnunet_export
from slidesam.core import KITS_LABELS, Geometry, InputError, Volume
from slidesam.data.io import read_image, read_label, write_image, write_mask
from slidesam.data.phantom import PhantomConfig, dataset_folder_name, write_cohort
from slidesam.stage1.export import (
    EXPORT_MANIFEST,
    export_nnunet,
    find_phase_cases,
    resample_to_grid,
)

PHASES = ("plain", "arterial", "venous")
#: small grids; random flips give non-identity directions, phases differ in grid and motion
CONFIG = PhantomConfig(shape=(38, 96, 96), spacing=(4.0, 3.5, 3.5), random_flips=True)
KITS_JSON = {name: value for value, name in KITS_LABELS.items()}


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("phantom")
    write_cohort(out, cases=2, seed=0, config=CONFIG, progress=False)
    return out


def _src(phantom: Path, phase: str, case: str, label: bool = False) -> Path:
    folder = phantom / dataset_folder_name(phase)
    if label:
        return folder / "labelsTr" / f"{case}.nii.gz"
    return folder / "imagesTr" / f"{case}_0000.nii.gz"


def _header(path: Path) -> Geometry:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return Geometry.from_itk(
        reader.GetSize(), reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection()
    )


@pytest.fixture
def file_cohort(phantom, tmp_path) -> Path:
    """The phantom as CASE_<phase> files: p0 labels beside / in labels/, p1 unlabelled, p1
    venous as NRRD."""
    root = tmp_path / "cohort"
    (root / "labels").mkdir(parents=True)
    for cid, case in (("p0", "case_00000"), ("p1", "case_00001")):
        for phase in PHASES:
            if cid == "p1" and phase == "venous":
                write_image(read_image(_src(phantom, phase, case)), root / f"{cid}_{phase}.nrrd")
            else:
                shutil.copyfile(_src(phantom, phase, case), root / f"{cid}_{phase}.nii.gz")
    arterial_label = _src(phantom, "arterial", "case_00000", True)
    shutil.copyfile(arterial_label, root / "labels" / "p0_arterial.nii.gz")
    shutil.copyfile(_src(phantom, "plain", "case_00000", True), root / "p0_plain_seg.nii.gz")
    (root / "notes.txt").write_text("ignored")
    return root


# ----------------------------------------------------------------------------------------------
# discovery
# ----------------------------------------------------------------------------------------------
def test_find_phase_cases_in_phantom_output(phantom):
    cases = find_phase_cases(phantom)
    assert [c.case_id for c in cases] == ["case_00000", "case_00001"]
    for c in cases:
        assert list(c.images) == list(PHASES)
        assert c.images == {p: _src(phantom, p, c.case_id) for p in PHASES}
        assert c.labels == {p: _src(phantom, p, c.case_id, label=True) for p in PHASES}


def test_find_phase_cases_in_a_file_folder(file_cohort):
    p0, p1 = find_phase_cases(file_cohort)
    assert (p0.case_id, p1.case_id) == ("p0", "p1")
    assert p0.images == {p: file_cohort / f"p0_{p}.nii.gz" for p in PHASES}
    assert p0.labels == {
        "plain": file_cohort / "p0_plain_seg.nii.gz",
        "arterial": file_cohort / "labels" / "p0_arterial.nii.gz",
    }
    assert p1.images["venous"] == file_cohort / "p1_venous.nrrd"
    assert p1.labels == {}
    only_two = find_phase_cases(file_cohort, suffixes=("_arterial", "_plain"))
    assert list(only_two[0].images) == ["arterial", "plain"]


def test_find_phase_cases_errors(file_cohort, phantom, tmp_path):
    with pytest.raises(InputError, match="no such folder"):
        find_phase_cases(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"no cases found; expected nnU-Net datasets"):
        find_phase_cases(tmp_path / "empty")

    shutil.copyfile(file_cohort / "p0_arterial.nii.gz", file_cohort / "images_p0_arterial.nii.gz")
    (file_cohort / "p1_venous.nrrd").unlink()
    with pytest.raises(InputError, match=r"every case needs every phase .*p1 lacks venous"):
        find_phase_cases(file_cohort)
    (file_cohort / "images").mkdir()
    shutil.copyfile(file_cohort / "p0_plain.nii.gz", file_cohort / "images" / "p0_plain.mha")
    with pytest.raises(InputError, match=r"case p0 has two plain images"):
        find_phase_cases(file_cohort)
    (file_cohort / "images" / "p0_plain.mha").unlink()
    shutil.copyfile(file_cohort / "p0_plain_seg.nii.gz", file_cohort / "p9_plain_seg.nii.gz")
    with pytest.raises(InputError, match=r"label map for case p9, which has no plain image"):
        find_phase_cases(file_cohort)

    twice = tmp_path / "twice"
    shutil.copytree(phantom, twice)
    shutil.copytree(twice / dataset_folder_name("arterial"), twice / "Dataset599_OtherArterial")
    with pytest.raises(InputError, match="two datasets for the arterial phase"):
        find_phase_cases(twice)


# ----------------------------------------------------------------------------------------------
# resampling
# ----------------------------------------------------------------------------------------------
def test_resample_to_grid_is_in_world_coordinates():
    array = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    standard = np.eye(3)[:, ::-1]  # (z, y, x) columns: array z, y, x along world z, y, x
    flip_x = standard * [1.0, 1.0, -1.0]  # array x points to world -x
    src = Volume(array, Geometry((4, 5, 6), (2.0, 1.0, 0.5), (10.0, 0.0, 0.0), flip_x))
    same = resample_to_grid(src, src.geometry)
    assert np.array_equal(same.array, array)
    assert same.array.dtype == np.int16

    # the same world box with x running the other way: the array comes back mirrored
    mirrored = Geometry((4, 5, 6), (2.0, 1.0, 0.5), (10.0 - 5 * 0.5, 0.0, 0.0), standard)
    assert np.array_equal(resample_to_grid(src, mirrored).array, array[:, :, ::-1])

    # one slice further up: the last output slice lies outside the source -> fill value
    shifted = Geometry((4, 5, 6), (2.0, 1.0, 0.5), (10.0, 0.0, 2.0), flip_x)
    out = resample_to_grid(src, shifted, fill_value=-1000)
    assert np.array_equal(out.array[:3], array[1:])
    assert np.all(out.array[3] == -1000)

    # half a voxel in y: linear interpolation, rounded back to int16
    half = Geometry((4, 5, 6), (2.0, 1.0, 0.5), (10.0, 0.5, 0.0), flip_x)
    expected = np.rint((array[:, :-1].astype(float) + array[:, 1:]) / 2)
    assert np.array_equal(resample_to_grid(src, half).array[:, :-1], expected)
    labels = resample_to_grid(src, half, interpolation="nearest", fill_value=0)
    assert labels.array.dtype == np.int16


# ----------------------------------------------------------------------------------------------
# export
# ----------------------------------------------------------------------------------------------
def test_channels_layout(phantom, tmp_path):
    summary = export_nnunet(phantom, tmp_path / "raw", layout="channels", progress=False)
    folder = tmp_path / "raw" / "Dataset510_RenalCT"
    info = summary["datasets"]["channels"]
    assert info == {
        "folder": str(folder),
        "dataset_id": 510,
        "channels": list(PHASES),
        "training": 2,
        "test": 0,
    }
    assert sorted(p.name for p in (folder / "imagesTr").iterdir()) == [
        f"case_0000{i}_000{c}.nii.gz" for i in (0, 1) for c in (0, 1, 2)
    ]
    assert sorted(p.name for p in (folder / "labelsTr").iterdir()) == [
        "case_00000.nii.gz",
        "case_00001.nii.gz",
    ]
    assert not (folder / "imagesTs").exists()
    assert not (folder / ".partial").exists()
    ds = json.loads((folder / "dataset.json").read_text())
    assert ds["channel_names"] == {"0": "CT", "1": "CT", "2": "CT"}  # CT normalisation each
    assert ds["channel_phases"] == {"0": "plain", "1": "arterial", "2": "venous"}
    assert ds["labels"] == KITS_JSON
    assert ds["numTraining"] == 2
    assert ds["file_ending"] == ".nii.gz"
    assert ds["reference_phase"] == "arterial"

    for case in ("case_00000", "case_00001"):
        ref_src = _src(phantom, "arterial", case)
        grid = _header(ref_src)
        # the reference channel and the labels: bit for bit
        ref_out = folder / "imagesTr" / f"{case}_0001.nii.gz"
        assert ref_out.read_bytes() == ref_src.read_bytes()
        label_out = folder / "labelsTr" / f"{case}.nii.gz"
        assert label_out.read_bytes() == _src(phantom, "arterial", case, True).read_bytes()
        assert set(np.unique(read_label(label_out).array)) <= set(KITS_LABELS)
        # every channel exactly on the reference grid
        for c in range(3):
            assert _header(folder / "imagesTr" / f"{case}_000{c}.nii.gz") == grid
        # the plain channel: the plain image sampled at the reference voxels' world positions
        plain = read_image(_src(phantom, "plain", case))
        assert plain.geometry.mismatch(grid)  # a different grid: resampling did something
        out = read_image(folder / "imagesTr" / f"{case}_0000.nii.gz").array
        zyx = np.stack(np.meshgrid(*[np.arange(n) for n in grid.shape], indexing="ij"), -1)
        idx = plain.geometry.world_to_index(grid.index_to_world(zyx.reshape(-1, 3)))
        inside = np.all((idx >= 0) & (idx <= np.array(plain.shape) - 1), axis=1)
        want = ndimage.map_coordinates(plain.array.astype(float), idx[inside].T, order=1)
        got = out.reshape(-1)[inside].astype(float)
        assert inside.mean() > 0.8
        assert np.max(np.abs(got - want)) <= 0.5 + 1e-3  # int16 rounding only
        n = np.array(plain.shape)
        outside = np.any((idx < -0.5 - 1e-6) | (idx > n - 0.5 + 1e-6), axis=1)  # > half a voxel
        assert np.all(out.reshape(-1)[outside] == -1024)


def test_channel_datasets_are_read_back_as_phase_cases(phantom, tmp_path):
    """The channels layout, read as a cohort: by its channel_phases, or by an explicit map
    (e.g. a user's own nnU-Net dataset whose channels are all called CT)."""
    export_nnunet(phantom, tmp_path / "raw", layout="channels", progress=False)
    folder = tmp_path / "raw" / "Dataset510_RenalCT"
    for where in (folder, tmp_path / "raw"):
        if where != folder:  # our exports are skipped as sources inside a parent folder
            with pytest.raises(InputError, match="no cases found"):
                find_phase_cases(where)
            continue
        cases = find_phase_cases(where)
        assert [c.case_id for c in cases] == ["case_00000", "case_00001"]
        c0 = cases[0]
        assert c0.images == {
            p: folder / "imagesTr" / f"case_00000_000{i}.nii.gz" for i, p in enumerate(PHASES)
        }
        assert c0.labels == dict.fromkeys(PHASES, folder / "labelsTr" / "case_00000.nii.gz")
    two = find_phase_cases(folder, channels={"arterial": 1, "plain": 0})
    assert two[1].images == {
        "arterial": folder / "imagesTr" / "case_00001_0001.nii.gz",
        "plain": folder / "imagesTr" / "case_00001_0000.nii.gz",
    }
    with pytest.raises(InputError, match=r"only 3 channels \(0..2\), but channels \{'venous': 5\}"):
        find_phase_cases(folder, channels={"arterial": 1, "venous": 5})
    with pytest.raises(InputError, match="two phases share a channel"):
        find_phase_cases(folder, channels={"arterial": 1, "plain": 1})
    (folder / "imagesTr" / "case_00001_0002.nii.gz").unlink()
    with pytest.raises(
        InputError, match=r"case_00001_0002.nii.gz: missing \(channel 2, the venous"
    ):
        find_phase_cases(folder)


def test_phase_suffixes_can_be_mapped(file_cohort):
    for p in file_cohort.glob("p*_*"):
        p.rename(p.with_name(p.name.replace("_plain", "_nc").replace("_arterial", "-art")))
    cases = find_phase_cases(file_cohort, suffixes={"plain": "_nc", "arterial": "-art"})
    assert cases[0].images == {
        "plain": file_cohort / "p0_nc.nii.gz",
        "arterial": file_cohort / "p0-art.nii.gz",
    }
    assert cases[0].labels == {"plain": file_cohort / "p0_nc_seg.nii.gz"}
    with pytest.raises(InputError, match="distinct phases"):
        find_phase_cases(file_cohort, suffixes={"plain": "_nc", "arterial": "_nc"})


def test_per_phase_layout(phantom, tmp_path):
    summary = export_nnunet(
        phantom, tmp_path / "raw", layout="per-phase", dataset_id=530, name="Kid", progress=False
    )
    assert {k: v["dataset_id"] for k, v in summary["datasets"].items()} == {
        "plain": 530,
        "arterial": 531,
        "venous": 532,
    }
    for phase, dataset_id in zip(PHASES, (530, 531, 532), strict=True):
        folder = tmp_path / "raw" / f"Dataset{dataset_id}_Kid{phase.capitalize()}"
        ds = json.loads((folder / "dataset.json").read_text())
        assert ds["channel_names"] == {"0": "CT"}
        assert ds["phase"] == phase
        assert ds["labels"] == KITS_JSON
        assert ds["numTraining"] == 2
        for case in ("case_00000", "case_00001"):
            image = folder / "imagesTr" / f"{case}_0000.nii.gz"
            label = folder / "labelsTr" / f"{case}.nii.gz"
            assert image.read_bytes() == _src(phantom, phase, case).read_bytes()
            assert label.read_bytes() == _src(phantom, phase, case, True).read_bytes()


def test_file_cohort_unlabelled_case_and_nrrd(file_cohort, tmp_path):
    out = tmp_path / "raw"
    summary = export_nnunet(file_cohort, out, layout="channels", progress=False)
    folder = out / "Dataset510_RenalCT"
    assert summary["datasets"]["channels"]["training"] == 1
    assert summary["datasets"]["channels"]["test"] == 1
    assert sorted(p.name for p in (folder / "imagesTs").iterdir()) == [
        f"p1_000{c}.nii.gz" for c in range(3)
    ]
    assert json.loads((folder / "dataset.json").read_text())["numTraining"] == 1

    per_phase = export_nnunet(file_cohort, out, layout="per-phase", progress=False)
    assert {k: (v["training"], v["test"]) for k, v in per_phase["datasets"].items()} == {
        "plain": (1, 1),
        "arterial": (1, 1),
        "venous": (0, 2),
    }
    venous = out / "Dataset522_RenalCTVenous"
    converted = read_image(venous / "imagesTs" / "p1_0000.nii.gz")
    original = read_image(file_cohort / "p1_venous.nrrd")
    assert np.array_equal(converted.array, original.array)
    assert converted.geometry.mismatch(original.geometry) == ""
    assert json.loads((venous / "dataset.json").read_text())["numTraining"] == 0


def test_export_rejects_bad_labels_and_settings(file_cohort, tmp_path):
    bad = read_label(file_cohort / "labels" / "p0_arterial.nii.gz")
    bad.array[0, 0, 0] = 7
    write_mask(bad.array, bad, file_cohort / "labels" / "p0_arterial.nii.gz")
    with pytest.raises(InputError, match=r"label values \[7\] are not in the dataset's labels"):
        export_nnunet(file_cohort, tmp_path / "a", progress=False)
    with pytest.raises(InputError, match="reference phase 'arterial' is not among"):
        export_nnunet(file_cohort, tmp_path / "b", phases=["plain", "venous"], progress=False)
    with pytest.raises(InputError, match="phases must be distinct phases of the cohort"):
        export_nnunet(file_cohort, tmp_path / "b", phases=["delayed"], progress=False)
    with pytest.raises(InputError, match="layout must be one of channels, per-phase"):
        export_nnunet(file_cohort, tmp_path / "b", layout="stacked", progress=False)
    with pytest.raises(InputError, match="name must be letters"):
        export_nnunet(file_cohort, tmp_path / "b", name="Renal CT", progress=False)
    with pytest.raises(InputError, match=r"dataset ids must lie in 1\.\.999, got 998\.\.1000"):
        export_nnunet(file_cohort, tmp_path / "b", layout="per-phase", dataset_id=998)
    assert not (tmp_path / "b").exists()


def test_export_resumes_and_refuses_another_dataset(phantom, tmp_path):
    out = tmp_path / "raw"
    export_nnunet(phantom, out, progress=False)
    folder = out / "Dataset510_RenalCT"
    files = sorted(folder.rglob("*.nii.gz"))
    stamps = {p: p.stat().st_mtime_ns for p in files}

    again = export_nnunet(phantom, out, progress=False)
    assert again["cases_resumed"] == 2
    assert {p: p.stat().st_mtime_ns for p in files} == stamps  # nothing rewritten
    manifest = json.loads((folder / EXPORT_MANIFEST).read_text())
    assert manifest["complete"] is True
    assert sorted(manifest["cases"]) == ["case_00000", "case_00001"]

    touched = _src(phantom, "venous", "case_00001")
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
    redo = export_nnunet(phantom, out, progress=False)
    assert redo["cases_resumed"] == 1
    assert (folder / "imagesTr" / "case_00000_0000.nii.gz").stat().st_mtime_ns == stamps[
        folder / "imagesTr" / "case_00000_0000.nii.gz"
    ]

    with pytest.raises(InputError, match=r"different export \(.*reference_phase 'arterial' != "):
        export_nnunet(phantom, out, reference_phase="plain", progress=False)
    (out / "Dataset511_Other").mkdir()
    with pytest.raises(InputError, match="already holds Dataset511_Other with the dataset id 511"):
        export_nnunet(phantom, out, dataset_id=511, progress=False)
    foreign = tmp_path / "foreign" / "Dataset510_RenalCT"
    foreign.mkdir(parents=True)
    (foreign / "dataset.json").write_text("{}")
    with pytest.raises(InputError, match="was not written by slidesam nnunet-export"):
        export_nnunet(phantom, foreign.parent, progress=False)
    # an export inside the cohort folder is not mistaken for a source dataset
    export_nnunet(phantom, phantom, layout="per-phase", dataset_id=540, progress=False)
    assert len(find_phase_cases(phantom)) == 2


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="slidesam")
    nnunet_export.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli(phantom, tmp_path, capsys):
    out = tmp_path / "raw"
    argv = ["nnunet-export", "--cohort", str(phantom), "--out", str(out), "--no-progress"]
    rc = _cli([*argv, "--layout", "channels", "--phases", "arterial", "venous", "--name", "Two"])
    assert rc == 0
    folder = out / "Dataset510_Two"
    assert json.loads((folder / "dataset.json").read_text())["channel_phases"] == {
        "0": "arterial",
        "1": "venous",
    }
    printed = capsys.readouterr().out
    assert f"{folder}: 2 training and 0 test cases, channels 0=arterial, 1=venous" in printed
    assert "nnUNetv2_plan_and_preprocess -d 510 --verify_dataset_integrity" in printed

    assert _cli([*argv, "--layout", "per-phase", "--dataset-id", "600"]) == 0
    assert (out / "Dataset602_RenalCTVenous" / "dataset.json").is_file()
    with pytest.raises(SystemExit):
        _cli([*argv, "--layout", "stacked"])
    with pytest.raises(InputError, match="reference phase 'plain' is not among"):
        _cli([*argv, "--layout", "channels", "--phases", "arterial", "--reference-phase", "plain"])


class _InProcessPool:
    """multiprocessing Pool stand-in: nnU-Net's verifier runs in this process, no spawn."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def starmap(self, fn, iterable):
        return [fn(*args) for args in iterable]


@pytest.mark.skipif(
    importlib.util.find_spec("nnunetv2") is None, reason="nnU-Net v2 is not installed"
)
def test_nnunet_accepts_the_datasets(phantom, tmp_path, monkeypatch):
    """nnU-Net's own verify_dataset_integrity (names, counts, labels, grids per channel)."""
    import multiprocessing

    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    monkeypatch.setattr(
        multiprocessing, "get_context", lambda method=None: SimpleNamespace(Pool=_InProcessPool)
    )
    channels = export_nnunet(phantom, tmp_path, progress=False)
    per_phase = export_nnunet(phantom, tmp_path, layout="per-phase", progress=False)
    for info in [*channels["datasets"].values(), *per_phase["datasets"].values()]:
        verify_dataset_integrity(info["folder"], 1)  # raises on any problem
