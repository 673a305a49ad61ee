"""The training loop on the tiny_64 model and a 12-sample prepared toy dataset (2 cases)."""

from __future__ import annotations

import csv
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
    batch_loss,
    build_training_model,
    lr_factor,
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
