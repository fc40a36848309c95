"""Run the small CPU study behind results/study/ (configs/experiment/study.yaml): BN, BRN and BKN
with each transition on the digits data set, at micro-batch settings and a large-batch baseline,
several seeds; every run is evaluated with batch and with population statistics.

A setting pairs a gradient and a statistics batch size, which one Hydra sweep cannot pair, so
this script launches ``train.py -m experiment=study`` per setting (and seed, for BKN's three
transitions), ``--workers`` at a time with one thread each: on a 2-core machine two one-thread processes finish sooner than one
two-thread process, and far sooner when anything else runs. ``resume=auto`` skips finished runs,
so an interrupted study continues where it stopped. Then ``make study`` writes results/study/.

    python scripts/study.py                   # runs/study/study/<run>/, logs in runs/study/logs/
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ((64, 64), (32, 2), (16, 1), (8, 2))  # (gradient, statistics); the first is the baseline
SEEDS = (0, 1, 2)
# Every run sees the same number of examples (study.yaml: train.epochs), so the settings differ in
# their number of steps; these rules, in examples, scale with the gradient batch of each setting.
BASE_LR, BASE_BATCH = 0.1, 64  # the linear scaling rule: lr = 0.1 x gradient / 64
EVAL_EVERY_EXAMPLES = 640  # about 7 evaluations per run
BRN_WARMUP_EXAMPLES, BRN_RELAX_EXAMPLES = 500, 2000  # BRN's 5k / 40k steps, shrunk to these short runs
# BKN's gain q, as the authors' code sets p = 1 - q: 0.9 for micro-batches, 0.05 for large batches.
MICRO_BATCH_GAIN, LARGE_BATCH_GAIN = 0.1, 0.95
LARGE_STATISTICS = 32  # statistics batches from this size up count as large


def commands(runs_dir: Path, settings: Sequence[tuple[int, int]], seeds: Sequence[int],
             extra: Sequence[str]) -> list[tuple[str, list[str]]]:
    """(log name, command) of every ``train.py`` sweep of the study, the costliest first."""
    launched = []
    all_seeds = f"seed={','.join(map(str, seeds))}"
    for gradient, statistics in sorted(settings, reverse=True):
        name = f"g{gradient}_s{statistics}"
        base = [sys.executable, "train.py", "-m", "experiment=study", f"out_dir={runs_dir}", "resume=auto",
                f"batch.gradient={gradient}", f"batch.statistics={statistics}", f"batch.per_device={gradient}",
                f"optim.lr={BASE_LR * gradient / BASE_BATCH:g}", f"eval.every={max(1, EVAL_EVERY_EXAMPLES // gradient)}"]
        gain = LARGE_BATCH_GAIN if statistics >= LARGE_STATISTICS else MICRO_BATCH_GAIN
        for seed in seeds:  # the sweep's own normalizers: BKN with each transition
            launched.append((f"{name}_bkn_seed{seed}", [*base, f"seed={seed}", f"normalizer.gain={gain}", *extra]))
        launched.append((f"{name}_bn", [*base, all_seeds, "normalizer=bn", *extra]))
        launched.append((f"{name}_brn", [*base, all_seeds, "normalizer=brn",
                                         f"normalizer.warmup_steps={BRN_WARMUP_EXAMPLES // gradient}",
                                         f"normalizer.relax_steps={BRN_RELAX_EXAMPLES // gradient}", *extra]))
    return launched


def run(name: str, command: list[str], logs: Path) -> tuple[str, int, float]:
    start = time.monotonic()
    with open(logs / f"{name}.log", "w") as log:
        code = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}).returncode
    return name, code, time.monotonic() - start


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/study"), help="default runs/study")
    parser.add_argument("--workers", type=int, default=2, help="train.py processes at a time (default 2)")
    parser.add_argument("--seeds", type=int, default=len(SEEDS), help=f"seeds per run (default {len(SEEDS)})")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run, e.g. train.steps=50")
    args = parser.parse_args(argv)
    if args.workers < 1 or args.seeds < 1:
        parser.error("--workers and --seeds must be at least 1")
    logs = args.runs_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    runs_dir = args.runs_dir.resolve()
    started = time.monotonic()
    with ThreadPoolExecutor(args.workers) as pool:
        jobs = [pool.submit(run, name, command, logs)
                for name, command in commands(runs_dir, SETTINGS, range(args.seeds), args.overrides)]
        results = [job.result() for job in jobs]
    for name, code, seconds in results:
        print(f"{name:24s} {'ok' if code == 0 else f'FAILED ({code})':12s} {seconds:7.1f} s")
    print(f"study: {time.monotonic() - started:.0f} s in all")
    failed = [name for name, code, _ in results if code != 0]
    if failed:
        sys.exit(f"error: {len(failed)} sweep(s) failed; see {logs}/{failed[0]}.log")


if __name__ == "__main__":
    main()
