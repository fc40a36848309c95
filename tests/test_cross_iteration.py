"""Cross-Iteration BN (bkn.nn.CrossIterationNorm2d) against independent computations: the Taylor-
compensated statistics of a stored batch against its statistics recomputed at the current conv
weights (the error is second order in the weight change), the window's average and its gradients
against the paper's formulas written out per group, the burn-in against our BN bit for bit, and a
resumed run against an uninterrupted one."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import bkn.nn as N

CHANNELS, STATISTICS = 4, 2


def conv_and_cbn(conv_groups: int = 1, **options) -> tuple[nn.Conv2d, N.CrossIterationNorm2d]:
    """A conv from 3 channels (from 4 in ``conv_groups``) and its CBN layer."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3 if conv_groups == 1 else 4, CHANNELS, 3, padding=1, bias=False, groups=conv_groups).double()
    norm = N.build_norm("cbn", CHANNELS, statistics_batch_size=STATISTICS, **options).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5), norm.bias.uniform_(-0.5, 0.5)
    return conv, norm


def batch(seed: int, size: int = 6, channels: int = 3) -> torch.Tensor:
    return torch.randn(size, channels, 5, 5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.5


def group_moments(y: torch.Tensor, groups: int) -> torch.Tensor:
    """Mean and second moment of each channel of each group (examples g, g + G, ...): (2, G, C), by a loop."""
    return torch.stack([torch.stack([y[g::groups].mean(dim=(0, 2, 3)) for g in range(groups)]),
                        torch.stack([(y[g::groups] ** 2).mean(dim=(0, 2, 3)) for g in range(groups)])])


def test_compensation_error_is_second_order_in_the_weight_change() -> None:
    conv, norm = conv_and_cbn(window=2, burn_in=0)
    x = batch(1)
    norm(conv(x), conv)  # stores this batch's statistics at the current weights
    groups = x.shape[0] // STATISTICS
    direction = torch.randn(conv.weight.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    errors, uncompensated = [], []
    for step in (1e-2, 5e-3, 2.5e-3):
        moved = conv.weight.detach() + step * direction
        exact = group_moments(nn.functional.conv2d(x, moved, padding=1), groups)
        with torch.no_grad():
            estimate = norm.compensated(moved)[0]
        torch.testing.assert_close(estimate[0], exact[0], rtol=1e-10, atol=1e-12)  # the mean is linear in W
        errors.append((estimate[1] - exact[1]).abs().max().item())
        uncompensated.append((norm.past_statistics[0, 1] - exact[1]).abs().max().item())
    # E[y^2] is quadratic in W, so the first-order term leaves exactly the second-order one.
    assert errors[0] / errors[1] == pytest.approx(4, rel=1e-6) and errors[1] / errors[2] == pytest.approx(4, rel=1e-6)
    assert all(error < 0.1 * plain for error, plain in zip(errors, uncompensated))


# A plain conv: the weight gradients from its saved input; a grouped one: a batched backward.
@pytest.mark.parametrize("conv_groups", [1, 2])
def test_window_average_and_gradients_follow_the_papers_formulas(conv_groups: int) -> None:
    window, rho = 3, 0.7
    conv, norm = conv_and_cbn(conv_groups, window=window, burn_in=0, rho=rho)
    channels = conv.in_channels
    optimizer = torch.optim.SGD(conv.parameters(), lr=0.05)
    groups = 3
    seen = []  # (input, conv weight) of each iteration
    for seed in range(3):
        x = batch(seed, channels=channels)
        seen.append((x, conv.weight.detach().clone()))
        y = norm(conv(x), conv)
        optimizer.zero_grad()
        (y ** 3).sum().backward()
        optimizer.step()

    x = batch(10, channels=channels).requires_grad_()
    optimizer.zero_grad()
    reference_conv = copy.deepcopy(conv)
    y = norm(conv(x), conv)
    (y ** 3).sum().backward()

    # Written out: each past iteration's moments and their per-group weight gradients (a loop).
    out = reference_conv(x)
    current = group_moments(out, groups)
    entries = [current]
    for past_x, past_weight in seen[-(window - 1):]:
        weight = past_weight.clone().requires_grad_()
        moments = group_moments(nn.functional.conv2d(past_x, weight, padding=1, groups=conv_groups), groups)
        taylor = torch.zeros_like(moments)
        for s in range(2):
            for g in range(groups):
                for c in range(CHANNELS):
                    (gradient,) = torch.autograd.grad(moments[s, g, c], weight, retain_graph=True)
                    taylor[s, g, c] = rho * (gradient * (reference_conv.weight.detach() - past_weight)).sum()
        entries.append(moments.detach() + taylor)
    stacked = torch.stack(entries)
    mean = stacked[:, 0].mean(0)
    var = torch.maximum(stacked[:, 1], stacked[:, 0] ** 2).mean(0) - mean ** 2
    expected = torch.empty_like(out)
    for g in range(groups):
        normalized = (out[g::groups] - mean[g, :, None, None]) / (var[g, :, None, None] + norm.eps).sqrt()
        expected[g::groups] = normalized * norm.weight[:, None, None] + norm.bias[:, None, None]
    torch.testing.assert_close(y, expected, rtol=1e-9, atol=1e-9)
    x_grad, conv_grad = x.grad.clone(), conv.weight.grad.clone()
    x.grad, norm.weight.grad = None, None
    (expected ** 3).sum().backward()
    torch.testing.assert_close(x_grad, x.grad, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(conv_grad, reference_conv.weight.grad, rtol=1e-8, atol=1e-8)
    assert norm.past_statistics.shape[0] == window - 1  # the current one and the latest past one kept


def test_burn_in_is_our_bn_bit_for_bit_then_the_window_starts() -> None:
    burn_in = 3
    conv, norm = conv_and_cbn(window=4, burn_in=burn_in)
    bn_conv = copy.deepcopy(conv)
    bn = N.BatchNorm2d(CHANNELS, statistics_batch_size=STATISTICS).double()
    bn.load_state_dict({k: v for k, v in norm.state_dict().items() if k != "_extra_state"})
    optimizers = [torch.optim.SGD(module.parameters(), lr=0.1) for module in (conv, norm, bn_conv, bn)]
    for step in range(burn_in + 2):
        x = batch(step)
        outputs = []
        for c, n in ((conv, norm), (bn_conv, bn)):
            y = N.apply_norm(n, c(x), None, c)[0]
            (y ** 3).sum().backward()
            outputs.append(y.detach())
        if step < burn_in:
            assert torch.equal(outputs[0], outputs[1])
            assert torch.equal(conv.weight.grad, bn_conv.weight.grad) and torch.equal(norm.weight.grad, bn.weight.grad)
        elif step == burn_in + 1:  # one stored iteration in the window: no longer BN
            assert not torch.allclose(outputs[0], outputs[1], atol=1e-4)
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
    torch.testing.assert_close(norm.running_mean, bn.running_mean)  # the current batch's alone, as BN's


def test_without_a_conv_or_in_eval_mode_it_is_bn() -> None:
    conv, norm = conv_and_cbn(window=3, burn_in=0)
    bn = N.BatchNorm2d(CHANNELS, statistics_batch_size=STATISTICS).double()
    bn.load_state_dict({k: v for k, v in norm.state_dict().items() if k != "_extra_state"})
    for seed in range(3):
        y = conv(batch(seed))
        assert torch.equal(norm(y), bn(y))  # no conv: no window
    assert norm.past_statistics is None
    norm.eval(), bn.eval()
    y = conv(batch(5))
    assert torch.equal(norm(y, conv), bn(y))  # population statistics (option B)


def test_a_resumed_run_continues_exactly() -> None:
    def build() -> nn.Module:
        torch.manual_seed(0)
        norm = {"name": "cbn", "statistics_batch_size": 2, "window": 3, "burn_in": 1}
        return N.Sequential(N.ConvNormAct(3, 6, 3, norm, first=True), N.ConvNormAct(6, 6, 3, norm))

    def step(model: nn.Module, optimizer: torch.optim.Optimizer, seed: int) -> torch.Tensor:
        y, _ = model(batch(seed).float())
        optimizer.zero_grad()
        (y ** 2).mean().backward()
        optimizer.step()
        return y.detach()

    model = build()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for seed in range(4):
        step(model, optimizer, seed)
    saved = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, saved)
    expected = [step(model, optimizer, seed) for seed in (4, 5)]

    saved.seek(0)
    checkpoint = torch.load(saved, weights_only=True)
    resumed = build()
    resumed.load_state_dict(checkpoint["model"])
    resumed_optimizer = torch.optim.SGD(resumed.parameters(), lr=0.1, momentum=0.9)
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    assert resumed[1].norm.past_statistics.shape[0] == 2
    for seed, y in zip((4, 5), expected):
        assert torch.equal(step(resumed, resumed_optimizer, seed), y)


def test_a_converted_model_links_the_conv_that_feeds_each_layer() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 5, 3), nn.ReLU(),
                        nn.BatchNorm2d(5), nn.BatchNorm2d(5))
    N.convert_batchnorm(net, {"name": "cbn", "statistics_batch_size": 2, "burn_in": 0})
    assert net[1].feeding_conv.conv is net[0] and net[5].feeding_conv.conv is net[3]
    assert net[6].feeding_conv.conv is None  # a norm after a norm: BN
    for seed in range(2):
        net(batch(seed).float()).sum().backward()
    assert net[1].past_statistics.shape[0] == 2 and net[6].past_statistics is None


@pytest.mark.parametrize("option, value", [("window", 0), ("burn_in", -1)])
def test_bad_settings_are_refused(option: str, value: int) -> None:
    with pytest.raises(ValueError, match=f"CBN needs {option} >= "):
        N.build_norm("cbn", 4, **{option: value})


def test_the_plain_conv_shortcut_equals_the_batched_backward() -> None:
    conv, norm = conv_and_cbn()
    x = conv(batch(0))
    grouped = x.reshape(2, 3, CHANNELS, -1)  # 6 examples, statistics groups of 2: G = 3, example n in group n % 3
    var, mean = torch.var_mean(grouped, dim=(0, 3), correction=0)
    current = torch.stack([mean, var + mean * mean])
    direct = norm._weight_gradients(current, x, conv.weight)  # x's node is the conv: its saved input
    through_graph = norm._weight_gradients(current, x * 1, conv.weight)  # a multiply in between: autograd
    assert type(x.grad_fn).__name__ == "ConvolutionBackward0" and type((x * 1).grad_fn).__name__ != "ConvolutionBackward0"
    torch.testing.assert_close(direct, through_graph, rtol=1e-10, atol=1e-12)
