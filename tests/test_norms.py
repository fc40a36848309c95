"""BN, BRN and BKN layers against independent computations: PyTorch's BatchNorm, per-group runs,
hand-written formulas in float64 and finite differences (gradcheck)."""

import copy
import math

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import bkn.nn as N
from bkn import functional as BF
from test_functional import groups_of


def randomize_affine(*layers: nn.Module) -> None:
    for layer in layers:
        with torch.no_grad():
            layer.weight.uniform_(0.5, 1.5)
            layer.bias.uniform_(-0.5, 0.5)


def grads_of(module: nn.Module, x: torch.Tensor, forward) -> tuple[torch.Tensor, ...]:
    x = x.clone().requires_grad_()
    y = forward(module, x)
    (y ** 3).sum().backward()  # elementwise, so per-group runs see the same upstream gradient
    return y.detach(), x.grad, module.weight.grad, module.bias.grad


# --- BN ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_batchnorm_one_group_equals_torch_batchnorm(memory_format):
    ours, theirs = N.BatchNorm2d(5), nn.BatchNorm2d(5)
    randomize_affine(ours)
    theirs.load_state_dict(ours.state_dict())
    for _ in range(3):  # train steps update running statistics the same way
        x = (torch.randn(8, 5, 4, 4) * 2 + 1).to(memory_format=memory_format)
        mine, reference = grads_of(ours, x, lambda m, v: m(v)), grads_of(theirs, x, lambda m, v: m(v))
        for a, b in zip(mine, reference):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    assert ours.num_batches_tracked == theirs.num_batches_tracked == 3
    ours.eval(), theirs.eval()
    x = torch.randn(3, 5, 4, 4)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls, reference, shape", [(N.BatchNorm1d, nn.BatchNorm1d, (6, 4)),
                                                     (N.BatchNorm1d, nn.BatchNorm1d, (6, 4, 5)),
                                                     (N.BatchNorm3d, nn.BatchNorm3d, (6, 4, 2, 3, 3))])
def test_other_ranks_equal_torch_batchnorm(cls, reference, shape):
    ours, theirs = cls(4), reference(4)
    x = torch.randn(shape)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.running_var, theirs.running_var)


def separate_runs(make_layer, x: torch.Tensor, s: int, forward=lambda m, v: m(v)):
    """Reference: a fresh copy of the layer on each group alone; outputs and input grads concatenated."""
    outputs, grads = torch.empty_like(x), torch.empty_like(x)
    count = x.shape[0] // s
    for g, group in enumerate(groups_of(x, s)):
        layer = make_layer()
        group = group.clone().requires_grad_()
        y = forward(layer, group)
        (y ** 3).sum().backward()
        outputs[g::count], grads[g::count] = y.detach(), group.grad
    return outputs, grads


def test_batchnorm_groups_equal_separate_runs():
    base = N.BatchNorm2d(3, statistics_batch_size=None)
    randomize_affine(base)
    x = torch.randn(8, 3, 5, 5) * 3
    grouped = copy.deepcopy(base)
    grouped.statistics_batch_size = 2
    y, gx, *_ = grads_of(grouped, x, lambda m, v: m(v))
    ref_y, ref_gx = separate_runs(lambda: copy.deepcopy(base), x, 2)
    torch.testing.assert_close(y, ref_y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, ref_gx, rtol=1e-5, atol=1e-5)
    # the running statistics follow the average of the groups' statistics
    group_means = torch.stack([g.mean(dim=(0, 2, 3)) for g in groups_of(x, 2)])
    torch.testing.assert_close(grouped.running_mean, 0.1 * group_means.mean(0))


def test_eval_options_population_and_batch():
    layer = N.BatchNorm2d(3, statistics_batch_size=2)
    randomize_affine(layer)
    for _ in range(4):
        layer(torch.randn(4, 3, 3, 3) + 2)
    layer.eval()
    x = torch.randn(4, 3, 3, 3)
    expected = BF.normalize(x.double(), layer.running_mean[None].double(), layer.running_var[None].double(),
                            layer.weight.double(), layer.bias.double(), layer.eps)
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)  # option B
    running = layer.running_mean.clone()
    N.set_inference(layer, "batch")  # option A: the test batch's own groups, running stats untouched
    train_mode = copy.deepcopy(layer).train()
    torch.testing.assert_close(layer(x), train_mode(x))
    assert torch.equal(layer.running_mean, running)


# --- BRN ---------------------------------------------------------------------------------------

