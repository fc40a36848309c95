"""The engine's parts against independent computations, and train.py end to end on synthetic
data, on CIFAR files in the real pickle format, and with a real model of the registry."""

from __future__ import annotations

import math
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import Dataset

from bkn.engine.batches import StepBatches
from bkn.engine.checkpoint import checkpoint_path, load_checkpoint
from bkn.engine.evaluate import evaluate
from bkn.engine.optim import build_optimizer, learning_rate
from bkn.engine.records import RunRecord, read_metrics, read_summary
from bkn.nn import set_inference
from data_writers import write_cifar10, write_cifar100
from training_helpers import (ROOT, TINY, TINY_RUN, TinyNet, final_state, register_tiny_net, run_train_main,
                              subprocess_env, the_run_dir, train_in_process)


TRAIN_KEYS = {"kind", "step", "epoch", "loss", "lr", "examples_per_s", "skipped_steps"}
EVAL_KEYS = {"kind", "step", "inference", "top1", "top5", "loss", "examples"}
SUMMARY_KEYS = {"experiment", "run", "status", "model", "normalizer", "transition", "gradient_batch_size",
                "statistics_batch_size", "per_device_batch_size", "world_size", "accumulation", "data", "seed",
                "steps", "step", "final", "examples_per_s", "wall_time_s", "num_parameters", "versions"}


# --- parts ---------------------------------------------------------------------------------

def _torch_schedule(scheduler_type: type, steps: int, **options: object) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = scheduler_type(optimizer, **options)
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def test_learning_rate_matches_torch_schedulers() -> None:
    step = {"name": "step", "warmup_steps": 0, "milestones": [0.5, 0.75], "gamma": 0.1}
    ours = [learning_rate(t, 20, 0.1, step) for t in range(20)]
    torch_rates = _torch_schedule(torch.optim.lr_scheduler.MultiStepLR, 20, milestones=[10, 15], gamma=0.1)
    assert ours == pytest.approx(torch_rates)
    cosine = {"name": "cosine", "warmup_steps": 0}
    torch_rates = _torch_schedule(torch.optim.lr_scheduler.CosineAnnealingLR, 20, T_max=20)
    assert [learning_rate(t, 20, 0.1, cosine) for t in range(20)] == pytest.approx(torch_rates)
    warm = [learning_rate(t, 20, 0.1, {**cosine, "warmup_steps": 4}) for t in range(5)]
    assert warm == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1])


def test_no_weight_decay_on_norm_parameters_and_biases() -> None:
    model = TinyNet(4, {"name": "bn"}, 8)
    settings = {"lr": 0.1, "momentum": 0.9, "nesterov": False, "weight_decay": 1e-4, "decay_norm_and_bias": False}
    decayed, exempt = build_optimizer(model, settings).param_groups
    names = {id(p): name for name, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in decayed["params"]) == ["block1.conv.weight", "block2.conv.weight", "fc.weight"]
    assert decayed["weight_decay"] == 1e-4 and exempt["weight_decay"] == 0.0 and len(exempt["params"]) == 5
    everything = build_optimizer(model, {**settings, "decay_norm_and_bias": True}).param_groups
    assert len(everything) == 1 and len(everything[0]["params"]) == 8


