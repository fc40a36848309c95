"""Pure tensor maths shared by every normalizer: statistics groups, the Kalman update,
normalization with given statistics, and BKN's three transitions.

Shapes: activations are ``(N, C, *spatial)``; statistics are ``(G, C)`` with ``G = N / s`` statistics
groups. Group ``g`` holds the examples ``g, g + G, g + 2G, ...`` of the device batch. (The authors'
code splits the batch into contiguous chunks instead; for shuffled data the two are the same
thing, and the strided split makes ``(N, C, ...)`` a free view ``(s, G*C, ...)``, so every group's
statistics are one "channel" of PyTorch's fused batch-norm kernels.)

Statistics are float32 (float64 for float64 input), also under autocast.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


def num_groups(batch_size: int, statistics_batch_size: int | None) -> int:
    """How many statistics groups a device batch splits into; raises if ``s`` does not divide it."""
    if statistics_batch_size is None:
        return 1
    if statistics_batch_size < 1 or batch_size % statistics_batch_size != 0:
        raise ValueError(
            f"statistics_batch_size={statistics_batch_size} does not divide the device batch of "
            f"{batch_size} examples; choose a divisor of {batch_size} (batch.statistics / batch.per_device)"
        )
    return batch_size // statistics_batch_size


def _grouped(x: Tensor, groups: int) -> Tensor:
    """``(N, C, *spatial)`` as ``(N/G, G*C, *spatial)``: a view for contiguous ``x`` (and for any
    ``x`` when ``G = 1``, channels_last included)."""
    if groups == 1:
        return x
    return x.reshape(x.shape[0] // groups, groups * x.shape[1], *x.shape[2:])


def _channel_statistics(grouped: Tensor) -> tuple[Tensor, Tensor]:
    """Biased mean and variance of each channel of ``grouped`` (over every dimension but 1)."""
    if torch.compiler.is_compiling():
        # The eager kernel below has no fake-tensor (meta) implementation, which torch.compile
        # needs once shapes are dynamic; the compiler fuses var_mean into one Welford pass.
        var, mean = torch.var_mean(grouped, dim=[0, *range(2, grouped.dim())], correction=0)
        return mean, var
    # PyTorch's batch-norm statistics kernel: the same biased Welford variance as
    # torch.var_mean, about twice as fast over the (0, 2, 3) dimensions.
    return torch.batch_norm_update_stats(grouped, None, None, 0.0)


class _GroupStats(torch.autograd.Function):
    """Biased per-channel mean and variance of ``x``'s grouped view, with a one-pass backward.

    Autograd's own ``var_mean`` backward makes several full-size temporaries; the gradient is
    affine in ``x`` (``dx = x * 2 g_var / n + (g_mean - 2 g_var mean) / n``), so one fused
    multiply-add suffices. It takes ``x`` itself, not the grouped view, so that the gradient
    arrives in ``x``'s shape without a view's backward in between.
    """

    @staticmethod
    def forward(ctx, x: Tensor, groups: int) -> tuple[Tensor, Tensor]:
        mean, var = _channel_statistics(_grouped(x, groups))
        ctx.save_for_backward(x, mean)
        ctx.groups = groups
        return mean, var

    @staticmethod
    def backward(ctx, grad_mean: Tensor | None, grad_var: Tensor | None) -> tuple[Tensor, None]:
        x, mean = ctx.saved_tensors
        grouped = _grouped(x, ctx.groups)
        count = grouped.numel() // grouped.shape[1]
        grad_mean = torch.zeros_like(mean) if grad_mean is None else grad_mean
        grad_var = torch.zeros_like(mean) if grad_var is None else grad_var
        slope = 2 * grad_var / count
        offset = grad_mean / count - slope * mean
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return torch.addcmul(offset.view(shape), grouped, slope.view(shape)).reshape(x.shape), None


def group_stats(x: Tensor, statistics_batch_size: int | None) -> tuple[Tensor, Tensor]:
    """Biased mean and variance of each channel in each statistics group, shape ``(G, C)`` each.

    One vectorized pass over all groups; the Welford variance is numerically stable for large
    activations, unlike ``E[x^2] - E[x]^2``.
    """
    groups = num_groups(x.shape[0], statistics_batch_size)
    with without_autocast(x.device.type):
        mean, var = _GroupStats.apply(cast(x, statistics_dtype(x.dtype)), groups)
    return mean.view(groups, -1), var.view(groups, -1)


class _AllReduceSum(torch.autograd.Function):
    """The sum of ``tensor`` over the processes of ``group``, on every one of them. Its gradient is the
    sum of theirs: each process's loss depends on every share through the sum."""

    @staticmethod
    def forward(ctx, tensor: Tensor, group: Any) -> Tensor:
        import torch.distributed as dist

        ctx.group = group
        total = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return _AllReduceSum.apply(grad, ctx.group), None


