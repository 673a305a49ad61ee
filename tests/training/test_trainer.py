"""The training loop on the tiny_64 model and a 12-sample prepared toy dataset (2 cases)."""

from __future__ import annotations

import csv
import logging
import math
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
import yaml

import slidesam
from slidesam.cli.main import main
from slidesam.core import InputError
from slidesam.core.config import variant_config
from slidesam.data.prepare import PrepareConfig, prepare_dataset
from slidesam.inference.checkpoint import save_checkpoint
from slidesam.modeling import build_model
from slidesam.training.config import (
    DataConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
    load_train_config,
)
from slidesam.training.trainer import (
    LOG_COLUMNS,
    _MixSampler,
    batch_loss,
    build_training_model,
    class_mix,
    find_val_volumes,
    log_columns,
    lr_factor,
    propagation_dice,
    train,
)
from slidesam.training.windows import AugmentConfig, WindowDataset
from tests.training.toy import toy_dataset

SIZE = 64


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Prepared folder: 2 cases x (4 kidney + 2 tumor windows) = 12 samples at 64 px."""
    root = tmp_path_factory.mktemp("trainer")
    ds = toy_dataset(root)
    prepare_dataset(ds, root / "out", PrepareConfig(size=SIZE, image_format="png"), progress=False)
    return root / "out" / ds.name


def _config(folder, out_dir, **optim) -> TrainConfig:
    return TrainConfig(
        data=DataConfig(folders=(str(folder),)),
        model=ModelConfig(variant="tiny_64", lora_rank=2, trainable="lora"),
        augment=AugmentConfig(),
        optim=OptimConfig(
            **{"lr": 1e-3, "batch_size": 2, "epochs": 2, "warmup_epochs": 0.5, "cosine": True}
            | optim
        ),
        run=RunConfig(out_dir=str(out_dir), seed=3, val_fraction=0.5),
    )


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_loss_decreases_when_overfitting_one_batch(prepared):
    config = _config(prepared, "unused")
    config = replace(config, model=replace(config.model, trainable="full"))
    model = build_training_model(config)
    ds = WindowDataset(prepared, size=SIZE)
    batch = torch.utils.data.default_collate([ds[0], ds[5]])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(20):
        rng = np.random.default_rng(0)  # the same prompts every step
        out = batch_loss(model, batch.image, batch.mask, batch.indicator, rng)
        opt.zero_grad()
        out.total.backward()
        opt.step()
        losses.append(out.total.item())
    assert losses[-1] < 0.3 * losses[0], losses  # 14.8 -> 2.8 when written


def test_train_writes_log_checkpoints_and_config(prepared, tmp_path):
    config = _config(prepared, tmp_path / "run")
    result = train(config, progress=False)
    run = tmp_path / "run"
    with (run / "log.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == LOG_COLUMNS
    # one case of two held out: 6 training samples, batch 2 -> 3 steps per epoch
    assert [(int(r["epoch"]), int(r["step"])) for r in rows] == [(1, 3), (2, 6)]
    assert all(0.0 <= float(r["val_dice"]) <= 1.0 for r in rows)
    assert float(rows[-1]["lr"]) == pytest.approx(0.0, abs=1e-12)  # cosine ends at 0
    assert result["steps"] == 6
    assert result["val_dice"] == pytest.approx(float(rows[-1]["val_dice"]), abs=1e-6)
    assert load_train_config(run / "config.yaml") == config

    # slidesam.load_model reads the checkpoint, and it is the trained model
    model = slidesam.load_model(run / "last.pt")
    trained = build_training_model(config).eval()
    trained.load_state_dict(_weights(run / "last.pt"))
    images = torch.rand(1, 3, SIZE, SIZE) * 255
    box = torch.tensor([[10.0, 10.0, 40.0, 30.0]])
    with torch.no_grad():
        a = model(images, boxes=box)
        b = trained(images, boxes=box)
    assert torch.equal(a[0], b[0])
    assert torch.equal(a[1], b[1])
    assert (run / "best.pt").is_file()
    assert (run / "last.config.json").is_file()
    assert config.run.tensorboard is False
    assert not (run / "tensorboard").exists()  # TensorBoard is off by default
    start = _weights(run / "last.pt")
    fresh = build_training_model(config).state_dict()
    assert not torch.equal(
        start["mask_decoder.iou_token.weight"], fresh["mask_decoder.iou_token.weight"]
    )


def test_resume_equals_an_uninterrupted_run(prepared, tmp_path):
    straight = train(_config(prepared, tmp_path / "a"), progress=False)
    first = train(_config(prepared, tmp_path / "b"), stop_after=1, progress=False)
    assert first["steps"] == 3
    with pytest.raises(InputError, match="already holds a run"):
        train(_config(prepared, tmp_path / "b"), progress=False)
    resumed = train(_config(prepared, tmp_path / "b"), resume=True, progress=False)
    assert resumed["steps"] == straight["steps"] == 6
    wa, wb = _weights(tmp_path / "a" / "last.pt"), _weights(tmp_path / "b" / "last.pt")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k  # bit-identical on CPU
    log_a = (tmp_path / "a" / "log.csv").read_text().splitlines()
    log_b = (tmp_path / "b" / "log.csv").read_text().splitlines()
    # the same losses, Dice and lr in the log (all but the seconds column)
    assert [r.rsplit(",", 1)[0] for r in log_a] == [r.rsplit(",", 1)[0] for r in log_b]
    with pytest.raises(InputError, match=r"optim\.lr changed"):
        train(_config(prepared, tmp_path / "b", lr=5e-4), resume=True, progress=False)


@pytest.mark.parametrize(
    ("warmup", "cosine", "expected"),
    [
        (2, False, [0.5, 1.0, 1.0, 1.0, 1.0]),
        (0, True, [1.0, 0.9045085, 0.6545085, 0.3454915, 0.0954915]),  # (1 + cos(pi s/5)) / 2
        (1, True, [1.0, 1.0, 0.8535534, 0.5, 0.1464466]),
    ],
)
def test_lr_schedule(warmup, cosine, expected):
    got = [lr_factor(s, warmup_steps=warmup, total_steps=5, cosine=cosine) for s in range(5)]
    assert got == pytest.approx(expected, abs=1e-6)


def _yaml(tmp_path, data) -> str:
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_yaml_config_reads_and_names_unknown_keys(tmp_path):
    path = _yaml(
        tmp_path,
        {"data": {"folders": ["a"]}, "optim": {"lr": "1e-4", "lrr": 1, "epochz": 2}},
    )
    with pytest.raises(InputError, match=r"unknown key\(s\) in section 'optim': epochz, lrr"):
        load_train_config(path)
    with pytest.raises(InputError, match=r"unknown config section\(s\): optimizer"):
        load_train_config(_yaml(tmp_path, {"data": {"folders": ["a"]}, "optimizer": {}}))
    with pytest.raises(InputError, match=r"optim\.batch_size must be an integer, got 'two'"):
        load_train_config(
            _yaml(tmp_path, {"data": {"folders": ["a"]}, "optim": {"batch_size": "two"}})
        )
    with pytest.raises(InputError, match=r"loss: LossConfig.lambda_ce must be >= 0"):
        load_train_config(_yaml(tmp_path, {"data": {"folders": ["a"]}, "loss": {"lambda_ce": -1}}))
    cfg = load_train_config(
        _yaml(tmp_path, {"data": {"folders": "a"}, "optim": {"lr": "1e-4", "grad_clip": None}})
    )
    assert cfg.data.folders == ("a",)
    assert cfg.optim.lr == 1e-4
    assert cfg.optim.grad_clip is None
    assert cfg.optim.betas == (0.9, 0.999)
    assert cfg.optim.weight_decay == 0.1
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_bad_input_fails_before_training(prepared, tmp_path):
    with pytest.raises(InputError, match="no such prepared dataset folder"):
        train(_config(tmp_path / "missing", tmp_path / "r1"), progress=False)
    empty = tmp_path / "empty"
    shutil.copytree(prepared, empty)
    for done in (empty / "meta").glob("*.done.json"):
        done.unlink()
    with pytest.raises(InputError, match="no samples in"):
        train(_config(empty, tmp_path / "r2"), progress=False)
    # an init checkpoint of another variant
    other = tmp_path / "tiny.pt"
    tiny = build_model(variant_config("tiny", num_slices=3))
    save_checkpoint(tiny, tiny.config, other)
    cfg = _config(prepared, tmp_path / "r3")
    cfg = replace(cfg, model=replace(cfg.model, init_checkpoint=str(other)))
    with pytest.raises(InputError, match=r"init_checkpoint .*tiny.*tiny_64"):
        train(cfg, progress=False)
    assert not (tmp_path / "r3").exists()


def test_cli_train_and_errors(prepared, tmp_path, capsys):
    cfg = _config(prepared, tmp_path / "ignored", epochs=1)
    path = tmp_path / "c.yaml"
    cfg.save(path)
    assert (
        main(["train", "--config", str(path), "--out", str(tmp_path / "cli"), "--no-progress"]) == 0
    )
    assert (tmp_path / "cli" / "last.pt").is_file()
    assert not (tmp_path / "ignored").exists()
    data = cfg.to_dict()
    data["run"]["val_fractoin"] = 0.2
    bad = _yaml(tmp_path, data)
    assert main(["train", "--config", bad]) == 2
    err = capsys.readouterr().err
    assert "val_fractoin" in err
    assert "'run'" in err
    assert err.count("\n") == 1


@pytest.mark.parametrize(
    ("section", "values", "message"),
    [
        ("optim", {"amp": "fp8"}, r"optim\.amp must be one of none, bf16, fp16, got 'fp8'"),
        ("optim", {"amp": "bf16"}, r"optim\.amp 'bf16' needs a CUDA device, but run\.device"),
        ("model", {"grad_checkpointing": "yes"}, r"model\.grad_checkpointing must be true/false"),
        ("run", {"tensorboard": 1}, r"run\.tensorboard must be true/false, got 1"),
        ("run", {"tensorbord": True}, r"unknown key\(s\) in section 'run': tensorbord"),
        ("run", {"select_by": "loss"}, r"run\.select_by must be one of window_dice, dice3d"),
        ("run", {"select_by": "dice3d"}, r"'dice3d' needs run\.val_volumes"),
        ("run", {"val_volumes_every": 0}, r"run\.val_volumes_every and run\.val_volumes_max"),
        ("run", {"val_volumes": [["a.nii.gz", "b", "c"]]}, r"run\.val_volumes\[0\] must be"),
    ],
)
def test_new_config_keys_refuse_bad_values_by_name(tmp_path, section, values, message):
    with pytest.raises(InputError, match=message):
        load_train_config(_yaml(tmp_path, {"data": {"folders": ["a"]}, section: values}))


def test_new_config_keys_read_and_round_trip(tmp_path):
    default = TrainConfig(data=DataConfig(folders=("a",)))
    assert (default.optim.amp, default.model.grad_checkpointing, default.run.tensorboard) == (
        "none",
        False,
        False,
    )
    assert (default.run.val_volumes, default.run.select_by) == ((), "window_dice")
    cfg = load_train_config(
        _yaml(
            tmp_path,
            {
                "data": {"folders": ["a"]},
                "model": {"grad_checkpointing": True},
                "optim": {"amp": "bf16"},
                "run": {
                    "device": "cuda",
                    "tensorboard": True,
                    "val_volumes": [["img.nii.gz", "lab.nii.gz"], "Dataset001"],
                    "val_volumes_every": 5,
                    "val_volumes_max": 2,
                    "select_by": "dice3d",
                },
            },
        )
    )
    assert cfg.run.val_volumes == (("img.nii.gz", "lab.nii.gz"), "Dataset001")
    assert (cfg.optim.amp, cfg.model.grad_checkpointing, cfg.run.select_by) == (
        "bf16",
        True,
        "dice3d",
    )
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    one = load_train_config(
        _yaml(tmp_path, {"data": {"folders": ["a"]}, "run": {"val_volumes": "Dataset001"}})
    )
    assert one.run.val_volumes == ("Dataset001",)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    config = TrainConfig(
        data=DataConfig(folders=("unused",)),
        model=ModelConfig(variant="tiny", lora_rank=0, trainable="full"),
    )
    model = build_training_model(config)
    size = model.image_size
    g = torch.Generator().manual_seed(0)
    images = torch.rand(1, 3, size, size, generator=g) * 255
    masks = torch.zeros(1, 3, size, size)
    masks[0, :, 60:140, 80:150] = 1

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        saved = []  # elements kept for the backward pass during the forward
        with torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(t.numel()) or t, lambda t: t
        ):
            out = batch_loss(model, images, masks, torch.ones(1, 3), np.random.default_rng(1))
        out.total.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out.total.item(), grads, sum(saved)

    plain_loss, plain, plain_saved = loss_and_grads()
    model.image_encoder.grad_checkpointing = True
    ckpt_loss, ckpt, ckpt_saved = loss_and_grads()
    assert ckpt_saved < 0.5 * plain_saved  # the blocks' activations were not kept
    assert ckpt_loss == pytest.approx(plain_loss, abs=1e-5)
    assert plain.keys() == ckpt.keys()
    assert any(k.startswith("image_encoder.blocks.0.") for k in plain)
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], atol=1e-5, rtol=1e-5, msg=k)


def test_3d_dice_validation_is_logged_and_selects_best(prepared, tmp_path, caplog):
    raw = prepared.parent.parent / "Dataset900_Toy"
    config = _config(prepared, tmp_path / "run")
    config = replace(
        config,
        run=replace(
            config.run,
            val_volumes=(str(raw),),
            val_volumes_every=2,
            val_volumes_max=1,
            select_by="dice3d",
            tensorboard=True,
        ),
    )
    with caplog.at_level(logging.WARNING):
        result = train(config, stop_after=1, progress=False)
        # before its first measurement best.pt is the latest model
        assert (tmp_path / "run" / "best.pt").is_file()
        result = train(config, resume=True, progress=False)
    with (tmp_path / "run" / "log.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == log_columns(["kidney", "tumor"])
    assert log_columns(["kidney", "tumor"])[4:7] == (
        "val_dice3d",
        "val_dice3d_kidney",
        "val_dice3d_tumor",
    )
    assert rows[0]["val_dice3d_kidney"] == ""  # every 2 epochs: not measured after epoch 1
    kidney, tumor = float(rows[1]["val_dice3d_kidney"]), float(rows[1]["val_dice3d_tumor"])
    assert 0.0 <= kidney <= 1.0
    assert 0.0 <= tumor <= 1.0
    assert float(rows[1]["val_dice3d"]) == pytest.approx((kidney + tumor) / 2, abs=1e-6)
    assert result["best_metric"] == pytest.approx(float(rows[1]["val_dice3d"]), abs=1e-6)
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=True)["training"]
    assert best["epoch"] == 2
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        warned = [r for r in caplog.records if "tensorboard package is not installed" in r.message]
        assert len(warned) == 2  # one line per train() call
    else:
        assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


def test_val_volumes_are_found_and_checked(prepared, tmp_path):
    raw = prepared.parent.parent / "Dataset900_Toy"
    classes = {"kidney": (1,), "tumor": (2,), "cyst": (3,)}
    found = find_val_volumes([str(raw)], classes)
    assert [v.case for v in found] == ["case_000", "case_001"]
    assert found[0].targets == (("kidney", (1,)), ("tumor", (2,)))  # no cyst in dataset.json
    image, label = found[1].image, found[1].label
    pair = find_val_volumes([str(raw), (str(image), str(label))], classes, limit=3)
    assert [v.case for v in pair] == ["case_000", "case_001", image.name]
    assert pair[2].targets == tuple(classes.items())
    assert len(find_val_volumes([str(raw)], classes, limit=1)) == 1
    with pytest.raises(InputError, match=r"run\.val_volumes .*missing: no such folder"):
        find_val_volumes([str(tmp_path / "missing")], classes)
    with pytest.raises(InputError, match=r"run\.val_volumes: .*nope\.nii\.gz: no such file"):
        find_val_volumes([(str(image), str(tmp_path / "nope.nii.gz"))], classes)
    with pytest.raises(InputError, match="none of the trained classes"):
        find_val_volumes([str(raw)], {"liver": (5,)})


def test_propagation_dice_scores_present_classes_only(prepared):
    from slidesam.data.io import read_image, read_label

    raw = prepared.parent.parent / "Dataset900_Toy"
    image = read_image(raw / "imagesTr" / "case_000_0000.nii.gz")
    labels = read_label(raw / "labelsTr" / "case_000.nii.gz", reference=image).array
    model = build_training_model(_config(prepared, "unused"))
    dice = propagation_dice(
        model, image, labels, [("kidney", (1,)), ("cyst", (3,)), ("both", (1, 2))], axis=0
    )
    assert set(dice) == {"kidney", "both"}
    assert all(0.0 <= d <= 1.0 for d in dice.values())
    assert model.training  # put back in train mode


def test_fp16_amp_path_with_loss_scale_runs_and_resumes(prepared, tmp_path):
    """The CUDA-only ``optim.amp: fp16`` code (autocast + GradScaler, its state in last.pt),
    run on CPU, where torch supports both, by setting the field past the config's check."""
    config = _config(prepared, tmp_path / "run")
    object.__setattr__(config.optim, "amp", "fp16")
    first = train(config, stop_after=1, progress=False)
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["training"]
    assert state["scaler"]["scale"] > 0
    assert state["scaler"]["_growth_tracker"] == first["steps"] == 3  # no step skipped
    result = train(config, resume=True, progress=False)
    assert result["steps"] == 6
    assert math.isfinite(result["train_loss"])
    assert 0.0 <= result["val_dice"] <= 1.0


