"""The stage-1 U-Net: configs, strict checkpoints, exact geometry, learning, the shipped model."""

from __future__ import annotations

import argparse
import csv
import importlib.resources
import pickle
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from slidesam.cli import unet_train as cli
from slidesam.core import Geometry, InputError, Volume
from slidesam.data.phantom import PhantomConfig, generate_case, write_cohort
from slidesam.evaluation.metrics import binary_scores
from slidesam.stage1.base import Stage1
from slidesam.stage1.train import UNetTrainConfig, load_unet_train_config, train_unet
from slidesam.stage1.unet import (
    UNetConfig,
    UNetStage1,
    build_unet,
    default_unet,
    load_unet,
    load_unet_checkpoint,
    network_geometry,
    save_unet_checkpoint,
)

TINY = UNetConfig(
    channels=(4, 8),
    strides=(2,),
    num_res_units=1,
    target_spacing=(2.0, 2.0, 2.0),
    patch_size=(8, 8, 8),
)

# anisotropic, off-origin, with flipped and permuted axes
ODD = Geometry(
    shape=(9, 17, 13),
    spacing=(3.3, 0.9, 1.7),
    origin=(12.5, -40.25, 7.0),
    direction=np.array([[0.0, -1.0, 0.0], [0.0, 0.0, 1.0], [-1.0, 0.0, 0.0]]),
)


def seeded(config: UNetConfig, seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_unet(config)


# ----------------------------------------------------------------------------------------------
# configs
# ----------------------------------------------------------------------------------------------
def test_config_round_trip_and_label_mapping():
    config = UNetConfig(
        label_names=("background", "tumor", "cyst"),
        target_spacing=(4, 2.5, 2.5),
        channels=(8, 16, 32, 64),
        strides=((1, 2, 2), 2, 2),
        patch_size=(16, 32, 32),
    )
    back = UNetConfig.from_dict(yaml.safe_load(yaml.safe_dump(config.to_dict())))
    assert back == config
    assert back.strides == ((1, 2, 2), 2, 2)
    assert back.patch_multiple == (4, 8, 8)
    assert config.num_classes == 3
    assert config.label_values == (0, 2, 3)
    assert config.tumor_channel == 1
    assert back.target_spacing == (4.0, 2.5, 2.5)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"chanels": [8, 16]}, r"unknown key\(s\) in U-Net config: chanels \(valid: channels"),
        ({"strides": [2, 2]}, r"strides needs len\(channels\) - 1 = 3 values"),
        ({"patch_size": [30, 64, 64]}, r"multiples of the product of strides \[8, 8, 8\]"),
        (
            {"strides": [[1, 2, 2], 2, 2], "patch_size": [6, 64, 64]},
            r"multiples of the product of strides \[4, 8, 8\]",
        ),
        ({"strides": [[1, 2], 2, 2]}, r"strides\[0\] must have 3 values"),
        ({"label_names": ["background", "kidney"]}, "must include tumor"),
        ({"label_names": ["kidney", "tumor"]}, "starting with background"),
        ({"target_spacing": [3, 3]}, r"target_spacing must have 3 values"),
        ({"hu_window": [400, -200]}, "low < high"),
        ({"phase": "portal"}, "phase must be one of plain, arterial, venous"),
        ({"num_res_units": True}, "num_res_units must be an integer"),
        ({"norm": "group"}, "norm must be one of instance, batch"),
    ],
)
def test_config_errors_name_the_problem(data, message):
    with pytest.raises(InputError, match=message):
        UNetConfig.from_dict(data)


