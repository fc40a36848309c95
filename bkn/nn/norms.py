"""BN, BRN and BKN layers with statistics groups, GroupNorm beside them, and ``build_norm``, the
factory models use.

Every BN, BRN and BKN layer splits the device batch into groups of ``statistics_batch_size`` examples
(None: one group, ordinary BN) and gets its statistics from :func:`bkn.functional.group_stats`.
In eval mode a layer normalizes with its running ("population") statistics — the paper's
inference option B — or, with ``inference="batch"``, with the test batch's own per-group
statistics — option A.
"""

from __future__ import annotations

import importlib
import inspect
import math
from typing import Any, Literal

import torch
from torch import Tensor, nn

from bkn import functional as BF
from bkn.nn.context import ALONE, Alone, forward_in_context
from bkn.nn.state import KalmanState, State

Inference = Literal["population", "batch"]
Transition = Literal["linear", "monte_carlo", "analytic"]
StateFrom = Literal["output", "input"]

LARGE_GROUP = 32  # statistics groups from this size up get the authors' large-batch gain
GAIN_WARMUP = 100  # optimizer steps (set_step), else training batches, over which BKN's gain falls from 1 (BN) to q


class _GroupedNorm(nn.Module):
    """What all three normalizers share: affine parameters, running statistics, input checks."""

    carries_state = False  # True for layers whose forward takes and returns a KalmanState
    spatial_dims: tuple[int, ...] = (2,)
    # Set by pool_statistics where a statistics group spans several devices: how many, and their
    # process group. Plain attributes, not state: a checkpoint does not depend on the launch.
    statistics_devices: int = 1
    statistics_process_group: Any = None
    pools_across_devices = True  # False for a layer whose statistics cannot be pooled (CBN's window)

    def __init__(self, num_features: int, statistics_batch_size: int | None = None, eps: float = 1e-5,
                 momentum: float = 0.1, affine: bool = True, track_running_stats: bool = True,
                 inference: Inference = "population") -> None:
        super().__init__()
        if statistics_batch_size is not None and statistics_batch_size < 1:
            raise ValueError(f"statistics_batch_size must be a positive integer or None, got {statistics_batch_size}")
        self.num_features = num_features
        self.statistics_batch_size = statistics_batch_size
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.inference = inference
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features))
            self.bias = nn.Parameter(torch.empty(num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features))
            self.register_buffer("running_var", torch.ones(num_features))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    @property
    def inference(self) -> Inference:
        return self._inference

    @inference.setter
    def inference(self, value: Inference) -> None:
        if value not in ("population", "batch"):
            raise ValueError(f"inference must be 'population' (option B) or 'batch' (option A), got {value!r}")
        self._inference = value

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, statistics_batch_size={self.statistics_batch_size}, eps={self.eps}, "
                f"momentum={self.momentum}, affine={self.affine}, "
                f"track_running_stats={self.track_running_stats}, inference={self.inference!r}")

    def _check_input(self, x: Tensor) -> None:
        if x.dim() - 2 not in self.spatial_dims:
            raise ValueError(f"{type(self).__name__} expects {[d + 2 for d in self.spatial_dims]}-D input "
                             f"(N, C, ...), got shape {tuple(x.shape)}")
        if x.shape[1] != self.num_features:
            raise ValueError(f"{type(self).__name__} was built for {self.num_features} channels (num_features) "
                             f"but got input with {x.shape[1]} channels")
        if self._uses_batch_statistics():  # population statistics take any batch, as torch's BN does
            self._groups(x)  # raises with the fix named

    def _pools(self, x: Tensor) -> bool:
        """Whether this forward's statistics group spans several devices (in training only: evaluation
        runs on one device, whose batches hold whole groups)."""
        return (self.training and self.statistics_devices > 1 and self.statistics_batch_size is not None
                and x.shape[0] < self.statistics_batch_size)

    def _groups(self, x: Tensor) -> int:
        """Statistics groups in this batch: 1 where the group is pooled over devices."""
        if not self._pools(x):
            return BF.num_groups(x.shape[0], self.statistics_batch_size)
        if x.shape[0] * self.statistics_devices != self.statistics_batch_size:
            raise ValueError(f"statistics_batch_size={self.statistics_batch_size} is pooled over "
                             f"{self.statistics_devices} devices, so each must hold "
                             f"{self.statistics_batch_size // self.statistics_devices} examples, got {x.shape[0]}")
        return 1

    def _uses_batch_statistics(self) -> bool:
        return self.training or self.inference == "batch" or not self.track_running_stats

    def _update_running_stats(self, mean: Tensor, var: Tensor, x: Tensor) -> None:
        """EMA of the groups' average statistics, ``(G, C)`` and without a gradient; variance made
        unbiased, as PyTorch's BN does."""
        if not (self.training and self.track_running_stats):
            return
        groups = mean.shape[0]
        count = x.numel() // (x.shape[1] * groups)  # values per channel per group
        if self._pools(x):
            count *= self.statistics_devices
        mean, var = (s[0] if groups == 1 else s.mean(0) for s in (mean, var))
        self.running_mean.lerp_(BF.cast(mean, self.running_mean.dtype), self.momentum)
        self.running_var.lerp_(BF.cast(var * (count / max(count - 1, 1)), self.running_var.dtype), self.momentum)
        self.num_batches_tracked.add_(1)

    def _batch_norm(self, x: Tensor) -> Tensor:
        """BN with each statistics group's own statistics (pooled over devices where it spans several),
        the running statistics updated in training."""
        if self._pools(x):
            mean, var = BF.pooled_stats(x, self.statistics_process_group, self.statistics_devices)
            self._update_running_stats(mean.detach(), var.detach(), x)
            return BF.normalize(x, mean, var, self.weight, self.bias, self.eps)
        y, mean, var = BF.batch_norm(x, self.statistics_batch_size, self.weight, self.bias, self.eps)
        self._update_running_stats(mean, var, x)
        return y

    def _normalize_with_running_stats(self, x: Tensor) -> Tensor:
        """One group: each example is normalized on its own, whatever the batch size."""
        dtype = BF.statistics_dtype(x.dtype)
        return BF.normalize(x, BF.cast(self.running_mean[None], dtype), BF.cast(self.running_var[None], dtype),
                            self.weight, self.bias, self.eps)


