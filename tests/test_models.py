"""The paper's networks: every model x normalizer trains a step, BKN threads its state through
every branch and sum, BKN at gain 1 is the BN model, the ResNets are torchvision's (names,
parameter counts, outputs), eval-mode statistics options, MAC counts and the error messages."""

import re

import pytest
import torch
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import bkn.nn as N
from bkn.models import MODELS, PAPER_MODELS, build_model, list_models
from bkn.models.__main__ import main as summary_main
from bkn.models.summary import count_macs, count_parameters

CIFAR_MODELS = ("cifar_net", "preact_resnet32", "preact_resnet110")
RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
NORMS = {
    "bn": {"name": "bn", "statistics_batch_size": 2},
    "brn": {"name": "brn", "statistics_batch_size": 2, "warmup_steps": 0, "relax_steps": 1},
    "bkn-analytic": {"name": "bkn", "statistics_batch_size": 2, "transition": "analytic"},
    "bkn-monte_carlo": {"name": "bkn", "statistics_batch_size": 2, "transition": "monte_carlo"},
    "bkn-linear": {"name": "bkn", "statistics_batch_size": 2, "transition": "linear"},
    "gn": {"name": "gn", "statistics_batch_size": 2, "num_groups": 4},
}
# Enough for the default suite: each normalizer, each BKN transition, each kind of model.
FAST = {("cifar_net", norm) for norm in NORMS} | {("preact_resnet32", norm) for norm in NORMS} | {
    ("resnet18", "bn"), ("resnet18", "brn"), ("resnet18", "bkn-linear"), ("resnet50", "bkn-analytic"),
    ("inception_v2", "bkn-analytic"), ("inception_v2", "gn")}


def small_size(name: str) -> int:
    """The smallest input each model takes: 8x8 (digits) for the CIFAR models, 32x32 otherwise."""
    return 8 if name in CIFAR_MODELS else 32


def images(batch: int, name: str, seed: int = 0) -> torch.Tensor:
    size = small_size(name)
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


MATRIX = [pytest.param(name, norm, id=f"{name}-{norm}", marks=() if (name, norm) in FAST else pytest.mark.slow)
          for name in PAPER_MODELS for norm in NORMS]


@pytest.mark.parametrize("name, norm", MATRIX)
def test_forward_backward_and_state_reaches_every_norm(name, norm):
    torch.manual_seed(0)
    model = build_model(name, 7, NORMS[norm], small_size(name))
    N.set_step(model, 10)  # BRN past its warm-up: r and d are active
    priors = []  # whether each BKN layer got a prior: all but the network's first must
    for layer in model.modules():
        if isinstance(layer, N.KalmanNorm2d):
            layer.register_forward_pre_hook(lambda module, args: priors.append(args[1] is not None))
    logits = model(images(4, name))
    logits.logsumexp(1).sum().backward()
    assert logits.shape == (4, 7) and torch.isfinite(logits).all()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []  # also BKN's A, if any
    if norm.startswith("bkn"):
        assert priors.count(False) == 1 and priors[0] is False


def randomize_norms(model: nn.Module) -> None:
    """Affine parameters and running statistics away from 1 and 0, so that mistakes show."""
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, (nn.BatchNorm2d, N.BatchNorm2d, N.KalmanNorm2d, N.GroupNorm2d)) and layer.affine:
                layer.weight.uniform_(0.5, 1.5), layer.bias.uniform_(-0.5, 0.5)
            if isinstance(layer, (nn.BatchNorm2d, N.BatchNorm2d, N.KalmanNorm2d)) and layer.affine:
                layer.running_mean.uniform_(-0.5, 0.5), layer.running_var.uniform_(0.5, 2.0)


@pytest.mark.parametrize("name", ["cifar_net", "resnet18", "preact_resnet32"])
@pytest.mark.parametrize("transition", ["analytic", "monte_carlo", "linear"])
def test_bkn_with_gain_one_is_the_bn_model(name, transition):
    torch.manual_seed(0)
    bn = build_model(name, 5, NORMS["bn"], small_size(name))
    randomize_norms(bn)
    bkn = build_model(name, 5, {**NORMS[f"bkn-{transition}"], "gain": 1.0}, small_size(name))
    result = bkn.load_state_dict(bn.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert {key.rsplit(".", 1)[1] for key in result.missing_keys} <= {"transition_matrix", "noise_raw"}
    x = images(6, name)
    outputs = [model(x) for model in (bn, bkn)]
    for output in outputs:
        (output ** 2).sum().backward()
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)
    bkn_parameters = dict(bkn.named_parameters())
    for key, parameter in bn.named_parameters():
        torch.testing.assert_close(bkn_parameters[key].grad, parameter.grad, rtol=1e-4, atol=1e-5, msg=key)
    bkn_buffers = dict(bkn.named_buffers())
    for key, buffer in bn.named_buffers():  # running statistics updated alike
        torch.testing.assert_close(bkn_buffers[key], buffer, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("name", RESNETS)
def test_bn_resnets_have_torchvision_names_shapes_and_parameter_counts(name):
    with torch.device("meta"):
        ours = build_model(name, 1000, {"name": "bn"}, 224)
        theirs = getattr(torchvision.models, name)()
    assert count_parameters(ours) == count_parameters(theirs)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}


