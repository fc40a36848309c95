"""Normalization layers with statistics groups (BN, BRN, BKN, CBN), GroupNorm, FRN and EvoNorm-S0,
their factory, ConvNormAct,
the Sequential that chains it, and the conversions: any model's BatchNorms to ours
(convert_batchnorm; with BKN, the context that passes its estimate along), and a trained model's
layers back to torch.nn.BatchNorm for deployment."""

from bkn.nn.blocks import ConvNormAct, NormSpec, Sequential, activation_after, apply_norm, norm_options
from bkn.nn.context import KalmanContext
from bkn.nn.convert import convert_batchnorm, to_torch_batchnorm
from bkn.nn.cross_iteration import CrossIterationNorm2d
from bkn.nn.norms import (
    NORMALIZERS,
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    GroupNorm2d,
    KalmanNorm2d,
    build_norm,
    pool_statistics,
    set_inference,
    set_step,
)
from bkn.nn.state import KalmanState, State, add_states, concat_states, pad_channels

__all__ = [
    "NORMALIZERS", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchRenorm1d", "BatchRenorm2d",
    "BatchRenorm3d", "ConvNormAct", "CrossIterationNorm2d", "EvoNorm2dS0", "FilterResponseNorm2d", "GroupNorm2d",
    "KalmanContext", "KalmanNorm2d", "KalmanState", "NormSpec", "Sequential", "State", "activation_after", "add_states",
    "apply_norm", "build_norm", "concat_states", "convert_batchnorm", "norm_options", "pad_channels", "pool_statistics",
    "set_inference", "set_step", "to_torch_batchnorm",
]


def __getattr__(name: str) -> type:
    """FRN and EvoNorm-S0 are imported on first use: their module imports timm, which takes seconds."""
    if name in ("FilterResponseNorm2d", "EvoNorm2dS0"):
        from bkn.nn import norm_act
        return getattr(norm_act, name)
    raise AttributeError(f"module 'bkn.nn' has no attribute {name!r}")
