"""torchrun multi-GPU runs: rank-0-only logging and checkpoints, inert in one process.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Distributed:
    """This process's place in a ``torchrun`` job; the defaults are a plain single-process run."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Only rank 0 logs, checkpoints and writes outputs: the ranks hold the same weights."""
        return self.rank == 0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Distributed:
        """Read torchrun's ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` (absent: a single process)."""
        env = os.environ if env is None else env
        world = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        dist = cls(rank=rank, local_rank=int(env.get("LOCAL_RANK", str(rank))), world_size=world)
        if not 0 <= dist.rank < dist.world_size:
            raise ValueError(f"RANK={dist.rank} is not in [0, WORLD_SIZE={dist.world_size})")
        return dist


def init_distributed(dist: Distributed, device: torch.device) -> torch.device:
    """Join the torchrun process group (NCCL on CUDA, gloo on CPU); returns this rank's device.

    On CUDA each rank takes the GPU of its ``LOCAL_RANK``. A single process
    returns ``device`` untouched and never touches ``torch.distributed``.
    """
    if not dist.enabled:
        return device
    backend = "gloo"
    if device.type == "cuda":  # pragma: no cover - needs GPUs
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend=backend, rank=dist.rank, world_size=dist.world_size)
    return device


def wrap_ddp(module: torch.nn.Module, dist: Distributed, device: torch.device) -> torch.nn.Module:
    """``DistributedDataParallel`` around ``module`` in a multi-process run (gradients averaged over ranks)."""
    if not dist.enabled:
        return module
    device_ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=device_ids)


def sync_buffers(modules: Iterable[torch.nn.Module], dist: Distributed) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics).

    DDP averages gradients, so parameters agree, but each rank's last forward
    leaves its own batch statistics in the buffers; validation, and with it the
    scheduler and early stopping, must see the same model on every rank.
    """
    if not dist.enabled:
        return
    for module in modules:
        for buffer in module.buffers():
            torch.distributed.broadcast(buffer, src=0)
