"""Blocks in containers: bkn.nn.Sequential threads BKN's estimate exactly as a hand-written
forward does, torch's nn.Sequential gets a clear error, KalmanState prints as one line, and
build_norm's list of options is what the layers accept."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from bkn.nn import NORMALIZERS, ConvNormAct, KalmanState, Sequential, build_norm
from bkn.nn.norms import TIMM_NORMALIZERS

BKN = {"name": "bkn", "statistics_batch_size": 2, "transition": "analytic", "gain": 0.1, "gain_warmup": 0}


def _blocks() -> tuple[ConvNormAct, ConvNormAct, ConvNormAct]:
    torch.manual_seed(0)
    return ConvNormAct(3, 8, 3, BKN, first=True), ConvNormAct(8, 8, 3, BKN, stride=2), ConvNormAct(8, 4, 1, BKN)


def test_sequential_threads_the_state_like_a_hand_written_forward() -> None:
    first, second, third = _blocks()
    x = torch.randn(8, 3, 16, 16)
    model = Sequential(first, Sequential(second, nn.MaxPool2d(2)), third)
    y, state = model(x)

    expected, expected_state = first(x)
    expected, expected_state = second(expected, expected_state)
    expected, expected_state = third(nn.MaxPool2d(2)(expected), expected_state)  # the pool keeps the state
    assert torch.equal(y, expected)
    assert torch.equal(state.mean, expected_state.mean) and torch.equal(state.var, expected_state.var)
    without_state, _ = third(nn.MaxPool2d(2)(second(first(x)[0])[0]))
    assert not torch.allclose(y, without_state)  # the state mattered: it was passed, not dropped


def test_torch_sequential_of_blocks_is_refused_with_the_fix() -> None:
    first, second, _ = _blocks()
    with pytest.raises(TypeError, match=r"chain blocks in bkn.nn.Sequential"):
        nn.Sequential(first, second)(torch.randn(4, 3, 8, 8))


def test_kalman_state_prints_as_one_short_line() -> None:
    state = KalmanState(torch.randn(4, 256), torch.rand(4, 256))
    assert repr(state) == "KalmanState(groups=4, channels=256, dtype=float32, device=cpu)"
    assert repr(state) == str(state) and "\n" not in str([state])


@pytest.mark.parametrize("name", sorted({*NORMALIZERS, *TIMM_NORMALIZERS}))  # timm's register when first built
def test_build_norm_lists_the_options_the_layer_accepts(name: str) -> None:
    with pytest.raises(ValueError, match=r"its options are \[(.*)\]") as error:
        build_norm(name, 4, no_such_option=1)
    listed = re.findall(r"'(\w+)'", re.search(r"its options are \[(.*)\]", str(error.value))[1])
    assert listed and "args" not in listed and "kwargs" not in listed
    defaults = {"statistics_batch_size": 2, "inference": "population", "in_features": 4}
    for option in listed:  # each listed option is one the layer really takes
        value = defaults.get(option, getattr(build_norm(name, 4), option, None))
        if value is not None:
            build_norm(name, 4, **{option: value})
