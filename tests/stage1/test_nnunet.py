"""The nnU-Net v2 adapter, run with the real ``nnUNetPredictor`` on a small model folder.

The model folder (tests/stage1/nnunet_folder.py) is in nnU-Net's exact format with weights from a
quick seeded fit, so the predictions are meaningful: the bright "tumour" must be found.
"""

from __future__ import annotations

import importlib.util
import io
import json
import multiprocessing.process
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from slidesam.core import Geometry, InputError, Volume
from slidesam.data.io import read_image, read_label, write_image
from slidesam.stage1.nnunet import NnUNetStage1, RasReorientation, load_nnunet_checkpoint
from tests.stage1 import nnunet_folder as toy

HAVE_NNUNET = importlib.util.find_spec("nnunetv2") is not None
needs_nnunet = pytest.mark.skipif(
    not HAVE_NNUNET, reason="nnU-Net v2 is not installed (pip install 'slidesam[nnunet]')"
)

#: a test grid unlike the training grid: anisotropic, other spacing, shifted origin
SHAPE = (18, 52, 38)
SPACING = (2.5, 1.2, 1.7)
ORIGIN = (-12.3, 40.5, 100.25)
#: ITK-order direction matrices (columns = array axes x, y, z in world LPS)
FLIPPED_ITK = np.diag([-1.0, 1.0, -1.0])
PERMUTED_ITK = np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])


def _geometry(direction_itk: np.ndarray) -> Geometry:
    return Geometry(shape=SHAPE, spacing=SPACING, origin=ORIGIN, direction=direction_itk[:, ::-1])


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.sum(a & b) / max(np.sum(a) + np.sum(b), 1))


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Two shared cores: one torch thread is ~10x faster than two busy-waiting ones."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    if not HAVE_NNUNET:
        pytest.skip("nnU-Net v2 is not installed (pip install 'slidesam[nnunet]')")
    return toy.build_model_folder(tmp_path_factory.mktemp("nnunet"), seed=0, steps=50)


@pytest.fixture(scope="module")
def stage(model_folder) -> NnUNetStage1:
    return NnUNetStage1(model_folder, device="cpu")


@pytest.fixture(scope="module")
def case() -> tuple[Volume, np.ndarray]:
    image, labels = toy.toy_case(SHAPE, SPACING, seed=123)
    return Volume(image, _geometry(FLIPPED_ITK), source="case.nii.gz"), labels


def _copy_model(model_folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(model_folder, tmp_path / model_folder.name))


# ----------------------------------------------------------------------------------------------
# prediction
# ----------------------------------------------------------------------------------------------
@needs_nnunet
def test_predict_keeps_geometry_and_finds_the_tumor(stage, case, monkeypatch):
    volume, truth = case

    def no_processes(self):
        raise AssertionError("the adapter must predict in this process, without worker pools")

    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", no_processes)
    out = stage.predict(volume)

    assert out.geometry == volume.geometry  # bit for bit: shape, spacing, origin, direction
    assert out.source == volume.source
    assert out.array.dtype == np.uint8
    assert set(np.unique(out.array)) <= set(stage.labels)
    assert _dice(out.array == 2, truth == 2) > 0.5  # the bright blob
    assert _dice(out.array > 0, truth > 0) > 0.5  # kidney and masses


@needs_nnunet
def test_model_description(stage, model_folder):
    assert stage.labels == {0: "background", 1: "kidney", 2: "tumor", 3: "cyst"}
    assert stage.channel_names == ("CT",)
    assert stage.folds == ("fold_0",)
    assert stage.configuration == "3d_fullres"
    assert stage.model_dir == model_folder
    assert stage.name == "nnU-Net Dataset990_ToyKidney 3d_fullres, fold_0"


