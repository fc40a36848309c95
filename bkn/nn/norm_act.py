"""Batch-independent normalizers that include their activation: FRN + TLU (Singh & Krishnan, CVPR
2020) and EvoNorm-S0 (Liu et al., NeurIPS 2020), as timm implements them.

Each is timm's own layer (``timm.layers.FilterResponseNormTlu2d``, ``timm.layers.EvoNorm2dS0``);
the subclasses here only give it the interface of our other normalizers (``statistics_batch_size``,
accepted and ignored: the statistics are per example) and, for EvoNorm-S0, the group count that
fits any width. Both replace a norm *and* the ReLU after it, as timm builds its own FRN / EvoNorm
networks: where a ReLU follows, the layer is built with its activation (``apply_act=True``) and the
network drops its ReLU (:func:`bkn.nn.activation_after`); where none follows (the last norm of a residual
branch, a projection shortcut) it is built without (``apply_act=False``): FRN without its TLU, and
for EvoNorm-S0 timm's affine-only layer (docs/normalizers.md).
"""

from __future__ import annotations

import warnings
from types import ModuleType
from typing import Any

from bkn.nn.norms import NORMALIZERS


def import_timm() -> ModuleType:
    """``import timm``, without the warning timm 1.0.22 raises on import (it uses
    ``torch.jit.interface``, deprecated in torch 2.14). Importing timm takes seconds, so this
    module is imported only when an FRN or EvoNorm-S0 layer is first built (bkn.nn.build_norm)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`torch.jit.interface` is deprecated", FutureWarning)
        import timm
    return timm


timm_layers = import_timm().layers


class FilterResponseNorm2d(timm_layers.FilterResponseNormTlu2d):
    """FRN + TLU: ``max(weight * x / sqrt(mean(x^2 over H, W) + eps) + bias, tau)`` per example and
    channel; without ``apply_act``, no ``tau``. timm's defaults (eps 1e-5, fixed)."""

    carries_state = False
    fuses_activation = True

    def __init__(self, num_features: int, statistics_batch_size: int | None = None, **timm_options: Any) -> None:
        super().__init__(num_features, **timm_options)  # apply_act, eps, rms
        self.num_features = num_features
        self.statistics_batch_size = statistics_batch_size  # kept for the same interface; unused


class EvoNorm2dS0(timm_layers.EvoNorm2dS0):
    """EvoNorm-S0: ``x * sigmoid(v * x) / group_std(x) * weight + bias`` per example, over ``groups``
    groups of channels; without ``apply_act`` timm's layer is ``x * weight + bias``. A width that
    ``groups`` does not divide gets the largest divisor of its channels up to ``groups`` (as
    :class:`~bkn.nn.GroupNorm2d`), so every model takes it."""

    carries_state = False
    fuses_activation = True

    def __init__(self, num_features: int, statistics_batch_size: int | None = None, *, groups: int = 32,
                 **timm_options: Any) -> None:
        if groups < 1:
            raise ValueError(f"EvoNorm2dS0 needs groups >= 1, got {groups}")
        fitting = max(g for g in range(1, min(groups, num_features) + 1) if num_features % g == 0)
        super().__init__(num_features, groups=fitting, **timm_options)  # group_size, apply_act, eps
        self.num_features = num_features
        self.statistics_batch_size = statistics_batch_size  # kept for the same interface; unused


NORMALIZERS.update({"frn": FilterResponseNorm2d, "evonorm_s0": EvoNorm2dS0})
