"""Cross-Iteration Batch Normalization (CBN; Yao et al., CVPR 2021, arXiv 2002.05712) with
statistics groups.

At micro-batches CBN normalizes with statistics averaged over the current batch and the ``k - 1``
batches before it. The past statistics were measured with the conv weights of their iteration, so
each is first moved to the current weights by a first-order Taylor term, ``stat + rho *
d(stat)/dW * (W_now - W_then)``, where ``W`` is the weight of the conv that feeds the layer and
``d(stat)/dW`` was taken when the statistic was measured (the conv's weight gradient). Like the official layer
(Howal/Cross-iterationBatchNorm, ``mmdet/models/utils/CBN.py``) it keeps per channel the mean and
the second moment ``E[y^2]``, no gradient flows through past statistics, the running statistics
come from the current batch alone, and a burn-in of plain BN comes first. Where that code departs
from the paper we follow the paper (docs/normalizers.md): ``eps`` inside the square root, the
window of ``k`` iterations counting the current one, and ``nu = max(nu, mu^2)`` per entry with an
equal-weight average over the window (the official layer drops entries whose variance would be
negative).

Everything is per statistics group: group ``g`` of iteration ``t`` is compensated from the same
group ``g`` of the past iterations. The layer needs its conv: the bundled networks pass it
(:func:`bkn.nn.apply_norm`), a converted model links it (:func:`bkn.nn.convert_batchnorm`); a
layer with no conv before it (a pre-activation norm after a residual sum) is BN.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from bkn import functional as BF
from bkn.nn.norms import NORMALIZERS, _GroupedNorm


@dataclass(eq=False)
class FeedingConv:
    """The conv whose output a converted CBN layer normalizes (None: none fits). A plain object, not
    a module attribute, so the conv is not registered twice."""

    conv: nn.Conv2d | None


class CrossIterationNorm2d(_GroupedNorm):
    """CBN with statistics groups: ``forward(x, conv)``, where ``x = conv(input)``.

    ``window`` is the paper's ``k``, the iterations averaged including the current one (1: BN);
    ``burn_in`` the training batches of plain BN before the window starts to fill; ``rho`` scales
    the Taylor compensation (0: the past statistics as measured, 1: the paper's). The stored window
    (statistics, their weight gradients and the weights they were measured at) and the batch count
    are the layer's extra state in ``state_dict``, so a resumed run continues exactly.
    """

    pools_across_devices = False  # its window of past statistics is per device

    uses_conv = True

    def __init__(self, num_features: int, statistics_batch_size: int | None = None, *, window: int = 8,
                 burn_in: int = 100, rho: float = 1.0, **kwargs: Any) -> None:
        if window < 1:
            raise ValueError(f"CBN needs window >= 1 iterations (1: plain BN), got {window}")
        if burn_in < 0:
            raise ValueError(f"CBN needs burn_in >= 0 training batches, got {burn_in}")
        super().__init__(num_features, statistics_batch_size, **kwargs)
        self.window, self.burn_in, self.rho = window, burn_in, rho
        self.feeding_conv: FeedingConv | None = None  # set by convert_batchnorm
        self.training_batches = 0
        self.clear_window()

    def clear_window(self) -> None:
        """Forget the stored iterations (the window refills after the next training batch)."""
        self.past_statistics: Tensor | None = None  # (n, 2, G, C): mean and E[y^2] of each group
        self.past_gradients: Tensor | None = None  # (n, 2, G, C, C_in / groups, kh, kw): their d/dW
        self.past_weights: Tensor | None = None  # (n, C, C_in / groups, kh, kw)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", window={self.window}, burn_in={self.burn_in}, rho={self.rho}"

    def get_extra_state(self) -> dict[str, Any]:
        return {"training_batches": self.training_batches, "past_statistics": self.past_statistics,
                "past_gradients": self.past_gradients, "past_weights": self.past_weights}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.training_batches = state["training_batches"]
        device = next((t.device for t in (self.running_mean, self.weight) if t is not None), None)
        self.past_statistics, self.past_gradients, self.past_weights = (
            None if state[key] is None else state[key].to(device)
            for key in ("past_statistics", "past_gradients", "past_weights"))

    def compensated(self, weight: Tensor) -> Tensor:
        """The stored iterations' statistics moved to the conv weight ``weight`` by the Taylor term:
        ``(n, 2, G, C)``, mean and second moment; no gradient."""
        delta = (weight.detach().to(self.past_weights.dtype) - self.past_weights).flatten(2)  # (n, C, K)
        gradients = self.past_gradients.flatten(4)  # (n, 2, G, C, K)
        return self.past_statistics + self.rho * torch.einsum("nsgck,nck->nsgc", gradients, delta)

    def forward(self, x: Tensor, conv: nn.Conv2d | None = None) -> Tensor:
        self._check_input(x)
        if not self._uses_batch_statistics():
            return self._normalize_with_running_stats(x)
        if conv is None and self.feeding_conv is not None:
            conv = self.feeding_conv.conv
        in_window = (self.training and self.window > 1 and self.training_batches >= self.burn_in
                     and conv is not None and conv.weight.requires_grad and torch.is_grad_enabled())
        if self.training:
            self.training_batches += 1
        if not in_window:  # burn-in, option A, no conv: BN
            y, mean, var = BF.batch_norm(x, self.statistics_batch_size, self.weight, self.bias, self.eps)
            self._update_running_stats(mean, var, x)
            return y
        groups = BF.num_groups(x.shape[0], self.statistics_batch_size)
        with BF.without_autocast(x.device.type):
            # Example n is in group n % G (bkn.functional's strided groups): (N / G, G, C, H * W).
            grouped = BF.cast(x, BF.statistics_dtype(x.dtype)).reshape(x.shape[0] // groups, groups, x.shape[1], -1)
            var, mean = torch.var_mean(grouped, dim=(0, 3), correction=0)
            current = torch.stack([mean, var + mean * mean])  # (2, G, C)
            gradients = self._weight_gradients(current, x, conv.weight)
            stored = self._window_matches(current, conv.weight)
            entries = current[None] if not stored else torch.cat([current[None], self.compensated(conv.weight)])
            window_mean = entries[:, 0].mean(0)
            window_second = torch.maximum(entries[:, 1], entries[:, 0] * entries[:, 0]).mean(0)
            window_var = (window_second - window_mean * window_mean).clamp_min(0)
        self._update_running_stats(mean.detach(), var.detach(), x)
        self._store(current.detach(), gradients, conv.weight.detach(), stored)
        return BF.normalize(x, window_mean, window_var, self.weight, self.bias, self.eps)

    def _weight_gradients(self, current: Tensor, x: Tensor, weight: Tensor) -> Tensor:
        """``d(current[s, g, c]) / d(weight[c])`` for every statistic ``s`` (mean, second moment) and
        group ``g``, shape ``(2, G, C, C_in / groups, kh, kw)``.

        Where ``x`` is the output of a plain conv (its autograd node holds the conv's input), directly:
        ``d mean / dW = E_g[patch]`` and ``d E[y^2] / dW = 2 E_g[y * patch]`` are the conv's weight
        gradient for those output gradients, and one weight gradient of a conv with ``G`` weight groups
        (the statistics groups side by side on channels) gives every group's at once. Otherwise (a
        grouped or transposed conv, ops between the conv and the layer) one batched backward through
        the graph: ``2 G`` backwards of the whole batch, as many times the cost."""
        node = x.grad_fn
        if (type(node).__name__ == "ConvolutionBackward0" and node._saved_groups == 1 and not node._saved_transposed
                and all(isinstance(p, int) for p in node._saved_padding)):
            return self._plain_conv_weight_gradients(node, x, weight.shape)
        rows = current.shape[0] * current.shape[1]
        selectors = torch.eye(rows, dtype=current.dtype, device=current.device)
        selectors = selectors.view(rows, *current.shape[:2], 1).expand(rows, *current.shape)
        (gradients,) = torch.autograd.grad(current, weight, selectors, retain_graph=True, is_grads_batched=True)
        return gradients.view(*current.shape, *weight.shape[1:]).to(current.dtype)

    def _plain_conv_weight_gradients(self, node: Any, x: Tensor, weight_shape: torch.Size) -> Tensor:
        """:meth:`_weight_gradients` for a plain conv whose input ``node`` saved: example ``n`` of
        group ``g = n % G`` becomes channels ``g`` of a ``(N / G, G * C_in, H, W)`` input, and the two
        statistics' output gradients channels ``g`` of ``(N / G, G * 2C, H', W')``."""
        dtype = BF.statistics_dtype(x.dtype)
        conv_input = BF.cast(node._saved_input.detach(), dtype)
        groups = BF.num_groups(x.shape[0], self.statistics_batch_size)
        output = BF.cast(x.detach(), dtype).reshape(x.shape[0] // groups, groups, x.shape[1], *x.shape[2:])
        count = output.shape[0] * output[0, 0, 0].numel()  # values per channel per group
        output_gradients = torch.cat([torch.full_like(output, 1 / count), output * (2 / count)], dim=2)
        gradients = torch.nn.grad.conv2d_weight(
            conv_input.reshape(output.shape[0], groups * conv_input.shape[1], *conv_input.shape[2:]),
            (groups * 2 * weight_shape[0], *weight_shape[1:]), output_gradients.flatten(1, 2),
            stride=node._saved_stride, padding=node._saved_padding, dilation=node._saved_dilation, groups=groups)
        return gradients.view(groups, 2, *weight_shape).transpose(0, 1)

    def _window_matches(self, current: Tensor, weight: Tensor) -> bool:
        """Whether stored iterations exist for this batch's groups and this conv's weight shape (a
        different device batch, or another conv, starts the window over)."""
        return (self.past_statistics is not None and self.past_statistics.shape[1:] == current.shape
                and self.past_weights.shape[1:] == weight.shape)

    def _store(self, current: Tensor, gradients: Tensor, weight: Tensor, stored: bool) -> None:
        """Put this iteration first in the window; keep the ``window - 1`` latest."""
        new = (current, gradients.detach(), weight.to(current.dtype).clone())
        if stored:
            past = (self.past_statistics, self.past_gradients, self.past_weights)
            new = tuple(torch.cat([latest[None], older])[:self.window - 1] for latest, older in zip(new, past))
        else:
            new = tuple(latest[None] for latest in new)
        self.past_statistics, self.past_gradients, self.past_weights = new


NORMALIZERS["cbn"] = CrossIterationNorm2d
