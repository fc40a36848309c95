"""timm models with our normalizers (model=timm model.arch=...): every BatchNorm replaced, with
statistics groups, timm's initialization kept, a training step, both inference options, a run
through train.py's engine, and the refusals (unknown architectures, no BatchNorm to replace, a
transition that needs a conv the converter cannot find). BKN in converted models: test_convert.py."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import timm
import torch
from torch.nn.modules.batchnorm import _BatchNorm

import bkn.nn as N
from bkn.engine.records import read_summary
from bkn.models import build_model
from training_helpers import TINY, train_in_process

# Two families: a ResNet (plain BatchNorm2d) and a MobileNetV3 (timm's BatchNormAct2d: norm + act).
ARCHS = ("resnet18", "mobilenetv3_small_050")
# momentum 1: the running statistics are those of the last training-mode batch, not mostly their
# initial (0, 1), which an untrained MobileNet's activations outgrow by orders of magnitude.
NORMS = {
    "bn": {"name": "bn", "statistics_batch_size": 2, "momentum": 1.0},
    "brn": {"name": "brn", "statistics_batch_size": 2, "momentum": 1.0, "warmup_steps": 0, "relax_steps": 1},
}
OURS = {"bn": N.BatchNorm2d, "brn": N.BatchRenorm2d}


def images(batch: int = 8, size: int = 32) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("norm", NORMS)
def test_every_batch_norm_is_ours_and_a_training_step_runs(arch: str, norm: str) -> None:
    timm_batch_norms = sum(isinstance(module, _BatchNorm) for module in timm.create_model(arch).modules())
    torch.manual_seed(0)
    model = build_model("timm", 5, NORMS[norm], 32, arch=arch)
    ours = [module for module in model.modules() if isinstance(module, OURS[norm])]
    assert timm_batch_norms > 0 and len(ours) == timm_batch_norms
    assert not any(isinstance(module, _BatchNorm) for module in model.modules())
    assert {layer.statistics_batch_size for layer in ours} == {2}

    N.set_step(model, 10)  # BRN past its warm-up: r and d are active
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [parameter.detach().clone() for parameter in model.parameters()]
    loss = torch.nn.functional.cross_entropy(model(images()), torch.arange(8) % 5)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert [name for name, parameter in model.named_parameters() if parameter.grad is None] == []
    assert all(not torch.equal(old, new) for old, new in zip(before, model.parameters()) if new.grad.any())
    assert all(layer.num_batches_tracked.item() == 1 for layer in ours)  # running statistics updated

    with torch.no_grad():
        model(images())  # the running statistics of the weights after the step
    model.eval()
    with torch.no_grad():
        N.set_inference(model, "population")  # option B: running statistics
        population = model(images())
        N.set_inference(model, "batch")  # option A: statistics of test groups of 2
        batch = model(images())
    assert torch.isfinite(population).all() and torch.isfinite(batch).all()
    assert not torch.allclose(population, batch)


def test_statistics_groups_change_the_forward() -> None:
    torch.manual_seed(0)
    grouped = build_model("timm", 5, {"name": "bn", "statistics_batch_size": 2}, 32, arch="resnet18")
    whole = build_model("timm", 5, {"name": "bn", "statistics_batch_size": None}, 32, arch="resnet18")
    whole.load_state_dict(grouped.state_dict())
    with torch.no_grad():
        assert not torch.allclose(grouped(images()), whole(images()))


def test_timm_initialization_is_kept() -> None:
    """Same seed: our resnet18 holds exactly timm's initial tensors (its zero-initialized last norm
    of each residual branch included), and timm's state_dict loads strictly."""
    torch.manual_seed(0)
    reference = timm.create_model("resnet18", num_classes=5)
    torch.manual_seed(0)
    model = build_model("timm", 5, NORMS["bn"], 32, arch="resnet18")
    expected, actual = reference.state_dict(), model.state_dict()
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[key], actual[key]) for key in expected)
    assert not model.layer1[0].bn2.weight.any()  # timm's zero_init_last
    model.load_state_dict(reference.state_dict(), strict=True)


def test_refusals_are_one_clear_line() -> None:
    with pytest.raises(ValueError, match=re.escape("model.arch='resnet_18' is not a timm model; timm.list_models()")):
        build_model("timm", 5, NORMS["bn"], 32, arch="resnet_18")
    with pytest.raises(ValueError, match=re.escape("model.arch='convnext_atto' has no batch norm for normalizer=bn")):
        build_model("timm", 5, NORMS["bn"], 32, arch="convnext_atto")
    with pytest.raises(ValueError, match=re.escape("model.arch='resnet18': transition=analytic pushes the previous")):
        build_model("timm", 5, {"name": "bkn", "transition": "analytic"}, 32, arch="resnet18")


def test_train_py_trains_and_evaluates_a_timm_model(tmp_path: Path) -> None:
    overrides = [*TINY, "model=timm", "model.arch=resnet18", "normalizer=bn", "train.steps=4"]
    overrides.remove("model.name=tiny_net")
    overrides.remove("~model.width")
    run_dir = train_in_process(tmp_path, overrides)
    assert run_dir.name.startswith("timm-resnet18_bn_g8_s2_seed0")  # + a hash of the tiny settings
    summary = read_summary(run_dir)
    assert (summary["status"], summary["step"], summary["statistics_batch_size"]) == ("finished", 4, 2)
    assert set(summary["final"]) == {"population", "batch"}


@pytest.mark.parametrize("arch", ARCHS)
def test_group_norm_replaces_every_batch_norm_and_trains(arch: str) -> None:
    timm_batch_norms = sum(isinstance(module, _BatchNorm) for module in timm.create_model(arch).modules())
    torch.manual_seed(0)
    model = build_model("timm", 5, "gn", 32, arch=arch)  # the shorthand: {"name": "gn"}
    ours = [module for module in model.modules() if isinstance(module, N.GroupNorm2d)]
    assert len(ours) == timm_batch_norms and not any(isinstance(m, _BatchNorm) for m in model.modules())
    assert all(layer.num_features % layer.num_groups == 0 for layer in ours)
    loss = torch.nn.functional.cross_entropy(model(images()), torch.arange(8) % 5)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters())
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(images())[:1], model(images()[:1]))  # per example: any batch
