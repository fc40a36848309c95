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


class _Normalize(torch.autograd.Function):
    """``weight * (x - mean) / sqrt(var + eps) + bias`` per channel of ``x``'s grouped view, through
    PyTorch's fused eval-mode batch-norm kernel, with gradients for the statistics too.

    The backward's fused kernel gives ``dx``, ``sum(dy * x_hat)`` and ``sum(dy)``; the statistics'
    gradients follow from the two sums. ``observed`` (BKN): ``x``'s own statistics, from which
    ``mean`` and ``var`` were estimated. Then the backward runs the *training-mode* kernel, BN's,
    whose ``dx`` also holds the gradient that would reach ``x`` if ``mean`` and ``var`` were ``x``'s
    own statistics; that part is taken back through the observed statistics (their gradients below),
    so the total is the same, and where the estimate is the observation (BKN at gain 1) the
    correction is exactly zero and every number is BN's, bit for bit.

    The kernels are not differentiable themselves, so when the backward must be
    (``create_graph=True``: double backward, gradient penalties, Hessian-vector products) the same
    terms come from ordinary tensor ops instead. Input and output are in ``x``'s shape, and the
    output is not a view: a view would turn an in-place activation after the layer (ReLU with
    ``inplace=True``) into full-size copies in the backward (autograd's CopySlices).
    """

    @staticmethod
    def forward(ctx, x: Tensor, mean: Tensor, var: Tensor, obs_mean: Tensor | None, obs_var: Tensor | None,
                weight: Tensor, bias: Tensor, eps: float, groups: int) -> Tensor:
        ctx.save_for_backward(x, mean, var, weight, obs_mean)
        ctx.eps, ctx.groups, ctx.observed = eps, groups, obs_mean is not None
        ctx.bias_per_group = bias.dim() == 2
        y = torch.batch_norm(_grouped(x, groups), _flat(weight, groups), _flat(bias, groups), mean.view(-1),
                             var.view(-1), False, 0.0, eps, torch.backends.cudnn.enabled)
        return y if groups == 1 else torch.ops.aten._unsafe_view(y, x.shape)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, mean, var, weight, obs_mean = ctx.saved_tensors
        grad_x, grad_weight, grad_bias, invstd = _batch_norm_backward(
            grad_out, x, mean.view(-1), var.view(-1), _flat(weight, ctx.groups), ctx, ctx.observed)
        grad_weight, grad_bias, invstd = (g.view(mean.shape) for g in (grad_weight, grad_bias, invstd))  # (G, C)
        grad_mean = -grad_bias * weight * invstd
        grad_var = -0.5 * grad_weight * weight * invstd * invstd
        grad_obs_mean = grad_obs_var = None
        if ctx.observed:
            # The kernel's dx holds grad_mean / n + 2 grad_var (x - mean) / n; the observed statistics'
            # backward (group_stats) adds a / n + 2 b (x - obs_mean) / n, so these cancel it.
            grad_obs_mean = -grad_mean - 2 * grad_var * (obs_mean - mean)
            grad_obs_var = -grad_var
        return (grad_x, grad_mean, grad_var, grad_obs_mean, grad_obs_var, _group_sum(grad_weight, weight.dim() == 2),
                _group_sum(grad_bias, ctx.bias_per_group), None, None)


class _BatchNorm(torch.autograd.Function):
    """BN of ``x``'s grouped view with each channel's own statistics, which it returns too (without
    a gradient: they feed the running statistics, and BRN's r and d, constants for the gradient).

    Forward: the statistics kernel and the eval-mode kernel, the ops BKN runs (group_stats, then
    normalize), so BKN whose estimate is its observation computes the same numbers. Backward:
    PyTorch's training-mode batch-norm kernel alone, as ``torch.nn.BatchNorm2d``'s, where group_stats
    and normalize would take two more full-size passes. ``statistics`` given: ``x``'s own, computed
    by the caller (BRN), not again here.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, eps: float, groups: int,
                statistics: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor, Tensor]:
        grouped = _grouped(x, groups)
        if statistics is None:
            with without_autocast(x.device.type):
                mean, var = _channel_statistics(cast(grouped, statistics_dtype(x.dtype)))
        else:
            mean, var = (s.view(-1) for s in statistics)
        y = torch.batch_norm(grouped, _flat(weight, groups), _flat(bias, groups), mean, var, False, 0.0, eps,
                             torch.backends.cudnn.enabled)
        ctx.save_for_backward(x, weight, mean, var)
        ctx.eps, ctx.groups, ctx.bias_per_group = eps, groups, bias.dim() == 2
        mean, var = mean.view(groups, -1), var.view(groups, -1)
        ctx.mark_non_differentiable(mean, var)
        return (y if groups == 1 else torch.ops.aten._unsafe_view(y, x.shape)), mean, var

    @staticmethod
    def backward(ctx, grad_out: Tensor, _grad_mean: Tensor | None, _grad_var: Tensor | None):
        x, weight, mean, var = ctx.saved_tensors
        if torch.is_grad_enabled():  # differentiated again: the statistics as the functions of x they are
            grouped = _grouped(x, ctx.groups)
            var, mean = torch.var_mean(cast(grouped, mean.dtype), dim=[0, *range(2, grouped.dim())], correction=0)
        grad_x, grad_weight, grad_bias, _ = _batch_norm_backward(grad_out, x, mean, var, _flat(weight, ctx.groups),
                                                                 ctx, training=True)
        shape = (ctx.groups, -1)
        return (grad_x, _group_sum(grad_weight.view(shape), weight.dim() == 2),
                _group_sum(grad_bias.view(shape), ctx.bias_per_group), None, None, None)


def _flat(parameter: Tensor, groups: int) -> Tensor:
    """A ``(C,)`` or per-group ``(G, C)`` affine parameter as the grouped view's ``(G*C,)``."""
    if parameter.dim() == 2:
        return parameter.reshape(-1)
    # expand + reshape (one copy) costs a quarter of .repeat, which runs arange, cat and unfold.
    return parameter if groups == 1 else parameter.expand(groups, -1).reshape(-1)