def test_batch_renorm_without_relaxation_equals_batchnorm_exactly():
    bn, brn = N.BatchNorm2d(4, statistics_batch_size=2), N.BatchRenorm2d(4, statistics_batch_size=2)
    randomize_affine(bn)
    brn.load_state_dict(bn.state_dict())
    N.set_step(brn, 0)  # inside warm-up: r_max = 1, d_max = 0
    assert brn.r_max.item() == 1 and brn.d_max.item() == 0
    x = torch.randn(8, 4, 3, 3) + 1
    for a, b in zip(grads_of(bn, x, lambda m, v: m(v)), grads_of(brn, x, lambda m, v: m(v))):
        assert torch.equal(a, b)
    assert torch.equal(bn.running_var, brn.running_var)


def test_batch_renorm_schedule():
    layer = N.BatchRenorm2d(2, r_max=3, d_max=5, warmup_steps=10, relax_steps=20)
    for step, r_max, d_max in [(0, 1, 0), (10, 1, 0), (20, 2, 2.5), (30, 3, 5), (1000, 3, 5)]:
        N.set_step(layer, step)
        assert layer.r_max.item() == pytest.approx(r_max) and layer.d_max.item() == pytest.approx(d_max)


def test_batch_renorm_clipping_matches_the_formula():
    layer = N.BatchRenorm2d(3, statistics_batch_size=2, r_max=1.5, d_max=0.5, warmup_steps=0, relax_steps=1)
    randomize_affine(layer)
    N.set_step(layer, 1)
    with torch.no_grad():
        layer.running_mean.copy_(torch.tensor([0.0, 3.0, -0.2]))
        layer.running_var.copy_(torch.tensor([1.0, 0.01, 4.0]))
    running_mean, running_var = layer.running_mean.double().clone(), layer.running_var.double().clone()
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1).double()
    y = layer.double()(x)
    eps = layer.eps
    for g, chunk in enumerate(groups_of(x, 2)):
        mean = chunk.mean(dim=(0, 2, 3))
        var = chunk.var(dim=(0, 2, 3), unbiased=False)
        r = ((var + eps).sqrt() / (running_var + eps).sqrt()).clamp(1 / 1.5, 1.5)
        d = ((mean - running_mean) / (running_var + eps).sqrt()).clamp(-0.5, 0.5)
        x_hat = (chunk - mean.view(1, 3, 1, 1)) / (var + eps).sqrt().view(1, 3, 1, 1)
        expected = layer.weight.view(1, 3, 1, 1) * (x_hat * r.view(1, 3, 1, 1) + d.view(1, 3, 1, 1)) \
            + layer.bias.view(1, 3, 1, 1)
        torch.testing.assert_close(y[g::2], expected)
        assert (r == 1.5).any() or (r == 1 / 1.5).any()  # the clipping engaged on some channel
        assert (d.abs() == 0.5).any()


def test_batch_renorm_groups_equal_separate_runs():
    base = N.BatchRenorm2d(3, warmup_steps=0, relax_steps=1)
    N.set_step(base, 5)
    with torch.no_grad():
        base.running_mean.fill_(0.3), base.running_var.fill_(2.0)
    x = torch.randn(6, 3, 4, 4)
    grouped = copy.deepcopy(base)
    grouped.statistics_batch_size = 2
    y, gx, *_ = grads_of(grouped, x, lambda m, v: m(v))
    ref_y, ref_gx = separate_runs(lambda: copy.deepcopy(base), x, 2)
    torch.testing.assert_close(y, ref_y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, ref_gx, rtol=1e-5, atol=1e-5)


# --- BKN ---------------------------------------------------------------------------------------

TRANSITIONS = ["linear", "monte_carlo", "analytic"]


def two_layer(norm: dict) -> nn.ModuleList:
    torch.manual_seed(0)
    return nn.ModuleList([N.ConvNormAct(3, 6, 3, norm), N.ConvNormAct(6, 5, 3, norm, stride=2)])


