"""FRN + TLU and EvoNorm-S0 (bkn.nn.norm_act): timm's own layers against their formulas written
out; in every bundled network each takes the place of a norm and the ReLU after it (and is built
without its activation where no ReLU follows); in converted torchvision and timm models; and the
three newer normalizers (FRN, EvoNorm-S0, CBN) trained by train.py in a converted torchvision model."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
import torchvision
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import bkn.nn as N
from bkn.engine.records import read_summary
from bkn.models import build_model
from training_helpers import TINY, train_in_process

FUSED = (N.FilterResponseNorm2d, N.EvoNorm2dS0)


def randomized(layer: nn.Module) -> nn.Module:
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.uniform_(-1, 1)
    return layer


def test_frn_is_timms_layer_and_its_formula() -> None:
    layer = randomized(N.build_norm("frn", 6, statistics_batch_size=2))
    assert isinstance(layer, timm.layers.FilterResponseNormTlu2d) and layer.apply_act
    x = torch.randn(4, 6, 5, 5)
    nu2 = (x ** 2).mean(dim=(2, 3), keepdim=True)
    affine = x / (nu2 + 1e-5).sqrt() * layer.weight[:, None, None] + layer.bias[:, None, None]
    torch.testing.assert_close(layer(x), torch.maximum(affine, layer.tau[:, None, None]))
    without = N.build_norm("frn", 6, relu_follows=False)
    assert without.tau is None


@pytest.mark.parametrize("channels, groups", [(64, 32), (16, 16), (48, 24)])
def test_evonorm_s0_is_timms_layer_and_its_formula(channels: int, groups: int) -> None:
    layer = randomized(N.build_norm("evonorm_s0", channels))
    assert isinstance(layer, timm.layers.EvoNorm2dS0) and layer.groups == groups  # 32, or the largest divisor
    x = torch.randn(3, channels, 4, 4)
    std = x.view(3, groups, -1).var(dim=2, unbiased=False).add(1e-5).sqrt()
    std = std.repeat_interleave(channels // groups, dim=1)[:, :, None, None]
    expected = x * torch.sigmoid(layer.v[:, None, None] * x) / std * layer.weight[:, None, None] + layer.bias[:, None, None]
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer(x[:1]), layer(x)[:1])  # per example


@pytest.mark.parametrize("name", ["frn", "evonorm_s0"])
@pytest.mark.parametrize("model_name, depth", [("cifar_net", None), ("preact_resnet", 8), ("resnet18", None)])
def test_each_norm_relu_pair_becomes_one_layer_in_every_network(name: str, model_name: str, depth) -> None:
    torch.manual_seed(0)
    options = {} if depth is None else {"depth": depth}
    model = build_model(model_name, 4, {"name": name, "statistics_batch_size": 2}, 32, **options)
    layers = [module for module in model.modules() if isinstance(module, FUSED)]
    assert layers and not any(isinstance(m, (N.BatchNorm2d, _BatchNorm)) for m in model.modules())
    with_act = sum(layer.apply_act for layer in layers)
    relus = sum(isinstance(module, nn.ReLU) for module in model.modules())
    if model_name == "resnet18":  # the last norm of each branch and each shortcut's norm feed a sum: no activation
        assert not model.layer1[0].bn2.apply_act and not model.layer2[0].downsample[1].apply_act
        assert model.layer1[0].bn1.apply_act and isinstance(model.layer1[0].act1, nn.Identity)
        assert with_act == 1 + 8 and relus == 8  # the stem and each block's first norm; the ReLU after each sum stays
    else:  # every norm is followed by a ReLU, so none is left
        assert with_act == len(layers) and relus == 0
    loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.arange(4))
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", ["frn", "evonorm_s0"])
def test_converted_torchvision_and_timm_models(name: str) -> None:
    torch.manual_seed(0)
    resnet = N.convert_batchnorm(torchvision.models.resnet18(num_classes=4), name)
    assert all(layer.apply_act for layer in resnet.modules() if isinstance(layer, FUSED))  # torch's BN has no act
    mobilenet = build_model("timm", 4, name, 32, arch="mobilenetv3_small_050")
    layers = [module for module in mobilenet.modules() if isinstance(module, FUSED)]
    reference = [module for module in timm.create_model("mobilenetv3_small_050").modules()
                 if isinstance(module, _BatchNorm)]
    assert len(layers) == len(reference)
    # Where timm's BatchNormAct2d has an activation the layer takes its place; where it has none, no activation.
    assert [layer.apply_act for layer in layers] == [not isinstance(bn.act, nn.Identity) for bn in reference]
    assert all(isinstance(layer.act, nn.Identity) for layer in layers)
    for model in (resnet, mobilenet):
        loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.arange(4))
        loss.backward()
        assert torch.isfinite(loss)


@pytest.mark.parametrize("normalizer", ["frn", "evonorm_s0", "cbn"])
def test_train_py_trains_a_torchvision_model_with_each(tmp_path: Path, normalizer: str) -> None:
    overrides = [*TINY, "model=torchvision", "model.arch=resnet18", f"normalizer={normalizer}", "train.steps=3"]
    if normalizer == "cbn":
        overrides.append("normalizer.burn_in=1")  # the window fills over the last two steps
    overrides.remove("model.name=tiny_net")
    overrides.remove("~model.width")
    run_dir = train_in_process(tmp_path, overrides)
    summary = read_summary(run_dir)
    assert (summary["status"], summary["step"], summary["normalizer"]) == ("finished", 3, normalizer)
    assert set(summary["final"]) == {"population", "batch"}
