"""bkn.nn.convert_batchnorm: any model's batch norms become ours under the same names, with their
parameters and running statistics; with BKN, the per-forward context passes each layer's estimate
to the next one the forward runs, exactly as a hand-threaded forward does, reset every forward,
under autocast, torch.compile and DDP, refused under activation checkpointing. torchvision and
timm models with BKN: a training step, eval on one example, the state_dict round trip, and a
torchvision model with BKN trained and evaluated by train.py's engine."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import timm
import torch
import torch.distributed as dist
import torchvision
from torch import nn
from torch.utils.checkpoint import checkpoint

import bkn.nn as N
from bkn.engine.records import read_summary
from bkn.models import build_model
from bkn.models.torchvision_models import torchvision_model
from training_helpers import TINY, train_in_process

BKN = {"name": "bkn", "statistics_batch_size": 2, "gain": 0.3}


def conv_bn_net() -> nn.Sequential:
    """Written for BatchNorm: conv -> BN -> ReLU twice, a pool between, and a classifier."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(6, 5, 3), nn.BatchNorm2d(5), nn.ReLU(), nn.Flatten(), nn.LazyLinear(4))
    net(torch.randn(2, 3, 12, 12))  # the lazy classifier's shape
    with torch.no_grad():  # parameters and running statistics a copy must carry over
        for layer in (net[1], net[5]):
            layer.weight.uniform_(0.5, 1.5), layer.bias.uniform_(-0.5, 0.5)
            layer.running_mean.uniform_(-1, 1), layer.running_var.uniform_(0.5, 2)
            layer.num_batches_tracked.fill_(7)
    return net