def run_two_layer(blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    state = None
    for block in blocks:
        x, state = block(x, state)
    return x


@pytest.mark.parametrize("transition", TRANSITIONS)
def test_kalman_norm_with_gain_one_equals_batchnorm_exactly(transition):
    bn_net = two_layer({"name": "bn", "statistics_batch_size": 2})
    bkn_net = two_layer({"name": "bkn", "statistics_batch_size": 2, "gain": 1.0, "gain_warmup": 0, "transition": transition})
    for block in bn_net:
        randomize_affine(block.norm)
    bkn_net.load_state_dict(bn_net.state_dict(), strict=False)
    x = torch.randn(4, 3, 8, 8)
    outputs, grads = [], []
    for net in (bn_net, bkn_net):
        inp = x.clone().requires_grad_()
        y = run_two_layer(net, inp)
        (y ** 3).sum().backward()
        outputs.append(y), grads.append([inp.grad] + [p.grad for name, p in net.named_parameters()
                                                      if name in dict(bn_net.named_parameters())])
    assert torch.equal(outputs[0], outputs[1])
    for a, b in zip(*grads):
        assert torch.equal(a, b)
    bkn_buffers = bkn_net.state_dict()
    for name, buffer in bn_net.state_dict().items():  # running statistics too
        assert torch.equal(buffer, bkn_buffers[name]), name


def kalman_reference(x, prior_mean, prior_var, q, weight, bias, eps):
    """Eqs. 4-5 and the normalization written out for one group in float64."""
    mean = x.mean(dim=(0, 2, 3))
    var = x.var(dim=(0, 2, 3), unbiased=False)
    post_mean = prior_mean + q * (mean - prior_mean)
    post_var = (1 - q) * prior_var + q * var + q * (1 - q) * (mean - prior_mean) ** 2
    y = (x - post_mean.view(1, -1, 1, 1)) / (post_var + eps).sqrt().view(1, -1, 1, 1)
    return y * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1), post_mean, post_var


@pytest.mark.parametrize("state_from", ["input", "output"])
def test_kalman_norm_matches_the_equations_per_group(state_from):
    layer = N.KalmanNorm2d(4, statistics_batch_size=3, gain=0.3, gain_warmup=0, state_from=state_from).double()
    randomize_affine(layer)
    x = torch.randn(6, 4, 3, 3, dtype=torch.float64) * 2
    prior = N.KalmanState(torch.randn(2, 4, dtype=torch.float64), torch.rand(2, 4, dtype=torch.float64) + 0.5)
    y, state = layer(x, prior)
    for g, chunk in enumerate(groups_of(x, 3)):
        expected, post_mean, post_var = kalman_reference(chunk, prior.mean[g], prior.var[g], 0.3,
                                                         layer.weight, layer.bias, layer.eps)
        torch.testing.assert_close(y[g::2], expected)
        if state_from == "input":  # the posterior estimate of the input's statistics
            torch.testing.assert_close(state.mean[g], post_mean)
            torch.testing.assert_close(state.var[g], post_var)
        else:  # the statistics of the output itself, measured on it
            torch.testing.assert_close(state.mean[g], expected.mean(dim=(0, 2, 3)))
            torch.testing.assert_close(state.var[g], expected.var(dim=(0, 2, 3), unbiased=False))


def test_linear_transition_without_propagation_predicts_a_learned_constant():
    layer = N.KalmanNorm2d(3, statistics_batch_size=2, in_features=5, transition="linear", propagate=False)
    assert not hasattr(layer, "transition_matrix")
    with torch.no_grad():
        layer.noise_raw.fill_(0.5)
    for previous in (N.KalmanState(torch.randn(2, 5), torch.rand(2, 5)), N.KalmanState(torch.randn(2, 5) * 9, torch.ones(2, 5))):
        prior = layer.predict(previous)
        torch.testing.assert_close(prior.mean, torch.zeros(2, 3))
        torch.testing.assert_close(prior.var, torch.full((2, 3), math.log1p(math.exp(0.5))))
    with pytest.raises(ValueError, match="ablation of the linear transition"):
        N.KalmanNorm2d(3, propagate=False, transition="analytic")


