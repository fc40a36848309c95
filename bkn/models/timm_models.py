"""Any timm CNN with our normalizers: ``build_model("timm", 10, {"name": "bn", ...}, 32, arch="resnet18")``.

timm builds the network (untrained: no weights are downloaded), then every ``BatchNorm2d`` in it,
timm's ``BatchNormAct2d`` included, is swapped for the layer ``norm`` names, with statistics
groups; each keeps the initial scale and shift timm gave the one it replaces (timm zero-initializes
the last norm of a residual branch). A swap instead of timm's ``norm_layer`` argument because each
family calls its norm layer differently (``norm_layer(channels)``, ``norm_act_layer(channels,
act_layer=...)``, or not at all), while the modules it ends up with are ordinary BatchNorms.

BKN is refused: its estimate must be passed from layer to layer through the forward pass, which
only the suite's own networks do.
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bkn.nn import NORMALIZERS, NormSpec, build_norm, norm_options


def timm_model(num_classes: int, norm: NormSpec, image_size: int, arch: str, in_channels: int = 3,
               **timm_options: Any) -> nn.Module:
    """timm's ``arch`` for ``num_classes`` and ``in_channels``, its BatchNorms replaced by ``norm``.

    ``timm_options`` go to ``timm.create_model`` (``drop_rate=0.2``, ...). ``image_size`` is not
    needed by CNNs and not used.
    """
    # Imported here, not at the top: importing timm takes seconds, which only timm runs should pay.
    with warnings.catch_warnings():  # timm 1.0.22 uses torch.jit.interface, deprecated in torch 2.14
        warnings.filterwarnings("ignore", "`torch.jit.interface` is deprecated", FutureWarning)
        import timm

    norm = norm_options(norm)
    name = norm["name"]
    if name in NORMALIZERS and NORMALIZERS[name].carries_state:
        raise ValueError(f"normalizer={name} cannot be used with model=timm: BKN passes its estimate from layer "
                         f"to layer, which only the suite's own models do; choose bn, brn or gn, or one of our models")
    if not timm.is_model(arch):
        raise ValueError(f"model.arch={arch!r} is not a timm model; timm.list_models() lists them "
                         f"(e.g. resnet18, efficientnet_b0, regnetx_002)")
    model = timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_channels,
                              **timm_options)
    replaced = replace_batch_norms(model, norm)
    left = [path for path, module in model.named_modules() if isinstance(module, _BatchNorm)]
    if left:
        raise ValueError(f"model.arch={arch!r} has batch norms that are not 2-D ({left[0]}); choose a timm CNN "
                         f"whose batch norms are all BatchNorm2d")
    if not replaced:
        raise ValueError(f"model.arch={arch!r} has no BatchNorm2d for normalizer={name} to replace; "
                         f"choose a timm CNN with batch norm (resnet18, efficientnet_b0, regnetx_002, ...)")
    return model


def replace_batch_norms(module: nn.Module, norm: NormSpec) -> int:
    """Swap every ``nn.BatchNorm2d`` below ``module`` for ``build_norm(**norm)``; returns how many.

    timm's ``BatchNormAct2d`` (a BatchNorm2d followed by its own dropout and activation) becomes
    ``Sequential(our norm, its dropout, its activation)``.
    """
    count = 0
    for child_name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            ours = build_norm(num_features=child.num_features, **norm)
            if child.affine and getattr(ours, "weight", None) is not None:  # timm's initial scale and shift
                ours.weight.data.copy_(child.weight.data)
                ours.bias.data.copy_(child.bias.data)
            extras = [part for part in (getattr(child, "drop", None), getattr(child, "act", None))
                      if isinstance(part, nn.Module)]
            setattr(module, child_name, nn.Sequential(ours, *extras) if extras else ours)
            count += 1
        else:
            count += replace_batch_norms(child, norm)
    return count
