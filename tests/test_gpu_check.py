"""scripts/gpu_check.py, the parts a CPU can check: the one-line exit without CUDA, a train.py check
judged from its run record, the settings of every train.py check (validated as on a GPU), the
process-group check (on the CPU, with gloo, instead of the GPU with NCCL), and the report section it
appends."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from bkn.config import validate
from training_helpers import compose_config

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"
spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
gpu_check = importlib.util.module_from_spec(spec)
sys.modules["gpu_check"] = gpu_check  # dataclasses look their module up by name
spec.loader.exec_module(gpu_check)

CPU_TRAIN = ["device=cpu", "data=synthetic", "data.image_size=8", "data.train_size=32", "data.test_size=8",
             "data.num_classes=4", "model.width=0.25", "batch.gradient=8", "batch.statistics=2", "train.steps=2",
             "train.epochs=null", "train.log_every=1", "checkpoint.every=null"]


def test_without_cuda_one_line_and_exit_0(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--output", str(tmp_path / "gpu")]) == 0
    assert capsys.readouterr().out == gpu_check.NO_CUDA + "\n"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # ~15 s of training on the CPU
def test_a_train_run_check_reads_the_run_record(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(gpu_check, "TRAIN", CPU_TRAIN)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    passed = gpu_check.check_train_run("bn", ["normalizer=bn"], tmp_path / "good")
    assert passed.passed, passed.detail
    assert passed.detail.startswith("finished, top-1 B ") and ", A " in passed.detail
    failed = gpu_check.check_train_run("bad", ["normalizer=bn", "batch.statistics=3"], tmp_path / "bad")
    assert not failed.passed
    assert failed.detail.startswith("exit code 2: error: batch.statistics=3 does not divide")


@pytest.mark.parametrize("name", list(gpu_check.TRAIN_RUNS))
def test_every_train_run_of_the_check_is_a_valid_config_on_one_gpu(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A misspelt override (compile=reduce_overhead) would otherwise show only on a GPU machine."""
    monkeypatch.setattr(gpu_check.torch.cuda, "device_count", lambda: 1)
    plan = validate(compose_config([*gpu_check.TRAIN, *gpu_check.TRAIN_RUNS[name]]), environ={})
    assert plan.device == "cuda"


@pytest.mark.slow  # ~10 s: a 2-process run
def test_the_process_group_check_trains_bkn_under_ddp() -> None:
    # On a GPU: NCCL and 32x32 images; bf16 on a CPU is slow, so 4x4 here.
    check = gpu_check.check_process_group(gpu_check.torch.device("cpu"), backend="gloo", image_size=4)
    assert check.passed, check.detail
    assert check.detail.startswith("all-reduce [3.0, 3.0, 3.0, 3.0], losses ")


def test_the_report_section_has_a_row_per_check() -> None:
    checks = [gpu_check.Check("bf16", True, 12.3, "finished"), gpu_check.Check("nccl", False, 1.0, "exit code 1: x")]
    section = gpu_check.checks_section(checks, "NVIDIA H200")
    assert "## CUDA code paths (`make gpu-check`, NVIDIA H200)" in section
    assert "| bf16 | pass | 12 | finished |" in section
    assert "| nccl | **FAIL** | 1 | exit code 1: x |" in section


def test_a_benchmark_check_fails_with_the_benchmarks_last_error_line(monkeypatch: pytest.MonkeyPatch,
                                                                     tmp_path: Path) -> None:
    monkeypatch.setitem(gpu_check.BENCHMARKS, "no_such_preset", ([], 60))
    check = gpu_check.run_benchmark("no_such_preset", tmp_path / "report")
    assert (check.name, check.passed) == ("benchmark --preset no_such_preset", False)
    assert check.detail.startswith("exit code 2: ") and "invalid choice: 'no_such_preset'" in check.detail


def test_both_gpu_presets_are_benchmarked(monkeypatch: pytest.MonkeyPatch) -> None:
    # A misspelt preset would show only on a GPU machine; its name must be one benchmark.py knows.
    benchmark_spec = importlib.util.spec_from_file_location("benchmark", SCRIPT.with_name("benchmark.py"))
    benchmark = importlib.util.module_from_spec(benchmark_spec)
    monkeypatch.setitem(sys.modules, "benchmark", benchmark)  # its dataclasses look their module up by name
    benchmark_spec.loader.exec_module(benchmark)
    assert set(gpu_check.BENCHMARKS) == {"gpu", "micro_gpu"}
    assert all(benchmark.PRESETS[preset][1].device == "cuda" for preset in gpu_check.BENCHMARKS)