class BatchNorm2d(_GroupedNorm):
    """BN whose statistics come from groups of ``statistics_batch_size`` examples ("ghost batches")."""

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        if not self._uses_batch_statistics():
            return self._normalize_with_running_stats(x)
        return self._batch_norm(x)


class BatchRenorm2d(_GroupedNorm):
    """Batch Renormalization (Ioffe 2017) with statistics groups.

    ``y = weight * ((x - mean) / std * r + d) + bias``, with ``r`` and ``d`` (no gradient)
    correcting each group's statistics toward the running ones, clipped to ``[1/r_max, r_max]`` and
    ``[-d_max, d_max]``. The limits follow the step set by :func:`set_step`: plain BN
    (``r_max = 1``, ``d_max = 0``) for ``warmup_steps``, then linear growth to the final values
    over ``relax_steps``.
    """

    def __init__(self, num_features: int, statistics_batch_size: int | None = None, *,
                 r_max: float = 3.0, d_max: float = 5.0, warmup_steps: int = 5000,
                 relax_steps: int = 40000, **kwargs: Any) -> None:
        super().__init__(num_features, statistics_batch_size, **kwargs)
        if r_max < 1 or d_max < 0:
            raise ValueError(f"BatchRenorm2d needs r_max >= 1 and d_max >= 0, got r_max={r_max}, d_max={d_max}")
        self.final_r_max, self.final_d_max = r_max, d_max
        self.warmup_steps, self.relax_steps = warmup_steps, relax_steps
        # Tensors, not floats, so that a changing limit does not recompile a torch.compile'd model.
        self.register_buffer("r_max", torch.tensor(1.0), persistent=False)
        self.register_buffer("r_min", torch.tensor(1.0), persistent=False)  # 1 / r_max, set with it
        self.register_buffer("d_max", torch.tensor(0.0), persistent=False)
        self.register_buffer("d_min", torch.tensor(0.0), persistent=False)  # -d_max
        self.relax_progress = 0.0  # of the limits in the buffers: set_step fills them when it changes

    def set_step(self, step: int) -> None:
        """Set the clipping limits for optimizer step ``step``."""
        progress = min(max(step - self.warmup_steps, 0) / max(self.relax_steps, 1), 1.0)
        if progress != self.relax_progress:  # four ops a layer, only while the limits move
            self.relax_progress = progress
            r_max, d_max = 1 + (self.final_r_max - 1) * progress, self.final_d_max * progress
            self.r_max.fill_(r_max), self.r_min.fill_(1 / r_max)
            self.d_max.fill_(d_max), self.d_min.fill_(-d_max)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", r_max={self.final_r_max}, d_max={self.final_d_max}, "
                f"warmup_steps={self.warmup_steps}, relax_steps={self.relax_steps}")

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        if not self._uses_batch_statistics():
            return self._normalize_with_running_stats(x)
        if not (self.training and self.track_running_stats):  # option A: plain batch statistics
            return self._batch_norm(x)
        pooled = self._pools(x)
        if pooled:  # the statistics with their gradient; r and d from them without
            statistics = BF.pooled_stats(x, self.statistics_process_group, self.statistics_devices)
            mean, var = (s.detach() for s in statistics)
        else:
            with torch.no_grad():
                mean, var = BF.group_stats(x, self.statistics_batch_size)
        with torch.no_grad():  # r and d are constants for the gradient
            running_mean, running_var = (read_before_update(s) for s in (self.running_mean, self.running_var))
            running_invstd = torch.rsqrt(BF.cast(running_var, var.dtype) + self.eps)
            r = torch.sqrt(var + self.eps).mul_(running_invstd).clamp_(self.r_min, self.r_max)
            d = (mean - BF.cast(running_mean, mean.dtype)).mul_(running_invstd).clamp_(self.d_min, self.d_max)
        self._update_running_stats(mean, var, x)
        # weight * (x_hat * r + d) + bias == BN with weight * r and bias + weight * d:
        # at r = 1, d = 0 the same numbers as BN, bit for bit.
        weight = r if self.weight is None else self.weight * r
        bias = d if self.weight is None else torch.addcmul(self.bias, self.weight, d)
        if pooled:
            return BF.normalize(x, *statistics, weight, bias, self.eps)
        return BF.batch_norm(x, self.statistics_batch_size, weight, bias, self.eps, statistics=(mean, var))[0]


