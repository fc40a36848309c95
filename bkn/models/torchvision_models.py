"""Any torchvision classification network with our normalizers:
``build_model("torchvision", 10, {"name": "bkn", ...}, 32, arch="resnet18")``.

torchvision builds the network by name (``torchvision.models.get_model``, untrained: no weights
are downloaded) for ``num_classes``; its first conv is rebuilt for ``in_channels`` when the data
set's differ from its 3; then every batch norm becomes ``norm`` (:func:`bkn.nn.convert_batchnorm`),
as for timm (:mod:`bkn.models.timm_models`).
"""

from __future__ import annotations

from typing import Any

import torchvision
from torch import nn

from bkn.models.timm_models import convert_model
from bkn.nn import NormSpec


def torchvision_model(num_classes: int, norm: NormSpec, image_size: int, arch: str, in_channels: int = 3,
                      **torchvision_options: Any) -> nn.Module:
    """torchvision's ``arch`` for ``num_classes`` and ``in_channels``, its batch norms replaced by ``norm``.

    ``torchvision_options`` go to the model's builder (``dropout=0.2``, ``aux_logits=False``, ...).
    ``image_size`` is not needed by CNNs and not used.
    """
    classifiers = torchvision.models.list_models(module=torchvision.models)
    if arch not in classifiers:
        raise ValueError(f"model.arch={arch!r} is not a torchvision classification model; "
                         f"torchvision.models.list_models(module=torchvision.models) lists them (e.g. resnet18, "
                         f"mobilenet_v3_small, regnet_x_400mf)")
    model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **torchvision_options)
    path, first = next((path, module) for path, module in model.named_modules() if isinstance(module, nn.Conv2d))
    if first.in_channels != in_channels:
        parent, _, name = path.rpartition(".")
        replacement = nn.Conv2d(in_channels, first.out_channels, first.kernel_size, first.stride, first.padding,
                                first.dilation, first.groups, first.bias is not None, first.padding_mode)
        setattr(model.get_submodule(parent), name, replacement)
    return convert_model(model, norm, f"model.arch={arch!r}")
