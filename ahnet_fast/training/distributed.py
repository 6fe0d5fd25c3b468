"""Process-group set-up for ``torchrun``: one process per GPU (NCCL) or per CPU worker (gloo).

torchrun exports RANK, LOCAL_RANK and WORLD_SIZE; without them the run is a single process and
nothing here touches torch.distributed.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def info_from_env() -> DistInfo:
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as exc:
        raise ValueError(f"RANK / LOCAL_RANK / WORLD_SIZE must be integers (as torchrun sets them): {exc}") from exc
    return DistInfo(rank=rank, local_rank=local, world_size=world)


def setup(device_type: str) -> tuple[DistInfo, torch.device | None]:
    """Initialises the default process group when launched by torchrun; returns the rank info and,
    on CUDA, this process's device (cuda:LOCAL_RANK)."""
    info = info_from_env()
    if not info.enabled:
        return info, None
    if not dist.is_available():
        raise ValueError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    device = None
    if device_type == "cuda":
        if torch.cuda.device_count() <= info.local_rank:
            raise ValueError(f"LOCAL_RANK {info.local_rank} but only {torch.cuda.device_count()} CUDA device(s)")
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=30))
    return info, device


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def mean_across_ranks(value: float, info: DistInfo, device: torch.device) -> float:
    """The mean of a Python number over all ranks (for logging a global loss)."""
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / info.world_size


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
