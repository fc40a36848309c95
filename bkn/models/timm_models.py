"""Any timm CNN with our normalizers: ``build_model("timm", 10, {"name": "bkn", ...}, 32, arch="resnet18")``.

timm builds the network (untrained: no weights are downloaded), then :func:`bkn.nn.convert_batchnorm`
swaps every batch norm in it, timm's ``BatchNormAct2d`` included (it keeps its activation), for
the layer ``norm`` names, with statistics groups; each keeps the initial scale and shift timm gave
the one it replaces (timm zero-initializes the last norm of a residual branch). A swap instead of
timm's ``norm_layer`` argument because each family calls its norm layer differently
(``norm_layer(channels)``, ``norm_act_layer(channels, act_layer=...)``, or not at all), while the
modules it ends up with are ordinary BatchNorms. With BKN each layer takes its prior from the one
the forward ran before it (:mod:`bkn.nn.context`).
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bkn.nn import NormSpec, convert_batchnorm, norm_options


def timm_model(num_classes: int, norm: NormSpec, image_size: int, arch: str, in_channels: int = 3,
               **timm_options: Any) -> nn.Module:
    """timm's ``arch`` for ``num_classes`` and ``in_channels``, its batch norms replaced by ``norm``.

    ``timm_options`` go to ``timm.create_model`` (``drop_rate=0.2``, ...). ``image_size`` is not
    needed by CNNs and not used.
    """
    # Imported here, not at the top: importing timm takes seconds, which only timm runs should pay.
    from bkn.nn.norm_act import import_timm
    timm = import_timm()

    if not timm.is_model(arch):
        raise ValueError(f"model.arch={arch!r} is not a timm model; timm.list_models() lists them "
                         f"(e.g. resnet18, efficientnet_b0, regnetx_002)")
    model = timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_channels,
                              **timm_options)
    return convert_model(model, norm, f"model.arch={arch!r}")


def convert_model(model: nn.Module, norm: NormSpec, what: str) -> nn.Module:
    """:func:`convert_batchnorm` for a library's model; a refusal names ``what`` was asked for."""
    if not any(isinstance(module, _BatchNorm) for module in model.modules()):
        raise ValueError(f"{what} has no batch norm for normalizer={norm_options(norm)['name']} to replace; "
                         f"choose a CNN with batch norm (resnet18, efficientnet_b0, regnetx_002, ...)")
    try:
        return convert_batchnorm(model, norm)
    except ValueError as error:
        raise ValueError(f"{what}: {error}") from None