@pytest.mark.parametrize("name", ["resnet18", pytest.param("resnet50", marks=pytest.mark.slow)])
def test_torchvision_state_dict_loads_strictly_and_gives_torchvisions_outputs(name):
    torch.manual_seed(0)
    theirs = getattr(torchvision.models, name)(num_classes=10)
    randomize_norms(theirs)
    ours = build_model(name, 10, {"name": "bn"}, 64)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    ours.eval(), theirs.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-4)


def test_zero_init_residual_zeroes_the_same_norm_weights_as_torchvision():
    def zeroed(model: nn.Module) -> set[str]:
        return {key for key, value in model.state_dict().items() if key.endswith("weight") and not value.any()}

    ours = zeroed(build_model("resnet50", 10, {"name": "bn"}, 224, zero_init_residual=True))
    assert ours == zeroed(torchvision.models.resnet50(num_classes=10, zero_init_residual=True))
    assert len(ours) == 16 and zeroed(build_model("resnet50", 10, {"name": "bn"}, 224)) == set()


@pytest.mark.parametrize("name", ["cifar_net", "preact_resnet32", "resnet18"])
def test_population_statistics_make_examples_independent_and_batch_statistics_do_not(name):
    torch.manual_seed(0)
    model = build_model(name, 5, NORMS["bkn-analytic"], small_size(name))
    with torch.no_grad():
        for seed in range(3):  # a few training steps' worth of running statistics
            model(images(4, name, seed))
    model.eval()
    x = images(4, name, seed=10)
    others = x.clone()
    others[1:] = images(3, name, seed=11)
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], model(others)[0])  # option B
        N.set_inference(model, "batch")
        assert not torch.allclose(model(x)[0], model(others)[0], atol=1e-4)  # option A


@pytest.mark.parametrize("name", ["cifar_net", "inception_v2", "resnet50", "preact_resnet32"])
def test_mac_count_equals_torch_flop_counter(name):
    size = 64
    with torch.device("meta"):
        model = build_model(name, 10, {"name": "bn"}, size)
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model.eval()(torch.zeros(1, 3, size, size))
    assert count_macs(model, size) * 2 == counter.get_total_flops()


def test_summary_command_prints_parameters_and_macs_of_each_normalizer(capsys):
    summary_main(["preact_resnet32", "--norm", "bkn", "--image-size", "8", "--num-classes", "7"])
    lines = capsys.readouterr().out.splitlines()[2:]
    assert [line.split(" | ")[1] for line in lines] == ["bkn (analytic)", "bkn (monte_carlo)", "bkn (linear)"]
    for line, transition in zip(lines, ["analytic", "monte_carlo", "linear"]):
        model = build_model("preact_resnet32", 7, {"name": "bkn", "transition": transition}, 8)
        assert f"| {count_parameters(model):,} (" in line
        assert f"| {count_macs(model, 8) / 1e9:.3f} G |" in line


def test_bad_names_sizes_and_options_get_one_clear_line():
    message = f"unknown model 'resnet'; choose one of {list_models()} (model=...)"
    with pytest.raises(ValueError, match=re.escape(message)):
        build_model("resnet", 10, NORMS["bn"], 224)
    with pytest.raises(ValueError, match=r"inception_v2 downsamples by 32, so image_size=16 is too small; "
                                         r"use image_size >= 32"):
        build_model("inception_v2", 10, NORMS["bn"], 16)
    with pytest.raises(ValueError, match=r"image_size=1 is too small; use image_size >= 2"):
        build_model("cifar_net", 10, NORMS["bn"], 1)
    with pytest.raises(ValueError, match=r"model 'cifar_net' has no option 'zero_init_residual'"):
        build_model("cifar_net", 10, NORMS["bn"], 32, zero_init_residual=True)
    assert set(list_models()) == set(MODELS)