def test_train_config_yaml_round_trip_and_unknown_keys(tmp_path):
    config = UNetTrainConfig.from_dict(
        {
            "data": {"folders": "some/Dataset502", "val_cases": 2},
            "model": {"channels": [8, 16, 32], "strides": [2, 2], "patch_size": [16, 32, 32]},
            "augment": {"patch_size": [8, 16, 16]},
            "loss": {"batch_dice": False},
            "optim": {"lr": "1e-3", "epochs": 3},
            "run": None,
        }
    )
    assert config.data.folders == ("some/Dataset502",)
    assert config.optim.lr == 1e-3  # PyYAML's string for 1e-3 is read as a number
    assert config.train_patch == (8, 16, 16)
    assert config.loss.batch_dice is False
    path = config.save(tmp_path / "c.yaml")
    assert load_unet_train_config(path) == config

    bad = {"data": {"folders": ["x"]}, "optim": {"lr": 1e-3, "epoch": 3}}
    with pytest.raises(InputError, match=r"unknown key\(s\) in section 'optim': epoch \(valid:"):
        UNetTrainConfig.from_dict(bad)
    with pytest.raises(InputError, match=r"unknown config section\(s\): trainer; valid: data"):
        UNetTrainConfig.from_dict({"data": {"folders": ["x"]}, "trainer": {}})
    with pytest.raises(InputError, match="no 'data' section"):
        UNetTrainConfig.from_dict({"optim": {}})
    with pytest.raises(InputError, match=r"optim.batch_size must be an integer >= 1"):
        UNetTrainConfig.from_dict({"data": {"folders": ["x"]}, "optim": {"batch_size": 0}})
    with pytest.raises(InputError, match=r"augment.patch_size.*multiples"):
        UNetTrainConfig.from_dict({"data": {"folders": ["x"]}, "augment": {"patch_size": [9] * 3}})
    path.write_text("data: {folders: [x]}\nmodel: {depth: 3}\n")
    with pytest.raises(
        InputError, match=rf"{path.name}: unknown key\(s\) in section 'model': depth"
    ):
        load_unet_train_config(path)


# ----------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------
def test_checkpoint_round_trip_keeps_weights_config_and_extra(tmp_path):
    model = seeded(TINY, 1)
    path = save_unet_checkpoint(model, TINY, tmp_path / "m.pt", extra={"epoch": 3, "d": (1, 2)})
    ckpt = load_unet_checkpoint(path)
    assert ckpt.config == TINY
    assert ckpt.extra == {"epoch": 3, "d": [1, 2]}
    assert not ckpt.model.training
    for (k, a), (k2, b) in zip(
        model.state_dict().items(), ckpt.model.state_dict().items(), strict=True
    ):
        assert k == k2
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    stage = load_unet(path)
    assert isinstance(stage, Stage1)
    assert stage.name == "m.pt"


def test_checkpoint_loading_is_strict_and_readable(tmp_path):
    path = save_unet_checkpoint(seeded(TINY), TINY, tmp_path / "m.pt")
    payload = torch.load(path, weights_only=True)
    state = payload["state_dict"]
    removed = sorted(state)[0]
    del state[removed]
    state["head.extra.weight"] = torch.zeros(2)
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(InputError) as info:
        load_unet_checkpoint(tmp_path / "bad.pt")
    msg = str(info.value)
    assert "1 missing: " + removed in msg
    assert "1 unexpected: head.extra.weight" in msg

    payload = torch.load(path, weights_only=True)
    payload["config"]["channels"] = [4, 16]  # the weights are for [4, 8]
    torch.save(payload, tmp_path / "shape.pt")
    with pytest.raises(InputError, match="wrong shape"):
        load_unet_checkpoint(tmp_path / "shape.pt")

    payload = torch.load(path, weights_only=True)
    payload["config"]["depth"] = 3
    torch.save(payload, tmp_path / "cfg.pt")
    with pytest.raises(InputError, match=r"bad U-Net config in the checkpoint: unknown key\(s\)"):
        load_unet_checkpoint(tmp_path / "cfg.pt")

    torch.save({"model": payload["state_dict"]}, tmp_path / "foreign.pt")
    with pytest.raises(InputError, match="not a slidesam U-Net checkpoint"):
        load_unet_checkpoint(tmp_path / "foreign.pt")

    with (tmp_path / "evil.pt").open("wb") as fh:
        pickle.dump({"format": "slidesam-unet", "x": argparse.Namespace()}, fh, protocol=2)
    with pytest.raises(InputError, match=r"refused|not a readable"):
        load_unet_checkpoint(tmp_path / "evil.pt")
    with pytest.raises(InputError, match="no such checkpoint"):
        load_unet_checkpoint(tmp_path / "none.pt")


