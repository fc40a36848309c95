"""`make gpu-check`: bkn's CUDA code paths on one GPU, then the GPU benchmarks, in under 10 minutes.

1. train.py on synthetic images (each run a subprocess, its record under a temporary folder):
   bf16 autocast with channels_last, fp16 autocast with the gradient scaler (BKN and BRN),
   torch.compile of BKN in CUDA graphs (compile=reduce-overhead: static shapes, inductor's kernels,
   the step replayed as graphs), a torchvision-layout ResNet with BKN-linear; every run
   evaluates with option B (population statistics) and option A (test-batch statistics) and must
   finish with finite numbers.
2. A one-process NCCL group: BKN under DistributedDataParallel for a few bf16 steps, and an
   all-reduce, on the GPU (one GPU cannot hold a second rank, so this is the NCCL path one rank sees).
3. scripts/benchmark.py --preset gpu, with fewer repeats so that it fits, written to
   results/benchmark/gpu.md (with the ratios beside the targets: BKN >= 0.985 x BN, the paper's
   Table 2); the results of 1, 2 and 4 are appended to it.
4. scripts/benchmark.py --preset micro_gpu, the micro-batch regime (preact_resnet32 at (8, 2) and
   (16, 1) eager; at (8, 2) also compiled, and compiled in CUDA graphs), with fewer repeats, written
   to results/benchmark/micro_gpu.md (step time and ATen calls against torch.nn.BatchNorm2d, beside
   the targets, and whether inductor captured every variant's CUDA graphs).

One line per check; exit code 1 if any failed. Without CUDA: one line, exit code 0.

    python scripts/gpu_check.py [--output results/benchmark/gpu]
"""

from __future__ import annotations

import argparse
import json
import math
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
NO_CUDA = ("gpu-check: no CUDA device here (torch.cuda.is_available() is False); nothing to check, "
           "run it on a GPU machine")

# A short run: 40 optimizer steps of 32 synthetic 32x32 images, checkpoints and evaluation included.
TRAIN = ["device=cuda", "data=synthetic", "data.train_size=512", "data.test_size=64", "batch.gradient=32",
         "batch.statistics=2", "train.steps=40", "train.epochs=null", "train.log_every=10", "checkpoint.every=20",
         "eval.every=20"]
TRAIN_RUNS: dict[str, list[str]] = {
    "bf16 autocast + channels_last, BKN": ["normalizer=bkn", "amp=bf16", "channels_last=true"],
    "fp16 autocast + gradient scaler, BKN": ["normalizer=bkn", "amp=fp16"],
    # No warm-up: r_max / d_max relax over the first 20 steps, so the check runs the renorm correction.
    "fp16 autocast + gradient scaler, BRN": ["normalizer=brn", "normalizer.warmup_steps=0",
                                             "normalizer.relax_steps=20", "amp=fp16", "channels_last=true"],
    "torch.compile in CUDA graphs + bf16 + channels_last, BKN": ["normalizer=bkn", "amp=bf16",
                                                                 "compile=reduce-overhead", "channels_last=true"],
    "resnet18 + bf16 + channels_last, BKN-linear": ["model=resnet18", "normalizer=bkn_linear", "amp=bf16",
                                                    "channels_last=true"],
}
# The benchmark presets, with fewer repeats than their own so that both fit (gpu: 7 of 20 steps;
# micro_gpu: 7 of 50), each with its time limit in seconds.
BENCHMARKS: dict[str, tuple[list[str], int]] = {
    "gpu": (["--repeats", "3", "--steps", "10"], 300),
    "micro_gpu": (["--repeats", "3", "--steps", "30"], 240),
}


@dataclass
class Check:
    name: str
    passed: bool
    seconds: float
    detail: str


def check_train_run(name: str, overrides: list[str], out_dir: Path) -> Check:
    """train.py with ``overrides`` into ``out_dir``: it must exit 0, finish, and report finite
    option A and option B results."""
    started = time.perf_counter()
    command = [sys.executable, str(ROOT / "train.py"), f"out_dir={out_dir}", *TRAIN, *overrides]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        return Check(name, False, seconds, f"exit code {result.returncode}: {last}")
    (summary_path,) = out_dir.glob("*/*/summary.json")  # <experiment>/<run name>/
    summary = json.loads(summary_path.read_text())
    top1 = {inference: summary["final"].get(inference, {}).get("top1") for inference in ("population", "batch")}
    finite = all(isinstance(value, float) and math.isfinite(value) for value in top1.values())
    detail = (f"{summary['status']}, top-1 B {top1['population']}, A {top1['batch']}, "
              f"{summary.get('examples_per_s') or 0:.0f} ex/s")
    return Check(name, summary["status"] == "finished" and finite, seconds, detail)


