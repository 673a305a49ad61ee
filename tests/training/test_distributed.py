"""Data-parallel training: 2 CPU processes (gloo) launched by torchrun on the toy dataset."""

from __future__ import annotations

import csv
import math
import os
import signal
import socket
import subprocess
import sys
import textwrap
from dataclasses import replace

import pytest
import torch

from slidesam.core import InputError
from slidesam.data.prepare import PrepareConfig, prepare_dataset
from slidesam.training.config import (
    DataConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
)
from slidesam.training.distributed import World, rank_device, world_from_env
from slidesam.training.trainer import _MixSampler, build_training_model
from tests.training.toy import toy_dataset

SIZE = 64

# Runs the real command line (slidesam.cli.main train CONFIG [--resume]) in each process and
# keeps this process's trained weights: the CLI's train() is wrapped to save result["model"].
WORKER = textwrap.dedent(
    """
    import os, sys
    import torch
    import slidesam.training.trainer as trainer
    from slidesam.cli.main import main

    train = trainer.train

    def keep_weights(*args, **kwargs):
        result = train(*args, **kwargs)
        torch.save(
            {
                "state_dict": result["model"].state_dict(),
                "train_loss": result["train_loss"],
                "steps": result["steps"],
                "world_size": result["world_size"],
            },
            os.path.join(sys.argv[2], f"rank{result['rank']}.pt"),
        )
        return result

    trainer.train = keep_weights
    sys.exit(main(["train", "--config", sys.argv[1], "--no-progress", *sys.argv[3:]]))
    """
)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """(raw nnU-Net folder, prepared folder): 2 cases x 6 samples at 64 px."""
    root = tmp_path_factory.mktemp("ddp")
    ds = toy_dataset(root)
    prepare_dataset(ds, root / "out", PrepareConfig(size=SIZE, image_format="png"), progress=False)
    return ds, root / "out" / ds.name


def _run_group(command: list[str], env: dict, timeout: float) -> tuple[str, str, int]:
    """Run torchrun in its own process group; on timeout kill the group (workers too)."""
    proc = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun did not finish in {timeout} s:\n{stderr[-4000:]}")
    return stdout, stderr, proc.returncode


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_cpu_processes_end_with_identical_trained_weights(toy, tmp_path):
    """torchrun, gloo, 2 processes: one epoch, then a second launch resuming to epoch 2 (one
    launch per run: torch reuses a destroyed group's store keys, so a process should not
    create a second group on the same store)."""
    raw, prepared = toy
    config = TrainConfig(
        data=DataConfig(folders=(str(prepared),)),
        model=ModelConfig(
            variant="tiny_64", lora_rank=2, trainable="lora", grad_checkpointing=True
        ),
        optim=OptimConfig(lr=1e-3, batch_size=2, epochs=1),
        run=RunConfig(
            out_dir=str(tmp_path / "run"),
            seed=3,
            val_fraction=0.5,
            val_volumes=(str(raw),),  # 2 volumes: one per rank, sums reduced
            select_by="dice3d",
        ),
    )
    first = config.save(tmp_path / "epoch1.yaml")
    config = replace(config, optim=replace(config.optim, epochs=2))
    second = config.save(tmp_path / "epoch2.yaml")
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    stdout = ""
    for path, extra in ((first, []), (second, ["--resume"])):
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes=1",
            "--nproc_per_node=2",
            "--master_addr=127.0.0.1",
            f"--master_port={_free_port()}",
            str(script),
            str(path),
            str(tmp_path),
            *extra,
        ]
        out, err, code = _run_group(command, env, timeout=120)
        assert code == 0, err[-4000:]
        stdout += out

    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    # 6 training samples -> 3 per rank, batch 2 -> 2 steps per epoch
    assert [r["steps"] for r in ranks] == [4, 4]
    a, b = ranks[0]["state_dict"], ranks[1]["state_dict"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bit-identical on both ranks
    start = build_training_model(config).state_dict()
    changed = [k for k in a if not torch.equal(a[k], start[k])]
    assert "mask_decoder.iou_token.weight" in changed
    assert not any(".lora_" not in k and k.startswith("image_encoder.blocks") for k in changed)
    assert all(math.isfinite(r["train_loss"]) for r in ranks)
    assert ranks[0]["train_loss"] == ranks[1]["train_loss"]  # reduced over the ranks

    # rank 0 wrote the run folder, and its checkpoint is the trained model
    saved = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(saved[k], a[k]) for k in a)
    with (tmp_path / "run" / "log.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [2, 4]
    for r in rows:
        assert 0.0 <= float(r["val_dice"]) <= 1.0
        assert 0.0 <= float(r["val_dice3d_kidney"]) <= 1.0
        assert 0.0 <= float(r["val_dice3d_tumor"]) <= 1.0
    assert (tmp_path / "run" / "best.pt").is_file()
    assert stdout.count("epochs,") == 2  # one summary line per call, from rank 0


def test_each_rank_draws_a_disjoint_equal_shard_of_the_epoch():
    index = [torch.arange(7).numpy(), torch.arange(10, 13).numpy()]
    whole = list(_MixSampler(index, None, 9, seed=5))
    shards = [list(_MixSampler(index, None, 9, seed=5, world=World(r, 2, r))) for r in (0, 1)]
    assert [len(s) for s in shards] == [5, 5]  # 9 padded to 10
    assert shards[0] == whole[0::2]
    assert shards[1] == [*whole[1::2], whole[0]]  # the pad repeats the list's start


def test_torchrun_environment():
    assert world_from_env({}) == World()
    w = world_from_env({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (w.rank, w.size, w.local_rank, w.distributed, w.is_main) == (1, 4, 1, True, False)
    with pytest.raises(InputError, match="inconsistent torchrun environment"):
        world_from_env({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(InputError, match="must be integers"):
        world_from_env({"RANK": "a", "WORLD_SIZE": "2"})
    assert rank_device("cuda", World(1, 2, 1)) == torch.device("cuda", 1)
    assert rank_device("cpu", World(1, 2, 1)) == torch.device("cpu")
    with pytest.raises(InputError, match=r"use run.device: cuda"):
        rank_device("cuda:0", World(1, 2, 1))