def pooled_stats(x: Tensor, process_group: Any, devices: int) -> tuple[Tensor, Tensor]:
    """Biased mean and variance ``(1, C)`` of one statistics group that spans ``devices`` processes of
    ``process_group``, each holding an equal share ``x`` of it: differentiable, as if the whole group
    were on one device.

    Two all-reduces of ``(C,)`` tensors each way: the mean, then each share's variance plus its mean's
    squared distance to the group's (Chan's pairwise formula for equal counts), which stays accurate
    for large activations where ``E[x^2] - E[x]^2`` would not.
    """
    mean, var = group_stats(x, None)
    pooled_mean = _AllReduceSum.apply(mean, process_group) / devices
    pooled_var = _AllReduceSum.apply(var + (mean - pooled_mean).square(), process_group) / devices
    return pooled_mean, pooled_var


def statistics_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics of ``dtype`` activations are kept in: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def cast(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    """``tensor.to(dtype)`` without the call where it already has that dtype: at micro-batches a
    normalization layer's time is mostly per-op overhead, and ``.to`` costs as much as a small kernel."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def without_autocast(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast switched off (statistics stay float32), entered only where it is on: entering
    ``torch.autocast`` costs about as much as a small kernel."""
    return torch.autocast(device_type, enabled=False) if torch.is_autocast_enabled(device_type) else contextlib.nullcontext()


def _eval_kernel(grouped: Tensor, weight: Tensor, bias: Tensor, mean: Tensor, var: Tensor, eps: float) -> Tensor:
    """``weight * (x - mean) / sqrt(var + eps) + bias`` per channel: PyTorch's eval-mode batch-norm kernel,
    called as the ATen op itself (``torch.batch_norm`` adds an allocation call in front of it)."""
    return torch.native_batch_norm(grouped, weight, bias, mean, var, False, 0.0, eps)[0]


def _ungrouped(y: Tensor, x: Tensor, groups: int) -> Tensor:
    """The kernel's output in ``x``'s shape. Not a view: a view would turn an in-place activation after
    the layer (ReLU with ``inplace=True``) into full-size copies in the backward (autograd's CopySlices)."""
    return y if groups == 1 else torch.ops.aten._unsafe_view(y, x.shape)


class _Normalize(torch.autograd.Function):
    """``weight * (x - mean) / sqrt(var + eps) + bias`` per channel of ``x``'s grouped view, through
    PyTorch's fused eval-mode batch-norm kernel, with gradients for the given statistics too.

    The backward's fused kernel gives ``dx``, ``sum(dy * x_hat)`` and ``sum(dy)``; the statistics'
    gradients follow from the two sums. The kernels are not differentiable themselves, so when the
    backward must be (``create_graph=True``: double backward, gradient penalties, Hessian-vector
    products) the same terms come from ordinary tensor ops instead.
    """

    @staticmethod
    def forward(ctx, x: Tensor, mean: Tensor, var: Tensor, weight: Tensor, bias: Tensor, eps: float,
                groups: int) -> Tensor:
        ctx.save_for_backward(x, mean, var, weight)
        ctx.eps, ctx.groups, ctx.bias_per_group = eps, groups, bias.dim() == 2
        y = _eval_kernel(_grouped(x, groups), _flat(weight, groups), _flat(bias, groups), mean.view(-1),
                         var.view(-1), eps)
        return _ungrouped(y, x, groups)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, mean, var, weight = ctx.saved_tensors
        grad_x, grad_weight, grad_bias, invstd = _batch_norm_backward(
            grad_out, x, mean.view(-1), var.view(-1), _flat(weight, ctx.groups), ctx, training=False)
        grad_weight, grad_bias, invstd = (g.view(mean.shape) for g in (grad_weight, grad_bias, invstd))  # (G, C)
        grad_mean = -grad_bias * weight * invstd
        grad_var = -0.5 * grad_weight * weight * invstd * invstd
        return (grad_x, grad_mean, grad_var, _group_sum(grad_weight, weight.dim() == 2),
                _group_sum(grad_bias, ctx.bias_per_group), None, None)


class _BatchNorm(torch.autograd.Function):
    """BN of ``x``'s grouped view with each channel's own statistics, which it returns too, ``(G, C)``
    and without a gradient (they feed the running statistics, and BRN's r and d, constants for the
    gradient).

    Forward: the statistics kernel and the eval-mode kernel, the ops BKN runs, so BKN whose estimate
    is its observation computes the same numbers. Backward: PyTorch's training-mode batch-norm kernel
    alone, as ``torch.nn.BatchNorm2d``'s. ``statistics`` given: ``x``'s own, computed by the caller
    (BRN), not again here.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, eps: float, groups: int,
                statistics: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor, Tensor]:
        ctx.set_materialize_grads(False)  # the statistics' gradients are always None: no zeros made for them
        grouped = _grouped(x, groups)
        if statistics is None:
            with without_autocast(x.device.type):
                mean, var = _channel_statistics(cast(grouped, statistics_dtype(x.dtype)))
        else:
            mean, var = (s.view(-1) for s in statistics)
        flat_weight = _flat(weight, groups)
        y = _eval_kernel(grouped, flat_weight, _flat(bias, groups), mean, var, eps)
        ctx.save_for_backward(x, weight, flat_weight, mean, var)
        ctx.eps, ctx.groups, ctx.bias_per_group = eps, groups, bias.dim() == 2
        mean, var = mean.view(groups, -1), var.view(groups, -1)
        ctx.mark_non_differentiable(mean, var)
        return _ungrouped(y, x, groups), mean, var

    @staticmethod
    def backward(ctx, grad_out: Tensor | None, _grad_mean: None, _grad_var: None):
        x, weight, flat_weight, mean, var = ctx.saved_tensors
        if grad_out is None:
            return None, None, None, None, None, None
        if torch.is_grad_enabled():  # differentiated again: the statistics as the functions of x they are
            grouped = _grouped(x, ctx.groups)
            var, mean = torch.var_mean(cast(grouped, mean.dtype), dim=[0, *range(2, grouped.dim())], correction=0)
            flat_weight = _flat(weight, ctx.groups)  # the forward's copy is not connected to weight
        grad_x, grad_weight, grad_bias, _ = _batch_norm_backward(grad_out, x, mean, var, flat_weight, ctx,
                                                                 training=True)
        shape = (ctx.groups, -1)
        return (grad_x, _group_sum(grad_weight.view(shape), weight.dim() == 2),
                _group_sum(grad_bias.view(shape), ctx.bias_per_group), None, None, None)


def _flat(parameter: Tensor, groups: int) -> Tensor:
    """A ``(C,)`` or per-group ``(G, C)`` affine parameter as the grouped view's ``(G*C,)``."""
    if parameter.dim() == 2:
        return parameter.view(-1)
    # One cat of G references: one op, where expand + reshape costs three and .repeat more.
    return parameter if groups == 1 else torch.cat([parameter] * groups)


def _group_sum(grad: Tensor, per_group: bool) -> Tensor:
    """The gradient of a ``(C,)`` parameter (``(G, C)`` if ``per_group``) from that of its per-group copies, ``(G, C)``."""
    if per_group:
        return grad
    return grad.view(-1) if grad.shape[0] == 1 else grad.sum(0)


def _batch_norm_backward(grad_out: Tensor, x: Tensor, mean: Tensor, var: Tensor, weight: Tensor, ctx,
                         training: bool, invstd: Tensor | None = None) -> tuple[Tensor | None, Tensor, Tensor, Tensor]:
    """``(dx, sum(dy * x_hat), sum(dy), invstd)`` of batch norm with the given statistics, ``dx`` in ``x``'s
    shape; ``invstd = rsqrt(var + eps)``, computed here unless the caller has it.

    ``training``: ``dx = weight * invstd * (dy - mean(dy) - x_hat * mean(dy * x_hat))``, the gradient
    when ``mean`` and ``var`` are ``x``'s own statistics; else ``dx = weight * invstd * dy``, for fixed
    statistics. PyTorch's fused kernel, or under ``create_graph=True`` the same as tensor ops.
    """
    grouped = _grouped(x, ctx.groups)
    grad_grouped = _grouped(grad_out, ctx.groups).contiguous(memory_format=_memory_format(grouped))
    needs_grad_x = ctx.needs_input_grad[0]
    if invstd is None:
        invstd = torch.rsqrt(var + ctx.eps)
    if not torch.is_grad_enabled():
        statistics = (None, None, mean, invstd) if training else (mean, var, None, None)  # saved or running
        grad_x, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
            grad_grouped, grouped, weight, *statistics, training, ctx.eps, [needs_grad_x, True, True])
    else:  # create_graph=True: this backward is differentiated in turn
        shape = (1, -1) + (1,) * (grouped.dim() - 2)
        dims = [0, *range(2, grouped.dim())]
        x_hat = (grouped - mean.view(shape)) * invstd.view(shape)
        grad_bias, grad_weight = grad_grouped.sum(dims), (grad_grouped * x_hat).sum(dims)
        grad_x = None
        if needs_grad_x:
            grad_x = grad_grouped
            if training:
                count = grouped.numel() // grouped.shape[1]
                grad_x = grad_x - (grad_bias / count).view(shape) - x_hat * (grad_weight / count).view(shape)
            grad_x = grad_x * (weight * invstd).view(shape)
    return (None if grad_x is None else grad_x.reshape(x.shape)), grad_weight, grad_bias, invstd