def test_kalman_norm_groups_equal_separate_runs():
    base = N.KalmanNorm2d(3, gain=0.4, gain_warmup=0)
    randomize_affine(base)
    x = torch.randn(6, 3, 4, 4)
    prior = N.KalmanState(torch.randn(3, 3), torch.rand(3, 3) + 0.2)
    grouped = copy.deepcopy(base)
    grouped.statistics_batch_size = 2
    y, gx, *_ = grads_of(grouped, x, lambda m, v: m(v, prior)[0])
    priors = iter(range(3))

    def forward_one(layer, group):
        g = next(priors)
        return layer(group, N.KalmanState(prior.mean[g:g + 1], prior.var[g:g + 1]))[0]

    ref_y, ref_gx = separate_runs(lambda: copy.deepcopy(base), x, 2, forward_one)
    torch.testing.assert_close(y, ref_y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, ref_gx, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("transition", ["linear", "analytic"])
def test_predictions_are_per_group(transition):
    layer = N.KalmanNorm2d(5, in_features=3, transition=transition)
    with torch.no_grad():
        if transition == "linear":
            layer.transition_matrix.normal_()
    conv = nn.Conv2d(3, 5, 3)
    previous = N.KalmanState(torch.randn(4, 3), torch.rand(4, 3))
    whole = layer.predict(previous, conv)
    for g in range(4):
        part = layer.predict(N.KalmanState(previous.mean[g:g + 1], previous.var[g:g + 1]), conv)
        torch.testing.assert_close(part.mean, whole.mean[g:g + 1])
        torch.testing.assert_close(part.var, whole.var[g:g + 1])


def test_fallback_uses_the_observation_when_the_prediction_is_far_too_wide():
    layer = N.KalmanNorm2d(3, statistics_batch_size=2, gain=0.1, gain_warmup=0, fallback_ratio=100.0, state_from="input")
    x = torch.randn(4, 3, 4, 4)
    obs_mean, obs_var = BF.group_stats(x, 2)
    prior = N.KalmanState(torch.zeros(2, 3), torch.stack([obs_var[0] * 1000, obs_var[1] * 2]))
    _, posterior = layer(x, prior)
    torch.testing.assert_close(posterior.mean[0], obs_mean[0])  # group 0 fell back to BN
    torch.testing.assert_close(posterior.var[0], obs_var[0])
    assert not torch.allclose(posterior.mean[1], obs_mean[1])  # group 1 kept the filter
    layer.fallback = False
    _, without = layer(x, prior)
    assert not torch.allclose(without.var[0], obs_var[0])


def test_gain_warmup_starts_as_bn_and_reaches_the_gain():
    """The gain falls linearly from 1 (exactly BN) to q over gain_warmup training batches."""
    torch.manual_seed(0)
    x, prior = torch.randn(4, 3, 4, 4) + 1, N.KalmanState(torch.zeros(2, 3), torch.ones(2, 3))
    warm = N.KalmanNorm2d(3, statistics_batch_size=2, gain=0.2, gain_warmup=4)
    bn = N.BatchNorm2d(3, statistics_batch_size=2)
    assert torch.equal(warm(x, prior)[0], bn(x))  # batch 0: gain 1, bit for bit BN
    gains = []
    for _ in range(6):
        gains.append(warm.current_gain().item())
        warm(x, prior)
    assert gains == pytest.approx([0.8, 0.6, 0.4, 0.2, 0.2, 0.2])  # 1 - 0.8 * min(t / 4, 1)
    N.set_step(warm, 2)  # from now on the training loop's optimizer step counts, not the batches
    warm(x, prior), warm(x, prior)
    assert warm.current_gain().item() == pytest.approx(0.6)
    N.set_step(warm, 4)
    settled = N.KalmanNorm2d(3, statistics_batch_size=2, gain=0.2, gain_warmup=0)
    settled.load_state_dict(warm.state_dict())  # the count travels with the state_dict (resume)
    torch.testing.assert_close(warm(x, prior)[0], settled(x, prior)[0])


def test_gain_follows_the_authors_rule_by_group_size():
    assert N.KalmanNorm2d(3, statistics_batch_size=2).initial_gain == 0.1
    assert N.KalmanNorm2d(3, statistics_batch_size=31).initial_gain == 0.1
    assert N.KalmanNorm2d(3, statistics_batch_size=32).initial_gain == 0.95
    assert N.KalmanNorm2d(3).initial_gain == 0.95  # one group of the whole batch
    assert N.KalmanNorm2d(3, statistics_batch_size=2, gain=0.3).initial_gain == 0.3
    with pytest.raises(ValueError, match="gain_warmup"):
        N.KalmanNorm2d(3, gain_warmup=-1)


def test_kalman_norm_eval_options():
    layer = N.KalmanNorm2d(3, statistics_batch_size=2, gain=0.5, gain_warmup=0)
    prior = N.KalmanState(torch.zeros(2, 3), torch.ones(2, 3))
    for _ in range(3):
        layer(torch.randn(4, 3, 4, 4) + 1, prior)
    layer.eval()
    x = torch.randn(4, 3, 4, 4)
    y, state = layer(x, prior)  # option B: population statistics, nothing to pass on
    assert state is None
    expected = (x - layer.running_mean.view(1, 3, 1, 1)) / (layer.running_var.view(1, 3, 1, 1) + layer.eps).sqrt()
    torch.testing.assert_close(y, expected * layer.weight.view(1, 3, 1, 1) + layer.bias.view(1, 3, 1, 1))
    N.set_inference(layer, "batch")  # option A: run the filter on the test batch
    y_a, state_a = layer(x, prior)
    y_train, state_train = copy.deepcopy(layer).train()(x, prior)
    torch.testing.assert_close(y_a, y_train)
    torch.testing.assert_close(state_a.var, state_train.var)


def test_learned_gain_and_linear_transition_train():
    layer = N.KalmanNorm2d(4, statistics_batch_size=2, in_features=3, transition="linear", gain=0.2, gain_warmup=0,
                           learn_gain=True)
    assert torch.sigmoid(layer.gain_logit).item() == pytest.approx(0.2)
    prior = layer.predict(N.KalmanState(torch.randn(2, 3), torch.rand(2, 3)))
    y, _ = layer(torch.randn(4, 4, 3, 3), prior)
    y.pow(2).sum().backward()
    assert layer.gain_logit.grad is not None and layer.transition_matrix.grad.abs().sum() > 0


def test_gradcheck_every_layer_in_float64():
    x = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    bn = N.BatchNorm2d(3, statistics_batch_size=2).double()
    assert torch.autograd.gradcheck(lambda v: bn(v), (x,))
    # BRN with r and d clipped (saturated), so they are constant under the numerical perturbation too
    brn = N.BatchRenorm2d(3, statistics_batch_size=2, r_max=2, d_max=0.5, warmup_steps=0, relax_steps=1,
                          momentum=0.0).double()  # running stats (and so r, d) fixed across the evaluations
    N.set_step(brn, 1)
    with torch.no_grad():
        brn.running_mean.fill_(10.0), brn.running_var.fill_(100.0)
    assert torch.autograd.gradcheck(lambda v: brn(v), (x,))
    bkn = N.KalmanNorm2d(3, statistics_batch_size=2, gain=0.3, gain_warmup=0, learn_gain=True).double()
    prior_mean = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    prior_var = (torch.rand(2, 3, dtype=torch.float64) + 0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda v, m, s: bkn(v, N.KalmanState(m, s))[0], (x, prior_mean, prior_var))


# --- safety and hygiene ------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["bn", "brn", "bkn"])
def test_adversarial_inputs_stay_finite(name):
    layer = N.build_norm(name, 3, statistics_batch_size=1)
    prior = N.KalmanState(torch.zeros(4, 3), torch.zeros(4, 3))
    inputs = {"constant channels": torch.ones(4, 3, 5, 5) * 7,
              "huge activations": torch.randn(4, 3, 5, 5) * 1e6 + 1e7,
              "group of one example": torch.randn(4, 3, 2, 2)}
    for what, x in inputs.items():
        x = x.clone().requires_grad_()
        out = layer(x, prior)[0] if layer.carries_state else layer(x)
        out.sum().backward()
        assert torch.isfinite(out).all() and torch.isfinite(x.grad).all(), what
        if layer.carries_state:
            assert (layer(x.detach(), prior)[1].var >= 0).all(), what


def test_bad_input_raises_one_clear_error():
    layer = N.KalmanNorm2d(4, statistics_batch_size=2)
    with pytest.raises(ValueError, match="statistics_batch_size=2 does not divide the device batch of 3"):
        layer(torch.randn(3, 4, 2, 2), None)
    with pytest.raises(ValueError, match=r"built for 4 channels \(num_features\) but got input with 5"):
        layer(torch.randn(2, 5, 2, 2), None)
    with pytest.raises(ValueError, match=r"prior of shape \(1, 4\).*\(groups, channels\) = \(2, 4\)"):
        layer(torch.randn(4, 4, 2, 2), N.KalmanState(torch.zeros(1, 4), torch.ones(1, 4)))
    with pytest.raises(ValueError, match="expects \\[4\\]-D input"):
        N.BatchNorm2d(4)(torch.randn(2, 4))
    with pytest.raises(ValueError, match="unknown normalizer 'ln'"):
        N.build_norm("ln", 4)
    with pytest.raises(ValueError, match="normalizer 'bn' has no option 'gain'"):
        N.build_norm("bn", 4, gain=0.5)
    with pytest.raises(ValueError, match="transition must be"):
        N.build_norm("bkn", 4, transition="kalman")
    with pytest.raises(ValueError, match="needs in_features"):
        N.KalmanNorm2d(4, transition="linear").predict(N.KalmanState(torch.zeros(1, 3), torch.ones(1, 3)))


@pytest.mark.parametrize("name, options", [("bn", {}), ("brn", {"r_max": 2.0}),
                                           ("bkn", {"transition": "linear", "learn_gain": True})])
def test_state_dict_round_trip_and_repr(name, options):
    make = lambda: N.build_norm(name, 4, in_features=3, statistics_batch_size=2, **options)  # noqa: E731
    layer = make()
    for p in layer.parameters():
        torch.nn.init.normal_(p)
    layer(torch.randn(4, 4, 3, 3), *([None] if layer.carries_state else []))
    copy_ = make()
    copy_.load_state_dict(layer.state_dict())
    for a, b in zip(layer.state_dict().values(), copy_.state_dict().values()):
        assert torch.equal(a, b)
    assert "statistics_batch_size=2" in repr(layer)
    layer.reset_parameters()
    assert torch.equal(layer.weight, torch.ones(4)) and torch.equal(layer.running_var, torch.ones(4))


def test_autocast_bfloat16_runs_in_low_precision_with_float32_statistics():
    net = two_layer({"name": "bkn", "statistics_batch_size": 2, "transition": "analytic"})
    x = torch.randn(4, 3, 8, 8)
    reference = run_two_layer(net, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        state = None
        y, state = net[0](x, state)
        assert state.mean.dtype == torch.float32
        y, state = net[1](y, state)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), reference, atol=0.1, rtol=0.05)