def images(batch: int = 4, size: int = 12) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def hand_threaded(net: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """The converted net's forward written out: each BKN layer given the previous one's estimate."""
    state = None
    for module in net:
        if isinstance(module, N.KalmanNorm2d):
            x, state = module.forward(x, module.predict(state, module.context_link.conv))
        else:
            x = module(x)
    return x


@pytest.mark.parametrize("transition", ["linear", "analytic", "monte_carlo"])
def test_converted_bkn_equals_the_hand_threaded_forward(transition: str) -> None:
    reference = conv_bn_net()
    net = N.convert_batchnorm(conv_bn_net(), {**BKN, "transition": transition})
    first, second = net[1], net[5]
    assert isinstance(first, N.KalmanNorm2d) and isinstance(second, N.KalmanNorm2d)
    assert net.state_dict().keys() - reference.state_dict().keys() == (
        {"5.transition_matrix", "5.noise_raw"} if transition == "linear" else set())
    for ours, torch_layer in ((first, reference[1]), (second, reference[5])):  # copied, not re-initialized
        for key, value in torch_layer.state_dict().items():
            if key == "num_batches_tracked":  # a new BKN layer starts its gain warm-up at 0
                assert ours.num_batches_tracked.item() == 0 and value.item() > 0, key
                continue
            assert torch.equal(ours.state_dict()[key], value), key
    assert (first.in_features, second.in_features) == (None, 6)  # the first layer has no A
    assert second.context_link.conv is (None if transition == "linear" else net[4])
    if transition == "linear":
        with torch.no_grad():
            second.transition_matrix.normal_()  # A = 0 would predict the same from any estimate

    x = images()
    threaded = copy.deepcopy(net)  # each forward moves the running statistics: both take the same steps
    for _ in range(2):  # the second forward opens a fresh context: the first layer gets no prior again
        torch.manual_seed(1)
        y = net(x)
        assert first.context_link.context.state is None  # closed after the forward: no tensor kept
        torch.manual_seed(1)
        torch.testing.assert_close(y, hand_threaded(threaded, x), rtol=0, atol=0)
    without_prior = net[6](second.forward(net[4](net[3](net[2](first.forward(net[0](x), None)[0]))), None)[0])
    assert not torch.allclose(net[:6](x).relu(), without_prior)  # the estimate was passed, not dropped


def test_gain_one_is_the_bn_model_exactly() -> None:
    bn = N.convert_batchnorm(conv_bn_net(), {"name": "bn", "statistics_batch_size": 2})
    bkn = N.convert_batchnorm(conv_bn_net(), {**BKN, "gain": 1.0})
    x = images().requires_grad_()
    for net in (bn, bkn):
        (net(x) ** 2).sum().backward()
    assert torch.equal(bn(x), bkn(x))
    for name, parameter in bn.named_parameters():
        assert torch.equal(parameter.grad, bkn.get_parameter(name).grad), name
    for name, buffer in bn.named_buffers():
        if not name.endswith("num_batches_tracked"):  # BKN's count restarts at conversion
            assert torch.equal(buffer, bkn.get_buffer(name)), name


def test_names_dims_round_trip_and_refusals() -> None:
    model = nn.Sequential(nn.BatchNorm1d(3), nn.SyncBatchNorm(4), nn.BatchNorm3d(2))
    converted = N.convert_batchnorm(model, "brn")
    assert [type(layer) for layer in converted] == [N.BatchRenorm1d, N.BatchRenorm2d, N.BatchRenorm3d]
    with pytest.raises(ValueError, match=re.escape("0 normalizes 3-D input (BatchNorm1d), but normalizer=bkn exists "
                                                   "for 4-D input only; choose bn or brn")):
        N.convert_batchnorm(nn.Sequential(nn.BatchNorm1d(3)), "bkn")
    with pytest.raises(ValueError, match=r"Sequential has no batch-norm layer to convert"):
        N.convert_batchnorm(nn.Sequential(nn.Conv2d(3, 3, 1)), "bkn")
    layer = N.convert_batchnorm(nn.BatchNorm2d(3, eps=1e-3, momentum=0.01), "bkn")  # a layer alone: eps kept
    assert (type(layer), layer.eps, layer.momentum) == (N.KalmanNorm2d, 1e-3, 0.01)
    assert N.convert_batchnorm(nn.BatchNorm2d(3), {"name": "bn", "eps": 1e-4}).eps == 1e-4  # unless set

    net = conv_bn_net().eval()
    x = images()
    back = N.to_torch_batchnorm(N.convert_batchnorm(conv_bn_net(), BKN).eval())
    assert [type(m) for m in back] == [type(m) for m in net]
    torch.testing.assert_close(back(x), net(x), rtol=0, atol=0)


def test_torch_sequential_works_converted_and_names_the_way_otherwise() -> None:
    plain = nn.Sequential(nn.Conv2d(3, 16, 3), N.build_norm("bkn", 16, statistics_batch_size=2), nn.ReLU())
    with pytest.raises(TypeError, match=re.escape("KalmanNorm2d was called with a tensor alone outside a converted "
                                                  "model: build the model with BatchNorm and convert it")):
        plain(images())
    # SyncBatchNorm's converter knows only torch's BatchNorm: it leaves ours as they are.
    converted = N.convert_batchnorm(conv_bn_net(), BKN)
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(converted)
    assert isinstance(synced[1], N.KalmanNorm2d) and not any(isinstance(m, nn.SyncBatchNorm) for m in synced.modules())


def test_module_order_against_execution_order() -> None:
    class Reversed(nn.Module):  # registers its norms in the opposite order of its forward
        def __init__(self) -> None:
            super().__init__()
            self.late, self.early = nn.BatchNorm2d(5), nn.BatchNorm2d(3)
            self.conv = nn.Conv2d(3, 5, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.late(self.conv(self.early(x)))

    with pytest.raises(ValueError, match=re.escape("KalmanNorm2d(5) got the estimate of 3 channels of the BKN layer "
                                                   "run before it, but was converted to follow none (in module order)")):
        N.convert_batchnorm(Reversed(), BKN)(torch.randn(4, 3, 2, 2))
    model = N.convert_batchnorm(Reversed(), BKN, example_input=torch.randn(4, 3, 2, 2))
    assert (model.early.in_features, model.late.in_features) == (None, 3)
    model(torch.randn(4, 3, 2, 2)).sum().backward()
    assert all(parameter.grad is not None for parameter in model.parameters())


def test_autocast_and_activation_checkpointing() -> None:
    net = N.convert_batchnorm(conv_bn_net(), BKN)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = net(images())
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), net(images()), rtol=0.05, atol=0.05)

    x = images().requires_grad_()
    net[0:2](x).sum()  # a segment without a converted model's root: no context to read, still fine
    loss = checkpoint(net, x, use_reentrant=False).sum()
    with pytest.raises(RuntimeError, match="was run inside a backward pass \\(activation checkpointing\\?\\)"):
        loss.backward()


@pytest.mark.slow
def test_torch_compile_traces_the_context_in_one_graph() -> None:
    net = N.convert_batchnorm(conv_bn_net(), {**BKN, "transition": "analytic"})
    # No set_step: a converted model's layers count their own batches, as in a user's training loop.
    compiled = torch.compile(net, fullgraph=True)  # fullgraph: a graph break would raise
    x = images()
    for _ in range(2):  # the context is reset between forwards
        # Both runs start from the same running statistics.
        before = {name: buffer.clone() for name, buffer in net.named_buffers()}
        expected = net(x)
        for name, buffer in net.named_buffers():
            buffer.copy_(before[name])
        torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-5)