def _memory_format(x: Tensor) -> torch.memory_format:
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def normalize(x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None,
              eps: float) -> Tensor:
    """``weight * (x - mean) / sqrt(var + eps) + bias`` with per-group ``(G, C)`` statistics (gradients
    for them too); ``weight`` and ``bias`` are ``(C,)`` or per group ``(G, C)``."""
    weight, bias = _affine(weight, bias, mean.shape[1], mean.dtype, mean.device)
    y = _Normalize.apply(x, mean, var, weight, bias, eps, mean.shape[0])
    return _like(y, x, mean.shape[0])


def _like(y: Tensor, x: Tensor, groups: int) -> Tensor:
    """``y`` in ``x``'s memory format: channels_last input with several groups took a copy in _grouped."""
    return y if groups == 1 else y.contiguous(memory_format=_memory_format(x))


def batch_norm(x: Tensor, statistics_batch_size: int | None, weight: Tensor | None, bias: Tensor | None,
               eps: float, statistics: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """BN with statistics groups: ``(y, mean, var)``, the statistics ``(G, C)`` and without a gradient.

    The same numbers as ``normalize(x, *group_stats(x, s), weight, bias, eps)``, with the backward
    of ``torch.nn.BatchNorm2d`` (one fused kernel). ``weight`` and ``bias`` are ``(C,)`` or per group
    ``(G, C)`` (BRN folds its r and d in there); ``statistics``: ``x``'s own ``(G, C)`` statistics,
    if the caller has them already.
    """
    groups = num_groups(x.shape[0], statistics_batch_size)
    weight, bias = _affine(weight, bias, x.shape[1], statistics_dtype(x.dtype), x.device)
    y, mean, var = _BatchNorm.apply(x, weight, bias, eps, groups, statistics)
    return _like(y, x, groups), mean, var


def _affine(weight: Tensor | None, bias: Tensor | None, channels: int, dtype: torch.dtype,
            device: torch.device) -> tuple[Tensor, Tensor]:
    """Affine parameters in the statistics' dtype; None: ones and zeros."""
    weight = torch.ones(channels, dtype=dtype, device=device) if weight is None else cast(weight, dtype)
    bias = torch.zeros(channels, dtype=dtype, device=device) if bias is None else cast(bias, dtype)
    return weight, bias


def kalman_update(obs_mean: Tensor, obs_var: Tensor, prior_mean: Tensor, prior_var: Tensor,
                  gain: Tensor | float) -> tuple[Tensor, Tensor]:
    """The BKN update (paper Eq. 4-5 with its appendix): a mixture of prediction and observation.

    Written as ``(1-q) prior + q obs`` rather than ``prior + q (obs - prior)``: the two are equal,
    but only this form gives *exactly* the observation (so exactly BN) at ``q = 1``.
    """
    mean = (1 - gain) * prior_mean + gain * obs_mean
    var = (1 - gain) * prior_var + gain * obs_var + gain * (1 - gain) * (obs_mean - prior_mean) ** 2
    return mean, var


def normalized_moments(obs_mean: Tensor, obs_var: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None,
                       bias: Tensor | None, eps: float) -> tuple[Tensor, Tensor]:
    """Per-group mean and variance of ``normalize(x, mean, var, weight, bias)`` for an ``x`` whose
    group statistics are ``obs_mean``, ``obs_var``: exact, without a pass over ``x``."""
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * cast(weight, var.dtype)
    out_mean = scale * (obs_mean - mean)
    if bias is not None:
        out_mean = out_mean + cast(bias, var.dtype)
    return out_mean, scale * scale * obs_var


def kalman_estimate(obs_mean: Tensor, obs_var: Tensor, prior_mean: Tensor | None, prior_var: Tensor | None,
                    gain: Tensor | float, fallback_ratio: float | None, eps: float) -> tuple[Tensor, Tensor]:
    """The statistics BKN normalizes with, ``(G, C)``: the observation without a prior, else the Kalman
    update, where a group falls back to its observation if its predicted variance is ``fallback_ratio``
    times the observed one on average (``None``: never), the variance clamped at 0. Autograd ops: the
    reference :func:`kalman_normalize` is tested against, and its double backward."""
    if prior_mean is None:
        return obs_mean, obs_var
    mean, var = kalman_update(obs_mean, obs_var, prior_mean, prior_var, gain)
    if fallback_ratio is not None:
        # Per group, where the authors use one flag for the whole batch: this keeps groups
        # independent of each other. torch.where, not .item(): no host sync.
        trust_observation = (prior_var / (obs_var + eps)).mean(dim=1, keepdim=True) >= fallback_ratio
        mean, var = torch.where(trust_observation, obs_mean, mean), torch.where(trust_observation, obs_var, var)
    return mean, var.clamp_min(0)


def kalman_normalize_reference(x: Tensor, prior_mean: Tensor | None, prior_var: Tensor | None, gain: Tensor | float,
                               weight: Tensor, bias: Tensor, eps: float, groups: int, fallback_ratio: float | None,
                               state_from_output: bool) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`kalman_normalize`'s ``(y, state mean, state var)`` as a composition of autograd ops."""
    grouped = _grouped(x, groups)
    dims = [0, *range(2, grouped.dim())]
    obs_var, obs_mean = torch.var_mean(cast(grouped, weight.dtype), dim=dims, correction=0)
    obs_mean, obs_var = obs_mean.view(groups, -1), obs_var.view(groups, -1)
    mean, var = kalman_estimate(obs_mean, obs_var, prior_mean, prior_var, gain, fallback_ratio, eps)
    shape = (1, -1) + (1,) * (grouped.dim() - 2)
    scale = (torch.rsqrt(var + eps) * weight).view(shape)
    y = ((grouped - mean.view(shape)) * scale + (bias * torch.ones_like(mean)).view(shape)).to(x.dtype)
    state = normalized_moments(obs_mean, obs_var, mean, var, weight, bias, eps) if state_from_output else (mean, var)
    return y.reshape(x.shape), *state


class _KalmanNormalize(torch.autograd.Function):
    """BKN's step for all groups and channels at once: the observed statistics, the Kalman update with
    the fallback, the normalization, and the statistics of the output (``state_from_output``) or the
    estimate itself as the state the next layer predicts from; the backward derived by hand.

    Forward: the statistics kernel, a few fused ``(G, C)`` ops and the eval-mode kernel, as BN runs.
    The fallback is a per-group gain of 1 (``lerp`` to the observation is then exact). Backward:
    PyTorch's training-mode kernel, whose ``dx`` holds the gradient that would reach ``x`` if the
    estimate were ``x``'s own statistics; the difference to the true gradient, which reaches ``x``
    through the observed statistics, is affine in ``x`` per channel and added in one pass. Where the
    estimate is the observation (gain 1) that difference is exactly zero and every number is BN's, bit
    for bit. Differentiated again (``create_graph=True``), the backward differentiates
    :func:`kalman_normalize_reference` instead.
    """

    @staticmethod
    def forward(ctx, x: Tensor, prior_mean: Tensor | None, prior_var: Tensor | None, gain: Tensor | None,
                weight: Tensor, bias: Tensor, eps: float, groups: int, fallback_ratio: float | None,
                state_from_output: bool):
        ctx.set_materialize_grads(False)
        grouped = _grouped(x, groups)
        obs_mean, obs_var = (s.view(groups, -1) for s in _channel_statistics(cast(grouped, weight.dtype)))
        mean, var = obs_mean, obs_var
        group_gain = trusted = one_minus_gain = weighted_diff = unclamped_var = None
        if prior_mean is not None:
            group_gain = gain
            if fallback_ratio is not None:  # per group (the authors: one flag for the batch); no host sync
                trusted = (prior_var / (obs_var + eps)).mean(dim=1, keepdim=True) >= fallback_ratio
                group_gain = torch.maximum(trusted, gain)  # (G, 1): 1 where trusted (a gain is at most 1), else q
            one_minus_gain = 1 - group_gain
            diff = obs_mean - prior_mean
            weighted_diff = diff * (group_gain * one_minus_gain)
            mean = torch.lerp(prior_mean, obs_mean, group_gain)  # exactly obs_mean at gain 1
            unclamped_var = torch.lerp(prior_var, obs_var, group_gain).addcmul_(weighted_diff, diff)
            var = unclamped_var.clamp_min(0)  # a negative prior variance could make it negative
        invstd = torch.rsqrt(var + eps)
        flat_weight = _flat(weight, groups)
        y = _eval_kernel(grouped, flat_weight, _flat(bias, groups), mean.view(-1), var.view(-1), eps)
        scale = invstd * weight
        centered = None
        if state_from_output:
            centered = obs_mean - mean
            state = torch.addcmul(bias, scale, centered), scale * scale * obs_var
        else:
            state = mean.clone(), var.clone()  # outputs of their own: mean and var are returned without a gradient too
        ctx.save_for_backward(x, prior_mean, prior_var, gain, weight, bias, flat_weight, obs_mean, obs_var, mean,
                              invstd, scale, centered, group_gain, trusted, one_minus_gain, weighted_diff,
                              unclamped_var)
        ctx.eps, ctx.groups, ctx.state_from_output = eps, groups, state_from_output
        ctx.reference_options = eps, groups, fallback_ratio, state_from_output
        ctx.mark_non_differentiable(mean, var)
        return _ungrouped(y, x, groups), *state, mean, var

    @staticmethod
    def backward(ctx, grad_y, grad_state_mean, grad_state_var, _grad_mean, _grad_var):
        if torch.is_grad_enabled():
            return _differentiate_reference(ctx, kalman_normalize_reference, 6, grad_y, grad_state_mean,
                                            grad_state_var)
        (x, prior_mean, prior_var, gain, weight, bias, flat_weight, obs_mean, obs_var, mean, invstd, scale, centered,
         group_gain, trusted, one_minus_gain, weighted_diff, unclamped_var) = ctx.saved_tensors
        groups = ctx.groups
        # The normalization: the kernel's dx, and the gradients of its statistics and affine parameters,
        # (G, C): d mean = -sum(dy) w invstd, d var = -sum(dy x_hat) w invstd^2 / 2.
        grad_x = grad_mean = grad_var = grad_weight = grad_bias = None
        scale_invstd = scale * invstd
        if grad_y is not None:
            grad_x, grad_weight, grad_bias, _ = _batch_norm_backward(grad_y, x, mean.view(-1), None, flat_weight, ctx,
                                                                     training=True, invstd=invstd.view(-1))
            grad_weight, grad_bias = grad_weight.view(groups, -1), grad_bias.view(groups, -1)
            grad_mean = -grad_bias * scale
            grad_var = grad_weight * scale_invstd * -0.5
        kernel_grad_mean, kernel_grad_var = grad_mean, grad_var  # what the kernel's dx already holds
        # The state passed on.
        grad_obs_mean = grad_obs_var = None
        if ctx.state_from_output:
            # state mean = w invstd centered + b, state var = w^2 invstd^2 obs_var; through invstd:
            # d var += -h w invstd^3 / 2 and d w += h invstd, with h = g_mean centered + 2 g_var obs_var w invstd.
            through_invstd = None
            if grad_state_mean is not None:
                grad_obs_mean = grad_state_mean * scale
                grad_mean = _add(grad_mean, -grad_obs_mean)
                grad_bias = _add(grad_bias, grad_state_mean)
                through_invstd = grad_state_mean * centered
            if grad_state_var is not None:
                grad_obs_var = grad_state_var * scale * scale
                weighted = grad_state_var * obs_var
                through_invstd = (weighted * scale * 2 if through_invstd is None
                                  else torch.addcmul(through_invstd, weighted, scale, value=2))
            if through_invstd is not None:
                through_invstd = through_invstd * invstd
                grad_weight = _add(grad_weight, through_invstd)
                grad_var = (through_invstd * scale_invstd * -0.5 if grad_var is None
                            else torch.addcmul(grad_var, through_invstd, scale_invstd, value=-0.5))
        else:
            grad_mean, grad_var = _add(grad_mean, grad_state_mean), _add(grad_var, grad_state_var)
        # The estimate: the observation itself, or the Kalman update with the clamp.
        grad_prior_mean = grad_prior_var = grad_gain = None
        if prior_mean is None:
            grad_obs_mean, grad_obs_var = _add(grad_obs_mean, grad_mean), _add(grad_obs_var, grad_var)
        elif grad_mean is not None or grad_var is not None:
            grad_mean = torch.zeros_like(mean) if grad_mean is None else grad_mean
            grad_var = torch.zeros_like(mean) if grad_var is None else grad_var * (unclamped_var >= 0)
            # mean = lerp(prior, obs, q), var = lerp(prior var, obs var, q) + q (1 - q) diff^2, q per group
            cross = grad_var * weighted_diff * 2
            grad_obs_mean = _add(grad_obs_mean, torch.addcmul(cross, grad_mean, group_gain))
            grad_obs_var = _add(grad_obs_var, grad_var * group_gain)
            grad_prior_mean = (grad_mean * one_minus_gain).sub_(cross)
            grad_prior_var = grad_var * one_minus_gain
            if ctx.needs_input_grad[3]:  # a learned gain; a group that fell back does not depend on it
                diff = obs_mean - prior_mean
                spread = obs_var - prior_var + diff * diff * (1 - 2 * gain)
                per_group = (grad_mean * diff + grad_var * spread).sum(1, keepdim=True)
                grad_gain = (per_group if trusted is None else per_group * ~trusted).sum()
        # dx: the gradient through the observed statistics, a / n + 2 b (x - obs_mean) / n, less what the
        # kernel's dx holds for the estimate, c / n + 2 d (x - mean) / n: offset + slope * x per channel.
        if ctx.needs_input_grad[0] and (grad_obs_mean is not None or grad_obs_var is not None):
            grouped = _grouped(x, groups)
            count = grouped.numel() // grouped.shape[1]
            grad_obs_mean = torch.zeros_like(mean) if grad_obs_mean is None else grad_obs_mean
            grad_obs_var = torch.zeros_like(mean) if grad_obs_var is None else grad_obs_var
            if kernel_grad_mean is None:
                kernel_grad_mean = kernel_grad_var = torch.zeros_like(mean)
            slope = (grad_obs_var - kernel_grad_var) * (2 / count)
            offset = ((grad_obs_mean - kernel_grad_mean) + 2 * (kernel_grad_var * mean - grad_obs_var * obs_mean)) / count
            shape = (1, -1) + (1,) * (grouped.dim() - 2)
            correction = torch.addcmul(offset.view(shape), grouped, slope.view(shape)).reshape(x.shape)
            grad_x = correction if grad_x is None else grad_x.add_(correction)
        per_channel = (lambda g: None if g is None else g.view(-1) if groups == 1 else g.sum(0))
        return (grad_x, grad_prior_mean, grad_prior_var, grad_gain, per_channel(grad_weight), per_channel(grad_bias),
                None, None, None, None)


def _add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    """``a + b`` where a missing gradient (None) counts as zero."""
    return b if a is None else a if b is None else a + b


def _differentiate_reference(ctx, reference: Callable[..., tuple[Tensor, ...]], num_inputs: int,
                             *grad_outputs: Tensor | None) -> tuple[Tensor | None, ...]:
    """A Function's backward as autograd ops of its ``reference`` composition, so that it can be
    differentiated again (double backward, gradient penalties): the first ``num_inputs`` saved tensors
    are the differentiable inputs, in order; the reference takes them and the ``ctx.reference_options``."""
    inputs = ctx.saved_tensors[:num_inputs]
    with torch.enable_grad():
        outputs = reference(*inputs, *ctx.reference_options)
    pairs = [(output, grad) for output, grad in zip(outputs, grad_outputs) if grad is not None]
    wanted = [i for i, tensor in enumerate(inputs) if ctx.needs_input_grad[i] and tensor is not None]
    grads = torch.autograd.grad([o for o, _ in pairs], [inputs[i] for i in wanted], [g for _, g in pairs],
                                create_graph=True, allow_unused=True)
    result: list[Tensor | None] = [None] * len(ctx.needs_input_grad)
    for i, grad in zip(wanted, grads):
        result[i] = grad
    return tuple(result)


def kalman_normalize(x: Tensor, prior_mean: Tensor | None, prior_var: Tensor | None, gain: Tensor | None,
                     weight: Tensor | None, bias: Tensor | None, eps: float, statistics_batch_size: int | None,
                     fallback_ratio: float | None, state_from_output: bool) -> tuple[Tensor, ...]:
    """BKN: ``(y, state_mean, state_var, mean, var)``. ``y`` is ``x`` normalized per statistics group
    with the Kalman estimate ``(mean, var)`` (``(G, C)``, without a gradient: for the running
    statistics) of its statistics from the observation and the prior ``(prior_mean, prior_var)``
    (None: the observation itself, BN) with gain ``gain`` (a 0-dim tensor); the state is the
    statistics of ``y`` (``state_from_output``) or the estimate, for the next layer's prediction.
    """
    groups = num_groups(x.shape[0], statistics_batch_size)
    dtype = statistics_dtype(x.dtype)
    weight, bias = _affine(weight, bias, x.shape[1], dtype, x.device)
    if prior_mean is not None:
        prior_mean, prior_var, gain = cast(prior_mean, dtype), cast(prior_var, dtype), cast(gain, dtype)
    with without_autocast(x.device.type):
        y, *rest = _KalmanNormalize.apply(x, prior_mean, prior_var, gain, weight, bias, eps, groups, fallback_ratio,
                                          state_from_output)
    return _like(y, x, groups), *rest


# --- transitions: predict this layer's statistics from the previous layer's posterior ---------
# They compute in the dtype of the statistics; callers under autocast switch it off around them.

def linear_transition(mean: Tensor, var: Tensor, matrix: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
    """Paper Eq. 2-3 with diagonal variances: ``A mu``, ``(A o A) var + r`` (``noise`` is ``r``, 0-dim).
    Four ops forward and its backward derived by hand: this runs before every BKN layer."""
    return _LinearTransition.apply(mean, var, matrix, noise)


def linear_transition_reference(mean: Tensor, var: Tensor, matrix: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`linear_transition` as autograd ops."""
    return mean @ matrix.t(), var @ (matrix * matrix).t() + noise


class _LinearTransition(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mean: Tensor, var: Tensor, matrix: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
        ctx.set_materialize_grads(False)
        square = matrix * matrix
        ctx.save_for_backward(mean, var, matrix, noise, square)
        ctx.reference_options = ()
        return torch.mm(mean, matrix.t()), torch.addmm(noise, var, square.t())

    @staticmethod
    def backward(ctx, grad_mean: Tensor | None, grad_var: Tensor | None):
        if torch.is_grad_enabled():
            return _differentiate_reference(ctx, linear_transition_reference, 4, grad_mean, grad_var)
        mean, var, matrix, noise, square = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad_in_mean = grad_in_var = grad_matrix = grad_noise = None
        if grad_mean is not None:
            grad_in_mean = torch.mm(grad_mean, matrix) if needs[0] else None
            grad_matrix = torch.mm(grad_mean.t(), mean) if needs[2] else None
        if grad_var is not None:
            grad_in_var = torch.mm(grad_var, square) if needs[1] else None
            if needs[2]:  # d (A o A) / d A = 2 A
                through_square = torch.mm(grad_var.t(), var)
                grad_matrix = (through_square.mul_(matrix).mul_(2) if grad_matrix is None
                               else grad_matrix.addcmul_(through_square, matrix, value=2))
            grad_noise = grad_var.sum_to_size(noise.shape) if needs[3] else None
        return grad_in_mean, grad_in_var, grad_matrix, grad_noise


def _relu_moments(mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and variance of ``relu(N(mean, var))`` in closed form."""
    std = var.clamp_min(1e-12).sqrt()
    alpha = mean / std
    cdf = 0.5 * (1 + torch.erf(alpha / math.sqrt(2)))
    pdf = torch.exp(-0.5 * alpha * alpha) / math.sqrt(2 * math.pi)
    first = mean * cdf + std * pdf
    second = (mean * mean + var) * cdf + mean * std * pdf
    return first, (second - first * first).clamp_min(0)


def analytic_transition(mean: Tensor, var: Tensor, conv: torch.nn.Conv2d) -> tuple[Tensor, Tensor]:
    """Closed-form moments of the Monte-Carlo model: ``relu`` of a Gaussian, then the conv.

    Inputs are independent across channels and positions, so a conv output's mean is
    ``sum(W) . mean_in`` and its variance ``sum(W^2) . var_in`` (sums over the kernel window).
    The (G, C) statistics are pushed through as 1x1 "images" so grouped convs work unchanged.
    """
    relu_mean, relu_var = _relu_moments(mean, var)
    weight = conv.weight.to(mean.dtype)
    kernel_sum = weight.sum(dim=(2, 3), keepdim=True)
    kernel_square_sum = (weight * weight).sum(dim=(2, 3), keepdim=True)
    bias = None if conv.bias is None else conv.bias.to(mean.dtype)
    out_mean = F.conv2d(relu_mean[:, :, None, None], kernel_sum, bias, groups=conv.groups)
    out_var = F.conv2d(relu_var[:, :, None, None], kernel_square_sum, groups=conv.groups)
    return out_mean.flatten(1), out_var.flatten(1)


def monte_carlo_transition(mean: Tensor, var: Tensor, conv: torch.nn.Conv2d,
                           spatial_size: int) -> tuple[Tensor, Tensor]:
    """The authors' transition: sample ``relu(mean + std z)``, run the real conv, take moments.

    One sample per group. The conv runs without padding on an input just large enough for a
    ``spatial_size`` x ``spatial_size`` output, so zero padding does not bias the moments.
    """
    kernel_h, kernel_w = conv.kernel_size
    (stride_h, stride_w), (dil_h, dil_w) = conv.stride, conv.dilation
    height = dil_h * (kernel_h - 1) + 1 + stride_h * (spatial_size - 1)
    width = dil_w * (kernel_w - 1) + 1 + stride_w * (spatial_size - 1)
    groups, channels = mean.shape
    noise = torch.randn(groups, channels, height, width, device=mean.device, dtype=mean.dtype)
    samples = torch.relu(mean[:, :, None, None] + var.clamp_min(0).sqrt()[:, :, None, None] * noise)
    bias = None if conv.bias is None else conv.bias.to(mean.dtype)
    out = F.conv2d(samples, conv.weight.to(mean.dtype), bias, stride=conv.stride, dilation=conv.dilation,
                   groups=conv.groups)
    var_out, mean_out = torch.var_mean(out, dim=(2, 3), correction=0)
    return mean_out, var_out
