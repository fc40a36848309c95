"""Every experiment config (configs/experiment/) composes at scale paper and smoke, its sweep expands
to the runs the paper compares, and at scale smoke every job passes train.py's validation.

The expected job counts come from the paper's design (models x normalizers x data sets, see
docs/results.md), not from the configs. The slow test runs `make table3 fig4 fig8 SCALE=smoke` end to end.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig

import bkn.config  # noqa: F401  (registers the run_name resolver)
from bkn.config import validate
from bkn.models import build_model

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
sys.path.insert(0, str(ROOT / "scripts"))

# id: (experiment_name, number of runs) as the paper's tables and figures define them.
EXPERIMENTS = {
    "table1": ("table1", 2 * 2),  # InceptionV2, ResNet101 x BN, BKN
    "table2": ("table2", 2),  # InceptionV2 x BN, BKN
    "table3": ("table3", 2 * 2),  # CIFAR-10, CIFAR-100 x BN, BKN (micro-batch)
    "table3_baseline": ("table3", 2),  # CIFAR-10, CIFAR-100 x ordinary BN
    "table3_widened": ("table3", 2),  # CIFAR-10, CIFAR-100 x BN widened to BKN's parameter count
    # Figures 3-7 add GroupNorm beside the paper's three (ours: the authors' repository compares it).
    "fig3": ("fig3", 2 * 4),  # InceptionV2, ResNet101 x BN, BRN, BKN, GN
    "fig4": ("fig4", 4),  # InceptionV2 x BN, BRN, BKN, GN
    "fig5": ("fig5", 2 * 4),
    "fig6": ("fig6", 2 * 4),
    "fig7": ("fig7", 2 * 4),
    "fig8": ("fig8", 2),  # CIFAR net on CIFAR-10 x BN, BKN
}
PAPER_SETTINGS = {"table1": (256, 32), "table2": (256, 32), "table3": (128, 2), "table3_baseline": (128, 128), "table3_widened": (128, 2),
                  "fig3": (256, 4), "fig4": (256, 1), "fig5": (64, 8), "fig6": (16, 4), "fig7": (8, 2),
                  "fig8": (128, 2)}


def expand_sweep(arguments: list[str]) -> list[tuple[str, ...]]:
    """The override lists of every job `train.py -m <arguments>` launches: the config's sweep
    params, then the command line's (which win), expanded as Hydra's basic sweeper does."""
    config = compose("config", overrides=arguments, return_hydra_config=True)
    params = [f"{key}={value}" for key, value in config.hydra.sweeper.params.items()] + arguments
    chunks = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(params), None)
    return [tuple(job) for chunk in chunks for job in chunk]


@functools.cache
def sweep_jobs(experiment: str, scale: str) -> tuple[tuple[str, ...], ...]:
    return tuple(expand_sweep([f"experiment={experiment}", f"scale={scale}"]))


@functools.cache
def job_configs(experiment: str, scale: str) -> tuple[DictConfig, ...]:
    """The composed config of every job of the sweep (composing is slow: each is built once)."""
    return tuple(compose("config", overrides=list(job)) for job in sweep_jobs(experiment, scale))


@pytest.fixture(scope="module", autouse=True)
def hydra_configs():
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        yield


def test_every_table_and_figure_has_a_config() -> None:
    files = {path.stem for path in (CONFIGS / "experiment").glob("*.yaml")}
    assert files == set(EXPERIMENTS) | {"study", "study_fashion", "demo"}  # demo: `make demo`; study*: `make study`


@pytest.mark.parametrize("scale", ["paper", "smoke"])
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_sweep_expands_to_the_papers_jobs(experiment: str, scale: str) -> None:
    assert len(sweep_jobs(experiment, scale)) == EXPERIMENTS[experiment][1]


def check_run_folders(experiment: str, scale: str) -> None:
    name, count = EXPERIMENTS[experiment]
    configs = job_configs(experiment, scale)
    assert {config.experiment_name for config in configs} == {name}
    assert len({config.run_name for config in configs}) == count  # no two jobs share a run folder


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_paper_job_has_its_own_run_folder(experiment: str) -> None:
    check_run_folders(experiment, "paper")


@pytest.mark.parametrize("experiment", ["table3", "table3_baseline", "table3_widened", "fig8"])
def test_smoke_jobs_that_rename_runs_have_their_own_run_folder(experiment: str) -> None:
    check_run_folders(experiment, "smoke")


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_paper_scale_uses_the_papers_setting_and_data(experiment: str) -> None:
    configs = job_configs(experiment, "paper")
    assert {(config.batch.gradient, config.batch.statistics) for config in configs} == {PAPER_SETTINGS[experiment]}
    expected_data = {"table3": {"cifar10", "cifar100"}, "table3_baseline": {"cifar10", "cifar100"},
                     "table3_widened": {"cifar10", "cifar100"}, "fig8": {"cifar10"}}
    assert {config.data.name for config in configs} == expected_data.get(experiment, {"imagenet"})


def check_smoke_job(config: DictConfig) -> None:
    assert config.data.name == "synthetic" and config.train.steps <= 10
    plan = validate(config)  # train.py's own check: batch sizes, model and image size, ...
    assert plan.gradient_batch_size <= 16 and plan.accumulation == 1


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_smoke_scale_is_small_and_valid(experiment: str) -> None:
    # One job here (composing is slow); every job in the slow test below.
    check_smoke_job(compose("config", overrides=list(sweep_jobs(experiment, "smoke")[-1])))


@pytest.mark.slow
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_smoke_job_is_small_valid_and_in_its_own_folder(experiment: str) -> None:
    check_run_folders(experiment, "smoke")
    for config in job_configs(experiment, "smoke"):
        check_smoke_job(config)


@pytest.mark.parametrize("scale", ["paper", "smoke"])
def test_table3_runs_its_baseline_and_widened_bn_share_a_folder_without_clashing(scale: str) -> None:
    names = [config.run_name for experiment in ("table3", "table3_baseline", "table3_widened")
             for config in job_configs(experiment, scale)]
    assert len(names) == len(set(names)) == 8


def test_table3_widened_bn_has_as_many_parameters_as_its_bkn() -> None:
    def parameters(config: DictConfig) -> int:
        options = {key: value for key, value in config.model.items() if key not in ("name", "image_size")}
        norm = {"name": config.normalizer.name, **({"transition": config.normalizer.transition}
                                                   if config.normalizer.name == "bkn" else {})}
        model = build_model(config.model.name, 10, norm, 32, **options)
        return sum(parameter.numel() for parameter in model.parameters())

    bkn = [config for config in job_configs("table3", "paper") if config.normalizer.name == "bkn"]
    (widened, *_) = job_configs("table3_widened", "paper")
    (plain, *_) = [config for config in job_configs("table3", "paper") if config.normalizer.name == "bn"]
    assert widened.normalizer.name == "bn" and bkn[0].normalizer.transition == "linear"
    assert parameters(plain) < 0.8 * parameters(bkn[0])  # BKN's transition adds parameters ...
    assert abs(parameters(widened) - parameters(bkn[0])) < 0.01 * parameters(bkn[0])  # ... the widened BN matches


def test_smoke_table3_stands_in_for_cifar10_and_cifar100_by_class_count() -> None:
    assert {config.data.num_classes for config in job_configs("table3", "smoke")} == {10, 100}


def test_scale_paper_changes_nothing() -> None:
    assert compose("config", overrides=["scale=paper"]) == compose("config")


@pytest.mark.slow
def test_make_table3_fig4_and_fig8_at_smoke_scale_write_their_results(tmp_path: Path) -> None:
    runs, results = tmp_path / "runs", tmp_path / "results"
    command = ["make", "table3", "fig4", "fig8", "SCALE=smoke", f"RUNS_DIR={runs}", f"RESULTS_DIR={results}",
               f"PY={sys.executable}"]
    completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env={**os.environ}, timeout=900)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    for name in ("table3.md", "table3.csv", "fig4.md", "fig4.csv", "fig4.png", "fig8.md", "fig8.csv", "fig8.png"):
        assert (results / name).stat().st_size > 0, name
    assert len(list((runs / "table3").glob("*/summary.json"))) == 8
    table_cells = [cell.strip() for line in (results / "fig4.md").read_text().splitlines()
                   if line.startswith("| ") for cell in line.split("|")]
    assert "missing" not in table_cells  # every row of the figure found its run
