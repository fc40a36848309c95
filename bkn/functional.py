"""Pure tensor maths shared by every normalizer: statistics groups, the Kalman update,
normalization with given statistics, and BKN's three transitions.

Shapes: activations are ``(N, C, *spatial)``; statistics are ``(G, C)`` with ``G`` the number
of statistics groups. Group ``g`` holds the contiguous examples ``g*s .. g*s+s-1`` of the device
batch, as the authors' code splits it. Statistics are float32 (float64 for float64 input), also
under autocast.
"""

from __future__ import annotations

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
    """View ``(N, C, *spatial)`` as ``(G, N/G, C, L)`` without a copy (also for channels_last)."""
    n, c = x.shape[:2]
    return x.reshape(groups, n // groups, c, -1)


def group_stats(x: Tensor, statistics_batch_size: int | None) -> tuple[Tensor, Tensor]:
    """Biased mean and variance of each channel in each statistics group, shape ``(G, C)`` each.

    Computed in float32 in one vectorized pass (``var_mean`` is numerically stable for large
    activations, unlike ``E[x^2] - E[x]^2``).
    """
    groups = num_groups(x.shape[0], statistics_batch_size)
    with torch.autocast(x.device.type, enabled=False):
        var, mean = torch.var_mean(_grouped(_at_least_float32(x), groups), dim=(1, 3), correction=0)
    return mean, var


def _at_least_float32(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def normalize(x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None,
              eps: float) -> Tensor:
    """``weight * (x - mean) / sqrt(var + eps) + bias`` with per-group ``(G, C)`` statistics.

    ``weight`` and ``bias`` are ``(C,)`` or per group ``(G, C)`` (BRN folds its r and d in there).
    Everything is folded into one scale and one shift per (group, channel), so the full-size work
    is a single fused multiply-add whose backward keeps only ``x`` and the scale.
    """
    groups, channels = mean.shape
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight.to(scale.dtype)
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.to(shift.dtype)
    y = torch.addcmul(shift.to(x.dtype).view(groups, 1, channels, 1), _grouped(x, groups),
                      scale.to(x.dtype).view(groups, 1, channels, 1))
    return y.reshape(x.shape)  # a view, in x's memory format


def kalman_update(obs_mean: Tensor, obs_var: Tensor, prior_mean: Tensor, prior_var: Tensor,
                  gain: Tensor | float) -> tuple[Tensor, Tensor]:
    """The BKN update (paper Eq. 4-5 with its appendix): a mixture of prediction and observation.

    Written as ``(1-q) prior + q obs`` rather than ``prior + q (obs - prior)``: the two are equal,
    but only this form gives *exactly* the observation (so exactly BN) at ``q = 1``.
    """
    mean = (1 - gain) * prior_mean + gain * obs_mean
    var = (1 - gain) * prior_var + gain * obs_var + gain * (1 - gain) * (obs_mean - prior_mean) ** 2
    return mean, var


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