def test_a_skipped_step_changes_nothing_and_a_good_step_is_sgd() -> None:
    from bkn.engine.distributed import Collective
    from bkn.engine.loop import BufferSnapshot, optimizer_step

    torch.manual_seed(0)
    model = TinyNet(4, {"name": "bn"}, 8)
    reference = TinyNet(4, {"name": "bn"}, 8)
    reference.load_state_dict(model.state_dict())
    settings = {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3, "decay_norm_and_bias": False}
    session = SimpleNamespace(optimizer=build_optimizer(model, settings), raw_model=model,
                              collective=Collective(SimpleNamespace(size=1)),
                              scaler=torch.amp.GradScaler("cpu", enabled=False))
    torch_sgd = torch.optim.SGD([{"params": [p for p in reference.parameters() if p.ndim > 1], "weight_decay": 1e-3},
                                 {"params": [p for p in reference.parameters() if p.ndim <= 1], "weight_decay": 0}],
                                lr=0.1, momentum=0.9, nesterov=True)
    images, labels = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    before = {name: p.detach().clone() for name, p in model.named_parameters()}

    snapshot = BufferSnapshot(model)
    snapshot.take()
    buffers = [buffer.clone() for buffer in model.buffers() if buffer.is_floating_point()]
    loss = torch.nn.functional.cross_entropy(model(images * float("nan")), labels)
    loss.backward()
    assert optimizer_step(session, loss.detach(), snapshot).item() == 1.0  # skipped
    assert all(torch.equal(before[name], p) for name, p in model.named_parameters())
    assert all(torch.equal(old, new) for old, new in zip(buffers, snapshot.buffers))  # running statistics too
    momentum = [session.optimizer.state[p]["momentum_buffer"] for p in model.parameters()]
    assert all(not buffer.any() for buffer in momentum)
    for _ in range(2):  # then two good steps equal torch's own SGD (its first momentum step included)
        snapshot.take()
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        assert optimizer_step(session, loss.detach(), snapshot).item() == 0.0
        torch.nn.functional.cross_entropy(reference(images), labels).backward()
        torch_sgd.step()
        torch_sgd.zero_grad()
    for (name, ours), theirs in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(ours, theirs, msg=name)


class IndexDataset(Dataset):
    """Example i is (tensor i, i % 3): the batches say which examples they hold."""

    def __len__(self) -> int:
        return 50

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.tensor(index), index % 3


def _batches(world_size: int, rank: int, accumulation: int) -> StepBatches:
    return StepBatches(IndexDataset(), per_device_batch_size=4, accumulation=accumulation, world_size=world_size,
                       rank=rank, num_workers=0, seed=5, pin_memory=False)


def test_step_batches_do_not_depend_on_how_the_gradient_batch_is_split() -> None:
    single, ranks = _batches(1, 0, accumulation=2), [_batches(2, rank, accumulation=1) for rank in (0, 1)]
    assert single.steps_per_epoch == 6  # 50 // 8
    seen_in_epoch: list[int] = []
    for step in range(9):  # past an epoch boundary
        micro = [images.tolist() for images, _ in single.next_step()]
        assert micro == [ranks[rank].next_step()[0][0].tolist() for rank in (0, 1)]
        if step < 6:
            seen_in_epoch += micro[0] + micro[1]
    assert len(set(seen_in_epoch)) == 48  # no example twice within an epoch
    resumed = _batches(1, 0, accumulation=2)
    resumed.seek(**{"epoch": 1, "batch_in_epoch": 3})  # the position after step 9
    continued = [images.tolist() for images, _ in single.next_step()]
    assert [images.tolist() for images, _ in resumed.next_step()] == continued


