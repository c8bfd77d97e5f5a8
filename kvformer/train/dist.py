"""One process, or one of the processes torchrun started: ``Dist`` (rank, world size, device)
and ``setup_distributed``, which joins the process group (gloo on CPU, nccl on GPUs)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from kvformer.errors import KvformerError


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()


def setup_distributed(device: str = "auto") -> Dist:
    """One process, or one of the processes torchrun started (RANK / WORLD_SIZE / LOCAL_RANK /
    MASTER_ADDR / MASTER_PORT in the environment): gloo on CPU, nccl on GPUs."""
    want_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise KvformerError(f"--device {device}: no CUDA device is available")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not dist.is_initialized():
        dev = torch.device(device if device not in ("auto",) else ("cuda" if want_cuda else "cpu"))
        return Dist(device=dev)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    owns = False
    if not dist.is_initialized():
        if want_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if want_cuda else "gloo", timeout=timedelta(minutes=30))
        owns = True
    dev = torch.device(f"cuda:{local}") if want_cuda else torch.device("cpu")
    return Dist(dist.get_rank(), dist.get_world_size(), local, dev, owns)
