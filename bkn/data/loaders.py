"""DataLoaders whose order is a pure function of ``(seed, epoch)``, on one device or sharded over many.

Every loader samples through ``EpochSampler``, a ``DistributedSampler`` (one replica when not
distributed) that can also start an epoch after its first ``k`` batches. So a run resumed in the
middle of epoch ``e`` calls ``set_epoch(loader, e, skip_batches=k)`` and sees exactly the batches an
uninterrupted run would have seen next, without loading the skipped ones. Random augmentations
draw from torch's RNG (in the workers: seeded from the loader's seeded generator), so they are
reproducible for a given run but not bit-identical across a resume.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler


class EpochSampler(DistributedSampler):
    """``DistributedSampler`` (shuffled by ``seed + epoch``) that skips the first ``start`` indices
    of this rank's share of the epoch; ``start`` is set by ``set_epoch`` and lasts one epoch."""

    def __init__(self, dataset: Dataset, *, world_size: int, rank: int, shuffle: bool, seed: int, drop_last: bool):
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.start = 0

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self) -> int:
        return self.num_samples - self.start


def usable_cpus() -> int:
    """The CPUs this process may run on (what PyTorch's DataLoader warns about more workers than)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def build_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    train: bool,
    world_size: int = 1,
    rank: int = 0,
    num_workers: int = 0,
    seed: int = 0,
    pin_memory: bool = False,
    drop_last: bool | None = None,
) -> DataLoader:
    """A loader of ``batch_size`` examples per device. Training loaders shuffle by ``(seed, epoch)``
    and drop the last partial batch (statistics groups need full device batches); evaluation
    loaders keep the data's order and every example. With ``world_size > 1`` each rank reads its
    own shard; an evaluation shard is padded by repeating up to ``world_size - 1`` examples (as
    ``DistributedSampler`` does), so exact evaluation reads on one rank with ``world_size=1``."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}; it must be at least 1 (batch.per_device)")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} with world_size={world_size}; need 0 <= rank < world_size")
    drop_last = train if drop_last is None else drop_last
    sampler = EpochSampler(dataset, world_size=world_size, rank=rank, shuffle=train, seed=seed, drop_last=drop_last)
    if drop_last and len(sampler) < batch_size:
        raise ValueError(
            f"the data set's {len(dataset)} examples over {world_size} device(s) give no full batch of "
            f"{batch_size}; lower batch.per_device or use more data"
        )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=drop_last,
        persistent_workers=num_workers > 0,
        # seeds the workers' augmentation RNGs: per shard, so ranks do not draw the same augmentations
        generator=torch.Generator().manual_seed(int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])),
    )


def set_epoch(loader: DataLoader, epoch: int, skip_batches: int = 0) -> None:
    """Make ``loader``'s next pass epoch ``epoch``'s order, starting after its first ``skip_batches``
    batches (to resume mid-epoch); call it before every epoch, also on one device."""
    sampler = loader.sampler
    if not isinstance(sampler, EpochSampler):
        raise TypeError(
            f"set_epoch needs a loader from bkn.data.build_loader, not one sampling with {type(sampler).__name__}"
        )
    rounding = math.floor if loader.drop_last else math.ceil
    batches = rounding(sampler.num_samples / loader.batch_size)
    if not 0 <= skip_batches <= batches:
        raise ValueError(f"skip_batches={skip_batches}, but an epoch of this loader has {batches} batches")
    sampler.set_epoch(epoch)
    sampler.start = skip_batches * loader.batch_size


def measure_loader_throughput(loader: DataLoader, batches: int) -> float:
    """Examples per second that ``loader`` delivers over ``batches`` batches, after one warm-up
    batch (worker start-up and the first prefetch are not throughput)."""
    if not 1 <= batches < len(loader):
        raise ValueError(f"batches={batches}; the loader has {len(loader)} batches and one is the warm-up")
    iterator = iter(loader)
    next(iterator)
    examples = 0
    start = time.perf_counter()
    for images, *_ in itertools.islice(iterator, batches):
        examples += len(images)
    return examples / (time.perf_counter() - start)