def test_evaluation_options_against_example_by_example() -> None:
    torch.manual_seed(0)
    model = TinyNet(3, {"name": "bkn", "statistics_batch_size": 2}, 8)
    model.train()
    for _ in range(3):  # running statistics that differ from any test batch's
        model(torch.randn(8, 3, 8, 8) * 2 + 1)
    images, labels = torch.randn(11, 3, 8, 8), torch.randint(0, 3, (11,))
    batches = [(images[i:i + 4], labels[i:i + 4]) for i in range(0, 11, 4)]  # 4, 4, 3
    options = dict(statistics_batch_size=2, to_device=lambda x: x, autocast=nullcontext)

    model.eval()
    with torch.no_grad():
        # Option B: each example alone (a batch of one) with running statistics.
        alone = torch.cat([model(images[i:i + 1]) for i in range(11)])
        # Option A: each statistics group on its own, with its own statistics. Group g of a batch of
        # n holds its examples g, g + n/2, ... (bkn.functional); the 11th example is trimmed.
        set_inference(model, "batch")
        grouped = torch.zeros(10, 3)
        for batch in ([0, 1, 2, 3], [4, 5, 6, 7], [8, 9]):
            groups = len(batch) // 2
            for g in range(groups):
                members = batch[g::groups]
                grouped[members] = model(images[members])
        set_inference(model, "population")
    population = evaluate(model, batches, inference="population", **options)
    batch = evaluate(model, batches, inference="batch", **options)
    assert population.examples == 11 and batch.examples == 10
    assert population.top1 == pytest.approx(100 * (alone.argmax(1) == labels).float().mean().item())
    assert batch.top1 == pytest.approx(100 * (grouped.argmax(1) == labels[:10]).float().mean().item())
    assert batch.loss == pytest.approx(torch.nn.functional.cross_entropy(grouped, labels[:10]).item(), rel=1e-5)
    assert population.top5 == batch.top5 == 100.0  # 3 classes: top-5 is top-3
    for module in model.modules():  # layers without running statistics use batch statistics in eval too
        if hasattr(module, "track_running_stats"):
            module.track_running_stats = False
    assert evaluate(model, batches, inference="population", **options).examples == 10  # not an error


def test_run_record_is_strict_json_without_credentials(tmp_path: Path) -> None:
    record = RunRecord(tmp_path, writable=True)
    record.start({"logger": {"wandb": {"api_key": "sk-1", "project": "p"}}, "token": "t"}, resumed_step=None)
    record.append({"kind": "train", "step": 1, "loss": float("nan")})
    record.write_summary({"final": {"batch": {"loss": float("inf")}}})
    config = (tmp_path / "config.yaml").read_text()
    assert "sk-1" not in config and "api_key: <redacted>" in config and "token: <redacted>" in config
    assert read_metrics(tmp_path) == [{"kind": "train", "step": 1, "loss": None}]
    assert read_summary(tmp_path) == {"final": {"batch": {"loss": None}}}
    RunRecord(tmp_path, writable=False).append({"step": 2})
    assert len(read_metrics(tmp_path)) == 1


# --- end to end ------------------------------------------------------------------------------

def _check_record(run_dir: Path, steps: int) -> dict:
    summary = read_summary(run_dir)
    assert SUMMARY_KEYS <= set(summary) and summary["status"] == "finished"
    assert summary["step"] == summary["steps"] == steps
    lines = read_metrics(run_dir)
    train_lines = [line for line in lines if line["kind"] == "train"]
    eval_lines = [line for line in lines if line["kind"] == "eval"]
    assert train_lines and all(set(line) == TRAIN_KEYS for line in train_lines)
    assert all(set(line) == EVAL_KEYS for line in eval_lines)
    assert {line["inference"] for line in eval_lines if line["step"] == steps} == {"population", "batch"}
    for inference, result in summary["final"].items():
        assert 0 <= result["top1"] <= result["top5"] <= 100 and math.isfinite(result["loss"])
    assert load_checkpoint(checkpoint_path(run_dir))["step"] == steps  # weights_only load
    return summary