def test_channels_last_gives_the_same_result():
    net = two_layer({"name": "bkn", "statistics_batch_size": 2, "transition": "analytic", "gain": 0.5, "gain_warmup": 0})
    x = torch.randn(4, 3, 8, 8)
    reference = run_two_layer(net, x)
    net = net.to(memory_format=torch.channels_last)
    y = run_two_layer(net, x.to(memory_format=torch.channels_last))
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, reference, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("transition", TRANSITIONS)
def test_torch_compile_matches_eager(transition):
    net = two_layer({"name": "bkn", "statistics_batch_size": 2, "transition": transition, "gain": 0.5, "gain_warmup": 0})
    x = torch.randn(4, 3, 8, 8)
    compiled = torch.compile(lambda v: run_two_layer(net, v))
    torch.manual_seed(1)
    expected = run_two_layer(net, x)
    torch.manual_seed(1)
    got = compiled(x)
    if transition != "monte_carlo":  # compiled RNG streams differ from eager ones
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert torch.isfinite(got).all()


@pytest.mark.parametrize("batches_counted", [0, 50])
def test_compiled_warmup_of_a_layer_counting_its_own_batches_has_the_eager_gradients(batches_counted):
    """A layer outside train.py counts its own batches in its forward, and torch.compile recomputed
    the warm-up's gain for the backward from the count after that increment: every gradient was off
    (the prior got weight where the gain was 1). The count is now read through read_before_update,
    which the partitioner saves for the backward; fullgraph: without a graph break."""
    norm = {"name": "bkn", "statistics_batch_size": 2, "transition": "linear"}  # the default warm-up
    eager = two_layer(norm)
    with torch.no_grad():
        eager[1].norm.transition_matrix.normal_(generator=torch.Generator().manual_seed(1))
        for block in eager:
            block.norm.num_batches_tracked.fill_(batches_counted)
    compiled_net = copy.deepcopy(eager)
    compiled = torch.compile(lambda v: run_two_layer(compiled_net, v), fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 3, 8, 8)
    for net, step in ((eager, lambda v: run_two_layer(eager, v)), (compiled_net, compiled)):
        out = step(x)
        (out * torch.linspace(-1, 2, out.numel()).view_as(out)).sum().backward()
    for (name, parameter), expected in zip(compiled_net.named_parameters(), eager.parameters()):
        torch.testing.assert_close(parameter.grad, expected.grad, rtol=1e-4, atol=1e-5, msg=name)
    assert int(compiled_net[0].norm.num_batches_tracked) == batches_counted + 1


