"""Training lowers the loss, runs resume, and the CLI trains and predicts end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from slidesam.cli.main import main
from slidesam.data.io import read_image, read_label
from slidesam.data.phantom import PhantomConfig, write_cohort
from slidesam.modeling.sam3d import build_sam3d, param_groups, set_trainable_3d, variant3d_config
from slidesam.msam.data import WorkCase
from slidesam.msam.refine import refine, upsample
from slidesam.msam.train import make_loss, sample_batch


def _ball_case(seed: int) -> WorkCase:
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.arange(48)] * 3, indexing="ij")
    c = rng.uniform(18, 30, 3)
    target = (z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 < rng.uniform(6, 10) ** 2
    image = np.where(target, 1.5, -0.5) + rng.normal(0, 0.3, target.shape)
    return WorkCase(f"ball{seed}", image.astype(np.float32), target, float(image.min()))


def test_a_short_train_lowers_the_loss():
    torch.manual_seed(0)
    model = build_sam3d(variant3d_config("tiny_32"))
    set_trainable_3d(model, "full")
    opt = torch.optim.AdamW(param_groups(model, lr=1e-2, low_lr_scale=1.0, weight_decay=0.1))
    loss_fn = make_loss()
    cases = [_ball_case(s) for s in range(3)]
    rng = np.random.default_rng(0)
    x, y = sample_batch(cases, 32, 2, rng, max_shift=2, flip_p=0.5)
    assert x.shape == (2, 1, 32, 32, 32)
    assert y.dtype == torch.bool
    gen = torch.Generator().manual_seed(0)

    def loss_now(train: bool) -> torch.Tensor:
        outs = refine(model, model.encode(x), iterations=2, target=y, generator=gen)
        return sum(loss_fn(upsample(o, 32), y.float()) for o in outs) / len(outs)

    with torch.no_grad():
        before = float(loss_now(False))
    for _ in range(12):
        loss = loss_now(True)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = float(loss_now(False))
    assert after < 0.85 * before, (before, after)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("msam_phantom")
    cfg = PhantomConfig(
        shape=(45, 100, 100),
        spacing=(3.0, 2.8, 2.8),
        phases=("venous",),
        tumor_diameter_mm=(25.0, 40.0),
        motion_mm=0.0,
        vary_z_spacing=False,
    )
    summary = write_cohort(out, cases=3, seed=3, config=cfg, progress=False)
    return Path(summary["datasets"]["venous"])


def _config(tmp_path: Path, cohort: Path, epochs: int) -> Path:
    cfg = {
        "data": {"folders": [str(cohort)], "val_cases": 1},
        "preprocess": {"spacing": [3.0, 3.0, 3.0]},
        "model": {"variant": "tiny_32", "trainable": "full"},
        "refine": {"train_iterations": 2, "val_iterations": 2},
        "optim": {"epochs": epochs, "steps_per_epoch": 2, "batch_size": 1},
        "run": {"out_dir": str(tmp_path / "run"), "seed": 0},
    }
    path = tmp_path / "msam.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_cli_train_resume_and_predict(tmp_path, cohort, capsys):
    cfg = _config(tmp_path, cohort, epochs=2)
    assert main(["msam", "train", "--config", str(cfg), "--no-progress"]) == 0
    run = tmp_path / "run"
    rows = (run / "log.csv").read_text().splitlines()
    assert len(rows) == 3
    assert {"best.pt", "last.pt", "config.yaml", "log.csv"} <= {p.name for p in run.iterdir()}
    # resume: one more epoch continues after epoch 2 and keeps the first rows
    data = yaml.safe_load(cfg.read_text())
    data["optim"]["epochs"] = 3
    data["run"]["resume"] = True
    cfg.write_text(yaml.safe_dump(data))
    assert main(["msam", "train", "--config", str(cfg), "--no-progress"]) == 0
    resumed = (run / "log.csv").read_text().splitlines()
    assert resumed[:3] == rows
    assert resumed[3].startswith("3,6,")

    image_path = sorted((cohort / "imagesTr").glob("*.nii.gz"))[0]
    label = read_label(cohort / "labelsTr" / (image_path.name[: -len("_0000.nii.gz")] + ".nii.gz"))
    tumor = np.argwhere(label.array == 2).mean(0).round().astype(int)
    prompts = tmp_path / "prompts.json"
    z, y, x = (int(v) for v in tumor)
    items = [
        {"slice": z, "points": [[x, y]], "point_labels": [1], "label": 2},
        {"slice": z, "box": [10, 10, 40, 40], "label": 1},
    ]
    prompts.write_text(json.dumps({"prompts": items}))
    out = tmp_path / "mask.nii.gz"
    code = main(
        ["msam", "predict", "--model", str(run / "best.pt"), "--image", str(image_path),
         "--prompts", str(prompts), "--out", str(out), "--iterations", "2", "--max-tiles", "4"]
    )  # fmt: skip
    assert code == 0
    assert "wrote" in capsys.readouterr().out
    mask, image = read_label(out), read_image(image_path)
    assert mask.geometry.mismatch(image.geometry) == ""
    assert mask.shape == image.shape
    assert set(np.unique(mask.array)) <= {0, 1, 2}


def test_cli_errors_are_one_line(tmp_path, cohort, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {folders: [x]}\noptim: {lr: fast}\n")
    assert main(["msam", "train", "--config", str(bad)]) == 2
    assert "bad.yaml: optim.lr must be a number" in capsys.readouterr().err
    image_path = sorted((cohort / "imagesTr").glob("*.nii.gz"))[0]
    prompts = tmp_path / "p.json"
    prompts.write_text('{"prompts": [{"slice": 999, "points": [[1, 1]], "point_labels": [1]}]}')
    ckpt = tmp_path / "none.pt"
    torch.save({"format": "other"}, ckpt)
    code = main(["msam", "predict", "--model", str(ckpt), "--image", str(image_path),
                 "--prompts", str(prompts), "--out", str(tmp_path / "m.nii.gz")])  # fmt: skip
    assert code == 2
    assert "not an M-SAM checkpoint" in capsys.readouterr().err