class KalmanNorm2d(_GroupedNorm):
    """Batch Kalman Normalization: each group's statistics are a Kalman estimate that fuses this
    layer's observation with a prediction from the previous normalization layer's estimate.

    ``forward(x, prior)`` takes the prediction (``None`` for a first layer: then it is BN) and
    returns ``(y, posterior)``; :meth:`predict` turns the previous layer's posterior into this
    layer's prior through the chosen ``transition``:

    - ``"linear"`` (default): the paper — learned ``A`` (``num_features x in_features``) and noise ``r``.
    - ``"analytic"``: closed-form moments of relu(Gaussian) pushed through the real conv.
    - ``"monte_carlo"``: the authors' code — sample, relu, the real conv, moments.

    The default is the one the CPU study (results/study/README.md) supports at one example per group.

    ``gain`` is ``q``, the weight of the observation; ``q = 1`` is exactly BN. ``None`` (default) is the
    authors' rule by statistics group size: ``q = 0.1`` for groups of fewer than 32 examples, 0.95 from
    32 (their code weights the prior with ``p = 1 - q``: 0.9 for micro-batches, 0.05 for large ones).
    ``gain_warmup`` starts the layer as BN, as BRN starts as BN: over its first ``gain_warmup``
    training batches (counted by ``num_batches_tracked``, or optimizer steps once the training loop
    calls :func:`set_step`, as train.py does) the gain falls linearly from 1 to ``q``, so
    the prior gets its weight once the network's scale has settled (docs/normalizers.md, "Why the
    linear transition died"). 0 switches it off; without running statistics there is no count and
    no warm-up. With
    ``fallback``, a group whose predicted variance is ``fallback_ratio`` times its observed one on
    average falls back to its observation, as in the authors' code.

    ``state_from`` says what the returned state describes, i.e. what the next layer predicts from:
    ``"output"`` (default), the statistics of this layer's output ``weight * x_hat + bias`` — what
    the next conv really sees — or ``"input"``, its estimate of its input's statistics, as the
    authors' code passes on. In a residual network the input's variance grows with depth while the
    next conv sees normalized activations, so ``"input"`` predicts variances 10-200x too large in
    the deep layers of the pre-activation ResNet-32 (results/study/README.md).

    ``propagate=False`` (linear transition only) is an ablation: the prior no longer depends on the
    previous layer — mean 0 and the learned variance ``r`` — so BKN only shrinks each group's
    statistics toward a learned prior.
    """

    carries_state = True

    def __init__(self, num_features: int, statistics_batch_size: int | None = None, *,
                 in_features: int | None = None, transition: Transition = "linear", gain: float | None = None,
                 gain_warmup: int = GAIN_WARMUP, learn_gain: bool = False, fallback: bool = True,
                 fallback_ratio: float = 100.0, monte_carlo_size: int = 8, state_from: StateFrom = "output",
                 propagate: bool = True, **kwargs: Any) -> None:
        if transition not in ("linear", "monte_carlo", "analytic"):
            raise ValueError(f"transition must be 'linear', 'monte_carlo' or 'analytic', got {transition!r}")
        if state_from not in ("output", "input"):
            raise ValueError(f"state_from must be 'output' or 'input' (the authors' code), got {state_from!r}")
        if not propagate and transition != "linear":
            raise ValueError("propagate=false is an ablation of the linear transition; use transition=linear")
        gain = default_gain(statistics_batch_size) if gain is None else gain
        if not 0.0 <= gain <= 1.0 or (learn_gain and gain in (0.0, 1.0)):
            raise ValueError(f"gain must lie in [0, 1] (in (0, 1) with learn_gain=true), got {gain}")
        if gain_warmup < 0:
            raise ValueError(f"gain_warmup must be >= 0 training batches (0: no warm-up), got {gain_warmup}")
        if monte_carlo_size < 1:
            raise ValueError(f"monte_carlo_size must be >= 1, got {monte_carlo_size}")
        super().__init__(num_features, statistics_batch_size, **kwargs)
        self.in_features, self.transition = in_features, transition
        self.initial_gain, self.learn_gain, self.gain_warmup = gain, learn_gain, gain_warmup
        self.fallback, self.fallback_ratio = fallback, fallback_ratio
        self.monte_carlo_size = monte_carlo_size
        self.state_from, self.propagate = state_from, propagate
        if learn_gain:
            self.gain_logit = nn.Parameter(torch.empty(()))
        else:  # a hyper-parameter, not state: not saved, so a config change is not overridden
            self.register_buffer("gain", torch.empty(()), persistent=False)
        # The warm-up's progress at the training loop's optimizer step (set_step), once it is set; a
        # buffer, so the gain stays a tensor expression (no recompilation under torch.compile) while the
        # warm-up runs. warmup_done (a Python flag) skips it after: one recompilation, no ops a step.
        self.register_buffer("warmup_progress", torch.zeros(()), persistent=False)
        self.steps_from_loop = self.warmup_done = False
        self.warmup_progress_value = 0.0
        if transition == "linear" and in_features is not None:
            if propagate:
                self.transition_matrix = nn.Parameter(torch.empty(num_features, in_features))
            self.noise_raw = nn.Parameter(torch.empty(()))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if not hasattr(self, "transition"):  # called from the base constructor, before the filter exists
            return
        with torch.no_grad():
            if self.learn_gain:
                self.gain_logit.fill_(math.log(self.initial_gain / (1 - self.initial_gain)))
            else:
                self.gain.fill_(self.initial_gain)
            if hasattr(self, "noise_raw"):
                # A = 0 and r = 1: the first prediction is a standard normal, and the filter
                # learns how much of the previous layer to carry over.
                if self.propagate:
                    self.transition_matrix.zero_()
                self.noise_raw.fill_(math.log(math.e - 1))  # softplus(noise_raw) = 1

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", in_features={self.in_features}, transition={self.transition!r}, "
                f"gain={self.initial_gain}, gain_warmup={self.gain_warmup}, learn_gain={self.learn_gain}, "
                f"fallback={self.fallback}, "
                f"state_from={self.state_from!r}" + ("" if self.propagate else ", propagate=False"))

    def set_step(self, step: int) -> None:
        """Count the gain warm-up in optimizer steps from now on. train.py calls it before every step,
        so gradient accumulation and DDP follow the same schedule; without it the layer counts its
        own training batches."""
        progress = min(step / self.gain_warmup, 1.0) if self.gain_warmup else 1.0
        if not self.steps_from_loop or progress != self.warmup_progress_value:  # one op a layer, only while it moves
            self.warmup_progress.fill_(progress)
            self.warmup_progress_value = progress
        self.steps_from_loop, self.warmup_done = True, progress == 1.0

    def current_gain(self) -> Tensor:
        """The gain of this forward pass: ``q``, or during the warm-up between 1 and ``q`` (also in eval
        mode with option A, which runs the filter as training at the same point would)."""
        gain = torch.sigmoid(self.gain_logit) if self.learn_gain else self.gain
        if not self.gain_warmup or self.warmup_done or (self.num_batches_tracked is None and not self.steps_from_loop):
            return gain
        if self.steps_from_loop:
            progress = self.warmup_progress
        else:  # the layer's own count, raised later in this forward (_update_running_stats): read_before_update
            progress = (read_before_update(self.num_batches_tracked) / self.gain_warmup).clamp_(max=1.0)
        # A tensor expression of the count, not a Python branch on it: no host sync. 1 - (1 - q) progress.
        return (gain - 1).mul_(progress).add_(1)

    def predict(self, previous: State, conv: nn.Conv2d | None = None) -> State:
        """This layer's prior from the previous layer's posterior, through ``conv`` (None: identity)."""
        if previous is None or (conv is None and self.transition != "linear"):
            return previous
        if self.transition == "linear" and not hasattr(self, "noise_raw"):
            raise ValueError("KalmanNorm2d(transition='linear') needs in_features, the previous layer's channels")
        with BF.without_autocast(previous.mean.device.type):  # statistics stay float32
            dtype = previous.mean.dtype  # A and r in the statistics' dtype, as the other transitions cast W
            if not self.propagate:
                shape = (previous.mean.shape[0], self.num_features)
                mean = previous.mean.new_zeros(shape)
                var = nn.functional.softplus(self.noise_raw).to(dtype).expand(shape)
            elif self.transition == "linear":
                mean, var = BF.linear_transition(previous.mean, previous.var, self.transition_matrix.to(dtype),
                                                 nn.functional.softplus(self.noise_raw).to(dtype))
            elif self.transition == "analytic":
                mean, var = BF.analytic_transition(previous.mean, previous.var, conv)
            else:
                mean, var = BF.monte_carlo_transition(previous.mean, previous.var, conv, self.monte_carlo_size)
        return KalmanState(mean, var)

    def forward(self, x: Tensor, prior: State | Alone = ALONE) -> tuple[Tensor, State] | Tensor:
        if prior is ALONE:  # layer(x), in a converted model: the prior comes from its context; returns y alone
            return forward_in_context(self, x)
        self._check_input(x)
        if not self._uses_batch_statistics():
            return self._normalize_with_running_stats(x), None
        self._check_prior(x, prior)
        if self._pools(x):
            return self._forward_pooled(x, prior)
        y, state_mean, state_var, mean, var = BF.kalman_normalize(
            x, *(prior or (None, None)), None if prior is None else self.current_gain(), self.weight, self.bias,
            self.eps, self.statistics_batch_size, self.fallback_ratio if self.fallback else None,
            state_from_output=self.state_from == "output")
        self._update_running_stats(mean, var, x)
        return y, KalmanState(state_mean, state_var)

    def _forward_pooled(self, x: Tensor, prior: State) -> tuple[Tensor, State]:
        """The same step as autograd ops, for a statistics group that spans several devices."""
        observation = BF.pooled_stats(x, self.statistics_process_group, self.statistics_devices)
        gain = None if prior is None else self.current_gain()
        estimate = BF.kalman_estimate(*observation, *(prior or (None, None)), gain,
                                      self.fallback_ratio if self.fallback else None, self.eps)
        self._update_running_stats(*(s.detach() for s in estimate), x)
        y = BF.normalize(x, *estimate, self.weight, self.bias, self.eps)
        if self.state_from == "input":
            return y, KalmanState(*estimate)
        return y, KalmanState(*BF.normalized_moments(*observation, *estimate, self.weight, self.bias, self.eps))

    def _check_prior(self, x: Tensor, prior: State) -> None:
        shape = (self._groups(x), self.num_features)
        if prior is not None and (prior.mean.shape != shape or prior.var.shape != shape):
            raise ValueError(f"KalmanNorm2d got a prior of shape {tuple(prior.mean.shape)} but its statistics "
                             f"are (groups, channels) = {shape}; the previous layer must use the "
                             f"same statistics_batch_size and feed {self.num_features} channels")

    def filter(self, x: Tensor, prior: State = None) -> tuple[KalmanState, KalmanState]:
        """``(observation, estimate)``: each group's observed statistics of ``x`` and the Kalman
        estimate the layer normalizes with (the observation itself without a ``prior``)."""
        self._check_prior(x, prior)
        observation = BF.group_stats(x, self.statistics_batch_size)
        if prior is None:
            return KalmanState(*observation), KalmanState(*observation)
        estimate = BF.kalman_estimate(*observation, prior.mean, prior.var, self.current_gain(),
                                      self.fallback_ratio if self.fallback else None, self.eps)
        return KalmanState(*observation), KalmanState(*estimate)


