"""The paper's networks, built by name: ``build_model("resnet101", 1000, {"name": "bkn", ...}, 224)``.

Every conv is followed by the chosen normalizer (BN, BRN, GN or BKN) and the BKN estimate flows
through the forward pass explicitly; ``model(x)`` returns logits. ``build_model("timm", ...,
arch="efficientnet_b0")`` and ``build_model("torchvision", ..., arch="resnet18")`` build a timm or
torchvision model with our normalizer, BKN included, in place of its BatchNorms
(:mod:`bkn.models.timm_models`, :mod:`bkn.models.torchvision_models`).
"""

from __future__ import annotations

import inspect
from functools import partial
from typing import Any, Callable, NamedTuple

from torch import nn

from bkn.models import cifar_net, inception_v2, preact_resnet, resnet, timm_models, torchvision_models
from bkn.nn import NormSpec, convert_batchnorm

Builder = Callable[..., nn.Module]  # builder(num_classes, norm, image_size, **options)

PAPER_MODELS: dict[str, Builder] = {
    "cifar_net": cifar_net.cifar_net,
    "inception_v2": inception_v2.inception_v2,
    **{name: partial(resnet.resnet, name) for name in resnet.LAYOUTS},
    "preact_resnet": preact_resnet.preact_resnet,
    **{name: partial(preact_resnet.preact_resnet_alias, name) for name in preact_resnet.DEPTHS},
}
MODELS: dict[str, Builder] = {**PAPER_MODELS, "timm": timm_models.timm_model,
                               "torchvision": torchvision_models.torchvision_model}


class PaperInput(NamedTuple):
    image_size: int
    num_classes: int


# What each network classifies in the paper: 224x224 ImageNet crops or 32x32 CIFAR-10 images.
PAPER_INPUT: dict[str, PaperInput] = {
    name: PaperInput(32, 10) if name in ("cifar_net", "preact_resnet", *preact_resnet.DEPTHS) else PaperInput(224, 1000)
    for name in PAPER_MODELS
}


def list_models() -> list[str]:
    return list(MODELS)


def build_model(name: str, num_classes: int, norm: NormSpec, image_size: int, convert: bool = False,
                **options: Any) -> nn.Module:
    """Build model ``name`` for ``image_size`` x ``image_size`` inputs with normalizer ``norm``.

    ``norm`` holds :func:`bkn.nn.build_norm`'s arguments, or is a normalizer's name (``"bn"``).
    ``options`` are the model's own (``in_channels``; ``zero_init_residual`` for the ResNets;
    ``arch`` and the library's options for timm and torchvision).

    ``convert=True`` builds one of the paper's networks with BN, then converts its batch norms to
    ``norm`` (:func:`bkn.nn.convert_batchnorm`), as timm and torchvision models always are: BKN's
    estimate then passes from layer to layer in the order the forward runs them, not along the
    data flow (docs/normalizers.md compares the two).
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {list_models()} (model=...)")
    if convert:
        if name not in PAPER_MODELS:
            raise ValueError(f"model.convert=true is for the paper's networks; model={name} is always converted")
        return convert_batchnorm(build_model(name, num_classes, "bn", image_size, **options), norm)
    builder = MODELS[name]
    parameters = inspect.signature(builder).parameters
    accepted = {key for key, parameter in parameters.items() if parameter.kind is not parameter.VAR_KEYWORD}
    accepted -= {"num_classes", "norm", "image_size"}
    unknown = sorted(set(options) - accepted)
    # A builder with **options (timm's) passes the rest on; its library checks them.
    if unknown and not any(parameter.kind is parameter.VAR_KEYWORD for parameter in parameters.values()):
        raise ValueError(f"model {name!r} has no option {unknown[0]!r}; its options are {sorted(accepted)}")
    return builder(num_classes=num_classes, norm=norm, image_size=image_size, **options)


__all__ = ["MODELS", "PAPER_INPUT", "PAPER_MODELS", "PaperInput", "build_model", "list_models"]