@pytest.mark.parametrize("name", ["bn", "brn", "bkn"])
def test_compiled_training_step_has_no_graph_break_and_matches_eager(name):
    """fullgraph=True raises at a graph break; aot_eager traces the backward as well (the autograd
    Functions' forward and backward) without the cost of generating kernels."""
    options = {"gain_warmup": 0} if name == "bkn" else {"warmup_steps": 0, "relax_steps": 1} if name == "brn" else {}
    eager = N.build_norm(name, 3, statistics_batch_size=2, **options)
    randomize_affine(eager)
    N.set_step(eager, 1)  # BRN past its warm-up and relaxation: r and d are not clipped to 1 and 0
    compiled_layer = copy.deepcopy(eager)
    forward = (lambda layer, v: layer(v, None)[0]) if name == "bkn" else (lambda layer, v: layer(v))
    compiled = torch.compile(lambda v: forward(compiled_layer, v), fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 3, 5, 5) * 2 + 1
    for _ in range(2):  # the second step sees the running statistics the first one left (BRN's r and d)
        input_grads = []
        for step in (lambda v: forward(eager, v), compiled):
            v = x.clone().requires_grad_()
            step(v).pow(3).sum().backward()
            input_grads.append(v.grad)
        torch.testing.assert_close(input_grads[1], input_grads[0], rtol=1e-4, atol=1e-4)
    for (key, value), expected in zip(compiled_layer.state_dict().items(), eager.state_dict().values()):
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6, msg=key)
    torch.testing.assert_close(compiled_layer.weight.grad, eager.weight.grad, rtol=1e-4, atol=1e-4)


# --- GroupNorm: PyTorch's own GroupNorm is the reference --------------------------------------