class BatchNorm1d(BatchNorm2d):
    """:class:`BatchNorm2d` for ``(N, C)`` or ``(N, C, L)`` input."""

    spatial_dims = (0, 1)


class BatchNorm3d(BatchNorm2d):
    """:class:`BatchNorm2d` for ``(N, C, D, H, W)`` input."""

    spatial_dims = (3,)


class BatchRenorm1d(BatchRenorm2d):
    """:class:`BatchRenorm2d` for ``(N, C)`` or ``(N, C, L)`` input."""

    spatial_dims = (0, 1)


class BatchRenorm3d(BatchRenorm2d):
    """:class:`BatchRenorm2d` for ``(N, C, D, H, W)`` input."""

    spatial_dims = (3,)


class GroupNorm2d(nn.Module):
    """GroupNorm (Wu & He 2018) through PyTorch's own kernel, with the interface of the layers above.

    Its statistics are per example (over channel groups and positions), so ``statistics_batch_size``
    is accepted and ignored, and training, option A and option B compute the same thing. The
    state_dict is ``torch.nn.GroupNorm``'s (``weight``, ``bias``). A layer whose channels
    ``num_groups`` does not divide uses the largest divisor of its channels up to ``num_groups``
    (16 channels with ``num_groups=32``: 16 groups; 48 channels: 24), so every model takes it.
    """

    carries_state = False

    def __init__(self, num_features: int, statistics_batch_size: int | None = None, *, num_groups: int = 32,
                 eps: float = 1e-5, affine: bool = True) -> None:
        super().__init__()
        if num_groups < 1:
            raise ValueError(f"GroupNorm2d needs num_groups >= 1, got {num_groups}")
        self.num_features = num_features
        self.statistics_batch_size = statistics_batch_size  # kept for the same interface; unused
        self.num_groups = max(g for g in range(1, min(num_groups, num_features) + 1) if num_features % g == 0)
        self.eps, self.affine = eps, affine
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def extra_repr(self) -> str:
        return f"{self.num_features}, num_groups={self.num_groups}, eps={self.eps}, affine={self.affine}"

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.num_features:
            raise ValueError(f"GroupNorm2d was built for (N, {self.num_features}, H, W) input, got shape {tuple(x.shape)}")
        return nn.functional.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


