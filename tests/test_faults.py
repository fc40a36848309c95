"""Every fault of issue 7 at the train.py level, in one place: bad settings, SIGTERM, a crash while
writing a checkpoint, a failing DDP rank, non-finite steps, W&B failures, secrets, bad data, and
BKN's variance safety in a real model. (A SIGKILLed run resuming exactly: test_resume.py.)"""

from __future__ import annotations

import logging
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

import bkn.engine.loop as loop
from bkn.engine.batches import StepBatches
from bkn.engine.checkpoint import checkpoint_path, load_checkpoint
from bkn.engine.evaluate import EvalResult
from bkn.engine.records import read_metrics, read_summary
from bkn.models import build_model
from data_writers import write_cifar10, write_image_folders
from training_helpers import (ROOT, TINY, TINY_RUN, register_tiny_net, run_fault_runner, run_train_main,
                              save_then_fail, subprocess_env, the_run_dir, train_in_process)


SECRET = "sk-test-secret-123"


def test_a_bad_setting_is_one_line_on_stderr_and_exit_code_2(tmp_path: Path) -> None:
    command = [sys.executable, str(ROOT / "train.py"), "batch.statistics=3", f"out_dir={tmp_path}"]
    result = subprocess.run(command, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: batch.statistics=3 does not divide the device batch batch.per_device=16: each device batch is cut "
        "into statistics groups; choose one of [1, 2, 4, 8, 16] (or, with k processes, per_device x k: a group "
        "pooled over k devices)"]
    assert not list(tmp_path.rglob("summary.json"))  # nothing ran


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = [*TINY, "train.steps=10", "checkpoint.every=null", f"out_dir={tmp_path}"]
    result = run_fault_runner(tmp_path, run, fault="term@4")  # SIGTERM arrives during step 5
    assert result.returncode == 143, result.stderr[-3000:]  # 128 + SIGTERM: interrupted, a sweep stops
    run_dir = the_run_dir(tmp_path)
    log = result.stdout + result.stderr
    assert f"preempted by SIGTERM at step 5; checkpoint saved to {checkpoint_path(run_dir)}" in log
    assert read_summary(run_dir)["status"] == "preempted"
    assert load_checkpoint(checkpoint_path(run_dir))["step"] == 5
    register_tiny_net(monkeypatch)
    train_in_process(tmp_path, run)  # the same command again continues to the end
    assert read_summary(run_dir)["status"] == "finished"


