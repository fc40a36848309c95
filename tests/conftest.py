"""Set-up shared by every test file."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Run torch on one thread. The tests' tensors are small, so a second thread costs more in
    synchronization than it saves (far more when other processes share the cores: spinning OpenMP
    workers), and bit-for-bit comparisons with the subprocesses, which run with OMP_NUM_THREADS=1,
    need the same thread count on both sides."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
