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


def mean_and_any(value: float, flag: bool, info: DistInfo, device: torch.device) -> tuple[float, bool]:
    """(the mean of ``value`` over all ranks, whether any rank's ``flag`` is set), in one all-reduce:
    the step's loss and whether any rank was asked to stop, so that all ranks stop after the same step."""
    if not info.enabled:
        return value, flag
    t = torch.tensor([value, float(flag)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t[0].item() / info.world_size, bool(t[1].item() > 0)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


class StepRunningStats:
    """BatchNorm running statistics updated once per optimizer step, the same way whatever the split of
    the step's batch into micro-batches and processes.

    Left alone, each forward pass moves a running mean r to (1 - m) r + m s (s: that micro-batch's
    statistic), so n micro-batches in one process apply n updates in a row, while n processes each apply
    one and DDP keeps rank 0's: three different answers for one global batch. The rule here: every
    micro-batch's update is measured against the statistics the step started from and undone, and at the
    end of the step the statistics move by the mean of those updates over all micro-batches of all ranks,
    r <- r + mean_i((1 - m) r + m s_i - r) = (1 - m) r + m mean_i(s_i). One process with
    ``micro_batch = batch / world_size`` and world_size processes therefore end every step with the same
    statistics (up to the rounding of one all-reduce), and every rank holds the same ones, so any rank's
    checkpoint is the run's. ``num_batches_tracked`` counts micro-batches of all ranks. A step of one
    micro-batch in one process is left exactly as BatchNorm computes it. Frozen (eval-mode) BatchNorm
    layers do not move: their updates are exactly zero.
    """

    def __init__(self, model: torch.nn.Module, info: DistInfo, micro_batches_per_rank: int):
        self.info = info
        self.total = micro_batches_per_rank * info.world_size
        self.active = self.total > 1
        stats = [(n, b) for n, b in model.named_buffers()
                 if n.endswith(("running_mean", "running_var", "num_batches_tracked"))]
        self.float_bufs = [b for n, b in stats if b.is_floating_point()]
        self.count_bufs = [b for n, b in stats if not b.is_floating_point()]
        self._start: list[torch.Tensor] = []
        self._delta: list[torch.Tensor] = []

    def begin_step(self) -> None:
        if not self.active:
            return
        bufs = self.float_bufs + self.count_bufs
        self._start = [b.detach().clone() for b in bufs]
        self._delta = [torch.zeros_like(b) for b in bufs]

    @torch.no_grad()
    def after_micro_batch(self) -> None:
        """Call after each micro-batch's forward and backward (recomputed forwards run under
        activation checkpointing do not touch the statistics)."""
        if not self.active:
            return
        for b, s, d in zip(self.float_bufs + self.count_bufs, self._start, self._delta):
            d.add_(b - s)
            b.copy_(s)

    @torch.no_grad()
    def end_step(self) -> None:
        if not self.active:
            return
        n_float = len(self.float_bufs)
        float_delta, count_delta = self._delta[:n_float], self._delta[n_float:]
        if self.info.enabled and float_delta:
            flat = torch.cat([d.reshape(-1).double() for d in float_delta])
            dist.all_reduce(flat)
            flat = flat.split([d.numel() for d in float_delta])
            float_delta = [f.view_as(d).to(d.dtype) for f, d in zip(flat, float_delta)]
        if self.info.enabled and count_delta:
            flat = torch.stack([d.reshape(()) for d in count_delta])
            dist.all_reduce(flat)
            count_delta = list(flat.unbind())
        for b, s, d in zip(self.float_bufs, self._start[:n_float], float_delta):
            b.copy_(s + d / self.total)
        for b, s, d in zip(self.count_bufs, self._start[n_float:], count_delta):
            b.copy_(s + d)
        self._start, self._delta = [], []