@pytest.mark.parametrize("signal_number, exit_code", [(signal.SIGUSR2, 0), (signal.SIGTERM, 143)])
def test_a_signal_during_the_final_evaluation(signal_number: int, exit_code: int, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The run is finished either way; SIGTERM still stops a sweep, submitit's time-limit warning
    (SIGUSR2) does not turn a finished job into a failed one."""
    register_tiny_net(monkeypatch)
    original = loop.evaluate

    def evaluate_then_signal(*args: Any, **kwargs: Any) -> EvalResult:
        os.kill(os.getpid(), signal_number)  # caught by the run's StopRequest
        return original(*args, **kwargs)

    monkeypatch.setattr(loop, "evaluate", evaluate_then_signal)
    assert run_train_main(monkeypatch, [*TINY, "eval.every=null", f"out_dir={tmp_path}"]) == exit_code
    assert read_summary(the_run_dir(tmp_path))["status"] == "finished"


def test_a_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    register_tiny_net(monkeypatch)
    save_then_fail(monkeypatch, RuntimeError("the writer crashed"))
    with pytest.raises(RuntimeError, match="the writer crashed"):  # an unexpected error: it keeps its traceback
        train_in_process(tmp_path, TINY)  # checkpoints at steps 3 and 6
    run_dir = the_run_dir(tmp_path)
    summary = read_summary(run_dir)
    assert summary["status"] == "failed" and summary["error"] == "the writer crashed"
    assert load_checkpoint(checkpoint_path(run_dir))["step"] == 3
    assert sorted(path.name for path in checkpoint_path(run_dir).parent.iterdir()) == [
        "last.pt", "step-00000003.pt", "step-00000003.pt.sha256"]  # no debris


def test_a_failing_rank_ends_every_rank_with_its_error(tmp_path: Path) -> None:
    # Without timeouts rank 0 would wait forever for rank 1's gradients; torchrun must end both
    # and show rank 1's traceback (the subprocess timeout fails the test if anything hangs).
    args = [*TINY, "batch.per_device=4", "train.steps=6", "distributed.timeout_s=300", f"out_dir={tmp_path}"]
    result = run_fault_runner(tmp_path, args, fault="raise@2:1", torchrun_processes=2, timeout=240)
    assert result.returncode != 0
    assert "RuntimeError: injected failure at step 2 on rank 1" in result.stderr
    assert "rank      : 1" in result.stderr  # torchrun's report names the failing rank


def _poison_steps(monkeypatch: pytest.MonkeyPatch, bad_steps: set[int]) -> None:
    """Make the images of the given optimizer steps NaN: a non-finite loss and gradient."""
    original = StepBatches.next_step
    calls = iter(range(10**6))

    def next_step(self: StepBatches) -> list:
        batches = original(self)
        if next(calls) in bad_steps:
            return [(images * math.nan, labels) for images, labels in batches]
        return batches

    monkeypatch.setattr(StepBatches, "next_step", next_step)


def test_non_finite_steps_are_skipped_and_counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    register_tiny_net(monkeypatch)
    _poison_steps(monkeypatch, {2, 3})
    run_dir = train_in_process(tmp_path, [*TINY, "train.max_bad_steps=3"])
    summary = read_summary(run_dir)
    assert summary["status"] == "finished" and summary["skipped_steps"] == 2
    assert [line["skipped_steps"] for line in read_metrics(run_dir) if line["kind"] == "train"] == [0, 2, 2]
    # The skipped steps left no trace: parameters and running statistics are finite, so is evaluation.
    state = load_checkpoint(checkpoint_path(run_dir))["model"]
    assert all(torch.isfinite(value).all() for value in state.values() if value.is_floating_point())
    assert math.isfinite(summary["final"]["population"]["loss"])


def test_too_many_non_finite_steps_in_a_row_stop_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    register_tiny_net(monkeypatch)
    _poison_steps(monkeypatch, set(range(2, 100)))
    overrides = [*TINY, "train.steps=10", "train.max_bad_steps=3", "train.log_every=1", "checkpoint.every=2",
                 f"out_dir={tmp_path}"]
    assert run_train_main(monkeypatch, overrides) == 1
    run_dir = the_run_dir(tmp_path)
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: stopped at step 5: 3 optimizer steps in a row had a non-finite loss or gradient and were skipped "
        f"(train.max_bad_steps=3); the last good checkpoint is {checkpoint_path(run_dir)} (step 4). "
        "Lower optim.lr (it is 0.05) or check the data"]
    assert read_summary(run_dir)["status"] == "diverged"


def test_a_run_blown_up_by_its_learning_rate_is_diverged_not_finished(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    register_tiny_net(monkeypatch)
    overrides = [*TINY, "optim.lr=1e12", "train.max_bad_steps=20", f"out_dir={tmp_path}"]
    assert run_train_main(monkeypatch, overrides) == 1
    assert read_summary(the_run_dir(tmp_path))["status"] == "diverged"
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("error: diverged at step ")
    assert error[0].endswith("Lower optim.lr (it is 1e+12) or check the data")


def test_the_advice_names_bf16_only_to_an_fp16_run() -> None:
    for amp in (None, "bf16", "fp16"):
        session = SimpleNamespace(cfg=OmegaConf.create({"optim": {"lr": 0.1}, "amp": amp}))
        assert ("use amp=bf16 instead of fp16" in loop._advice(session)) == (amp == "fp16")


def test_a_non_finite_final_evaluation_is_diverged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Finite parameters whose every later step is skipped (too few for train.max_bad_steps) and
    whose evaluation loss is nan: the case of a CIFAR net blown up by optim.lr=1e12."""
    register_tiny_net(monkeypatch)
    _poison_steps(monkeypatch, set(range(3, 100)))
    monkeypatch.setattr(loop, "evaluate", lambda *args, **kwargs: EvalResult(10.0, 50.0, math.nan, 20))
    assert run_train_main(monkeypatch, [*TINY, "train.max_bad_steps=20", f"out_dir={tmp_path}"]) == 1
    summary = read_summary(the_run_dir(tmp_path))
    assert summary["status"] == "diverged" and summary["skipped_steps"] == 3
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: diverged at step 3: the final evaluation's loss is nan (population statistics); 3 of 6 steps were "
        "skipped as non-finite. Lower optim.lr (it is 0.05) or check the data"]