@pytest.mark.slow
def test_compiled_cifar_net_with_bkn_matches_eager():
    torch.manual_seed(0)
    model = build_model("cifar_net", 5, NORMS["bkn-analytic"], 8)
    N.set_step(model, 10)  # the warm-up counts optimizer steps, as under train.py: fullgraph compiles it
    x = images(4, "cifar_net")
    eager = model(x)
    eager.sum().backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for layer in model.modules():  # the same running statistics before both runs
        if isinstance(layer, N.KalmanNorm2d):
            layer.reset_running_stats()
    # fullgraph: no graph break in the state threading; static shapes, as train.py compiles
    compiled = torch.compile(model, fullgraph=True, dynamic=False)(x)
    compiled.sum().backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    for grad, parameter in zip(eager_grads, model.parameters()):
        torch.testing.assert_close(parameter.grad, grad, rtol=1e-3, atol=1e-4)


def test_cifar_net_width_matches_bkn_linear_parameter_count():
    """Table 3's widened BN: width 1.17 holds as many parameters as BKN with the linear transition."""
    count = lambda model: sum(p.numel() for p in model.parameters())  # noqa: E731
    default = build_model("cifar_net", 10, {"name": "bn"}, 32)
    assert count(build_model("cifar_net", 10, {"name": "bn"}, 32, width=1.0)) == count(default)
    widened = count(build_model("cifar_net", 10, {"name": "bn"}, 32, width=1.17))
    bkn_linear = count(build_model("cifar_net", 10, {"name": "bkn", "transition": "linear"}, 32))
    assert bkn_linear > count(default)
    assert abs(widened - bkn_linear) / bkn_linear < 0.01
    with pytest.raises(ValueError, match="width must be positive"):
        build_model("cifar_net", 10, {"name": "bn"}, 32, width=0)


@pytest.mark.parametrize("norm", list(NORMS))
@pytest.mark.parametrize("name", ["cifar_net", "preact_resnet32"])
def test_eval_model_classifies_any_batch_each_example_as_alone(name, norm):
    """A model trained with statistics groups of 2 classifies one image, or five, in eval mode."""
    torch.manual_seed(0)
    model = build_model(name, 5, NORMS[norm], small_size(name))
    N.set_step(model, 10)
    with torch.no_grad():
        for seed in range(3):  # a few training steps' worth of running statistics
            model(images(4, name, seed))
    model.eval()
    x = images(5, name, seed=10)
    with torch.no_grad():
        together = model(x)
        alone = torch.cat([model(x[i:i + 1]) for i in range(5)])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["cifar_net", "inception_v2", "resnet18", "preact_resnet32"])
def test_a_normalizer_name_alone_is_a_norm_spec(name):
    size = 224 if name in ("inception_v2", "resnet18") else 32
    with torch.device("meta"):
        for norm in ("bn", "brn", "bkn"):
            assert repr(build_model(name, 10, norm, size)) == repr(build_model(name, 10, {"name": norm}, size))
    block = N.ConvNormAct(3, 4, 3, "bkn")
    assert isinstance(block.norm, N.KalmanNorm2d) and block.norm.in_features == 3


DEPLOYED = [("cifar_net", "bn"), ("cifar_net", "bkn-analytic"), ("preact_resnet32", "bn"),
            ("preact_resnet32", "bkn-analytic")]


def trained(name: str, norm: str) -> nn.Module:
    """A model with a few training steps' running statistics and random affine parameters, in eval mode."""
    torch.manual_seed(0)
    model = build_model(name, 5, NORMS[norm], small_size(name))
    randomize_norms(model)
    with torch.no_grad():
        for seed in range(2):
            model(images(4, name, seed))
    return model.eval()


