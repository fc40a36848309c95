"""Run the CPU study behind results/study/: BN, BRN, GN and BKN (each transition, two ablations) on
scikit-learn's digits, and BN, BRN, GN, the default BKN and the authors' BKN on Fashion-MNIST,
trained to convergence at micro-batch settings and a large-batch baseline.

The study is split into parts that run separately (``make study PART=<name>``), each sized to
finish from empty run records in about 75 minutes on a 2-core CPU (two one-thread runs at a time):

    quick     a first look in ~10 minutes: (32, 2), 10 epochs, one seed (its own experiment)
    baseline  the large-batch baseline (64, 64): every normalizer, 3 seeds
    g32_s2    (32, 2): every normalizer and both ablations, 3 seeds
    g16_s1_seed0, g16_s1_seed1, g16_s1_seed2
              (16, 1): every normalizer and both ablations, one seed a part
    g8_s2_seed0, g8_s2_seed1, g8_s2_seed2
              (8, 2): every normalizer but the authors' exact BKN, one seed a part
    gain_warmup
              the default BKN as it is now (linear, with its gain warm-up) at (32, 2) and (16, 1),
              3 seeds: the runs of ``bkn-linear`` predate the warm-up
    hard_g64, hard_g32_s1
              the harder variant (configs/data/digits_hard.yaml), 150 epochs, at (64, 64) / (32, 1)
    state     why the analytic transition stalled: what BKN passes on (state_from), at (32, 1) and (16, 1)
    stall     the recipe it stalled under (lr 0.05, no warm-up, 1,500 steps at (32, 1)), input vs output state
    speed_g8_s2_seed0
              g8_s2_seed0 again, as configured then, on the code after the micro-batch speed-up: the
              same runs' accuracy and wall time, new against committed (experiment study_speed)
    robustness_cifar_net_seed0, robustness_cifar_net_seed1,
    robustness_preact_resnet32_seed0, robustness_preact_resnet32_seed1
              the recipe a user types first, `python train.py`, over learning rates (below); `robustness`
              runs all four (about 3 hours)
    all       every part but quick, the speed rerun and the Fashion-MNIST ones, one after the other (several hours)

Fashion-MNIST (``make data-fashion`` installs it; configs/experiment/study_fashion.yaml), all
10,000 test images, experiment ``study_fashion``; each part one seed (0, 1, 2) of one setting:

    fashion_quick                  a first try of the design: BN at (128, 128) and (16, 1), BKN at (16, 1), 2 epochs
    fashion_baseline_seed0..2      (128, 128): BN, BRN, GN, BKN (default), the authors' BKN (Monte-Carlo, input state)
    fashion_g16_s1_seed0..2        (16, 1), the same five
    fashion_g8_s2_seed0..2         (8, 2), the same five
    fashion_all                    the nine, one after the other
    fashion_peers_{baseline,g16_s1,g8_s2}_seed0..2
                                   the same setting and seed with FRN + TLU, EvoNorm-S0 and CBN (their
                                   defaults): three of a grid part's five runs (not yet run)
    fashion_peers                  those nine, one after the other

Its design, for a 2-core CPU (two one-thread runs at a time): the pre-activation ResNet of depth 8
(one block a stage: 75,002 parameters with BN, 9.1 M MACs an image), a fixed stratified subset of
20,000 training images, 22 epochs (440,000 examples a run), an evaluation of both inference options
every 3 epochs and after the last step (batches of 256, ~5 s each). Measured on 2026-12-03, two
one-thread runs at a time on an otherwise idle 2-core machine, examples per second of training:

    setting     bn    bkn (linear)  bkn monte_carlo, state_from=input
    (128, 128)  730   660           (as BN: one group, one sample)
    (16, 1)     660   540           ~290

The schedule was chosen by BN at (128, 128), seed 0, on that machine (``fashion_quick`` and three
trials; final top-1 with population statistics):

    depth  epochs  top-1   training loss, last tenth  minutes (beside one other run)
    8      15      90.7%   0.25                       13 (beside heavier jobs)
    14     10      91.0%   0.23                       13
    8      22      91.6%   0.21                       16

At 15 epochs the network underfits (training loss = test loss, still falling), below the 91% the
study requires; depth 14 trains 1.7x slower per example and is no better at the same cost; 22
epochs clear the bar by half a point. Estimated from the speeds above (the (8, 2) runs ~1.3x
the (16, 1) ones): a baseline part ~27 minutes, a (16, 1) part ~37 and an (8, 2) part ~50 (the
authors' BKN, ~2x the others' time, is the longest run), the nine parts ~5.7 hours. Measured
since, alone on an idle machine of the same kind: ``fashion_g16_s1_seed1`` 63 minutes (its runs
17-33), 1.7x the estimate, ``fashion_g8_s2_seed2`` 57 minutes (its runs 13-27), 1.1x, and
``fashion_baseline_seed2`` 35 minutes (its runs 10-12), 1.3x: each inside the 75 a part may take,
but the nine parts ~7.75 hours, over the ~6 aimed at; the other parts' wall times (results/study/
README.md) are upper bounds, each shared the cores with other work. The knobs:
FASHION_EPOCHS here, data.train_size and model.depth in configs/experiment/study_fashion.yaml
(TRAIN_EXAMPLES).

The robustness parts do not train to convergence: they test whether each normalizer trains at all
on the default command's recipe (step schedule, no warm-up, one evaluation at the end) for 300
steps at (16, 2) and (16, 1), at learning rates 0.05, 0.1, 0.2 and 0.4 (not rescaled), with both
networks: BN, BRN (plain BN for 5% of the steps, relaxed over the next 40%), GN, BKN as configured
by default (linear, with its gain warm-up), BKN-analytic, BKN-Monte-Carlo, and the default BKN
without the warm-up (as it was before it). 56 runs a part; estimated ~50 minutes (cifar_net) and
~35 minutes (preact_resnet32) on an idle 2-core machine, from single runs of ~110 s and ~75 s
taken two at a time.

The converged parts: every run of a part sees the same examples (``epochs`` of the training set) whatever its
gradient batch, so the settings differ in their number of steps. What follows from a setting:

- learning rate: the linear scaling rule, ``0.1 x gradient / 64``; cosine decay to zero after a
  one-epoch linear warm-up;
- BKN's gain q as the authors' code sets p = 1 - q: q = 0.1 for statistics groups below 32
  examples, q = 0.95 from 32 up;
- BRN: plain BN for the first 5% of the examples, then r_max / d_max relax over the next 40%;
- an evaluation (both inference options) after every epoch.

Each run is one ``train.py`` process with an explicit ``run_name``, so the run folders do not
depend on how train.py names runs. Finished runs (status ``finished`` in summary.json, in the
runs dir or among the committed records in results/study/records/) are skipped without starting
a process; a stopped one resumes from its checkpoint (``resume=auto``).
Each invocation, finished or interrupted, appends its wall time to
``<runs-dir>/logs/<part>/wall_times.jsonl``; then
``scripts/study_report.py`` (``make study`` runs it) writes results/study/.

    python scripts/study.py baseline                 # runs/study/study/<run>/, logs in runs/study/logs/baseline/
    python scripts/study.py g32_s2 --dry-run         # print the commands of what is still to run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from bkn.nn.norms import default_gain

ROOT = Path(__file__).resolve().parents[1]
RECORDS = ROOT / "results" / "study" / "records"  # committed records of finished runs

BASE_LR, BASE_BATCH = 0.1, 64  # the linear scaling rule: lr = 0.1 x gradient / 64
BRN_WARMUP_FRACTION, BRN_RELAX_FRACTION = 0.05, 0.40
# Training-set sizes (configs/data/; Fashion-MNIST: configs/experiment/study_fashion.yaml's data.train_size).
TRAIN_EXAMPLES = {"digits": 1437, "digits_hard": 500, "fashion_mnist": 20000}

# Normalizer variants: Hydra overrides; BKN's gain and BRN's schedule are added per setting.
CORE = {
    "bn": ["normalizer=bn"],
    "brn": ["normalizer=brn"],
    "gn": ["normalizer=gn"],
    "bkn-linear": ["normalizer=bkn_linear"],
    "bkn-monte_carlo": ["normalizer=bkn_monte_carlo"],
    "bkn-analytic": ["normalizer=bkn_analytic"],
    # The authors' code exactly: the Monte-Carlo transition from the previous layer's input statistics.
    "bkn-monte_carlo-state_input": ["normalizer=bkn_monte_carlo", "normalizer.state_from=input"],
}
# The default BKN since the gain warm-up (configs/normalizer/bkn.yaml); "bkn-linear" ran without it.
GAIN_WARMUP = {"bkn-linear-gain_warmup": ["normalizer=bkn_linear", "normalizer.gain_warmup=100"]}
ABLATIONS = {
    # Shrinkage toward a learned prior, without propagation from the previous layer (A frozen at 0).
    "bkn-linear-no_propagation": ["normalizer=bkn_linear", "normalizer.propagate=false"],
    # The paper's BKN: the linear transition and a learned gain q.
    "bkn-linear-learned_gain": ["normalizer=bkn_linear", "normalizer.learn_gain=true"],
}
STATE = {
    f"bkn-{transition}-state_{state}": [f"normalizer=bkn_{transition}", f"normalizer.state_from={state}"]
    for transition in ("analytic", "monte_carlo") for state in ("input", "output")
}
# (8, 2) without the authors' exact BKN, the second costliest run: with it a seed takes ~32 minutes.
G8_S2_VARIANTS = {name: overrides for name, overrides in CORE.items() if name != "bkn-monte_carlo-state_input"}
# The (8, 2) runs again, on the code after the micro-batch speed-up, as they were configured then
# (BKN without its gain warm-up, which came later): only the code differs.
SPEED_RERUN = {name: overrides + ["normalizer.gain_warmup=0"] if name.startswith("bkn") else overrides
               for name, overrides in G8_S2_VARIANTS.items()}
HARD = {name: CORE[name] for name in ("bn", "brn", "gn", "bkn-linear", "bkn-analytic")}
QUICK = {name: CORE[name] for name in ("bn", "brn", "gn", "bkn-linear", "bkn-monte_carlo", "bkn-analytic")}
# Fashion-MNIST: BKN as configured by default (configs/normalizer/bkn.yaml) and the authors' exact BKN.
FASHION = {"bn": CORE["bn"], "brn": CORE["brn"], "gn": CORE["gn"], "bkn": ["normalizer=bkn"],
           "bkn-monte_carlo-state_input": CORE["bkn-monte_carlo-state_input"]}
# The micro-batch normalizers published since the paper, each with its default configuration
# (configs/normalizer/): FRN + TLU, EvoNorm-S0 and Cross-Iteration BN, at the grid's settings.
FASHION_PEERS = {"frn": ["normalizer=frn"], "evonorm_s0": ["normalizer=evonorm_s0"], "cbn": ["normalizer=cbn"]}
FASHION_LARGE, FASHION_MICRO = (128, 128), ((16, 1), (8, 2))  # (gradient, statistics)
FASHION_EPOCHS = 22  # of configs/experiment/study_fashion.yaml's 20,000 training images (the docstring says why)


# The robustness study: the default command's recipe over learning rates (see the docstring).
ROBUSTNESS = {
    "bn": CORE["bn"], "brn": CORE["brn"], "gn": CORE["gn"],
    "bkn-linear": ["normalizer=bkn"],  # the default BKN, as a user gets it
    "bkn-analytic": CORE["bkn-analytic"], "bkn-monte_carlo": CORE["bkn-monte_carlo"],
    "bkn-linear-no_gain_warmup": ["normalizer=bkn", "normalizer.gain_warmup=0"],  # the default before the fix
}
ROBUSTNESS_LEARNING_RATES = (0.05, 0.1, 0.2, 0.4)
ROBUSTNESS_MODELS = ("cifar_net", "preact_resnet32")


@dataclass(frozen=True)
class Part:
    experiment: str  # experiment_name: the folder under the runs dir
    settings: tuple[tuple[int, int], ...]  # (gradient, statistics)
    variants: dict[str, list[str]]
    seeds: tuple[int, ...]
    epochs: int
    data: str = "digits"
    steps: int | None = None  # a fixed number of steps instead of epochs, without the warm-up
    # The default command's recipe at each of these learning rates, with this model (robustness);
    # empty: the study's recipe (linear scaling, cosine, warm-up, an evaluation every epoch).
    learning_rates: tuple[float, ...] = ()
    model: str = "preact_resnet32"
    config: str = "study"  # experiment=<config>: configs/experiment/<config>.yaml
    eval_every_epochs: int = 1  # Fashion-MNIST's 10,000 test images are worth evaluating less often


PARTS = {
    "quick": Part("study_quick", ((32, 2),), QUICK, (0,), 10),
    "baseline": Part("study", ((64, 64),), CORE, (0, 1, 2), 30),
    "g32_s2": Part("study", ((32, 2),), {**CORE, **ABLATIONS}, (0, 1, 2), 30),
    # At (16, 1) and (8, 2) three seeds take 2-3 hours: one part per seed keeps a part within ~75 minutes.
    **{f"g16_s1_seed{seed}": Part("study", ((16, 1),), {**CORE, **ABLATIONS}, (seed,), 30) for seed in (0, 1, 2)},
    **{f"g8_s2_seed{seed}": Part("study", ((8, 2),), G8_S2_VARIANTS, (seed,), 30) for seed in (0, 1, 2)},
    # Where the gain is the micro-batch 0.1 (at (64, 64) it is 0.95 and the warm-up changes little);
    # (8, 2), the costliest setting, is not rerun.
    "gain_warmup": Part("study", ((32, 2), (16, 1)), GAIN_WARMUP, (0, 1, 2), 30),
    # The harder digits, 150 epochs (1,050 steps at (64, 64)): after 60 the baseline's loss was still falling.
    "hard_g64": Part("study_hard", ((64, 64),), HARD, (0, 1, 2), 150, data="digits_hard"),
    # One example per group, as at (16, 1), but half the steps: 150 epochs at (16, 1) would take ~65 minutes.
    "hard_g32_s1": Part("study_hard", ((32, 1),), HARD, (0, 1, 2), 150, data="digits_hard"),
    "state": Part("study_state", ((32, 1), (16, 1)), STATE, (0, 1), 30),
    # The recipe under which BKN-analytic was seen to stall: lr 0.05, no warm-up, 1,500 steps at (32, 1).
    **{f"robustness_{model}_seed{seed}": Part("study_robustness", ((16, 2), (16, 1)), ROBUSTNESS, (seed,), 0,
                                              steps=300, learning_rates=ROBUSTNESS_LEARNING_RATES, model=model)
       for model in ROBUSTNESS_MODELS for seed in (0, 1)},
    "speed_g8_s2_seed0": Part("study_speed", ((8, 2),), SPEED_RERUN, (0,), 30),
    "stall": Part("study_stall", ((32, 1),), {k: v for k, v in STATE.items() if "analytic" in k}, (0, 1), 0,
                  steps=1500),
    # Fashion-MNIST: a first try of the design (BN at both batch sizes, BKN at (16, 1), 2 epochs), then the grid.
    "fashion_quick": Part("study_fashion_quick", (FASHION_LARGE, (16, 1)), {k: FASHION[k] for k in ("bn", "bkn")},
                          (0,), 2, data="fashion_mnist", config="study_fashion"),
    **{f"fashion_{name}_seed{seed}": Part("study_fashion", (setting,), FASHION, (seed,), FASHION_EPOCHS,
                                          data="fashion_mnist", config="study_fashion", eval_every_epochs=3)
       for name, setting in (("baseline", FASHION_LARGE), ("g16_s1", FASHION_MICRO[0]), ("g8_s2", FASHION_MICRO[1]))
       for seed in (0, 1, 2)},
    # The peers, in the grid's experiment with its recipe: three of the five runs of a grid part.
    **{f"fashion_peers_{name}_seed{seed}": Part("study_fashion", (setting,), FASHION_PEERS, (seed,), FASHION_EPOCHS,
                                                data="fashion_mnist", config="study_fashion", eval_every_epochs=3)
       for name, setting in (("baseline", FASHION_LARGE), ("g16_s1", FASHION_MICRO[0]), ("g8_s2", FASHION_MICRO[1]))
       for seed in (0, 1, 2)},
}
# What all runs: every part but the quick ones, the speed rerun and Fashion-MNIST's (fashion_all, fashion_peers).
DIGITS_PARTS = [name for name in PARTS if name not in ("quick", "speed_g8_s2_seed0") and not name.startswith("fashion")]
PEER_PARTS = [name for name in PARTS if name.startswith("fashion_peers_")]  # fashion_peers
FASHION_PARTS = [name for name in PARTS if name.startswith("fashion") and name != "fashion_quick"
                 and name not in PEER_PARTS]  # fashion_all


@dataclass(frozen=True)
class RunSpec:
    name: str  # run_name, e.g. g32_s2_bkn-analytic_seed0
    overrides: tuple[str, ...]


def run_specs(part: Part, runs_dir: Path) -> list[RunSpec]:
    """Every run of ``part``, the costliest first: the smallest gradient batch, and in each setting the
    Monte-Carlo variants (2-4x the others' time at micro-batches), so that a part does not end with
    one worker training the slowest run alone."""
    if part.learning_rates:
        return robustness_specs(part, runs_dir)
    specs = []
    for gradient, statistics in sorted(part.settings):
        steps_per_epoch = TRAIN_EXAMPLES[part.data] // gradient
        length = ([f"train.steps={part.steps}", "train.epochs=null", "schedule.warmup_steps=0"] if part.steps else
                  [f"train.epochs={part.epochs}", f"schedule.warmup_steps={steps_per_epoch}"])
        setting = [
            f"experiment={part.config}", f"data={part.data}", f"experiment_name={part.experiment}",
            f"out_dir={runs_dir}",
            "resume=auto", f"batch.gradient={gradient}", f"batch.statistics={statistics}",
            f"batch.per_device={gradient}", f"optim.lr={BASE_LR * gradient / BASE_BATCH:g}", "schedule=cosine",
            *length, f"eval.every={steps_per_epoch * part.eval_every_epochs}",
        ]
        examples = part.steps * gradient if part.steps else part.epochs * TRAIN_EXAMPLES[part.data]
        gain = default_gain(statistics)  # set explicitly, so the runs' records name it
        for variant, normalizer in sorted(part.variants.items(), key=lambda item: "monte_carlo" not in item[0]):
            if variant.startswith("bkn"):
                extra = [f"normalizer.gain={gain}"]
            elif variant == "brn":
                extra = [f"normalizer.warmup_steps={round(BRN_WARMUP_FRACTION * examples / gradient)}",
                         f"normalizer.relax_steps={round(BRN_RELAX_FRACTION * examples / gradient)}"]
            else:
                extra = []
            for seed in part.seeds:
                name = f"g{gradient}_s{statistics}_{variant}_seed{seed}"
                specs.append(RunSpec(name, (*setting, *normalizer, *extra, f"seed={seed}", f"run_name={name}")))
    return specs


def robustness_specs(part: Part, runs_dir: Path) -> list[RunSpec]:
    """The runs of a robustness part: ``python train.py`` with the model, setting, learning rate,
    normalizer and seed changed, and nothing else (BRN's schedule follows the number of steps)."""
    specs = []
    for gradient, statistics in sorted(part.settings):
        for lr in part.learning_rates:
            setting = [f"model={part.model}", f"data={part.data}", f"experiment_name={part.experiment}",
                       f"out_dir={runs_dir}", "resume=auto", f"batch.gradient={gradient}",
                       f"batch.statistics={statistics}", f"optim.lr={lr:g}", f"train.steps={part.steps}",
                       "train.epochs=null"]
            for variant, normalizer in part.variants.items():
                extra = []
                if variant == "brn":
                    extra = [f"normalizer.warmup_steps={round(BRN_WARMUP_FRACTION * part.steps)}",
                             f"normalizer.relax_steps={round(BRN_RELAX_FRACTION * part.steps)}"]
                for seed in part.seeds:
                    name = f"{part.model}_g{gradient}_s{statistics}_lr{lr:g}_{variant}_seed{seed}"
                    specs.append(RunSpec(name, (*setting, *normalizer, *extra, f"seed={seed}", f"run_name={name}")))
    return specs


def is_finished(run_dir: Path) -> bool:
    try:
        return json.loads((run_dir / "summary.json").read_text()).get("status") == "finished"
    except (FileNotFoundError, json.JSONDecodeError):
        return False


def already_run(runs_dir: Path, experiment: str, name: str) -> bool:
    """Finished in the runs dir, or committed as finished in results/study/records/ (study_report.py)."""
    return is_finished(runs_dir / experiment / name) or is_finished(RECORDS / experiment / name)


def train(spec: RunSpec, logs: Path) -> tuple[str, int, float]:
    start = time.monotonic()
    with open(logs / f"{spec.name}.log", "w") as log:
        code = subprocess.run([sys.executable, "train.py", *spec.overrides], cwd=ROOT, stdout=log,
                              stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"}).returncode
    return spec.name, code, time.monotonic() - start


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=[*PARTS, "robustness", "all", "fashion_all", "fashion_peers"],
                        help="which part of the study to run")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/study"), help="default runs/study")
    parser.add_argument("--workers", type=int, default=2, help="train.py processes at a time (default 2)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands still to run, run nothing")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    groups = {"all": DIGITS_PARTS, "fashion_all": FASHION_PARTS, "fashion_peers": PEER_PARTS,
              "robustness": [part for part in PARTS if part.startswith("robustness_")]}
    for part_name in groups.get(args.part, [args.part]):
        run_part(part_name, args.runs_dir.resolve(), args.workers, args.dry_run)


def run_part(part_name: str, runs_dir: Path, workers: int, dry_run: bool) -> None:
    part = PARTS[part_name]
    specs = run_specs(part, runs_dir)
    todo = [spec for spec in specs if not already_run(runs_dir, part.experiment, spec.name)]
    print(f"study part {part_name}: {len(specs)} runs, {len(specs) - len(todo)} finished, {len(todo)} to run")
    if dry_run:
        for spec in todo:
            print("python train.py " + " ".join(spec.overrides))
        return
    logs = runs_dir / "logs" / part_name
    logs.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    results = []
    try:
        with ThreadPoolExecutor(workers) as pool:
            for job in as_completed([pool.submit(train, spec, logs) for spec in todo]):
                name, code, seconds = job.result()
                print(f"  {name:44s} {'ok' if code == 0 else f'FAILED ({code})':12s} {seconds:7.1f} s", flush=True)
                results.append((name, code))
    finally:  # an interrupted invocation (Ctrl-C) counts too: the part's wall time is the sum of its invocations
        wall = time.monotonic() - started
        entry = {"part": part_name, "runs": len(todo), "wall_s": round(wall, 1), "workers": workers,
                 "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        if len(results) < len(todo):
            entry["interrupted_after_runs"] = len(results)
        with open(logs / "wall_times.jsonl", "a") as handle:
            handle.write(json.dumps(entry) + "\n")
    print(f"study part {part_name}: {wall:.0f} s for {len(todo)} runs")
    failed = [name for name, code in results if code != 0]
    if failed:
        sys.exit(f"error: {len(failed)} run(s) failed; see {logs}/{failed[0]}.log")


if __name__ == "__main__":
    main()