def test_non_finite_parameters_are_diverged_at_the_next_log_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    register_tiny_net(monkeypatch)
    original = loop.optimizer_step

    def overflowing_step(session: Any, *args: Any) -> torch.Tensor:
        found_inf = original(session, *args)
        if session.step == 2:  # the update of step 3 overflows a weight; the loss stays finite
            with torch.no_grad():
                next(session.raw_model.parameters()).view(-1)[0] = math.inf
        return found_inf

    monkeypatch.setattr(loop, "optimizer_step", overflowing_step)
    overrides = [*TINY, "train.log_every=2", f"out_dir={tmp_path}"]
    assert run_train_main(monkeypatch, overrides) == 1
    assert capsys.readouterr().err.strip().splitlines() == [  # found at step 4's log point, step 4 skipped
        "error: diverged at step 3: the parameters are no longer finite; 1 of 4 steps were skipped as non-finite. "
        "Lower optim.lr (it is 0.05) or check the data"]
    assert read_summary(the_run_dir(tmp_path))["status"] == "diverged"


def test_a_failing_wandb_never_stops_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              caplog: pytest.LogCaptureFixture) -> None:
    import wandb

    def unreachable(**settings: Any) -> None:
        raise wandb.errors.CommError("Network error: could not reach api.wandb.ai")

    register_tiny_net(monkeypatch)
    monkeypatch.setattr(wandb, "init", unreachable)
    with caplog.at_level(logging.WARNING, logger="bkn"):
        run_dir = train_in_process(tmp_path, [*TINY, "logger=wandb", "logger.wandb.mode=online"])
    assert read_summary(run_dir)["status"] == "finished"
    assert ("W&B init failed (CommError: Network error: could not reach api.wandb.ai); W&B logging is off for this "
            "run, training continues with the local run record") in caplog.text


def test_no_secret_reaches_the_record_or_the_logs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capfd: pytest.CaptureFixture[str]) -> None:
    register_tiny_net(monkeypatch)
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    monkeypatch.setenv("BKN_TEST_TOKEN", SECRET)
    overrides = [*TINY, "logger=wandb", f"out_dir={tmp_path}"]
    # A key for it in the config is refused (an unknown key), without echoing its value or writing anything.
    assert run_train_main(monkeypatch, [*overrides, "+logger.wandb.api_key=${oc.env:WANDB_API_KEY}"]) == 2
    assert not list(tmp_path.iterdir())
    assert run_train_main(monkeypatch, overrides) == 0
    files = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert any("wandb" in path.parts for path in files)  # W&B's offline run is inside the record
    leaks = [path for path in files if SECRET.encode() in path.read_bytes()]
    assert leaks == []
    output = capfd.readouterr()
    assert SECRET not in output.out + output.err


