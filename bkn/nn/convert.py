"""Conversion between PyTorch's BatchNorm and ours, in both directions.

:func:`convert_batchnorm` puts BN, BRN, GN or BKN into any model written for BatchNorm (a torchvision
or timm network, your own): every batch-norm layer becomes ours, with its affine parameters and
running statistics, under the same name. With BKN it also installs the per-forward context
(:mod:`bkn.nn.context`) that passes each layer's estimate to the next one the forward runs.

:func:`to_torch_batchnorm` goes back, for deployment. In eval mode with population statistics
(option B) every one of our layers computes ``weight * (x - running_mean) / sqrt(running_var +
eps) + bias``, per example: BRN's ``r`` and ``d`` and BKN's filter only act on batch statistics.
That is exactly ``torch.nn.BatchNorm2d`` in eval mode, so the layers can be swapped, and any tool
that knows BatchNorm (ONNX export, TorchScript, quantization, conv-BN fusion) takes the result.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from bkn.nn.blocks import NormSpec, norm_options
from bkn.nn.context import ContextLink, KalmanContext
from bkn.nn.cross_iteration import CrossIterationNorm2d, FeedingConv
from bkn.nn.norms import (BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchRenorm1d, BatchRenorm2d, BatchRenorm3d,
                          GroupNorm2d, KalmanNorm2d, _GroupedNorm, build_norm)

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
    if hasattr(layer, "act"):  # it replaced timm's BatchNormAct2d (convert_batchnorm): keep its dropout and activation
        batchnorm.drop, batchnorm.act = layer.drop, layer.act
        batchnorm.register_forward_hook(_drop_and_act)
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


# --- torch's BatchNorm (and our BN / BRN) to any of ours --------------------------------------

# Our layer of each kind for 1-D and 3-D input (BKN and GN exist for 2-D input only).
VARIANTS: dict[type[nn.Module], dict[tuple[int, ...], type[_GroupedNorm]]] = {
    BatchNorm2d: {(0, 1): BatchNorm1d, (2,): BatchNorm2d, (3,): BatchNorm3d},
    BatchRenorm2d: {(0, 1): BatchRenorm1d, (2,): BatchRenorm2d, (3,): BatchRenorm3d},
}
TORCH_DIMS: dict[type[nn.Module], tuple[int, ...]] = {torch_class: dims for dims, torch_class in TORCH_BATCHNORM.items()}


def _is_batchnorm(module: nn.Module) -> bool:
    """torch's BatchNorm1d/2d/3d, SyncBatchNorm and their subclasses (timm's BatchNormAct2d), or our BN / BRN."""
    return isinstance(module, _BatchNorm) or (isinstance(module, _GroupedNorm) and not isinstance(module, KalmanNorm2d))


def _spatial_dims(module: nn.Module) -> tuple[int, ...]:
    if isinstance(module, _GroupedNorm):
        return module.spatial_dims
    return next((dims for torch_class, dims in TORCH_DIMS.items() if isinstance(module, torch_class)), (2,))


def _run_order(model: nn.Module, example_input: Tensor | None) -> list[nn.Module]:
    """The batch norms and 2-D convs of ``model``: in the order a forward of ``example_input`` runs
    them (in eval mode, without gradients: nothing changes), else in module order; those the
    forward does not run follow in module order."""
    in_module_order = [module for module in model.modules() if _is_batchnorm(module) or isinstance(module, nn.Conv2d)]
    if example_input is None:
        return in_module_order
    ran: list[nn.Module] = []
    handles = [module.register_forward_pre_hook(lambda module, args: ran.append(module)) for module in in_module_order]
    modes = {module: module.training for module in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(example_input)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    ran = list(dict.fromkeys(ran))  # a module run twice counts where it first ran
    not_run = set(in_module_order) - set(ran)
    return ran + [module for module in in_module_order if module in not_run]


def _drop_and_act(layer: nn.Module, args: Any, y: Tensor) -> Tensor:
    """Forward hook of a layer that replaced timm's ``BatchNormAct2d``: its dropout and activation."""
    return layer.act(layer.drop(y))