def _group_sum(grad: Tensor, per_group: bool) -> Tensor:
    """The gradient of a ``(C,)`` parameter (``(G, C)`` if ``per_group``) from that of its per-group copies, ``(G, C)``."""
    if per_group:
        return grad
    return grad.view(-1) if grad.shape[0] == 1 else grad.sum(0)


def _batch_norm_backward(grad_out: Tensor, x: Tensor, mean: Tensor, var: Tensor, weight: Tensor, ctx,
                         training: bool) -> tuple[Tensor | None, Tensor, Tensor, Tensor]:
    """``(dx, sum(dy * x_hat), sum(dy), invstd)`` of batch norm with the given statistics, ``dx`` in ``x``'s
    shape; ``invstd = rsqrt(var + eps)``, which the caller may need too.

    ``training``: ``dx = weight * invstd * (dy - mean(dy) - x_hat * mean(dy * x_hat))``, the gradient
    when ``mean`` and ``var`` are ``x``'s own statistics; else ``dx = weight * invstd * dy``, for fixed
    statistics. PyTorch's fused kernel, or under ``create_graph=True`` the same as tensor ops.
    """
    grouped = _grouped(x, ctx.groups)
    grad_grouped = _grouped(grad_out, ctx.groups).contiguous(memory_format=_memory_format(grouped))
    needs_grad_x = ctx.needs_input_grad[0]
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
              eps: float, observed: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """``weight * (x - mean) / sqrt(var + eps) + bias`` with per-group ``(G, C)`` statistics.

    ``weight`` and ``bias`` are ``(C,)`` or per group ``(G, C)``. ``observed``: ``x``'s own statistics
    (group_stats), when ``mean`` and ``var`` are estimated from them (BKN): the same gradient, through
    BN's backward kernel (see _Normalize).
    """
    weight, bias = _affine(weight, bias, mean)
    if observed is not None and (observed[0] is mean or observed[1] is var):
        # The estimate is the observation (no prior). torch.compile cannot trace one tensor passed
        # as two inputs of an autograd.Function; views of it are distinct tensors.
        observed = tuple(o.view(o.shape) for o in observed)
    y = _Normalize.apply(x, mean, var, *(observed or (None, None)), weight, bias, eps, mean.shape[0])
    if mean.shape[0] == 1:
        return y
    # channels_last input with several groups took a copy in _grouped; hand back x's layout
    return y.contiguous(memory_format=_memory_format(x))


def batch_norm(x: Tensor, statistics_batch_size: int | None, weight: Tensor | None, bias: Tensor | None,
               eps: float, statistics: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """BN with statistics groups: ``(y, mean, var)``, the statistics ``(G, C)`` and without a gradient.

    The same numbers as ``normalize(x, *group_stats(x, s), weight, bias, eps)``, with the backward
    of ``torch.nn.BatchNorm2d`` (one fused kernel). ``weight`` and ``bias`` are ``(C,)`` or per group
    ``(G, C)`` (BRN folds its r and d in there); ``statistics``: ``x``'s own ``(G, C)`` statistics,
    if the caller has them already.
    """
    groups = num_groups(x.shape[0], statistics_batch_size)
    weight, bias = _affine(weight, bias, x.new_empty((1, x.shape[1]), dtype=statistics_dtype(x.dtype)))
    y, mean, var = _BatchNorm.apply(x, weight, bias, eps, groups, statistics)
    if groups > 1:  # channels_last input with several groups took a copy in _grouped; hand back x's layout
        y = y.contiguous(memory_format=_memory_format(x))
    return y, mean, var


def _affine(weight: Tensor | None, bias: Tensor | None, like: Tensor) -> tuple[Tensor, Tensor]:
    """Affine parameters in the dtype of the ``(G, C)`` statistics ``like``; None: ones and zeros."""
    channels = like.shape[1]
    weight = like.new_ones(channels) if weight is None else cast(weight, like.dtype)
    bias = like.new_zeros(channels) if bias is None else cast(bias, like.dtype)
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


# --- transitions: predict this layer's statistics from the previous layer's posterior ---------
# They compute in the dtype of the statistics; callers under autocast switch it off around them.

def linear_transition(mean: Tensor, var: Tensor, matrix: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
    """Paper Eq. 2-3 with diagonal variances: ``A mu``, ``(A o A) var + r``."""
    return mean @ matrix.t(), var @ (matrix * matrix).t() + noise


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