def test_bad_data_stops_with_one_line_naming_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    register_tiny_net(monkeypatch)
    tiny_data = [*TINY_RUN, "data.image_size=8", "data.num_workers=0", "batch.gradient=2", f"out_dir={tmp_path}"]

    write_cifar10(tmp_path / "cifar")
    truncated = tmp_path / "cifar" / "cifar-10-batches-py" / "data_batch_2"
    truncated.write_bytes(truncated.read_bytes()[:1000])
    assert run_train_main(monkeypatch, [*tiny_data, "data=cifar10", f"data.root={tmp_path / 'cifar'}"]) == 2
    assert capsys.readouterr().err.startswith(f"error: corrupt CIFAR file {truncated}")
    assert not (tmp_path / "default").exists()  # found at start-up: no run folder is left

    written = write_image_folders(tmp_path / "imagenet")
    corrupt = written["train"][3][0]
    corrupt.write_bytes(corrupt.read_bytes()[:300])  # found when read, during training, by a worker
    imagenet = [*tiny_data, "data=imagenet", f"data.root={tmp_path / 'imagenet'}", "train.steps=3"]
    assert run_train_main(monkeypatch, [*imagenet, "data.num_workers=1"]) == 2
    assert capsys.readouterr().err.startswith(f"error: cannot read image {corrupt}: ")

    (tmp_path / "imagenet" / "train" / "n09999999").mkdir()  # found at construction
    assert run_train_main(monkeypatch, imagenet) == 2
    error = capsys.readouterr().err
    assert "empty class folder" in error and "n09999999" in error and len(error.strip().splitlines()) == 1


@pytest.mark.parametrize("transition", ["analytic", "monte_carlo", "linear"])
def test_bkn_stays_finite_on_degenerate_activations(transition: str) -> None:
    # Statistics groups of one example, constant input channels, and activations of 1e6.
    torch.manual_seed(0)
    model = build_model("cifar_net", 10, {"name": "bkn", "statistics_batch_size": 1, "transition": transition}, 8)
    constant = torch.ones(2, 3, 8, 8) * torch.tensor([0.0, 5.0, -3.0])[:, None, None]
    for images in (constant, torch.randn(2, 3, 8, 8) * 1e6):
        model.zero_grad()
        logits = model(images)
        logits.square().mean().backward()
        assert torch.isfinite(logits).all()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_an_image_found_corrupt_while_training_leaves_the_run_to_continue(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """README's fault table: the run stops with one line naming the file (exit 2, status failed) and
    keeps its last checkpoint; with the file fixed, the same command continues from there."""
    register_tiny_net(monkeypatch)
    written = write_image_folders(tmp_path / "images", images_per_class=4)
    originals = {path: path.read_bytes() for path, _, _ in written["train"]}
    run = [*TINY_RUN, "data=folder", f"data.root={tmp_path / 'images'}", "data.image_size=8", "data.num_workers=0",
           "batch.gradient=2", "train.steps=8", "checkpoint.every=2", f"out_dir={tmp_path / 'runs'}"]
    original_step = loop.optimizer_step

    def corrupt_after_step_3(session: Any, *args: Any) -> Any:
        if session.step == 3:  # step 4's batch is loaded: the next one finds the damage
            for path, content in originals.items():
                path.write_bytes(content[:300])
        return original_step(session, *args)

    monkeypatch.setattr(loop, "optimizer_step", corrupt_after_step_3)
    assert run_train_main(monkeypatch, run) == 2
    (error,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert error.startswith(f"error: cannot read image {tmp_path / 'images' / 'train'}/")
    run_dir = the_run_dir(tmp_path / "runs")
    assert read_summary(run_dir)["status"] == "failed"
    assert load_checkpoint(checkpoint_path(run_dir))["step"] == 4
    for path, content in originals.items():  # fixed
        path.write_bytes(content)
    monkeypatch.setattr(loop, "optimizer_step", original_step)
    assert run_train_main(monkeypatch, run) == 0
    assert "resumes from" in capsys.readouterr().out + (run_dir / "train.log").read_text()
    assert read_summary(run_dir)["status"] == "finished" and read_summary(run_dir)["step"] == 8
