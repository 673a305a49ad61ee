"""Tests of the multi-phase renal CT phantom (slidesam.data.phantom) and its CLI."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.distance import pdist

from slidesam.cli import main as cli_main
from slidesam.core import InputError
from slidesam.data.io import read_image, read_label
from slidesam.data.phantom import (
    PhantomConfig,
    dataset_folder_name,
    generate_case,
    write_cohort,
)

#: a coarse grid that still holds the kidneys (FOV 148 x 332 x 332 mm): ~4x faster than default
SMALL = PhantomConfig(shape=(38, 96, 96), spacing=(4.0, 3.5, 3.5))
SMALL_ARGS = ["--shape", "38", "96", "96", "--spacing", "4", "3.5", "3.5"]
DEFAULT_DIRECTION = np.eye(3)[:, ::-1]


@functools.lru_cache(maxsize=64)
def _case(index: int, seed: int, config: PhantomConfig = SMALL):
    return generate_case(index, seed=seed, config=config)


def _world_centroid(case, phase: str, label: int) -> np.ndarray:
    idx = np.argwhere(case.labels[phase].array == label)
    return case.phases[phase].geometry.index_to_world(idx).mean(axis=0)


def _interior_mean(case, phase: str, label: int) -> float:
    """Mean HU one voxel in from the label border (no partial volume with fat)."""
    mask = case.labels[phase].array == label
    inner = ndimage.binary_erosion(mask)
    if inner.sum() >= 10:
        mask = inner
    return float(case.phases[phase].array[mask].astype(np.float64).mean())


def _label_mean(case, phase: str, label: int) -> float:
    return float(case.phases[phase].array[case.labels[phase].array == label].mean())


# ----------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"phases": ("plain", "bogus")}, "unknown phase 'bogus'"),
        ({"phases": ()}, "at least one"),
        ({"phases": ("plain", "plain")}, "must not repeat"),
        ({"shape": (0, 160, 160)}, "shape"),
        ({"spacing": (3.0, -2.0, 2.0)}, "spacing"),
        ({"motion_mm": -1.0}, "motion_mm"),
        ({"noise_hu": (20.0, 10.0)}, "noise_hu"),
        ({"tumor_diameter_mm": (1.0, 60.0)}, "tumor_diameter_mm"),
        ({"cyst_probability": 1.5}, "cyst_probability"),
        ({"shape": (24, 96, 96), "spacing": (4.0, 3.5, 3.5)}, "at least 140 x 145 x 245 mm"),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(")):
        PhantomConfig(**kwargs)


def test_config_round_trips_through_json():
    config = PhantomConfig(phases=["venous", "plain"], motion_mm=2, random_flips=True)
    assert config.phases == ("venous", "plain")
    again = PhantomConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config


# ----------------------------------------------------------------------------------------------
# determinism
# ----------------------------------------------------------------------------------------------
def test_same_seed_and_index_give_identical_cases():
    a = generate_case(1, seed=7, config=SMALL)
    b = generate_case(1, seed=7, config=SMALL)
    assert a.case_id == "case_00001"
    assert a.truth == b.truth
    for phase in SMALL.phases:
        assert a.phases[phase].array.dtype == np.int16
        assert a.labels[phase].array.dtype == np.uint8
        assert a.phases[phase].geometry == b.phases[phase].geometry
        np.testing.assert_array_equal(a.phases[phase].array, b.phases[phase].array)
        np.testing.assert_array_equal(a.labels[phase].array, b.labels[phase].array)


def test_different_seeds_give_different_cases():
    a, b = _case(1, 7), _case(1, 8)
    assert a.truth["tumor_center_lps_mm"] != b.truth["tumor_center_lps_mm"]
    assert a.phases["plain"].array.shape == b.phases["plain"].array.shape
    assert np.mean(a.phases["plain"].array != b.phases["plain"].array) > 0.5


def test_phase_subset_gives_the_same_phase():
    only = generate_case(
        2,
        seed=5,
        config=PhantomConfig(shape=SMALL.shape, spacing=SMALL.spacing, phases=("arterial",)),
    )
    full = _case(2, 5)
    assert set(only.phases) == {"arterial"}
    assert only.phases["arterial"].geometry == full.phases["arterial"].geometry
    np.testing.assert_array_equal(only.phases["arterial"].array, full.phases["arterial"].array)
    np.testing.assert_array_equal(only.labels["arterial"].array, full.labels["arterial"].array)


# ----------------------------------------------------------------------------------------------
# realism of the intensities
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("index", "seed"), [(0, 0), (1, 0), (2, 0), (3, 0), (0, 1), (1, 1)])
def test_hu_values_match_multiphase_renal_ct(index, seed):
    case = _case(index, seed)
    kidney_plain = _interior_mean(case, "plain", 1)
    tumor_plain = _interior_mean(case, "plain", 2)
    # nearly isodense tumour on the plain phase
    assert 20.0 <= kidney_plain <= 40.0
    assert abs(tumor_plain - kidney_plain) <= 15.0
    # strong arterial enhancement of tumour and kidney (cortex), washout on the venous phase
    assert _label_mean(case, "arterial", 2) >= _label_mean(case, "plain", 2) + 60.0
    assert _interior_mean(case, "arterial", 1) >= kidney_plain + 70.0
    kidney_art = case.phases["arterial"].array[case.labels["arterial"].array == 1]
    assert np.percentile(kidney_art, 95) >= 150.0  # the cortex
    assert _interior_mean(case, "venous", 2) < _interior_mean(case, "venous", 1) - 20.0
    # air outside the body
    assert np.median(case.phases["plain"].array[0, :3, :3]) <= -950


@pytest.mark.parametrize(("index", "seed"), [(0, 0), (1, 0), (2, 3), (1, 1)])
def test_noise_in_the_liver_matches_the_drawn_sigma(index, seed):
    case = _case(index, seed)
    sigma = case.truth["noise_sigma_hu"]
    assert 10.0 <= sigma <= 20.0
    for phase in SMALL.phases:
        geometry = case.phases[phase].geometry
        centre = np.rint(geometry.world_to_index(case.truth["noise_probe_lps_mm"][phase]))
        half = np.maximum(1, np.round(12.0 / np.asarray(geometry.spacing))).astype(int)
        lo, hi = centre.astype(int) - half, centre.astype(int) + half + 1
        cube = case.phases[phase].array[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        assert cube.size == np.prod(2 * half + 1)
        assert 40.0 <= cube.mean() <= 140.0  # liver, any phase
        assert 8.0 <= cube.std() <= 25.0
        assert cube.std() == pytest.approx(sigma, rel=0.2)


# ----------------------------------------------------------------------------------------------
# labels
# ----------------------------------------------------------------------------------------------
def test_labels_hold_kidney_and_tumor_and_sometimes_a_cyst():
    cases = [_case(i, s) for s in (0, 1) for i in range(4)]
    for case in cases:
        for phase in SMALL.phases:
            values = set(np.unique(case.labels[phase].array).tolist())
            assert {0, 1, 2} <= values <= {0, 1, 2, 3}
            assert (3 in values) == case.truth["cyst_present"]
    assert any(c.truth["cyst_present"] for c in cases)
    assert not all(c.truth["cyst_present"] for c in cases)


@pytest.mark.parametrize(("index", "seed"), [(0, 0), (1, 0), (2, 0), (3, 0), (0, 1), (1, 1)])
def test_tumor_diameter_from_labels_matches_the_truth(index, seed):
    case = _case(index, seed)
    lo, hi = SMALL.tumor_diameter_mm
    slack = 2 * max(SMALL.spacing)
    diameter = case.truth["tumor_diameter_mm"]
    assert lo <= diameter <= hi
    for phase in SMALL.phases:
        mask = case.labels[phase].array == 2
        border = np.argwhere(mask & ~ndimage.binary_erosion(mask))
        extent = pdist(case.phases[phase].geometry.index_to_world(border)).max()
        assert lo - slack <= extent <= hi + slack
        assert abs(extent - diameter) <= slack


def test_kidneys_and_tumor_lie_inside_every_field_of_view():
    for case in [_case(i, s) for s in (0, 1) for i in range(4)]:
        for phase in SMALL.phases:
            lab = case.labels[phase].array > 0
            faces = [lab[0], lab[-1], lab[:, 0], lab[:, -1], lab[:, :, 0], lab[:, :, -1]]
            assert not any(face.any() for face in faces)


# ----------------------------------------------------------------------------------------------
# phases on their own grids, with motion
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("index", [0, 1])
def test_phases_are_not_voxel_aligned_and_motion_is_recorded(index):
    case = _case(index, 11, PhantomConfig())  # the default grid: 2 mm in-plane, 3 mm slices
    plain = case.phases["plain"].geometry
    assert plain.shape == (48, 160, 160)
    assert case.truth["motion_mm"]["plain"] == [0.0, 0.0, 0.0]
    for phase in ("arterial", "venous"):
        geometry = case.phases[phase].geometry
        assert case.labels[phase].geometry == geometry
        delta = np.subtract(geometry.origin, plain.origin)  # (x, y, z) mm
        for j, axis in enumerate((2, 1, 0)):  # world axis j <-> array axis
            for spacing in (plain.spacing[axis], geometry.spacing[axis]):
                frac = (delta[j] / spacing) % 1.0
                assert 0.05 < frac < 0.95, (phase, j, delta[j], spacing)
        motion = np.array(case.truth["motion_mm"][phase])
        assert np.all(np.abs(motion) <= 4.0)
        assert np.linalg.norm(motion) > 0.1
        moved = _world_centroid(case, phase, 2) - _world_centroid(case, "plain", 2)
        np.testing.assert_allclose(moved, motion, atol=1.5)
        truth = case.truth["tumor_centroid_lps_mm"][phase]
        np.testing.assert_allclose(_world_centroid(case, phase, 2), truth, atol=1.5)
    z_spacings = {case.phases[p].geometry.spacing[0] for p in case.phases}
    assert z_spacings <= {2.5, 3.0, 3.5}


def test_zero_motion_keeps_the_anatomy_in_place():
    config = PhantomConfig(shape=SMALL.shape, spacing=SMALL.spacing, motion_mm=0.0)
    case = generate_case(3, seed=2, config=config)
    for phase in ("arterial", "venous"):
        assert case.truth["motion_mm"][phase] == [0.0, 0.0, 0.0]
        np.testing.assert_allclose(
            _world_centroid(case, phase, 2), _world_centroid(case, "plain", 2), atol=1.0
        )


def test_random_flips_keep_labels_on_the_anatomy():
    config = PhantomConfig(shape=SMALL.shape, spacing=SMALL.spacing, random_flips=True)
    flipped, upright = generate_case(4, seed=3, config=config), _case(4, 3)
    n_flipped = 0
    for phase in config.phases:
        geometry = flipped.phases[phase].geometry
        np.testing.assert_allclose(geometry.direction.T @ geometry.direction, np.eye(3))
        axes = tuple(a for a in range(3) if geometry.direction[:, a].sum() < 0)
        n_flipped += bool(axes)
        # the same world grid, read in another order
        assert geometry.world_bounds()[0] == pytest.approx(
            upright.phases[phase].geometry.world_bounds()[0]
        )
        back = np.flip(flipped.labels[phase].array, axes)
        assert np.mean(back != upright.labels[phase].array) < 1e-4
        np.testing.assert_allclose(
            _world_centroid(flipped, phase, 2),
            flipped.truth["tumor_centroid_lps_mm"][phase],
            atol=2.0,
        )
    assert n_flipped >= 1


# ----------------------------------------------------------------------------------------------
# writing the nnU-Net datasets
# ----------------------------------------------------------------------------------------------
def test_write_cohort_writes_nnunet_layout(tmp_path):
    out = tmp_path / "phantom"
    summary = write_cohort(out, cases=3, seed=4, config=SMALL, workers=2, progress=False)
    assert summary["cases"] == 3
    assert summary["case_ids"] == ["case_00000", "case_00001", "case_00002"]
    names = {
        "plain": "Dataset501_RenalPhantomPlain",
        "arterial": "Dataset502_RenalPhantomArterial",
        "venous": "Dataset503_RenalPhantomVenous",
    }
    assert {p: dataset_folder_name(p) for p in names} == names
    meta = json.loads((out / "phantom.json").read_text())
    assert meta["seed"] == 4
    assert meta["complete"] is True
    assert PhantomConfig.from_dict(meta["config"]) == SMALL
    assert [c["case_id"] for c in meta["cases"]] == summary["case_ids"]
    alone = _case(1, 4)  # case 1 of the cohort equals case 1 made on its own
    assert meta["cases"][1] == alone.truth
    for phase, name in names.items():
        folder = out / name
        assert summary["datasets"][phase] == str(folder)
        assert json.loads((folder / "dataset.json").read_text()) == {
            "name": f"RenalPhantom{phase.capitalize()}",
            "description": json.loads((folder / "dataset.json").read_text())["description"],
            "channel_names": {"0": "CT"},
            "labels": {"background": 0, "kidney": 1, "tumor": 2, "cyst": 3},
            "numTraining": 3,
            "file_ending": ".nii.gz",
            "phase": phase,
        }
        assert sorted(p.name for p in (folder / "imagesTr").iterdir()) == [
            f"case_0000{i}_0000.nii.gz" for i in range(3)
        ]
        assert sorted(p.name for p in (folder / "labelsTr").iterdir()) == [
            f"case_0000{i}.nii.gz" for i in range(3)
        ]
        image = read_image(folder / "imagesTr" / "case_00001_0000.nii.gz")
        label = read_label(folder / "labelsTr" / "case_00001.nii.gz", reference=image)
        assert image.array.dtype == np.int16
        assert image.geometry.mismatch(alone.phases[phase].geometry) == ""
        np.testing.assert_array_equal(image.array, alone.phases[phase].array)
        np.testing.assert_array_equal(label.array, alone.labels[phase].array)


def test_write_cohort_is_idempotent_and_refuses_other_settings(tmp_path):
    out = tmp_path / "phantom"
    config = PhantomConfig(shape=SMALL.shape, spacing=SMALL.spacing, phases=("plain",))
    write_cohort(out, cases=2, seed=0, config=config, progress=False)
    image = out / dataset_folder_name("plain") / "imagesTr" / "case_00001_0000.nii.gz"
    first = read_image(image).array
    # the same settings again, with fewer cases: rewritten, surplus case removed
    write_cohort(out, cases=1, seed=0, config=config, progress=False)
    assert not image.exists()
    dataset = json.loads((out / dataset_folder_name("plain") / "dataset.json").read_text())
    assert dataset["numTraining"] == 1
    write_cohort(out, cases=2, seed=0, config=config, progress=False)
    np.testing.assert_array_equal(read_image(image).array, first)
    with pytest.raises(InputError, match=r"different settings.*seed 0 != 1"):
        write_cohort(out, cases=2, seed=1, config=config, progress=False)
    with pytest.raises(InputError, match="motion_mm"):
        write_cohort(
            out,
            cases=2,
            seed=0,
            progress=False,
            config=PhantomConfig(
                shape=SMALL.shape, spacing=SMALL.spacing, phases=("plain",), motion_mm=1.0
            ),
        )
    foreign = tmp_path / "foreign"
    (foreign / dataset_folder_name("venous")).mkdir(parents=True)
    (foreign / dataset_folder_name("venous") / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not written by slidesam phantom"):
        write_cohort(foreign, cases=1, seed=0, config=config, progress=False)
    with pytest.raises(InputError, match="cases"):
        write_cohort(tmp_path / "x", cases=0, seed=0, config=config, progress=False)


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------
def test_cli_writes_a_cohort(tmp_path, capsys):
    out = tmp_path / "cli"
    code = cli_main.main(
        [
            "phantom",
            "--out",
            str(out),
            "--cases",
            "1",
            "--seed",
            "3",
            "--phases",
            "plain",
            "venous",
            "--tumor-diameter-mm",
            "12",
            "14",
            "--no-progress",
            *SMALL_ARGS,
        ]
    )
    assert code == 0
    assert "wrote 1 phantom case(s)" in capsys.readouterr().out
    for phase in ("plain", "venous"):
        folder = out / dataset_folder_name(phase)
        image = read_image(folder / "imagesTr" / "case_00000_0000.nii.gz")
        read_label(folder / "labelsTr" / "case_00000.nii.gz", reference=image)
    assert not (out / dataset_folder_name("arterial")).exists()
    meta = json.loads((out / "phantom.json").read_text())
    assert meta["seed"] == 3
    assert meta["config"]["phases"] == ["plain", "venous"]
    assert meta["config"]["tumor_diameter_mm"] == [12.0, 14.0]
    assert 12.0 <= meta["cases"][0]["tumor_diameter_mm"] <= 14.0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--phases", "plain", "bogus"], "unknown phase 'bogus'"),
        (["--cases", "0"], "--cases must be at least 1"),
        (["--shape", "10", "96", "96"], "too small"),
        (["--tumor-diameter-mm", "30", "20"], "tumor_diameter_mm must be finite with low <= high"),
        (["--tumor-diameter-mm", "2", "20"], "tumor_diameter_mm must lie in 5..70 mm"),
    ],
)
def test_cli_reports_bad_arguments(tmp_path, capsys, args, message):
    argv = ["phantom", "--out", str(tmp_path / "bad"), "--no-progress", *SMALL_ARGS, *args]
    assert cli_main.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("slidesam: error: ")
    assert message in err
    assert len(err.strip().splitlines()) == 1
