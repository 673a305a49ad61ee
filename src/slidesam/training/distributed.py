"""Data-parallel training across processes: ``torchrun`` sets the environment, we read it.

Launch (one node, N processes; ``slidesam train`` works in place of ``-m slidesam.cli.main``)::

    torchrun --nproc_per_node=N -m slidesam.cli.main train --config C.yaml

``torchrun`` exports ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT`` to every process; without them (a plain ``slidesam train``) the run is a single
process and nothing here touches ``torch.distributed``. The process group uses ``nccl`` when the
run's device is CUDA (rank ``r`` of a node on ``cuda:LOCAL_RANK``) and ``gloo`` on CPU.

Helpers are no-ops in a single process, so the training loop calls them unconditionally.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from slidesam.core.errors import InputError

__all__ = ["World", "all_reduce_sum", "barrier", "process_group", "rank_device", "world_from_env"]

log = logging.getLogger(__name__)

#: how long a collective waits for the slowest rank (validation of big volumes included)
TIMEOUT = datetime.timedelta(minutes=60)


@dataclass(frozen=True)
class World:
    """This process's place among the training processes.

    Attributes:
        rank: global index 0..size-1 (rank 0 writes logs and checkpoints).
        size: number of processes (1 = not distributed).
        local_rank: index on this node (selects the GPU).
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_from_env(env: dict[str, str] | None = None) -> World:
    """The ``World`` that ``torchrun`` describes in ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``.

    Raises:
        InputError: values that are not integers or do not fit together.
    """
    env = os.environ if env is None else env
    if "WORLD_SIZE" not in env and "RANK" not in env:
        return World()
    try:
        size = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        local = int(env.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise InputError(
            "RANK, WORLD_SIZE and LOCAL_RANK must be integers (as torchrun sets them), got "
            f"{env.get('RANK')!r}, {env.get('WORLD_SIZE')!r}, {env.get('LOCAL_RANK')!r}"
        ) from None
    if size < 1 or not 0 <= rank < size or local < 0:
        raise InputError(f"inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={size}")
    return World(rank=rank, size=size, local_rank=local)


def rank_device(device: str, world: World) -> torch.device:
    """The device of this rank: ``cuda`` becomes ``cuda:LOCAL_RANK`` when distributed.

    Raises:
        InputError: an explicit ``cuda:N`` under a multi-process launch (each process must
            take its own GPU).
    """
    dev = torch.device(device)
    if not world.distributed or dev.type != "cuda":
        return dev
    if dev.index is not None:
        raise InputError(
            f"run.device {device!r} names one GPU, but torchrun started {world.size} processes; "
            "use run.device: cuda (each process takes cuda:LOCAL_RANK)"
        )
    return torch.device("cuda", world.local_rank)


@contextmanager
def process_group(world: World, device: torch.device) -> Iterator[World]:
    """Join the process group for the duration of the block (nothing in a single process).

    A group set up by the caller is used and left alone; one we create is destroyed on exit,
    also when the block raises. Create one group per process (one ``train`` call per
    ``torchrun`` launch): torch names a re-created default group as it named the destroyed one,
    so its ranks can read the old group's stale addresses from the shared store and hang.
    """
    if not world.distributed or dist.is_initialized():
        yield world
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=world.rank, world_size=world.size, timeout=TIMEOUT)
    log.debug("rank %d/%d joined the %s process group", world.rank, world.size, backend)
    try:
        yield world
    finally:
        dist.destroy_process_group()


def barrier(world: World) -> None:
    """Wait for every rank (no-op in a single process)."""
    if world.distributed:
        dist.barrier()


def all_reduce_sum(values: list[float], world: World, device: torch.device) -> list[float]:
    """Element-wise sums of ``values`` over the ranks (float64); ``values`` in one process."""
    if not world.distributed:
        return list(values)
    # nccl reduces CUDA tensors only; gloo reduces CPU ones
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().tolist()