@pytest.mark.parametrize("name, norm", DEPLOYED)
def test_an_eval_model_exports_with_a_dynamic_batch_and_gives_the_same_outputs(name, norm):
    model = trained(name, norm)
    exported = torch.export.export(model, (images(4, name),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    for batch in (1, 3, 5):
        x = images(batch, name, seed=batch)
        with torch.no_grad():
            torch.testing.assert_close(exported.module()(x), model(x))


@pytest.mark.filterwarnings("ignore:`torch.jit.trace")
@pytest.mark.parametrize("name, norm", [*DEPLOYED, ("cifar_net", "brn"), ("cifar_net", "bkn-linear"),
                                        ("preact_resnet32", "bkn-monte_carlo"), ("resnet18", "bkn-linear"),
                                        ("preact_resnet32", "gn")])
def test_to_torch_batchnorm_gives_torch_layers_and_the_same_outputs(name, norm):
    model = trained(name, norm)
    N.set_step(model, 10)
    x = images(5, name, seed=3)
    with torch.no_grad():
        expected = model(x)
        converted = N.to_torch_batchnorm(model)
        norms = [m for m in converted.modules() if isinstance(m, (nn.BatchNorm2d, N.BatchNorm2d, N.BatchRenorm2d,
                                                                  N.KalmanNorm2d)) and m.track_running_stats]
        assert all(type(m) is nn.BatchNorm2d for m in norms) and (norms or norm == "gn")
        assert not any(isinstance(m, N.GroupNorm2d) for m in converted.modules())  # GN: torch's GroupNorm
        torch.testing.assert_close(converted(x), expected)
        traced = torch.jit.trace(converted, x)  # TorchScript takes it
        torch.testing.assert_close(traced(images(2, name, seed=4)), converted(images(2, name, seed=4)))


def test_converted_conv_norm_fuses_with_torch_fusion():
    block = N.ConvNormAct(3, 4, 3, {"name": "bkn", "statistics_batch_size": 2}, first=True)
    randomize_norms(block)
    block.eval()
    x = torch.randn(3, 3, 6, 6)
    with torch.no_grad():
        expected, _ = block(x)
        N.to_torch_batchnorm(block)
        fused = torch.nn.utils.fusion.fuse_conv_bn_eval(block.conv, block.norm)
        torch.testing.assert_close(torch.relu(fused(x)), expected, rtol=1e-4, atol=1e-5)
    assert type(N.to_torch_batchnorm(N.BatchRenorm1d(4))) is nn.BatchNorm1d  # a layer itself: its replacement
    option_a = N.BatchNorm2d(4, inference="batch")  # needs test-batch statistics: not BatchNorm in eval
    assert N.to_torch_batchnorm(option_a) is option_a


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("norm", list(NORMS))
def test_a_model_in_float64_float16_or_bfloat16_trains_and_evaluates_like_float32(norm, dtype):
    torch.manual_seed(0)
    reference = build_model("cifar_net", 5, NORMS[norm], 8)
    model = build_model("cifar_net", 5, NORMS[norm], 8)
    model.load_state_dict(reference.state_dict())
    model.to(dtype)
    N.set_step(reference, 10), N.set_step(model, 10)
    x = images(4, "cifar_net")
    tolerance = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float64 else {"rtol": 0.1, "atol": 0.15}
    for training in (True, False):
        reference.train(training), model.train(training)
        torch.manual_seed(1)  # the same Monte-Carlo samples
        expected = reference(x[:3] if not training else x)
        torch.manual_seed(1)
        got = model((x[:3] if not training else x).to(dtype))
        assert got.dtype == dtype
        assert torch.isfinite(got).all()
        if not (norm == "bkn-monte_carlo" and dtype == torch.float64):  # float64 draws other samples
            torch.testing.assert_close(got.float(), expected, **tolerance)
        if training:
            got.float().logsumexp(1).sum().backward()
            assert all(p.grad.dtype == dtype and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("depth", [8, 14])
def test_preact_resnet_of_any_depth_6n_plus_2_takes_one_channel(depth):
    model = build_model("preact_resnet", 10, NORMS["bkn-linear"], 28, depth=depth, in_channels=1)
    blocks = (depth - 2) // 6
    assert len(model.blocks) == 3 * blocks  # three stages of n blocks: 2 convs each, + stem and classifier
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) + 1 == depth and convs[0].in_channels == 1
    logits = model(torch.randn(4, 1, 28, 28))  # 28 -> 14 -> 7: the odd size halves like the conv
    logits.sum().backward()
    assert logits.shape == (4, 10)


def test_the_authors_depths_are_aliases_of_preact_resnet():
    for name, depth in (("preact_resnet32", 32), ("preact_resnet110", 110)):
        with torch.device("meta"):
            alias, general = (build_model(n, 10, "bn", 32, **o) for n, o in ((name, {}), ("preact_resnet", {"depth": depth})))
        assert [(k, v.shape) for k, v in alias.state_dict().items()] == \
               [(k, v.shape) for k, v in general.state_dict().items()]


@pytest.mark.parametrize("depth", [2, 15, 0])
def test_a_depth_not_6n_plus_2_is_refused_in_one_line(depth):
    with pytest.raises(ValueError, match=rf"^model.depth={depth}: a pre-activation ResNet has depth 6n \+ 2"):
        build_model("preact_resnet", 10, "bn", 32, depth=depth)


def test_summary_lists_preact_resnet_at_the_depth_asked(capsys):
    summary_main(["preact_resnet", "--depth", "14", "--norm", "bn", "--image-size", "28"])
    line = capsys.readouterr().out.splitlines()[2]
    model = build_model("preact_resnet", 10, "bn", 28, depth=14)
    assert line.startswith("| preact_resnet-d14 | bn | 28x28 |") and f"| {count_parameters(model):,} (" in line
    with pytest.raises(SystemExit):
        summary_main(["preact_resnet", "--depth", "16"])
    assert "model.depth=16" in capsys.readouterr().err
