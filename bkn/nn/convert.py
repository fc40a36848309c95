"""Deployment: a trained model's BN / BRN / BKN layers as PyTorch's own BatchNorm (and GN as
PyTorch's GroupNorm).

In eval mode with population statistics (option B) every one of our layers computes
``weight * (x - running_mean) / sqrt(running_var + eps) + bias``, per example: BRN's ``r`` and
``d`` and BKN's filter only act on batch statistics. That is exactly ``torch.nn.BatchNorm2d`` in
eval mode, so :func:`to_torch_batchnorm` can swap the layers, and any tool that knows
BatchNorm (ONNX export, TorchScript, quantization, conv-BN fusion) takes the result.
"""

from __future__ import annotations

import torch
from torch import nn

from bkn.nn.norms import GroupNorm2d, _GroupedNorm

TORCH_BATCHNORM: dict[tuple[int, ...], type[nn.modules.batchnorm._BatchNorm]] = {
    (0, 1): nn.BatchNorm1d, (2,): nn.BatchNorm2d, (3,): nn.BatchNorm3d}


def _converts(module: nn.Module) -> bool:
    """A layer that normalizes with its running statistics in eval mode (population inference).

    BKN layers built only to predict (no running statistics: the pre-activation ResNet's
    ``conv2_transition``) normalize nothing and stay; so do layers set to ``inference="batch"``.
    """
    return (isinstance(module, _GroupedNorm)  # BN, BRN, BKN and their 1d / 3d variants
            and module.track_running_stats and module.inference == "population")


def _torch_group_norm(layer: GroupNorm2d) -> nn.GroupNorm:
    """GN computes the same in train and eval mode: torch's GroupNorm with the same groups and weights."""
    group_norm = nn.GroupNorm(layer.num_groups, layer.num_features, eps=layer.eps, affine=layer.affine)
    if layer.affine:
        group_norm.load_state_dict(layer.state_dict())
        group_norm.to(layer.weight.device, layer.weight.dtype)
    return group_norm.train(layer.training)


def _torch_batchnorm(layer: _GroupedNorm) -> nn.modules.batchnorm._BatchNorm:
    running_mean = layer.running_mean
    batchnorm = TORCH_BATCHNORM[layer.spatial_dims](
        layer.num_features, eps=layer.eps, momentum=layer.momentum, affine=layer.affine,
        device=running_mean.device, dtype=running_mean.dtype)
    with torch.no_grad():
        batchnorm.running_mean.copy_(running_mean)
        batchnorm.running_var.copy_(layer.running_var)
        batchnorm.num_batches_tracked.copy_(layer.num_batches_tracked)
        if layer.affine:
            batchnorm.weight.copy_(layer.weight)
            batchnorm.bias.copy_(layer.bias)
    return batchnorm.train(layer.training)


def to_torch_batchnorm(model: nn.Module) -> nn.Module:
    """Replace, in place, every BN / BRN / BKN layer of ``model`` that uses population statistics
    by ``torch.nn.BatchNorm1d/2d/3d`` with its running statistics, affine parameters and eps, and
    every GN layer by ``torch.nn.GroupNorm``; returns ``model`` (or the replacement, if ``model``
    is such a layer itself).

    In eval mode the outputs are the same. The replacements carry no BKN estimate: the models of
    :mod:`bkn.models` and :class:`~bkn.nn.ConvNormAct` call every norm through
    :func:`~bkn.nn.apply_norm`, which passes no state to a torch norm, so they run unchanged; call
    sites of your own that pass a state to a BKN layer should do the same. (In train mode a
    torch BatchNorm normalizes with whole-batch statistics, not with statistics groups.)
    """
    if _converts(model):
        return _torch_batchnorm(model)
    if isinstance(model, GroupNorm2d):
        return _torch_group_norm(model)
    for parent in model.modules():
        for name, child in parent.named_children():
            if _converts(child):
                setattr(parent, name, _torch_batchnorm(child))
            elif isinstance(child, GroupNorm2d):
                setattr(parent, name, _torch_group_norm(child))
    return model