# ----------------------------------------------------------------------------------------------
# geometry
# ----------------------------------------------------------------------------------------------
def test_network_grid_is_standard_axial_and_covers_the_input():
    grid = network_geometry(ODD, (2.0, 2.0, 2.0))
    # ODD's array axes run along world -z, -x, +y: reordered and flipped to +z, +y, +x
    np.testing.assert_array_equal(grid.direction, np.eye(3)[:, ::-1])
    np.testing.assert_allclose(grid.origin, ODD.index_to_world([8, 16, 0]))
    # extents (z, y, x) of ODD: 26.4, 14.4, 20.4 mm -> network (z, y, x) 26.4, 20.4, 14.4 mm
    assert grid.shape == (15, 12, 9)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in ODD.shape], indexing="ij"), -1)
    inside = grid.contains(grid.world_to_index(ODD.index_to_world(idx)), margin=1e-6)
    assert inside.all()
    standard = Geometry(shape=(10, 20, 30), spacing=(2.5, 0.7, 0.7), origin=(1.0, 2.0, 3.0))
    same = network_geometry(standard, (3.0, 2.0, 2.0))
    assert same.origin == standard.origin
    np.testing.assert_array_equal(same.direction, standard.direction)
    assert same.shape == (9, 8, 12)


def test_predict_returns_exactly_the_input_geometry_with_an_untrained_network():
    rng = np.random.default_rng(0)
    vol = Volume(array=rng.integers(-300, 400, ODD.shape).astype(np.int16), geometry=ODD)
    out = UNetStage1(seeded(TINY), TINY).predict(vol)
    assert out.geometry == vol.geometry  # origin, spacing, direction bit for bit
    assert out.array.shape == vol.array.shape
    assert out.array.dtype == np.uint8
    assert set(np.unique(out.array).tolist()) <= {0, 1, 2, 3}


def test_mirroring_averages_the_softmax_of_the_flipped_inputs():
    # a standard grid at the network spacing: the network grid is the image grid, so mirroring
    # over x equals averaging two one-pass runs, one on the image mirrored by hand
    geom = Geometry(shape=(10, 12, 14), spacing=(2.0, 2.0, 2.0), origin=(5.0, -3.0, 1.0))
    rng = np.random.default_rng(1)
    array = rng.integers(-300, 400, geom.shape).astype(np.int16)
    net = seeded(TINY, seed=4)
    one = UNetStage1(net, TINY)
    p, grid = one.network_probabilities(Volume(array=array, geometry=geom))
    assert grid == geom
    q, _ = one.network_probabilities(Volume(array=array[:, :, ::-1].copy(), geometry=geom))
    both, _ = UNetStage1(net, TINY, mirror_axes=[2]).network_probabilities(
        Volume(array=array, geometry=geom)
    )
    np.testing.assert_allclose(both, (p + q[..., ::-1]) / 2, atol=1e-6)
    assert np.abs(both - p).max() > 1e-3  # the untrained network is not mirror-symmetric
    every, _ = UNetStage1(net, TINY, mirror_axes=(2, 0, 1)).network_probabilities(
        Volume(array=array, geometry=geom)
    )
    np.testing.assert_allclose(every.sum(0), 1.0, atol=1e-5)
    for bad in ([3], [1, 1], "x"):
        with pytest.raises(InputError, match="mirror_axes"):
            UNetStage1(net, TINY, mirror_axes=bad)
        with pytest.raises(InputError, match="mirror_axes"):
            UNetConfig.from_dict({**TINY.to_dict(), "mirror_axes": bad})
    # the checkpoint's config sets the default; the predictor's argument overrides it
    mirrored = UNetConfig.from_dict({**TINY.to_dict(), "mirror_axes": [2]})
    assert UNetStage1(net, mirrored).mirror_axes == (2,)
    default, _ = UNetStage1(net, mirrored).network_probabilities(Volume(array=array, geometry=geom))
    np.testing.assert_array_equal(default, both)
    assert UNetStage1(net, mirrored, mirror_axes=()).mirror_axes == ()