@pytest.mark.parametrize("channels, requested, used", [(64, 32, 32), (16, 32, 16), (48, 32, 24), (6, 4, 3)])
def test_group_norm_equals_torch_group_norm(channels, requested, used):
    torch.manual_seed(0)
    ours = N.build_norm("gn", channels, statistics_batch_size=2, num_groups=requested)
    assert ours.num_groups == used
    reference = torch.nn.GroupNorm(used, channels)
    with torch.no_grad():
        for layer in (ours, reference):
            layer.weight.copy_(torch.linspace(0.5, 1.5, channels))
            layer.bias.copy_(torch.linspace(-1, 1, channels))
    x = torch.randn(4, channels, 5, 5, dtype=torch.float64) * 3 + 1
    x_ours, x_reference = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours.double(), reference.double()
    out_ours, out_reference = ours(x_ours), reference(x_reference)
    torch.testing.assert_close(out_ours, out_reference, rtol=0, atol=1e-12)
    grad = torch.randn_like(out_ours)
    out_ours.backward(grad), out_reference.backward(grad)
    torch.testing.assert_close(x_ours.grad, x_reference.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(ours.weight.grad, reference.weight.grad, rtol=0, atol=1e-10)
    torch.testing.assert_close(ours.bias.grad, reference.bias.grad, rtol=0, atol=1e-10)
    assert ours.state_dict().keys() == reference.state_dict().keys()
    reference.load_state_dict(ours.state_dict())  # loads both ways: the same names and shapes


def test_group_norm_ignores_statistics_groups_and_inference():
    torch.manual_seed(0)
    x = torch.randn(4, 8, 3, 3)
    layer = N.build_norm("gn", 8, statistics_batch_size=1, num_groups=4)
    train_out = layer(x)
    N.set_inference(layer, "batch")
    layer.eval()
    torch.testing.assert_close(layer(x), train_out, rtol=0, atol=0)
    torch.testing.assert_close(layer(x[:1]), train_out[:1], rtol=0, atol=0)  # per example: any batch
    with pytest.raises(ValueError, match=r"built for \(N, 8, H, W\) input, got shape \(4, 5, 3, 3\)"):
        layer(torch.randn(4, 5, 3, 3))
    with pytest.raises(ValueError, match="normalizer 'gn' has no option 'gain'"):
        N.build_norm("gn", 8, gain=0.5)


# --- used like any PyTorch model: eval on any batch, dtypes, double backward -------------------

EVERY_NORM = [{"name": "bn", "statistics_batch_size": 2},
              {"name": "brn", "statistics_batch_size": 2, "warmup_steps": 0, "relax_steps": 1},
              *({"name": "bkn", "statistics_batch_size": 2, "transition": t, "gain": 0.5, "gain_warmup": 0} for t in TRANSITIONS)]
NORM_IDS = ["bn", "brn", *(f"bkn-{t}" for t in TRANSITIONS)]


def trained_two_layer(norm: dict) -> nn.ModuleList:
    """A two-layer net with a few training steps' running statistics, in eval mode."""
    net = two_layer(norm)
    N.set_step(net, 10)
    with torch.no_grad():
        for seed in range(3):
            run_two_layer(net, torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(seed)) + 1)
    return net.eval()


