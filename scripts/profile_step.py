"""Where a training step's time goes, per ATen op, for each normalizer against torch.nn.BatchNorm2d:
the benchmark's micro-batch setting (preact_resnet32, 32x32, (8, 2) by default) under torch.profiler.

For each variant: the ops a step runs, their self CPU time per step, and the ops that account for
the difference to torch.nn.BatchNorm2d (the ratio the micro benchmark reports), and the ATen calls
that reach the dispatcher in one eager step (benchmark.count_aten_calls: the count the benchmark
reports, without the profiler's nested records of an op's own inner calls). The profiler adds
a few microseconds to every op, so the totals are above the benchmark's step times and weigh small
ops more; use it for where the time goes, and scripts/benchmark.py for how much.

With ``--compile``, the step runs torch.compile's graphs (static shapes, as train.py and the benchmark
compile). Their fused C++ kernels are not ATen ops: Inductor's kernel profiling names each one
(``cpp_fused_<the ops it fuses>``), and kernels that fuse the same ops are counted together; the
ATen ops left are the graphs' extern calls (convolutions, matrix products) and what runs outside them.

    python scripts/profile_step.py                                          # -> results/benchmark/micro_profile.md
    python scripts/profile_step.py --image-size 8 --variants torch_bn,bkn_linear --output /tmp/profile.md
    python scripts/profile_step.py --compile default                        # -> results/benchmark/micro_profile_compiled.md
"""

from __future__ import annotations

import argparse
import re
import time
from collections import Counter
from pathlib import Path

import torch
import torch._inductor.config
from torch.profiler import ProfilerActivity, profile

import benchmark

ROOT = Path(__file__).resolve().parents[1]
TOP_OPS = 12  # rows of each variant's difference table
# Inductor's name of a profiled C++ kernel: [graph_<graph id>_]cpp_fused_<ops>_<kernel number>.
COMPILED_KERNEL = re.compile(r"(?:graph_\d+_)?(cpp_\w+?)(?:_\d+)?$")


def op_name(key: str) -> str | None:
    """The row a profiler event is counted in: an ATen op, or a compiled kernel by the ops it fuses
    (kernels that differ only by number fuse the same ops); None for every other event (Python,
    autograd, the compiled region's own record), whose time is inside the ops' or is overhead."""
    if key.startswith("aten::"):
        return key
    kernel = COMPILED_KERNEL.match(key)
    return kernel.group(1) if kernel else None


