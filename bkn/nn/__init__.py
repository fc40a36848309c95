"""Normalization layers with statistics groups (BN, BRN, BKN), their factory, ConvNormAct and the
Sequential that chains it."""

from bkn.nn.blocks import ConvNormAct, NormSpec, Sequential, apply_norm
from bkn.nn.norms import (
    NORMALIZERS,
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    KalmanNorm2d,
    build_norm,
    set_inference,
    set_step,
)
from bkn.nn.state import KalmanState, State, add_states, concat_states, pad_channels

__all__ = [
    "NORMALIZERS", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchRenorm1d", "BatchRenorm2d",
    "BatchRenorm3d", "ConvNormAct", "KalmanNorm2d", "KalmanState", "NormSpec", "Sequential", "State",
    "add_states", "apply_norm", "build_norm", "concat_states", "pad_channels", "set_inference", "set_step",
]