def read_before_update(buffer: Tensor) -> Tensor:
    """``buffer`` for a value the backward needs, read in a forward that later updates the buffer in
    place (running statistics, the batch count). torch.compile's partitioner (torch 2.14) may
    recompute such a value in the backward from the buffer, after the update: wrong gradients
    (pytorch/pytorch#197039). It never recomputes an op it does not know, so compiled, the read goes
    through one (a copy) and the backward gets the value from before the update. Eager: the buffer."""
    return _snapshot(buffer) if torch.compiler.is_compiling() else buffer


@torch.library.custom_op("bkn::snapshot", mutates_args=())
def _snapshot(buffer: Tensor) -> Tensor:
    """A copy of ``buffer`` that the partitioner saves for the backward (see read_before_update)."""
    return buffer.clone()


@_snapshot.register_fake
def _(buffer: Tensor) -> Tensor:
    return torch.empty_like(buffer)


def default_gain(statistics_batch_size: int | None) -> float:
    """The authors' gain by statistics group size: 0.1 below 32 examples a group, 0.95 from 32 (and
    for one group of the whole batch, ``None``)."""
    if statistics_batch_size is not None and statistics_batch_size < LARGE_GROUP:
        return 0.1
    return 0.95


# CBN (bkn.nn.cross_iteration) adds itself when bkn.nn is imported, FRN and EvoNorm-S0 (timm's
# layers, bkn.nn.norm_act) when one is first built: their modules build on this one, and importing
# timm takes seconds that only the runs which use it should pay.
NORMALIZERS: dict[str, type[nn.Module]] = {"bn": BatchNorm2d, "brn": BatchRenorm2d, "bkn": KalmanNorm2d,
                                           "gn": GroupNorm2d}