def test_ddp_runs_the_converted_model() -> None:
    """One gloo process: DDP calls the converted model (its hooks open the context) and finds a
    gradient for every parameter, two steps in a row (it raises on the second otherwise)."""
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        net = N.convert_batchnorm(conv_bn_net(), BKN)
        ddp = nn.parallel.DistributedDataParallel(net)
        for _ in range(2):
            ddp(images()).sum().backward()
        threaded = copy.deepcopy(net)
        torch.testing.assert_close(ddp(images()), hand_threaded(threaded, images()), rtol=0, atol=0)
    finally:
        dist.destroy_process_group()


def check_library_model(model: nn.Module, rebuild, x: torch.Tensor) -> None:
    """A training step with BKN, eval on one example equal to it in the batch, state_dict round trip."""
    layers = [m for m in model.modules() if isinstance(m, N.KalmanNorm2d)]
    assert layers and not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    loss = nn.functional.cross_entropy(model(x), torch.arange(len(x)) % 5)
    loss.backward()
    assert torch.isfinite(loss)
    assert [name for name, parameter in model.named_parameters() if parameter.grad is None] == []
    optimizer.step()
    assert all(layer.num_batches_tracked.item() == 1 for layer in layers)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x[:1]), model(x)[:1], rtol=1e-4, atol=1e-5)
        N.set_inference(model, "batch")  # option A: the chain of estimates over test groups
        batch = model(x)
        N.set_inference(model, "population")
        population = model(x)
        copy = rebuild()
        copy.load_state_dict(model.state_dict())
        copy.eval()
        torch.testing.assert_close(copy(x), population, rtol=0, atol=0)
    assert torch.isfinite(batch).all() and not torch.allclose(batch, population)


def test_torchvision_resnet18_with_bkn() -> None:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return torchvision_model(5, {"name": "bkn", "statistics_batch_size": 2}, 32, arch="resnet18", in_channels=1)

    model = build()
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(num_classes=5)
    extra = model.state_dict().keys() - reference.state_dict().keys()
    assert reference.state_dict().keys() <= model.state_dict().keys()  # torchvision's names, plus A and r
    assert extra and all(key.endswith(("transition_matrix", "noise_raw")) for key in extra)
    assert model.conv1.in_channels == 1 and model.fc.out_features == 5
    check_library_model(model, build, torch.randn(4, 1, 32, 32, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match=re.escape("model.arch='resnet_18' is not a torchvision classification")):
        build_model("torchvision", 5, "bn", 16, arch="resnet_18")


def test_timm_mobilenet_with_bkn() -> None:
    """Another family: timm's BatchNormAct2d (norm, dropout, activation) and depthwise convs."""
    def build() -> nn.Module:
        torch.manual_seed(0)
        return build_model("timm", 5, {"name": "bkn", "statistics_batch_size": 2}, 32, arch="mobilenetv3_small_050")

    model = build()
    torch.manual_seed(0)
    reference = timm.create_model("mobilenetv3_small_050", num_classes=5)
    assert reference.state_dict().keys() <= model.state_dict().keys()
    assert isinstance(model.bn1.act, nn.Module) and model.bn1._forward_hooks  # timm's activation kept
    check_library_model(model, build, images(4, 32))
    with torch.no_grad():  # and back to torch's BatchNorm for deployment, the activation still applied
        expected = model(images(2, 32))
        torch.testing.assert_close(N.to_torch_batchnorm(model)(images(2, 32)), expected, rtol=0, atol=0)


def test_train_py_trains_and_evaluates_a_torchvision_model_with_bkn(tmp_path: Path) -> None:
    overrides = [*TINY, "model=torchvision", "model.arch=resnet18", "normalizer=bkn", "train.steps=2"]
    overrides.remove("model.name=tiny_net")
    overrides.remove("~model.width")
    run_dir = train_in_process(tmp_path, overrides)
    assert run_dir.name.startswith("torchvision-resnet18_bkn-linear_g8_s2_seed0")
    summary = read_summary(run_dir)
    assert (summary["status"], summary["step"], summary["normalizer"]) == ("finished", 2, "bkn")
    assert set(summary["final"]) == {"population", "batch"}  # both inference options evaluated