def op_times(step, steps: int) -> tuple[Counter, Counter, float]:
    """Self CPU microseconds and calls per step of each op (``op_name``), over ``steps`` profiled steps,
    and the profiled steps' wall-clock microseconds a step."""
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        wall = (time.perf_counter() - start) * 1e6 / steps
    times, calls = Counter(), Counter()
    for event in profiler.key_averages():
        name = op_name(event.key)
        if name is not None:
            times[name] += event.self_cpu_time_total / steps
            calls[name] += event.count / steps
    return times, calls, wall


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="preact_resnet32", help="a model name of train.py (default: the micro preset's)")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--statistics", type=int, default=2)
    parser.add_argument("--variants", default="torch_bn,bn_groups,brn,bkn_linear,bkn_analytic,bkn_monte_carlo")
    parser.add_argument("--compile", metavar="MODE", help="profile torch.compile's step in this mode (default, "
                        "reduce-overhead, ...) instead of the eager one")
    parser.add_argument("--steps", type=int, default=5, help="profiled steps per variant and round")
    parser.add_argument("--rounds", type=int, default=3, help="profiled rounds, after one dropped (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch's intra-op threads (default 1, as the micro preset)")
    parser.add_argument("--output", type=Path, help="the report (default: results/benchmark/micro_profile.md, "
                        "micro_profile_compiled.md with --compile)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    variants = args.variants.split(",")
    if "torch_bn" not in variants:
        parser.error("--variants must include torch_bn, the reference")
    if args.compile:
        torch._inductor.config.cpp.enable_kernel_profile = True  # a profiler record per C++ kernel
    output = args.output or ROOT / "results" / "benchmark" / f"micro_profile{'_compiled' if args.compile else ''}.md"
    setting = benchmark.Setting(args.model, args.image_size, 10, args.batch, args.statistics, tuple(variants),
                                compile_mode=args.compile)
    options = benchmark.Options("cpu", warmup=3, steps=args.steps, repeats=1)
    candidates = {variant: benchmark.build_candidate(setting, variant, options) for variant in variants}
    steps = {variant: candidate.step for variant, candidate in candidates.items()}
    aten_calls = {variant: candidate.aten_calls for variant, candidate in candidates.items()}
    # Round-robin, as the benchmark times: a drift of the machine hits every variant alike. The first
    # round is the profiler's own warm-up and is dropped.
    measured = {variant: (Counter(), Counter()) for variant in variants}
    walls: dict[str, float] = Counter()
    for round_ in range(args.rounds + 1):
        for variant, step in steps.items():
            times, calls, wall = op_times(step, args.steps)
            if round_:
                for total, part in zip(measured[variant], (times, calls)):
                    total.update({op: value / args.rounds for op, value in part.items()})
                walls[variant] += wall / args.rounds
    for variant, (times, _) in measured.items():
        print(f"{variant}: {sum(times.values()) / 1000:.1f} ms of ops in a step of {walls[variant] / 1000:.1f} ms")

    ops = "ATen ops and compiled kernels" if args.compile else "ATen ops"
    reference_times, reference_calls = measured["torch_bn"]
    reference_total = sum(reference_times.values())
    lines = [f"# Where a step's time goes: {setting.label}", "",
             f"torch.profiler, {args.rounds} round-robin rounds of {args.steps} steps per variant (after 3 steps and one "
             f"round of warm-up), threads: {torch.get_num_threads()}, torch {torch.__version__}. Self CPU time of "
             f"{ops} per step (the profiler's own cost per op included, so small ops weigh more than in the "
             "benchmark's step times); `profiled step ms`: the profiled steps' wall clock, whose rest beyond the ops "
             "is Python, autograd and (compiled) guard overhead; `op calls a step`: the profiler's records, an "
             "op's inner calls included; `ATen calls a step`: the calls that reach the dispatcher in one eager step "
             "(set_step, forward, backward, SGD step), counted as scripts/benchmark.py counts them"
             f"{', of the eager step also here (the compiled graphs run fused kernels)' if args.compile else ''}. "
             f"Written by `python scripts/profile_step.py{' --compile ' + args.compile if args.compile else ''}`.", "",
             "| variant | ops a step | op calls a step | ms of ops a step | vs torch_bn | profiled step ms | vs torch_bn "
             "| ATen calls a step | vs torch_bn |",
             "|---|---|---|---|---|---|---|---|---|"]
    for variant, (times, calls) in measured.items():
        total = sum(times.values())
        lines.append(f"| {variant} | {len(times)} | {sum(calls.values()):.0f} | {total / 1000:.1f} "
                     f"| {total / reference_total:.2f} | {walls[variant] / 1000:.1f} "
                     f"| {walls[variant] / walls['torch_bn']:.2f} | {aten_calls[variant]:,} "
                     f"| {aten_calls[variant] / aten_calls['torch_bn']:.2f} |")
    if args.compile:  # kernels fuse differently in each variant, so compare them by kind first
        lines += ["", "By kind: the graphs' ATen calls (convolutions, matrix products) and what runs outside the graphs "
                  "(the optimizer), the compiled kernels, and the step's rest (Python, autograd, guards):", "",
                  "| variant | ATen ms | ATen calls | compiled kernels ms | kernel calls | rest of the step ms |",
                  "|---|---|---|---|---|---|"]
        for variant, (times, calls) in measured.items():
            aten = [op for op in times if op.startswith("aten::")]
            kernels = [op for op in times if not op.startswith("aten::")]
            lines.append(f"| {variant} | {sum(times[op] for op in aten) / 1000:.1f} | {sum(calls[op] for op in aten):.0f} "
                         f"| {sum(times[op] for op in kernels) / 1000:.1f} | {sum(calls[op] for op in kernels):.0f} "
                         f"| {(walls[variant] - sum(times.values())) / 1000:.1f} |")
    for variant, (times, calls) in measured.items():
        if variant == "torch_bn":
            continue
        extra = sum(times.values()) - reference_total
        lines += ["", f"## {variant}: {extra / 1000:+.1f} ms of ops a step against torch_bn", "",
                  "The ops whose time differs most (ms a step; calls a step):", "",
                  "| op | torch_bn ms | calls | this ms | calls | difference ms |", "|---|---|---|---|---|---|"]
        names = sorted(set(times) | set(reference_times), key=lambda op: -abs(times[op] - reference_times[op]))
        for op in names[:TOP_OPS]:
            lines.append(f"| `{op}` | {reference_times[op] / 1000:.2f} | {reference_calls[op]:.0f} | "
                         f"{times[op] / 1000:.2f} | {calls[op]:.0f} | {(times[op] - reference_times[op]) / 1000:+.2f} |")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("\n".join(lines) + "\n")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
