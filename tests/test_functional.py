"""bkn.functional against independent computations: per-group loops, NumPy float64, closed forms."""

import numpy as np
import pytest
import torch

from bkn import functional as BF


def groups_of(x: torch.Tensor, s: int) -> list[torch.Tensor]:
    """The documented grouping: group g holds examples g, g + G, g + 2G, ..."""
    count = x.shape[0] // s
    return [x[g::count] for g in range(count)]


def loop_group_stats(x: torch.Tensor, s: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: one group at a time, in float64."""
    means, variances = [], []
    for group in groups_of(x.double(), s):
        values = group.transpose(0, 1).reshape(x.shape[1], -1)
        means.append(values.mean(1))
        variances.append(((values - values.mean(1, keepdim=True)) ** 2).mean(1))
    return torch.stack(means), torch.stack(variances)


@pytest.mark.parametrize("s", [1, 2, 3, 6])
def test_group_stats_matches_per_group_loop(s):
    x = torch.randn(6, 5, 4, 3) * 3 + 1
    mean, var = BF.group_stats(x, s)
    ref_mean, ref_var = loop_group_stats(x, s)
    assert mean.shape == var.shape == (6 // s, 5)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(var.double(), ref_var, rtol=1e-5, atol=1e-6)


def test_group_stats_whole_batch_and_other_ranks():
    x = torch.randn(4, 3, 7)  # 1-D feature maps
    mean, var = BF.group_stats(x, None)
    ref_mean, ref_var = loop_group_stats(x, 4)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(var.double(), ref_var, rtol=1e-5, atol=1e-6)
    mean2d, _ = BF.group_stats(torch.randn(8, 3), 2)  # (N, C): no spatial dims
    assert mean2d.shape == (4, 3)


def test_group_stats_channels_last_and_autocast_stay_float32():
    x = torch.randn(4, 8, 5, 5)
    ref = BF.group_stats(x, 2)
    cl = BF.group_stats(x.to(memory_format=torch.channels_last), 2)
    torch.testing.assert_close(cl, ref)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mean, var = BF.group_stats(x.bfloat16(), 2)
    assert mean.dtype == var.dtype == torch.float32
    torch.testing.assert_close(mean, ref[0], atol=0.05, rtol=0.02)


def test_group_stats_is_stable_for_large_activations():
    # A large offset with a small spread: E[x^2] - E[x]^2 in float32 would lose every digit.
    x = 1e4 + torch.randn(4, 3, 8, 8, dtype=torch.float64)
    _, var = BF.group_stats(x.float(), 2)
    _, ref_var = loop_group_stats(x, 2)
    torch.testing.assert_close(var.double(), ref_var, rtol=2e-2, atol=0)


def test_statistics_batch_that_does_not_divide_names_the_setting():
    with pytest.raises(ValueError, match=r"statistics_batch_size=3 does not divide the device batch of 8"):
        BF.group_stats(torch.randn(8, 2, 2, 2), 3)


def test_kalman_update_against_numpy_float64():
    rng = np.random.default_rng(0)
    obs_mean, prior_mean = rng.normal(size=(2, 3, 5))
    obs_var, prior_var = rng.uniform(0.1, 2, size=(2, 3, 5))
    q = 0.3
    expected_mean = prior_mean + q * (obs_mean - prior_mean)  # paper Eq. 4
    expected_var = (1 - q) * prior_var + q * obs_var + q * (1 - q) * (obs_mean - prior_mean) ** 2  # Eq. 5
    mean, var = BF.kalman_update(*(torch.from_numpy(a) for a in (obs_mean, obs_var, prior_mean, prior_var)), q)
    np.testing.assert_allclose(mean.numpy(), expected_mean, rtol=1e-12)
    np.testing.assert_allclose(var.numpy(), expected_var, rtol=1e-12)


def test_kalman_update_with_gain_one_is_exactly_the_observation():
    obs_mean, obs_var, prior_mean, prior_var = torch.randn(4, 2, 6).unbind(0)
    mean, var = BF.kalman_update(obs_mean, obs_var.abs(), prior_mean, prior_var.abs(), 1.0)
    assert torch.equal(mean, obs_mean) and torch.equal(var, obs_var.abs())


def test_normalize_matches_the_formula_per_group():
    x = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    mean, var = torch.randn(3, 4, dtype=torch.float64), torch.rand(3, 4, dtype=torch.float64) + 0.5
    weight, bias = torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    y = BF.normalize(x, mean, var, weight, bias, eps=1e-5)
    for g, chunk in enumerate(groups_of(x, 2)):
        expected = (chunk - mean[g, :, None, None]) / (var[g, :, None, None] + 1e-5).sqrt()
        expected = expected * weight[:, None, None] + bias[:, None, None]
        torch.testing.assert_close(y[g::3], expected)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_in_place_relu_after_grouped_statistics_gives_the_per_group_gradients(memory_format):
    # The output must not be a view: an in-place op on a view goes through autograd's CopySlices,
    # correct but full-size copies in the backward (the reason normalize returns a non-view).
    x = torch.randn(6, 4, 3, 3, dtype=torch.float64).to(memory_format=memory_format).requires_grad_()
    weight = torch.randn(4, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    mean, var = BF.group_stats(x, 2)
    y = BF.normalize(x, mean, var, weight, None, eps=1e-5)
    assert y._base is None
    torch.relu_(y).backward(upstream)

    reference_x = x.detach().clone().requires_grad_()
    reference_weight = weight.detach().clone().requires_grad_()
    outputs = []
    for chunk in groups_of(reference_x, 2):  # each group normalized on its own, out of place
        chunk_mean = chunk.mean(dim=(0, 2, 3), keepdim=True)
        chunk_var = chunk.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        outputs.append(torch.relu((chunk - chunk_mean) / (chunk_var + 1e-5).sqrt() * reference_weight[:, None, None]))
    stacked = torch.stack(outputs, dim=1).reshape(x.shape)  # example g + G i sits at (i, g)
    stacked.backward(upstream)
    torch.testing.assert_close(y, stacked.detach())
    torch.testing.assert_close(x.grad, reference_x.grad)
    torch.testing.assert_close(weight.grad, reference_weight.grad)


def test_normalize_keeps_channels_last():
    x = torch.randn(4, 6, 5, 5).to(memory_format=torch.channels_last)
    y = BF.normalize(x, torch.zeros(2, 6), torch.ones(2, 6), None, None, 1e-5)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, x / (1 + 1e-5) ** 0.5)


def test_relu_moments_against_numerical_integration():
    mean, var = torch.tensor([[-1.0, 0.0, 0.7, 3.0]], dtype=torch.float64), torch.tensor([[0.5, 1.0, 2.0, 0.1]],
                                                                                       dtype=torch.float64)
    grid = torch.linspace(-12, 12, 200001, dtype=torch.float64)
    std = var.sqrt()
    values = torch.relu(mean[..., None] + std[..., None] * grid)
    density = torch.exp(-0.5 * grid ** 2) / (2 * torch.pi) ** 0.5
    first = torch.trapezoid(values * density, grid)
    second = torch.trapezoid(values ** 2 * density, grid)
    got_mean, got_var = BF._relu_moments(mean, var)
    torch.testing.assert_close(got_mean, first, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(got_var, second - first ** 2, rtol=1e-6, atol=1e-8)


def test_analytic_transition_is_the_limit_of_monte_carlo():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(6, 5, 3, stride=2, bias=True)
    groups = 32  # identical groups: averaging them is more samples of the same estimate
    mean = torch.randn(1, 6).expand(groups, 6)
    var = (torch.rand(1, 6) + 0.2).expand(groups, 6)
    with torch.no_grad():
        exact_mean, exact_var = BF.analytic_transition(mean, var, conv)
        errors = []
        for size in (2, 8, 32):
            mc_mean, mc_var = BF.monte_carlo_transition(mean, var, conv, size)
            scale = exact_var[0].sqrt()
            errors.append(max(((mc_mean.mean(0) - exact_mean[0]) / scale).abs().max().item(),
                              ((mc_var.mean(0) - exact_var[0]) / exact_var[0]).abs().max().item()))
    assert errors[2] < errors[0]
    assert errors[2] < 0.05, errors


def test_linear_transition_is_the_paper_prediction():
    mean, var = torch.randn(3, 4, dtype=torch.float64), torch.rand(3, 4, dtype=torch.float64)
    matrix, noise = torch.randn(5, 4, dtype=torch.float64), torch.tensor(0.3, dtype=torch.float64)
    got_mean, got_var = BF.linear_transition(mean, var, matrix, noise)
    for g in range(3):
        covariance = matrix @ torch.diag(var[g]) @ matrix.t() + noise * torch.eye(5, dtype=torch.float64)
        torch.testing.assert_close(got_mean[g], matrix @ mean[g])
        torch.testing.assert_close(got_var[g], torch.diagonal(covariance))  # diagonal of A S A^T + R


def test_transitions_gradcheck():
    conv = torch.nn.Conv2d(3, 4, 3, bias=True).double()
    mean = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    var = (torch.rand(2, 3, dtype=torch.float64) + 0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda m, v: BF.analytic_transition(m, v, conv), (mean, var))
    matrix = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    noise = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(BF.linear_transition, (mean, var, matrix, noise))
    assert torch.autograd.gradgradcheck(BF.linear_transition, (mean, var, matrix, noise))
    for got, expected in zip(BF.linear_transition(mean, var, matrix, noise),
                             BF.linear_transition_reference(mean, var, matrix, noise)):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("state_from_output", [True, False])
@pytest.mark.parametrize("fallback_ratio", [None, 3.0])
def test_kalman_normalize_equals_its_autograd_composition(state_from_output, fallback_ratio):
    """The hand-derived step against kalman_normalize_reference (autograd ops), float64: outputs, and
    gradients of everything (gradcheck, with the state in the loss). With fallback_ratio=3 the first
    group's prior is far too wide and falls back to its observation, the second's does not."""
    torch.manual_seed(0)
    x = (torch.randn(4, 3, 3, 3, dtype=torch.float64) * 2 + 1).requires_grad_()
    prior_mean = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    prior_var = (torch.rand(2, 3, dtype=torch.float64) + 0.5).mul(torch.tensor([[100.0], [0.1]], dtype=torch.float64))
    prior_var.requires_grad_()
    gain = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)  # learned: it gets a gradient too
    weight = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_()
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)
    options = (1e-5, 2, fallback_ratio, state_from_output)
    inputs = (x, prior_mean, prior_var, gain, weight, bias)
    fused = BF.kalman_normalize(*inputs, 1e-5, 2, fallback_ratio, state_from_output)
    reference = BF.kalman_normalize_reference(*inputs, *options)
    for got, expected in zip(fused[:3], reference):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    if fallback_ratio is not None:  # the first group uses its observation, the second the Kalman estimate
        observed_mean = BF.group_stats(x, 2)[0]
        assert torch.equal(fused[3][0], observed_mean[0]) and not torch.allclose(fused[3][1], observed_mean[1])
    assert torch.autograd.gradcheck(lambda *a: BF.kalman_normalize(*a, 1e-5, 2, fallback_ratio, state_from_output)[:3],
                                    inputs)