def _nnunet_file_prediction(model_folder: Path, image_file: Path, out_dir: Path) -> Path:
    """nnU-Net's own file pipeline (reader, preprocessing, predictor, writer), no worker pools."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans = json.loads((model_folder / "plans.json").read_text())
    ds = json.loads((model_folder / "dataset.json").read_text())
    ckpt = load_nnunet_checkpoint(model_folder / "fold_0" / "checkpoint_final.pth")
    network = toy._build_network(plans, ds)
    network.load_state_dict(ckpt["network_weights"])
    pm = PlansManager(plans)
    predictor = nnUNetPredictor(device=torch.device("cpu"), use_mirroring=False, allow_tqdm=False)
    predictor.manual_initialization(
        network,
        pm,
        pm.get_configuration("3d_fullres"),
        [ckpt["network_weights"]],
        ds,
        ckpt["trainer_name"],
        ckpt["inference_allowed_mirroring_axes"],
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    predictor.predict_from_files_sequential([[str(image_file)]], [str(out_dir / "case")])
    return out_dir / "case.nii.gz"


@needs_nnunet
@pytest.mark.parametrize(
    "reader", ["SimpleITKIO", "SimpleITKIOWithReorient", "NibabelIO", "NibabelIOWithReorient"]
)
def test_same_labels_as_nnunet_from_files(model_folder, case, tmp_path, reader):
    """In memory through the adapter == nnU-Net reading and writing files, for every 3D reader."""
    folder = _copy_model(model_folder, tmp_path)
    toy.set_image_reader_writer(folder, reader)
    image, _ = case
    permuted = Volume(image.array, _geometry(PERMUTED_ITK))  # array z along world x: reorients
    image_file = write_image(permuted, tmp_path / "in" / "case_0000.nii.gz")
    volume = read_image(image_file)

    ours = NnUNetStage1(folder, use_mirroring=False).predict(volume)
    theirs = read_label(_nnunet_file_prediction(folder, image_file, tmp_path / "out"))

    assert ours.geometry == volume.geometry
    assert theirs.geometry.mismatch(volume.geometry) == ""
    assert np.array_equal(ours.array, theirs.array)
    assert np.any(ours.array == 2)


@needs_nnunet
def test_multi_channel_input_is_checked(stage, case):
    volume, _ = case
    with pytest.raises(InputError, match=r"takes 1 input channel\(s\) \['CT'\].*got 2"):
        stage.predict([volume, volume])
    with pytest.raises(InputError, match=r"takes channels \['CT'\]; got \['arterial'\]"):
        stage.predict({"arterial": volume})
    with pytest.raises(TypeError, match="must be a Volume"):
        stage.predict(volume.array)


@needs_nnunet
def test_two_channel_model_checks_grids(model_folder, case, tmp_path):
    """A 2-channel model (channel_phases from slidesam nnunet-export) takes phases by name."""
    folder = _copy_model(model_folder, tmp_path)
    ds = json.loads((folder / "dataset.json").read_text())
    ds["channel_names"] = {"0": "CT", "1": "CT"}
    ds["channel_phases"] = {"0": "plain", "1": "arterial"}
    (folder / "dataset.json").write_text(json.dumps(ds))
    plans = json.loads((folder / "plans.json").read_text())
    cfg = plans["configurations"]["3d_fullres"]
    cfg["normalization_schemes"] *= 2
    cfg["use_mask_for_norm"] *= 2
    props = plans["foreground_intensity_properties_per_channel"]
    props["1"] = props["0"]
    (folder / "plans.json").write_text(json.dumps(plans))
    ckpt_file = folder / "fold_0" / "checkpoint_final.pth"
    ckpt = load_nnunet_checkpoint(ckpt_file)
    weights = ckpt["network_weights"]
    for key, w in weights.items():
        if "encoder.stages.0.0.convs.0." in key and w.ndim == 5:  # the input conv, under 3 names
            weights[key] = w.repeat(1, 2, 1, 1, 1) / 2
    torch.save(ckpt, ckpt_file)

    two = NnUNetStage1(folder, use_mirroring=False)
    assert two.channel_names == ("plain", "arterial")
    volume, _ = case
    moved = Volume(volume.array, Geometry(SHAPE, SPACING, (0, 0, 0), volume.geometry.direction))
    with pytest.raises(InputError, match=r"channel 'arterial' is not on the grid.*origin"):
        two.predict({"plain": volume, "arterial": moved})
    out = two.predict({"arterial": volume, "plain": volume})
    assert out.geometry == volume.geometry


# ----------------------------------------------------------------------------------------------
# model folders
# ----------------------------------------------------------------------------------------------
@needs_nnunet
def test_dataset_folder_and_fold_selection(model_folder, tmp_path):
    folder = _copy_model(model_folder, tmp_path / "Dataset990_ToyKidney")
    assert NnUNetStage1(folder.parent).model_dir == folder  # the dataset folder above it
    for fold in ("fold_3", "fold_all"):
        shutil.copytree(folder / "fold_0", folder / fold)
    (folder / "fold_1").mkdir()  # training never finished
    (folder / "fold_1" / "checkpoint_latest.pth").write_bytes(b"")

    assert NnUNetStage1(folder).folds == ("fold_0", "fold_3")  # like nnUNetv2_predict
    assert NnUNetStage1(folder, folds="all").folds == ("fold_all",)
    assert NnUNetStage1(folder, folds=[3, 0]).folds == ("fold_3", "fold_0")
    with pytest.raises(InputError, match=r"fold_1: no checkpoint_final.pth \(it has "):
        NnUNetStage1(folder, folds=1)
    with pytest.raises(InputError, match=r"no fold_2 \(fold folders: fold_0, fold_1, fold_3"):
        NnUNetStage1(folder, folds=(2,))
    with pytest.raises(InputError, match=r"folds must be non-negative integers or 'all'"):
        NnUNetStage1(folder, folds=[-1])
    with pytest.raises(InputError, match=r"no fold holds checkpoint_best\.pth"):
        NnUNetStage1(folder, checkpoint="checkpoint_best.pth")


@needs_nnunet
def test_not_a_model_folder(tmp_path):
    with pytest.raises(InputError, match="no such folder; not an nnU-Net model folder"):
        NnUNetStage1(tmp_path / "missing")
    (tmp_path / "weights.pt").write_bytes(b"x")
    with pytest.raises(InputError, match=r"not an nnU-Net model folder: expected dataset\.json"):
        NnUNetStage1(tmp_path)
    with pytest.raises(InputError, match="is a file"):
        NnUNetStage1(tmp_path / "weights.pt")
    (tmp_path / "dataset.json").write_text("{}")
    with pytest.raises(InputError, match=r"no plans\.json"):
        NnUNetStage1(tmp_path)


@needs_nnunet
def test_wrong_configuration_cascade_and_checkpoint(model_folder, tmp_path):
    folder = _copy_model(model_folder, tmp_path)
    with pytest.raises(InputError, match="trained with configuration '3d_fullres', not '2d'"):
        NnUNetStage1(folder, configuration="2d")

    ckpt_file = folder / "fold_0" / "checkpoint_final.pth"
    ckpt = load_nnunet_checkpoint(ckpt_file)
    plans = json.loads((folder / "plans.json").read_text())
    plans["configurations"]["3d_cascade_fullres"] = {
        "inherits_from": "3d_fullres",
        "previous_stage": "3d_lowres",
    }
    (folder / "plans.json").write_text(json.dumps(plans))
    ckpt["init_args"]["configuration"] = "3d_cascade_fullres"
    torch.save(ckpt, ckpt_file)
    with pytest.raises(InputError, match="cascade stage that needs the '3d_lowres' prediction"):
        NnUNetStage1(folder)

    torch.save({"state_dict": ckpt["network_weights"]}, ckpt_file)
    with pytest.raises(InputError, match=r"not an nnU-Net checkpoint \(no 'network_weights'"):
        NnUNetStage1(folder)


@needs_nnunet
def test_weights_that_do_not_fit_the_plans(model_folder, tmp_path):
    folder = _copy_model(model_folder, tmp_path)
    plans = json.loads((folder / "plans.json").read_text())
    arch = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    arch["features_per_stage"] = [8, 16, 24]
    (folder / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(InputError, match=r"do not fit .*wrong shape .*trainer 'nnUNetTrainer'"):
        NnUNetStage1(folder)


@needs_nnunet
def test_unsupported_reader_and_device(model_folder, tmp_path):
    folder = _copy_model(model_folder, tmp_path)
    toy.set_image_reader_writer(folder, "NaturalImage2DIO")
    with pytest.raises(InputError, match="reads its images with NaturalImage2DIO"):
        NnUNetStage1(folder)
    with pytest.raises(InputError, match="device must be"):
        NnUNetStage1(model_folder, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA is not available"):
            NnUNetStage1(model_folder, device="cuda")


# ----------------------------------------------------------------------------------------------
# without nnU-Net
# ----------------------------------------------------------------------------------------------
def test_missing_nnunet_says_how_to_install(monkeypatch, tmp_path):
    for name in [m for m in sys.modules if m == "nnunetv2" or m.startswith("nnunetv2.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "nnunetv2", None)
    with pytest.raises(InputError, match=r"not installed: pip install 'slidesam\[nnunet\]'"):
        NnUNetStage1(tmp_path)


def test_importing_the_adapter_does_not_import_nnunet():
    code = (
        "import sys, slidesam.stage1.nnunet; "
        "assert 'nnunetv2' not in sys.modules and 'torch' not in sys.modules, sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def _direction_cases():
    yield np.eye(3)
    yield FLIPPED_ITK
    yield PERMUTED_ITK
    yield np.array([[0.0, 1.0, 0.0], [0.0, 0.0, -1.0], [-1.0, 0.0, 0.0]])
    a = np.deg2rad(10)  # slightly oblique: closest axes
    yield np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, -1.0]])


@pytest.mark.parametrize("direction_itk", list(_direction_cases()))
def test_ras_reorientation_matches_simpleitk_dicomorient(direction_itk):
    rng = np.random.default_rng(0)
    array = rng.integers(-1000, 1000, size=(3, 4, 5)).astype(np.int16)
    geometry = Geometry(shape=(3, 4, 5), spacing=(3.0, 2.0, 1.0), direction=direction_itk[:, ::-1])
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(geometry.itk_spacing())
    img.SetDirection(geometry.itk_direction())
    ras = sitk.DICOMOrient(img, "RAS")

    r = RasReorientation.from_geometry(geometry)
    assert np.array_equal(r.forward(array), sitk.GetArrayFromImage(ras))
    assert r.spacing(geometry.spacing) == pytest.approx(ras.GetSpacing()[::-1])
    assert np.array_equal(r.backward(r.forward(array)), array)
    stacked = np.stack([array, array + 1])  # (C, z, y, x) too
    assert np.array_equal(r.backward(r.forward(stacked)), stacked)


def _rewrite_pickle(path: Path, old: bytes, new: bytes) -> None:
    data = path.read_bytes()
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as zin, zipfile.ZipFile(out, "w") as zout:
        for item in zin.infolist():
            payload = zin.read(item.filename)
            if item.filename.endswith("data.pkl"):
                payload = payload.replace(old, new)
            zout.writestr(item, payload)
    path.write_bytes(out.getvalue())


def test_checkpoint_loader_is_weights_only(tmp_path):
    ok = tmp_path / "ok.pth"
    torch.save(
        {
            "network_weights": {"w": torch.ones(2)},
            "_best_ema": np.float64(0.5),
            "logging": {"mean_fg_dice": [np.float32(0.25)], "n": [np.int64(3)]},
            "init_args": {"device": torch.device("cpu"), "configuration": "3d_fullres"},
            "inference_allowed_mirroring_axes": (0, 1, 2),
        },
        ok,
    )
    ckpt = load_nnunet_checkpoint(ok)
    assert ckpt["_best_ema"] == 0.5
    assert ckpt["logging"]["n"] == [3]
    # numpy 1.x writes numpy.core.multiarray.scalar; numpy 2 reads it as numpy._core
    _rewrite_pickle(ok, b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert load_nnunet_checkpoint(ok)["_best_ema"] == 0.5

    unsafe = tmp_path / "unsafe.pth"
    torch.save({"network_weights": {}, "obj": Path("x")}, unsafe)
    with pytest.raises(InputError, match=r"cannot be loaded with weights_only=True \(it pickles "):
        load_nnunet_checkpoint(unsafe)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="not a readable PyTorch checkpoint"):
        load_nnunet_checkpoint(junk)
