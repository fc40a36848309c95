"""How the training processes talk: torchrun, submitit on SLURM, or one process.

Under ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` in the environment) or in a submitit SLURM
job with several tasks, every process joins one process group — NCCL on CUDA, gloo on CPU — with a
timeout, so a rank that dies makes the others fail instead of waiting forever. Control messages
(stop requests, RNG states for a checkpoint) go through a gloo group on the host, so they never
wait for the GPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from bkn.config import World


class Collective:
    """The few collective operations the engine needs; each is a no-op in a single process."""

    def __init__(self, world: World, control_group: Any = None) -> None:
        self.world = world
        self.control_group = control_group

    def any(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on any rank (a host-side all-reduce)."""
        if self.world.size == 1:
            return flag
        value = torch.tensor([int(flag)])
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.control_group)
        return bool(value.item())

    def all_gather_object(self, obj: Any) -> list[Any]:
        if self.world.size == 1:
            return [obj]
        gathered: list[Any] = [None] * self.world.size
        dist.all_gather_object(gathered, obj, group=self.control_group)
        return gathered

    def barrier(self) -> None:
        if self.world.size > 1:
            dist.barrier(group=self.control_group)

    def all_reduce_max_(self, tensor: torch.Tensor) -> torch.Tensor:
        """In place, on the tensor's device (no host sync on CUDA)."""
        if self.world.size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor


@contextmanager
def process_group(world: World, device: torch.device, timeout_s: float) -> Iterator[Collective]:
    """Join the process group for the whole ``with`` block (nothing to join in a single process)."""
    if world.size == 1:
        yield Collective(world)
        return
    if world.launcher == "slurm":
        from submitit.helpers import TorchDistributedEnvironment

        # MASTER_ADDR / MASTER_PORT from the SLURM node list and job id; every GPU stays visible
        # because the engine picks cuda:<local rank> itself.
        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    timeout = timedelta(seconds=timeout_s)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=timeout, device_id=device)
        control_group = dist.new_group(backend="gloo", timeout=timeout)
    else:
        dist.init_process_group("gloo", timeout=timeout)
        control_group = None  # the default group is already a host-side one
    try:
        yield Collective(world, control_group)
    finally:
        dist.destroy_process_group()