TIMM_NORMALIZERS = ("frn", "evonorm_s0")


def build_norm(name: str, num_features: int, in_features: int | None = None, relu_follows: bool = True,
               **options: Any) -> nn.Module:
    """Build a 2-D normalizer by name (``bn``, ``brn``, ``bkn``, ``gn``, ``frn``, ``evonorm_s0``,
    ``cbn``); unknown names or options raise.

    ``in_features`` (the channels entering the conv before this layer) is used by BKN's linear
    transition and ignored by the others, so models can pass it unconditionally. ``relu_follows``
    says whether the network applies a ReLU to this layer's output: a layer that includes its own
    activation (FRN + TLU, EvoNorm-S0) is then built with it, in the ReLU's place
    (:func:`bkn.nn.activation_after`), and otherwise without; the other layers ignore it.
    """
    if name in TIMM_NORMALIZERS and name not in NORMALIZERS:
        importlib.import_module("bkn.nn.norm_act")  # registers them
    if name not in NORMALIZERS:
        raise ValueError(f"unknown normalizer {name!r}; choose one of {sorted({*NORMALIZERS, *TIMM_NORMALIZERS})} "
                         f"(normalizer=...)")
    cls = NORMALIZERS[name]
    own_classes = cls.__mro__[:cls.__mro__.index(nn.Module)]  # not nn.Module's or object's (*args, **kwargs)
    accepted = {option for c in own_classes if "__init__" in vars(c)
                for option, parameter in inspect.signature(c.__init__).parameters.items()
                if parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)} - {"self", "num_features"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(f"normalizer {name!r} has no option {unknown[0]!r}; its options are {sorted(accepted)}")
    if cls.carries_state:
        options["in_features"] = in_features
    if getattr(cls, "fuses_activation", False):
        options.setdefault("apply_act", relu_follows)
    return cls(num_features, **options)


def set_step(model: nn.Module, step: int) -> None:
    """Tell every step-scheduled layer the current optimizer step: BRN's r_max / d_max and BKN's
    gain warm-up."""
    for module in model.modules():
        if isinstance(module, (BatchRenorm2d, KalmanNorm2d)):
            module.set_step(step)


def pool_statistics(model: nn.Module, devices: int) -> None:
    """Let every BN, BRN and BKN layer of ``model`` pool each statistics group over ``devices``
    consecutive processes of the default process group (ranks ``0..devices-1``, the next ``devices``,
    ...), for a ``statistics_batch_size`` of ``devices`` device batches. Every process must call it
    (creating process groups is collective); ``devices`` must divide the number of processes."""
    import torch.distributed as dist

    world, rank = dist.get_world_size(), dist.get_rank()
    if devices < 1 or world % devices:
        raise ValueError(f"statistics pooled over {devices} devices do not fit {world} processes; "
                         f"choose a number of devices that divides {world}")
    own_group = None
    for first in range(0, world, devices):
        ranks = list(range(first, first + devices))
        group = dist.new_group(ranks)  # every rank takes part in creating every group
        if rank in ranks:
            own_group = group
    layers = [module for module in model.modules() if isinstance(module, _GroupedNorm)]
    for layer in layers:
        if not layer.pools_across_devices:
            raise ValueError(f"{type(layer).__name__} cannot pool its statistics over devices; choose a "
                             f"statistics_batch_size that divides the device batch")
    for layer in layers:
        layer.statistics_devices, layer.statistics_process_group = devices, own_group


def set_inference(model: nn.Module, inference: Inference) -> None:
    """Choose eval-mode statistics for every normalizer: 'population' (option B) or 'batch' (option A)."""
    for module in model.modules():
        if isinstance(module, _GroupedNorm):
            module.inference = inference