@pytest.mark.parametrize("norm", EVERY_NORM, ids=NORM_IDS)
def test_population_inference_takes_any_batch_and_each_example_alone(norm):
    net = trained_two_layer(norm)
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        together = run_two_layer(net, x)  # 5 examples with statistics groups of 2
        alone = torch.cat([run_two_layer(net, x[i:i + 1]) for i in range(5)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)
    N.set_inference(net, "batch")  # option A keeps its rule: whole statistics groups only
    with pytest.raises(ValueError, match="statistics_batch_size=2 does not divide the device batch of 5"):
        run_two_layer(net, x)


def bn_output_and_input_grad(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_()
    y = layer(x, None)[0] if getattr(layer, "carries_state", False) else layer(x)
    (y.float() ** 2).sum().backward()
    assert y.dtype == x.dtype and x.grad.dtype == x.dtype
    return y.double(), x.grad.double()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["bn", "brn", "bkn"])
def test_layers_in_float64_float16_and_bfloat16_are_as_accurate_as_torch_batchnorm(name, dtype):
    """Train and eval mode in each dtype, against torch.nn.BatchNorm2d in float64 (BRN in its
    warm-up and BKN with gain 1 are BN): float64 to its precision, float16 and bfloat16 within
    twice the error of torch's own BatchNorm2d in that dtype. Statistics: float64 for float64,
    float32 otherwise."""
    options = {"gain": 1.0, "gain_warmup": 0} if name == "bkn" else {}
    ours, torch_bn = N.build_norm(name, 3, **options).to(dtype), nn.BatchNorm2d(3).to(dtype)
    exact = nn.BatchNorm2d(3).double()
    x = torch.randn(4, 3, 5, 5).to(dtype)
    for training in (True, False):
        for layer in (ours, torch_bn, exact):
            layer.train(training)
        reference = bn_output_and_input_grad(exact, x.double())
        got, torch_got = bn_output_and_input_grad(ours, x), bn_output_and_input_grad(torch_bn, x)
        for value, torch_value, exact_value in zip(got, torch_got, reference):
            if dtype == torch.float64:
                torch.testing.assert_close(value, exact_value)
            else:
                torch_error = (torch_value - exact_value).abs().max()
                assert (value - exact_value).abs().max() <= 2 * torch_error + torch.finfo(dtype).eps
    expected_statistics = torch.float64 if dtype == torch.float64 else torch.float32
    assert BF.group_stats(x, 2)[0].dtype == expected_statistics


def test_gradgradcheck_bn_and_brn_in_float64_training_mode():
    x = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    bn = N.BatchNorm2d(3, statistics_batch_size=2).double()
    assert torch.autograd.gradgradcheck(lambda v: bn(v), (x,))
    brn = N.BatchRenorm2d(3, statistics_batch_size=2, r_max=2, d_max=0.5, warmup_steps=0, relax_steps=1,
                          momentum=0.0).double()  # r and d saturated and fixed, as in the gradcheck above
    N.set_step(brn, 1)
    with torch.no_grad():
        brn.running_mean.fill_(10.0), brn.running_var.fill_(100.0)
    assert torch.autograd.gradgradcheck(lambda v: brn(v), (x,))


@pytest.mark.parametrize("transition", TRANSITIONS)
def test_gradgradcheck_bkn_in_float64_training_mode(transition):
    """Two BKN blocks, so the second layer's prior comes through the transition and the conv."""
    torch.manual_seed(0)
    norm = {"name": "bkn", "statistics_batch_size": 2, "transition": transition, "gain": 0.3, "gain_warmup": 0, "monte_carlo_size": 2}
    net = nn.ModuleList([N.ConvNormAct(2, 3, 3, norm, first=True), N.ConvNormAct(3, 3, 3, norm)]).double()
    if transition == "linear":
        with torch.no_grad():
            net[1].norm.transition_matrix.normal_()  # A = 0 at initialization would hide the prior's path
    for block in net:
        block.act = nn.Softplus()  # smooth, so that finite differences of the gradient hold

    def forward(v):
        torch.manual_seed(1)  # the same Monte-Carlo samples in every evaluation
        return run_two_layer(net, v)

    x = torch.randn(4, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(forward, (x,))


class RecordOps(TorchDispatchMode):
    """The ATen ops that run inside the ``with`` block."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", ["bn", "brn", "bkn"])
def test_single_backward_is_one_fused_kernel_and_create_graph_uses_tensor_ops(name):
    """BN and BRN: the forward is the statistics kernel and the eval-mode kernel, the backward
    torch's training-mode kernel alone, as torch.nn.BatchNorm2d's; BKN's backward uses that kernel too.
    With create_graph=True the same gradient comes from tensor ops, which can be differentiated again."""
    layer = N.build_norm(name, 3, statistics_batch_size=2, **({"gain_warmup": 0} if name == "bkn" else {}))
    forward = (lambda v: layer(v, None)[0]) if name == "bkn" else layer
    x = torch.randn(4, 3, 3, 3, requires_grad=True)
    loss = forward(x).pow(3).sum()
    with RecordOps() as recorded:
        loss.backward()
    assert recorded.ops.count("native_batch_norm_backward") == 1
    if name == "bn":  # nothing else of size x but the kernel and the upstream gradient's pow
        assert "var_mean" not in recorded.ops and "addcmul" not in recorded.ops
    with RecordOps() as recorded:
        (grad,) = torch.autograd.grad(forward(x).pow(3).sum(), x, create_graph=True)
    assert "native_batch_norm_backward" not in recorded.ops and grad.requires_grad
    torch.testing.assert_close(grad.detach(), x.grad)  # the same gradient either way


def test_group_norm_in_every_float_dtype_and_twice_differentiable():
    for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        layer = N.build_norm("gn", 4, num_groups=2).to(dtype)
        x = torch.randn(3, 4, 5, 5).to(dtype)
        torch.testing.assert_close(layer(x), nn.functional.group_norm(x, 2, layer.weight, layer.bias))
    layer = N.build_norm("gn", 4, num_groups=2).double()
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(layer, (x,))