def check_process_group(device: torch.device, backend: str = "nccl", image_size: int = 32) -> Check:
    """A one-process group: an all-reduce, then the CIFAR net with BKN under DDP (wrapped as the
    engine wraps it) for a few bf16 autocast steps. The tests run it on the CPU with gloo."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from bkn.models import build_model

    started = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                            device_id=device if device.type == "cuda" else None)
    try:
        value = torch.full((4,), 3.0, device=device)
        dist.all_reduce(value)
        torch.manual_seed(0)
        model = build_model("cifar_net", 10, {"name": "bkn", "statistics_batch_size": 2}, image_size).to(device)
        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                      forward_sync_buffers=False)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9)
        inputs = torch.randn(32, 3, image_size, image_size, device=device)
        targets = torch.randint(10, (32,), device=device)
        losses = []
        for _ in range(5):
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(ddp(inputs), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    finally:
        dist.destroy_process_group()
    passed = value.tolist() == [3.0] * 4 and all(math.isfinite(loss) for loss in losses) and losses[-1] < losses[0]
    return Check(f"one-process {backend} group: all-reduce, DDP + BKN + bf16", passed, time.perf_counter() - started,
                 f"all-reduce {value.tolist()}, losses {', '.join(f'{loss:.3f}' for loss in losses)}")


def free_port() -> int:
    """A TCP port of this host that nothing listens on (released again for the rendezvous to bind)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_benchmark(preset: str, output: Path) -> Check:
    started = time.perf_counter()
    arguments, timeout = BENCHMARKS[preset]
    command = [sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--preset", preset, *arguments,
               "--output", str(output)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - started
    name = f"benchmark --preset {preset}"
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        return Check(name, False, seconds, f"exit code {result.returncode}: {last}")
    return Check(name, True, seconds, f"{output}.md: ratios and targets there")


def checks_section(checks: list[Check], device_name: str) -> str:
    """The markdown appended to the benchmark's report: one row per check."""
    lines = ["", f"## CUDA code paths (`make gpu-check`, {device_name})", "",
             "| check | result | seconds | detail |", "|---|---|---:|---|"]
    lines += [f"| {c.name} | {'pass' if c.passed else '**FAIL**'} | {c.seconds:.0f} | {c.detail} |" for c in checks]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python scripts/gpu_check.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=ROOT / "results" / "benchmark" / "gpu",
                        help="report path without suffix (default results/benchmark/gpu; the micro-batch one goes beside it, "
                             "micro_<name>)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(NO_CUDA)
        return 0
    device_name = torch.cuda.get_device_name(0)
    checks: list[Check] = []

    def report(name: str, run_check: Callable[[], Check]) -> Check:
        """Run one check; an exception (a timeout, NCCL failing to start) fails it, not the script."""
        started = time.perf_counter()
        try:
            check = run_check()
        except Exception as error:  # noqa: BLE001 - every failure is reported the same way
            message = (str(error).strip().splitlines() or [""])[0]
            check = Check(name, False, time.perf_counter() - started, f"{type(error).__name__}: {message}")
        checks.append(check)
        print(f"{'pass' if check.passed else 'FAIL'}  {check.name} ({check.seconds:.0f} s): {check.detail}", flush=True)
        return check

    with tempfile.TemporaryDirectory(prefix="bkn-gpu-check-") as runs:
        for index, (name, overrides) in enumerate(TRAIN_RUNS.items()):
            report(name, partial(check_train_run, name, overrides, Path(runs) / str(index)))
    report("one-process nccl group", partial(check_process_group, torch.device("cuda", 0)))
    benchmark = report("benchmark --preset gpu", partial(run_benchmark, "gpu", args.output))
    report("benchmark --preset micro_gpu",
           partial(run_benchmark, "micro_gpu", args.output.with_name(f"micro_{args.output.name}")))
    report_path = args.output.with_suffix(".md")
    if benchmark.passed:
        with report_path.open("a") as file:
            file.write(checks_section(checks, device_name))
    failed = [check.name for check in checks if not check.passed]
    print(f"gpu-check: {len(checks) - len(failed)} of {len(checks)} checks passed"
          + (f"; failed: {', '.join(failed)}" if failed else f"; report in {report_path}"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
