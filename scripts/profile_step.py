"""Where a training step's time goes, per ATen op, for each normalizer against torch.nn.BatchNorm2d:
the benchmark's micro-batch setting (preact_resnet32, 32x32, (8, 2) by default) under torch.profiler.

For each variant: the ops a step runs, their self CPU time per step, and the ops that account for
the difference to torch.nn.BatchNorm2d (the ratio the micro benchmark reports). The profiler adds
a few microseconds to every op, so the totals are above the benchmark's step times and weigh small
ops more; use it for where the time goes, and scripts/benchmark.py for how much.

    python scripts/profile_step.py                                          # -> results/benchmark/micro_profile.md
    python scripts/profile_step.py --image-size 8 --variants torch_bn,bkn_linear --output /tmp/profile.md
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import benchmark

ROOT = Path(__file__).resolve().parents[1]
TOP_OPS = 12  # rows of each variant's difference table


def op_times(step, steps: int) -> tuple[Counter, Counter]:
    """Self CPU microseconds and calls per step of each ATen op, over ``steps`` profiled steps."""
    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        for _ in range(steps):
            step()
    times, calls = Counter(), Counter()
    for event in profiler.key_averages():
        if event.key.startswith("aten::"):
            times[event.key] += event.self_cpu_time_total / steps
            calls[event.key] += event.count / steps
    return times, calls


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--statistics", type=int, default=2)
    parser.add_argument("--variants", default="torch_bn,bn_groups,brn,bkn_linear,bkn_analytic,bkn_monte_carlo")
    parser.add_argument("--steps", type=int, default=5, help="profiled steps per variant and round")
    parser.add_argument("--rounds", type=int, default=3, help="profiled rounds, after one dropped (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch's intra-op threads (default 1, as the micro preset)")
    parser.add_argument("--output", type=Path, default=ROOT / "results" / "benchmark" / "micro_profile.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    variants = args.variants.split(",")
    if "torch_bn" not in variants:
        parser.error("--variants must include torch_bn, the reference")
    setting = benchmark.Setting("preact_resnet32", args.image_size, 10, args.batch, args.statistics, tuple(variants))
    options = benchmark.Options("cpu", warmup=3, steps=args.steps, repeats=1)
    steps = {variant: benchmark.build_candidate(setting, variant, options).step for variant in variants}
    # Round-robin, as the benchmark times: a drift of the machine hits every variant alike. The first
    # round is the profiler's own warm-up and is dropped.
    measured = {variant: (Counter(), Counter()) for variant in variants}
    for round_ in range(args.rounds + 1):
        for variant, step in steps.items():
            times, calls = op_times(step, args.steps)
            if round_:
                for total, part in zip(measured[variant], (times, calls)):
                    total.update({op: value / args.rounds for op, value in part.items()})
    for variant, (times, _) in measured.items():
        print(f"{variant}: {sum(times.values()) / 1000:.1f} ms of ATen ops a step")

    reference_times, reference_calls = measured["torch_bn"]
    reference_total = sum(reference_times.values())
    lines = [f"# Where a step's time goes: {setting.label}", "",
             f"torch.profiler, {args.rounds} round-robin rounds of {args.steps} steps per variant (after 3 steps and one "
             f"round of warm-up), threads: {torch.get_num_threads()}, "
             f"torch {torch.__version__}. Self CPU time of ATen ops per step (the profiler's own cost per op "
             "included, so small ops weigh more than in the benchmark's step times). Written by "
             "scripts/profile_step.py.", "",
             "| variant | ATen ops a step | op calls a step | ms a step | vs torch_bn |", "|---|---|---|---|---|"]
    for variant, (times, calls) in measured.items():
        total = sum(times.values())
        lines.append(f"| {variant} | {len(times)} | {sum(calls.values()):.0f} | {total / 1000:.1f} "
                     f"| {total / reference_total:.2f} |")
    for variant, (times, calls) in measured.items():
        if variant == "torch_bn":
            continue
        extra = sum(times.values()) - reference_total
        lines += ["", f"## {variant}: {extra / 1000:+.1f} ms a step against torch_bn", "",
                  "The ops whose time differs most (ms a step; calls a step):", "",
                  "| op | torch_bn ms | calls | this ms | calls | difference ms |", "|---|---|---|---|---|---|"]
        ops = sorted(set(times) | set(reference_times), key=lambda op: -abs(times[op] - reference_times[op]))
        for op in ops[:TOP_OPS]:
            lines.append(f"| `{op}` | {reference_times[op] / 1000:.2f} | {reference_calls[op]:.0f} | "
                         f"{times[op] / 1000:.2f} | {calls[op]:.0f} | {(times[op] - reference_times[op]) / 1000:+.2f} |")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