def test_class_mix_keeps_folder_shares_and_weighs_classes():
    # folder 0: samples 0-3 (3 kidney, 1 tumor); folder 1: samples 4-5 (1 kidney, 1 tumor)
    index = [np.array([0, 1, 2, 3]), np.array([4, 5])]
    classes = ["kidney", "kidney", "kidney", "tumor", "kidney", "tumor"]
    groups, weights = class_mix(index, classes, None, {"tumor": 3})
    assert [g.tolist() for g in groups] == [[0, 1, 2], [3], [4], [5]]
    # folder 0 keeps its share 4 (its size): kidney mass 3, tumor 3 -> 2 and 2;
    # folder 1 keeps 2: kidney 1, tumor 3 -> 0.5 and 1.5
    assert weights == pytest.approx([2.0, 2.0, 0.5, 1.5])
    groups, weights = class_mix(index, classes, [1.0, 3.0], {"tumor": 3})
    assert weights == pytest.approx([0.5, 0.5, 0.75, 2.25])
    # no class weights: the folders unchanged, as before the option existed
    groups, weights = class_mix(index, classes, [1.0, 3.0], None)
    assert [g.tolist() for g in groups] == [[0, 1, 2, 3], [4, 5]]
    assert weights == [1.0, 3.0]
    assert class_mix(index, classes, None, None)[1] is None
    with pytest.raises(InputError, match=r"class_weights names class\(es\) lesion"):
        class_mix(index, classes, None, {"lesion": 2})


def test_class_weights_change_what_the_sampler_draws(prepared):
    ds = WindowDataset(prepared)
    classes = ds.sample_classes()
    assert sorted(set(classes)) == ["kidney", "tumor"]
    assert classes.count("tumor") == 4
    index = [np.arange(len(ds))]
    for class_weights, expected in ((None, 4 / 12), ({"tumor": 4}, 16 / 24)):
        groups, weights = class_mix(index, classes, None, class_weights)
        sampler = _MixSampler(groups, weights, 20000, seed=1)
        drawn = np.array(classes)[np.fromiter(sampler, np.int64)]
        assert (drawn == "tumor").mean() == pytest.approx(expected, abs=0.015)


@pytest.mark.parametrize("value", [0, -1.0, "x", float("inf"), float("nan"), True])
def test_class_weights_must_be_positive(tmp_path, value):
    data = {"folders": ["a"], "class_weights": {"tumor": value}}
    with pytest.raises(InputError, match=r"data\.class_weights"):
        load_train_config(_yaml(tmp_path, {"data": data}))
    ok = load_train_config(
        _yaml(tmp_path, {"data": {"folders": ["a"], "class_weights": {"tumor": 3}}})
    )
    assert ok.data.class_weights == {"tumor": 3.0}