def test_train_py_with_a_registry_model(tmp_path: Path) -> None:
    command = [sys.executable, str(ROOT / "train.py"), "model=cifar_net", "normalizer=bkn_monte_carlo",
               "data=synthetic", "data.image_size=8", "data.train_size=32", "data.test_size=8", "batch.gradient=4",
               "train.steps=2", "train.epochs=null", "train.log_every=1", f"out_dir={tmp_path}"]
    result = subprocess.run(command, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = the_run_dir(tmp_path)  # data=synthetic, train.steps=2, ...: the name's hash suffix
    assert run_dir.parent.name == "default" and run_dir.name.startswith("cifar_net_bkn-monte_carlo_g4_s2_seed0_")
    summary = _check_record(run_dir, steps=2)
    assert (summary["model"], summary["transition"], summary["data"]) == ("cifar_net", "monte_carlo", "synthetic")
    assert summary["run"] == run_dir.name
    config = (run_dir / "config.yaml").read_text()
    assert f"run_name: {run_dir.name}" in config and "${" not in config  # resolved


@pytest.mark.parametrize("writer", [write_cifar10, write_cifar100])
def test_train_py_on_cifar_files(writer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    register_tiny_net(monkeypatch)
    writer(tmp_path / "cifar")
    name = "cifar10" if writer is write_cifar10 else "cifar100"
    overrides = [*TINY_RUN, f"data={name}", f"data.root={tmp_path / 'cifar'}", "data.num_workers=0",
                 "data.image_size=8", "batch.gradient=4", "train.steps=3", f"out_dir={tmp_path / 'runs'}"]
    assert run_train_main(monkeypatch, overrides) == 0
    summary = _check_record(the_run_dir(tmp_path / "runs"), steps=3)
    assert summary["data"] == name and summary["final"]["population"]["examples"] == 6


def test_same_config_same_parameters_and_finished_runs_are_kept(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    register_tiny_net(monkeypatch)
    overrides = [*TINY, "normalizer=bkn_monte_carlo"]  # Monte-Carlo noise: the seed must fix it too
    first, second = (train_in_process(tmp_path / name, overrides) for name in ("a", "b"))
    a, b = final_state(first), final_state(second)
    assert all(torch.equal(a[key], b[key]) for key in a)
    metrics = (first / "metrics.jsonl").read_text()
    train_in_process(tmp_path / "a", overrides)  # resume=auto on a finished run: nothing to do
    assert (first / "metrics.jsonl").read_text() == metrics


def test_dry_run_prints_the_plan_and_trains_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    register_tiny_net(monkeypatch)
    code = run_train_main(monkeypatch, [*TINY, f"out_dir={tmp_path}", "dry_run=true", "batch.per_device=4"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "8 = 4 per device x 1 process(es) x 2 accumulation step(s)" in printed
    assert "6 steps = 1.00 epochs of 48 training examples" in printed
    assert not list(tmp_path.rglob("summary.json"))


def _train_losses(run_dir: Path) -> list[float]:
    return [line["loss"] for line in read_metrics(run_dir) if line["kind"] == "train"]


def test_bf16_autocast_trains_like_float32(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    register_tiny_net(monkeypatch)
    float32 = _train_losses(train_in_process(tmp_path / "fp32", TINY))
    bfloat16 = _train_losses(train_in_process(tmp_path / "bf16", [*TINY, "amp=bf16"]))
    assert bfloat16 != float32  # autocast was on: bf16 rounding shows in the losses
    assert bfloat16 == pytest.approx(float32, rel=0.02)


@pytest.mark.parametrize(("value", "mode"), [("true", "default"),
                                             ("max-autotune-no-cudagraphs", "max-autotune-no-cudagraphs")])
def test_compile_hands_its_mode_to_torch_compile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str,
                                                  mode: str) -> None:
    """What train.py compiles and how; the compiled training itself is the slow test below."""
    register_tiny_net(monkeypatch)
    calls = []

    def record(model: torch.nn.Module, **options: object) -> torch.nn.Module:
        calls.append(options)
        return model

    monkeypatch.setattr(torch, "compile", record)
    train_in_process(tmp_path, [*TINY, f"compile={value}"])
    assert calls == [{"dynamic": False, "mode": mode}]


@pytest.mark.slow
def test_torch_compile_trains_like_eager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    register_tiny_net(monkeypatch)
    eager = _train_losses(train_in_process(tmp_path / "eager", [*TINY, "normalizer=bkn_linear"]))
    compiled = _train_losses(train_in_process(tmp_path / "compiled", [*TINY, "normalizer=bkn_linear", "compile=true"]))
    assert compiled == pytest.approx(eager, rel=1e-3)
