"""The device batches of every optimizer step on this rank, resumable at any step.

The training set of an epoch is split into ``world_size x accumulation`` shards ("replicas") with
``bkn.data.build_loader``; device batch ``k`` of step ``t`` on rank ``r`` is batch ``t`` of replica
``r * accumulation + k``. So the examples of every step, and how they fall into statistics groups,
depend only on the per-device batch and the number of device batches per step — not on how those
are split between processes and accumulation steps: two processes give the same training as one
process accumulating two device batches.

The order is a pure function of ``(seed, epoch)``, so a resumed run starts in the middle of an
epoch without loading the batches it skips.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import Tensor
from torch.utils.data import Dataset

from bkn.data import build_loader, set_epoch

Batch = tuple[Tensor, Tensor]


class StepBatches:
    def __init__(self, dataset: Dataset, *, per_device_batch_size: int, accumulation: int, world_size: int,
                 rank: int, num_workers: int, seed: int, pin_memory: bool) -> None:
        # data.num_workers is the budget of this device: shared by its accumulation loaders.
        workers_per_loader = -(-num_workers // accumulation)
        self.loaders = [
            build_loader(dataset, per_device_batch_size, train=True, world_size=world_size * accumulation,
                         rank=rank * accumulation + k, num_workers=workers_per_loader, seed=seed,
                         pin_memory=pin_memory)
            for k in range(accumulation)
        ]
        self.steps_per_epoch = len(self.loaders[0])
        self.epoch = 0
        self.batch_in_epoch = 0
        self._iterators: list[Iterator[Batch]] | None = None

    def seek(self, epoch: int, batch_in_epoch: int) -> None:
        """Continue at batch ``batch_in_epoch`` of ``epoch`` (a checkpoint's data position)."""
        self.epoch, self.batch_in_epoch = epoch, batch_in_epoch
        self._iterators = None

    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}

    def next_step(self) -> list[Batch]:
        """The device batches of the next optimizer step, one per accumulation step."""
        if self.batch_in_epoch == self.steps_per_epoch:
            self.seek(self.epoch + 1, 0)
        if self._iterators is None:
            for loader in self.loaders:
                set_epoch(loader, self.epoch, skip_batches=self.batch_in_epoch)
            self._iterators = [iter(loader) for loader in self.loaders]
        batches = [next(iterator) for iterator in self._iterators]
        self.batch_in_epoch += 1
        return batches