def _our_layer(source: nn.Module, options: dict[str, Any], in_features: int | None, path: str) -> nn.Module:
    """``build_norm(**options)`` in place of ``source``: its eps and momentum (unless ``options`` set
    them), affine parameters, running statistics, device, dtype, mode and timm's dropout and activation.

    A layer that includes its activation (FRN, EvoNorm-S0) takes the place of timm's activation (the
    pair becomes one layer, as in timm's own FRN / EvoNorm networks) and is built without one where
    timm's is ``nn.Identity``; in place of a batch norm without an activation of its own (torch's,
    torchvision's) it keeps its activation, and the model's own ReLUs still follow it wherever the
    model applies them (torchvision calls one ReLU module at several places). Its eps is its own:
    it normalizes by another statistic."""
    own_act = getattr(source, "act", None) if isinstance(getattr(source, "drop", None), nn.Module) else None
    relu_follows = not isinstance(own_act, nn.Identity)
    layer = build_norm(num_features=source.num_features, in_features=in_features, relu_follows=relu_follows,
                       **options)
    fused = getattr(layer, "fuses_activation", False)
    dims = _spatial_dims(source)
    if dims != (2,):
        if type(layer) not in VARIANTS:
            raise ValueError(f"{path} normalizes {dims[-1] + 2}-D input ({type(source).__name__}), but normalizer="
                             f"{options['name']} exists for 4-D input only; choose bn or brn for this model")
        layer = VARIANTS[type(layer)][dims](source.num_features, **{k: v for k, v in options.items() if k != "name"})
    for setting in ("eps", "momentum"):  # the architecture's own (timm's EfficientNets use eps 1e-3)
        if setting not in options and not fused and hasattr(layer, setting) and getattr(source, setting, None) is not None:
            setattr(layer, setting, getattr(source, setting))
    reference = source.weight if source.weight is not None else source.running_mean
    if reference is not None:
        layer.to(device=reference.device, dtype=reference.dtype)
    with torch.no_grad():
        if source.affine and getattr(layer, "affine", True):
            layer.weight.copy_(source.weight)
            layer.bias.copy_(source.bias)
        if source.running_mean is not None and getattr(layer, "track_running_stats", False):
            layer.running_mean.copy_(source.running_mean)
            layer.running_var.copy_(source.running_var)
            # A new BKN layer keeps its count at 0, so its gain warm-up runs: its prior is new even
            # when the network is trained.
            if source.num_batches_tracked is not None and not isinstance(layer, KalmanNorm2d):
                layer.num_batches_tracked.copy_(source.num_batches_tracked)
    if isinstance(own_act, nn.Module):
        # Same names: the same state_dict keys. A layer with its own activation replaces timm's.
        layer.drop, layer.act = source.drop, nn.Identity() if fused else own_act
        layer.register_forward_hook(_drop_and_act)
    return layer.train(source.training)


def _feeding_conv(conv: nn.Conv2d | None, layer: KalmanNorm2d, previous_channels: int, path: str) -> nn.Conv2d:
    """The conv between the previous BKN layer and ``layer`` through which the analytic and
    Monte-Carlo transitions push the previous estimate; refuses where there is none that fits."""
    if conv is None or conv.out_channels != layer.num_features or conv.in_channels != previous_channels:
        found = "no conv" if conv is None else f"a conv from {conv.in_channels} to {conv.out_channels} channels"
        raise ValueError(f"transition={layer.transition} pushes the previous BKN layer's estimate ({previous_channels} "
                         f"channels) through the conv feeding {path} ({layer.num_features} channels), but {found} runs "
                         f"between them; use transition=linear, which needs no conv")
    return conv


def convert_batchnorm(model: nn.Module, norm: NormSpec, example_input: Tensor | None = None) -> nn.Module:
    """Replace, in place, every batch-norm layer of ``model`` — torch's ``BatchNorm1d/2d/3d``,
    ``SyncBatchNorm`` and their subclasses (timm's ``BatchNormAct2d`` keeps its dropout and
    activation), and our BN / BRN — by ``norm`` (a :func:`build_norm` spec or a name: ``"bkn"``),
    under the same name, with the replaced layer's affine parameters, running statistics, eps and
    momentum; returns ``model`` (or the replacement, if ``model`` is such a layer). The inverse of
    :func:`to_torch_batchnorm`.

    With BKN the converted model passes each layer's estimate to the next one its forward runs
    (:mod:`bkn.nn.context`): each layer is called with a tensor alone, as before. The linear
    transition's ``A`` is sized for the previous layer in module order, or, given
    ``example_input``, in the order a forward of it runs them (where the two differ: a layer
    then says its prior has the wrong channels). The analytic and Monte-Carlo transitions
    need, between each BKN layer and the previous one, the conv that feeds it; a model without
    one is refused.
    """
    options = norm_options(norm)
    paths = {module: path or "the model" for path, module in model.named_modules()}
    order = _run_order(model, example_input)
    if not any(_is_batchnorm(module) for module in order):
        raise ValueError(f"{type(model).__name__} has no batch-norm layer to convert (torch's BatchNorm1d/2d/3d or "
                         f"a subclass, or our BN / BRN)")
    context = KalmanContext()
    replacements: dict[nn.Module, nn.Module] = {}
    previous: nn.Module | None = None
    conv: nn.Conv2d | None = None  # the last conv run since the previous norm
    for module in order:
        if isinstance(module, nn.Conv2d):
            conv = module
            continue
        previous_channels = None if previous is None else previous.num_features
        layer = _our_layer(module, options, previous_channels, paths[module])
        if isinstance(layer, KalmanNorm2d):
            feeding = None
            if layer.transition != "linear" and previous_channels is not None:
                feeding = _feeding_conv(conv, layer, previous_channels, paths[module])
            layer.context_link = ContextLink(context, feeding)
            layer.carries_state = False  # called with a tensor alone, it returns one: the context carries the state
        elif isinstance(layer, CrossIterationNorm2d):  # the conv that feeds it, if it does (else it is BN)
            layer.feeding_conv = FeedingConv(conv if conv is not None and conv.out_channels == layer.num_features
                                             else None)
        replacements[module] = layer
        previous, conv = module, None
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if child in replacements:
                setattr(parent, name, replacements[child])
    model = replacements.get(model, model)
    if any(isinstance(layer, KalmanNorm2d) for layer in replacements.values()):
        model.register_forward_pre_hook(context.open)
        model.register_forward_hook(context.close, always_call=True)
    return model
