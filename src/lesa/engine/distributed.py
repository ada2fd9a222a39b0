"""Process-group set-up for ``torchrun`` (multi-process, multi-node) and the single-process case."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..errors import ConfigError


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Sum a few scalars over all processes (float64, on the process's device)."""
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def gather(self, obj: Any) -> list[Any]:
        """``obj`` of every process, in rank order (picklable objects without tensors)."""
        if not self.distributed:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but CUDA is not available; use --device cpu")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device(name)


def _env_int(name: str, default: int, minimum: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise ConfigError(f"environment variable {name}={raw!r} must be an integer >= {minimum}: launch through "
                          f"torchrun, which sets it, or unset it for a single process")
    return value


def torchrun_environment() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from torchrun's environment, checked before any process group forms.

    Without ``WORLD_SIZE`` (or with ``WORLD_SIZE=1``) this is one process. With ``WORLD_SIZE > 1`` the
    ``env://`` rendezvous also needs ``RANK`` below ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``.

    Raises:
        ConfigError: a variable is not a non-negative integer, ``RANK >= WORLD_SIZE``, or a variable that
            the rendezvous needs is missing (a ``WORLD_SIZE`` left exported in a shell, say), instead of
            ``torch.distributed``'s traceback.
    """
    world = _env_int("WORLD_SIZE", 1, 1)
    rank = _env_int("RANK", 0, 0)
    local_rank = _env_int("LOCAL_RANK", 0, 0)
    if rank >= world:
        raise ConfigError(f"RANK={rank} is not below WORLD_SIZE={world}: launch through torchrun, which numbers "
                          "the processes 0..WORLD_SIZE-1, or unset RANK to run in one process")
    if world > 1:
        missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
        if missing:
            verb = "is" if len(missing) == 1 else "are"
            raise ConfigError(f"WORLD_SIZE={world} is set but {', '.join(missing)} {verb} not: start the processes "
                              f"with torchrun (torchrun --nproc-per-node {world} -m lesa ...), or unset WORLD_SIZE "
                              "to run in one process")
        port = os.environ["MASTER_PORT"]
        if not (port.strip().isdigit() and 0 < int(port) < 65536):
            raise ConfigError(f"MASTER_PORT={port!r} is not a port number (1-65535): launch through torchrun, or "
                              "set MASTER_PORT to a free port")
    return rank, world, local_rank


def setup_distributed(device: str = "auto") -> DistContext:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK).

    NCCL on CUDA, gloo on CPU. Without those variables this is a single process.

    Raises:
        ConfigError: torchrun's environment is incomplete or inconsistent (:func:`torchrun_environment`).
    """
    rank, world, local_rank = torchrun_environment()
    dev = resolve_device(device, local_rank)
    if world > 1 and not dist.is_initialized():
        if "TORCHELASTIC_RUN_ID" not in os.environ:  # started by hand: say what it waits for (torch is silent)
            print(f"lesa: process {rank} of {world} waiting for the others at {os.environ['MASTER_ADDR']}:"
                  f"{os.environ['MASTER_PORT']} (WORLD_SIZE is set; unset it to run in one process)",
                  file=sys.stderr, flush=True)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistContext(rank, world, local_rank, dev)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