class BrightIsTumor(nn.Module):
    """Voxel-wise stand-in network: tumor where the normalised image exceeds 0.5."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tumor = 40.0 * (x - 0.5)
        zero = torch.zeros_like(x)
        return torch.cat([zero, zero - 5, tumor, zero - 5], dim=1)


def _balls(geometry: Geometry, balls) -> tuple[Volume, np.ndarray]:
    """An image with bright balls ((centre LPS mm, radius mm), ...) at world positions."""
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in geometry.shape], indexing="ij"), -1)
    world = geometry.index_to_world(idx)
    truth = np.zeros(geometry.shape, dtype=bool)
    for centre, radius in balls:
        truth |= np.linalg.norm(world - np.asarray(centre), axis=-1) <= radius
    image = np.where(truth, 300, -100).astype(np.int16)
    return Volume(array=image, geometry=geometry), truth


def test_predict_segments_in_world_space_on_a_flipped_anisotropic_grid():
    geometry = Geometry(
        shape=(20, 40, 36),
        spacing=(2.7, 0.8, 1.3),
        origin=(30.0, -10.0, 40.0),
        direction=np.array([[0.0, -1.0, 0.0], [0.0, 0.0, 1.0], [-1.0, 0.0, 0.0]]),
    )
    lo, hi = geometry.world_bounds()
    centre = (lo + hi) / 2 + np.array([2.3, -1.1, 3.7])
    vol, truth = _balls(geometry, [(centre, 9.0)])
    config = UNetConfig(target_spacing=(3.0, 3.0, 3.0), patch_size=(16, 16, 16))
    out = UNetStage1(BrightIsTumor(), config).predict(vol)
    assert out.geometry == geometry
    dice = binary_scores(out.array == 2, truth, spacing=geometry.spacing).dice
    assert dice > 0.9
    assert set(np.unique(out.array).tolist()) == {0, 2}


def test_tumor_clean_up_keeps_the_largest_components():
    geometry = Geometry(shape=(30, 40, 40), spacing=(2.0, 2.0, 2.0))
    lo, hi = geometry.world_bounds()
    big, small = lo + np.array([20.0, 20.0, 20.0]), hi - np.array([14.0, 14.0, 14.0])
    vol, _ = _balls(geometry, [(big, 10.0), (small, 5.0)])
    config = UNetConfig(target_spacing=(2.0, 2.0, 2.0), patch_size=(16, 16, 16))
    net = BrightIsTumor()

    def components(**options) -> int:
        from scipy import ndimage

        return ndimage.label(UNetStage1(net, config, **options).predict(vol).array == 2)[1]

    assert components() == 2
    assert components(max_tumors=1) == 1
    assert components(min_tumor_ml=1.0) == 1  # the small ball is ~0.5 ml, the big one ~4 ml
    assert components(min_tumor_ml=10.0) == 0
    with pytest.raises(InputError, match="max_tumors must be an integer >= 1"):
        UNetStage1(net, config, max_tumors=0)


# ----------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------
#: large tumors: fast to learn at a coarse spacing
TINY_PHANTOM = PhantomConfig(phases=("arterial",), tumor_diameter_mm=(45.0, 60.0))


@pytest.fixture(scope="module")
def tiny_cohort(tmp_path_factory):
    """Three arterial phantom cases (seed 7)."""
    out = tmp_path_factory.mktemp("phantom")
    write_cohort(out, cases=3, seed=7, config=TINY_PHANTOM, progress=False)
    return out / "Dataset502_RenalPhantomArterial"


def _tiny_train_config(data, out, **optim) -> UNetTrainConfig:
    return UNetTrainConfig.from_dict(
        {
            "data": {"folders": [str(data)], "val_cases": 1},
            "model": {
                "channels": [8, 16, 32],
                "strides": [2, 2],
                "num_res_units": 1,
                "target_spacing": [6.0, 6.0, 6.0],
                "patch_size": [16, 32, 32],
            },
            "augment": {"tumor_fraction": 0.7},
            "optim": {"lr": 0.01, "batch_size": 2, "warmup_steps": 5, **optim},
            "run": {"out_dir": str(out), "seed": 3, "num_threads": 1, "val_every": 4},
        }
    )


def test_training_learns_the_tumor(tiny_cohort, tmp_path):
    config = _tiny_train_config(tiny_cohort, tmp_path / "run", epochs=8, steps_per_epoch=30)
    before = torch.get_num_threads()
    best = train_unet(config, progress=False)
    assert torch.get_num_threads() == before  # restored
    assert best == tmp_path / "run" / "best.pt"
    for name in ("best.pt", "last.pt", "log.csv", "config.yaml"):
        assert (tmp_path / "run" / name).is_file()
    assert load_unet_train_config(tmp_path / "run" / "config.yaml") == config
    rows = list(csv.DictReader((tmp_path / "run" / "log.csv").open()))
    assert [int(r["epoch"]) for r in rows] == list(range(1, 9))
    assert [r["val_tumor_dice"] != "" for r in rows] == [False, False, False, True] * 2
    assert float(rows[-1]["train_loss"]) < 0.5 * float(rows[0]["train_loss"])

    ckpt = load_unet_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt.extra["epoch"] == 8
    assert len(ckpt.extra["train_cases"]) == 2
    assert len(ckpt.extra["val_cases"]) == 1
    # Dice on the training cases, on their own grids, through the deployed predict path
    stage = UNetStage1(ckpt.model, ckpt.config)
    for case_id in ckpt.extra["train_cases"]:
        index = int(case_id.rsplit("_", 1)[-1])
        case = generate_case(index, seed=7, config=TINY_PHANTOM)
        image, gt = case.phases["arterial"], case.labels["arterial"]
        pred = stage.predict(image)
        assert pred.geometry == image.geometry
        assert binary_scores(pred.array == 2, gt.array == 2, spacing=image.spacing).dice > 0.6


def test_training_refuses_another_phase_and_too_few_cases(tiny_cohort, tmp_path):
    config = _tiny_train_config(tiny_cohort, tmp_path, epochs=1, steps_per_epoch=1)
    plain = UNetTrainConfig.from_dict({**config.to_dict(), "model": {"phase": "plain"}})
    with pytest.raises(InputError, match=r"dataset.json says phase 'arterial'.*phase 'plain'"):
        train_unet(plain, progress=False)
    d = config.to_dict()
    d["data"]["val_cases"] = 3
    with pytest.raises(InputError, match="val_cases is 3 but the data hold only 3"):
        train_unet(UNetTrainConfig.from_dict(d), progress=False)
    d["data"]["folders"] = [str(tmp_path)]
    with pytest.raises(InputError, match="not an nnU-Net raw dataset"):
        train_unet(UNetTrainConfig.from_dict(d), progress=False)


def test_fine_tuning_starts_from_the_given_weights(tiny_cohort, tmp_path, caplog):
    # one step at a negligible learning rate: the run's weights are the checkpoint's, not the
    # seed's (a run without init_checkpoint, same seed, ends elsewhere)
    config = _tiny_train_config(tiny_cohort, tmp_path / "scratch", epochs=1, steps_per_epoch=1)
    net = seeded(config.model, seed=11)
    save_unet_checkpoint(net, config.model, tmp_path / "init.pt")
    d = config.to_dict()
    d["optim"].update(lr=1e-12, warmup_steps=0)
    d["run"].update(out_dir=str(tmp_path / "ft"), init_checkpoint=str(tmp_path / "init.pt"))
    train_unet(UNetTrainConfig.from_dict(d), progress=False)
    tuned = load_unet_checkpoint(tmp_path / "ft" / "last.pt")
    assert tuned.extra["train_config"]["run"]["init_checkpoint"] == str(tmp_path / "init.pt")
    d["run"].update(out_dir=str(tmp_path / "scratch"), init_checkpoint=None)
    train_unet(UNetTrainConfig.from_dict(d), progress=False)
    scratch = load_unet_checkpoint(tmp_path / "scratch" / "last.pt")
    for key, value in net.state_dict().items():
        assert torch.allclose(tuned.model.state_dict()[key], value, atol=1e-8), key
    assert any(
        not torch.allclose(scratch.model.state_dict()[k], v) for k, v in net.state_dict().items()
    )

    # another preprocessing is allowed (with a warning); another network is refused by name
    d["run"].update(out_dir=str(tmp_path / "ft2"), init_checkpoint=str(tmp_path / "init.pt"))
    d["model"].update(target_spacing=[5.0, 6.0, 6.0], mirror_axes=[2])
    with caplog.at_level("WARNING", logger="slidesam.stage1.train"):
        train_unet(UNetTrainConfig.from_dict(d), progress=False)
    assert "model.target_spacing [5.0, 6.0, 6.0] (it was trained with [6.0, 6.0, 6.0])" in (
        caplog.text
    )
    assert "model.mirror_axes [2] asks for test-time mirroring of a model trained without" in (
        caplog.text
    )
    d["model"].update(channels=[4, 8, 16], label_names=["background", "kidney", "tumor"])
    with pytest.raises(InputError, match=r"channels: \[8, 16, 32\] there, \[4, 8, 16\] here"):
        train_unet(UNetTrainConfig.from_dict(d), progress=False)
    with pytest.raises(InputError, match=r"label_names: .*'cyst'\] there"):
        train_unet(UNetTrainConfig.from_dict(d), progress=False)
    d["run"]["init_checkpoint"] = "default"
    with pytest.raises(InputError, match=r"shipped default U-Net has another network.*channels"):
        train_unet(UNetTrainConfig.from_dict(d), progress=False)
    d["run"].update(init_checkpoint=str(tmp_path / "nope.pt"), out_dir=str(tmp_path / "ft3"))
    with pytest.raises(InputError, match=r"init_checkpoint .*nope\.pt: no such file"):
        train_unet(UNetTrainConfig.from_dict(d), progress=False)
    assert not (tmp_path / "ft3").exists()  # refused before the run folder is made
    with pytest.raises(InputError, match=r"run\.init_checkpoint must be"):
        UNetTrainConfig.from_dict({**d, "run": {"init_checkpoint": 3}})


def test_cli_trains_from_a_config(tiny_cohort, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="slidesam")
    cli.register(parser.add_subparsers(dest="command"))
    config = _tiny_train_config(tiny_cohort, tmp_path / "ignored", epochs=1, steps_per_epoch=2)
    config.save(tmp_path / "c.yaml")
    args = parser.parse_args(
        ["unet-train", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "run")]
    )
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert str(tmp_path / "run" / "best.pt") in printed
    assert "validation tumor Dice" in printed
    assert not (tmp_path / "ignored").exists()
    (tmp_path / "bad.yaml").write_text("data: {folders: [x]}\noptim: {epoch: 1}\n")
    args = parser.parse_args(["unet-train", "--config", str(tmp_path / "bad.yaml")])
    with pytest.raises(InputError, match=r"unknown key.*epoch"):
        args.func(args)
    # --data / --phase replace the config's folders and phase (checked before any training)
    good = ["unet-train", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "r2")]
    args = parser.parse_args([*good, "--phase", "plain"])
    with pytest.raises(InputError, match=r"dataset.json says phase 'arterial'.*phase 'plain'"):
        args.func(args)
    args = parser.parse_args([*good, "--data", str(tmp_path)])
    with pytest.raises(InputError, match="not an nnU-Net raw dataset"):
        args.func(args)
    args = parser.parse_args([*good, "--init", "default"])  # the shipped model is wider
    with pytest.raises(InputError, match="shipped default U-Net has another network"):
        args.func(args)
    help_text = parser._subparsers._group_actions[0].choices["unet-train"].format_help()
    assert "--config" in help_text
    assert "best.pt" in help_text
    assert "--init" in help_text


# ----------------------------------------------------------------------------------------------
# the shipped model
# ----------------------------------------------------------------------------------------------
def test_shipped_default_segments_a_new_arterial_phantom():
    if not importlib.resources.files("slidesam").joinpath("weights/default_unet.pt").is_file():
        pytest.skip("slidesam/weights/default_unet.pt is not installed")
    stage = default_unet()
    assert stage.config.phase == "arterial"
    case = generate_case(0, seed=4242, config=PhantomConfig(phases=("arterial",)))
    image, gt = case.phases["arterial"], case.labels["arterial"]
    pred = stage.predict(image)
    assert pred.geometry == image.geometry
    assert binary_scores(pred.array == 2, gt.array == 2, spacing=image.spacing).dice > 0.7


def test_committed_recipe_describes_the_shipped_model():
    """configs/unet_arterial_phantom.yaml is the recipe the model card quotes: it must load and
    build exactly the shipped network (a drifted recipe would not reproduce the model)."""
    recipe = Path(__file__).parents[2] / "configs" / "unet_arterial_phantom.yaml"
    if not recipe.is_file():
        pytest.skip("the configs/ folder is not next to the tests (installed package)")
    config = load_unet_train_config(recipe)
    shipped = load_unet_checkpoint(
        Path(str(importlib.resources.files("slidesam") / "weights" / "default_unet.pt"))
    )
    assert config.model == shipped.config
    assert shipped.extra["recipe"] == "configs/unet_arterial_phantom.yaml"
    assert shipped.extra["epoch"] == config.optim.epochs  # the recipe ships last.pt
    # mirrored at inference: only sound for a model trained with flips
    assert shipped.config.mirror_axes == (0, 1, 2)
    assert config.augment.flip_p > 0
    # step 2 fine-tunes step 1's best.pt: same network, same data plus one more cohort
    base = load_unet_train_config(recipe.with_name("unet_arterial_phantom_base.yaml"))
    assert config.run.init_checkpoint == f"{base.run.out_dir}/best.pt"
    assert base.run.init_checkpoint is None
    assert replace(base.model, mirror_axes=(0, 1, 2)) == config.model
    assert base.augment == config.augment
    assert config.data.folders[:3] == base.data.folders
    assert len(config.data.folders) == 4
    assert config.optim.lr < base.optim.lr
