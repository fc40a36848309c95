"""Statistics groups larger than a device batch: two gloo processes that each hold half of a group
of 8 must compute what one process computes with the whole group: outputs, every gradient and the
running statistics (BN, BRN and BKN with a prior)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import bkn.nn as N

DEVICES, SHARE, CHANNELS = 2, 4, 3
LAYERS = {
    "bn": {},
    "brn": {"warmup_steps": 0, "relax_steps": 1, "r_max": 1.5, "d_max": 0.5},  # r and d in play
    "bkn": {"gain": 0.3, "gain_warmup": 0},
}


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    layer = N.build_norm(name, CHANNELS, statistics_batch_size=DEVICES * SHARE, **LAYERS[name]).double()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5), layer.bias.uniform_(-0.5, 0.5)
        layer.running_mean.uniform_(-1, 1), layer.running_var.uniform_(0.5, 2)
    N.set_step(layer, 1)
    return layer


def step(layer: torch.nn.Module, x: torch.Tensor, upstream: torch.Tensor, prior: N.KalmanState | None,
         processes: int = 1):
    """Two training steps (the second sees the running statistics of the first); the second's output,
    input gradient and the gradients of the parameters (and of the prior, for BKN). The loss takes
    BKN's state (the group's, the same in every process) once over all ``processes``."""
    for _ in range(2):
        layer.zero_grad()
        x = x.detach().requires_grad_()
        if layer.carries_state:
            prior = N.KalmanState(*(p.detach().requires_grad_() for p in prior))
            y, state = layer(x, prior)
            loss = (y * upstream).sum() + (state.mean * 0.7 + state.var * 0.3).sum() / processes
        else:
            y = layer(x)
            loss = (y * upstream).sum()
        loss.backward()
    grads = [x.grad, layer.weight.grad, layer.bias.grad] + ([prior.mean.grad, prior.var.grad] if prior else [])
    return y.detach(), grads


def data() -> tuple[torch.Tensor, torch.Tensor, N.KalmanState]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(DEVICES * SHARE, CHANNELS, 3, 3, generator=generator, dtype=torch.float64) * 2 + 1
    upstream = torch.randn(x.shape, generator=generator, dtype=torch.float64)
    prior = N.KalmanState(torch.randn(1, CHANNELS, generator=generator, dtype=torch.float64),
                          torch.rand(1, CHANNELS, generator=generator, dtype=torch.float64) + 0.5)
    return x, upstream, prior


def worker(rank: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=DEVICES)
    try:
        x, upstream, prior = data()
        share = slice(rank * SHARE, (rank + 1) * SHARE)
        for name in LAYERS:
            reference = build(name)
            expected_y, expected_grads = step(reference, x, upstream, prior if name == "bkn" else None)
            layer = build(name)
            N.pool_statistics(layer, DEVICES)
            y, grads = step(layer, x[share], upstream[share], prior if name == "bkn" else None, DEVICES)
            torch.testing.assert_close(y, expected_y[share], msg=f"{name}: output")
            torch.testing.assert_close(grads[0], expected_grads[0][share], msg=f"{name}: input gradient")
            for what, grad, expected in zip(["weight", "bias", "prior mean", "prior var"], grads[1:], expected_grads[1:]):
                dist.all_reduce(grad)  # each process holds its share's part of the gradient (DDP sums them)
                torch.testing.assert_close(grad, expected, msg=f"{name}: {what} gradient")
            for buffer in ("running_mean", "running_var"):
                torch.testing.assert_close(getattr(layer, buffer), getattr(reference, buffer), msg=f"{name}: {buffer}")
            layer.eval()  # evaluation runs on one device with whole groups: no collective call
            torch.testing.assert_close(layer(x[share], None)[0] if name == "bkn" else layer(x[share]),
                                       (reference.eval()(x[share], None)[0] if name == "bkn" else reference.eval()(x[share])))
    finally:
        dist.destroy_process_group()


def test_two_processes_pool_each_group_like_one_process(tmp_path: Path) -> None:
    mp.spawn(worker, args=(str(tmp_path / "init"),), nprocs=DEVICES, join=True)


def test_pooling_refuses_a_batch_that_is_not_the_group_s_share() -> None:
    layer = N.BatchNorm2d(3, statistics_batch_size=8)
    layer.statistics_devices = 2  # as pool_statistics sets it; no process group needed to refuse
    with pytest.raises(ValueError, match="pooled over 2 devices, so each must hold 4 examples, got 2"):
        layer(torch.randn(2, 3, 2, 2))
    copy.deepcopy(layer).eval()(torch.randn(2, 3, 2, 2))  # evaluation: population statistics, any batch
