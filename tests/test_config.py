"""The config tree composes for every model x normalizer x data set, run names and directories
are derived from the settings, and bad settings are rejected with one line naming key and fix."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from bkn.config import ConfigError, Plan, World, validate
from bkn.data import BUILDERS
from bkn.models import list_models
from bkn.nn import NORMALIZERS
from training_helpers import CONFIG_DIR, compose_config

NORMALIZER_CONFIGS = sorted(path.stem for path in (CONFIG_DIR / "normalizer").glob("*.yaml"))
DATA_CONFIGS = sorted(path.stem for path in (CONFIG_DIR / "data").glob("*.yaml"))
MODEL_CONFIGS = sorted(path.stem for path in (CONFIG_DIR / "model").glob("*.yaml"))


def test_every_model_normalizer_and_data_set_has_a_config() -> None:
    assert MODEL_CONFIGS == sorted(list_models())
    assert {"bn", "brn", "bkn"} <= set(NORMALIZER_CONFIGS)
    assert DATA_CONFIGS == sorted(BUILDERS)


def test_every_combination_composes() -> None:
    # Hydra composes each option of each group once (composing is slow); the groups are
    # independent nodes, so every combination is then the base with the three nodes swapped in.
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        base = compose("config")
        nodes = {}
        for group, options in ("model", MODEL_CONFIGS), ("normalizer", NORMALIZER_CONFIGS), ("data", DATA_CONFIGS):
            for option in options:
                cfg = compose("config", overrides=[f"{group}={option}"])
                OmegaConf.resolve(cfg)  # every interpolation resolves
                nodes[group, option] = cfg[group]
    assert {nodes["model", m].name for m in MODEL_CONFIGS} == set(MODEL_CONFIGS)
    assert {nodes["normalizer", n].name for n in NORMALIZER_CONFIGS} == set(NORMALIZERS)
    assert [nodes["data", d].name for d in DATA_CONFIGS] == DATA_CONFIGS
    run_names = set()
    for model, normalizer, data in itertools.product(MODEL_CONFIGS, NORMALIZER_CONFIGS, DATA_CONFIGS):
        cfg = base.copy()
        cfg.model, cfg.normalizer = nodes["model", model], nodes["normalizer", normalizer]
        cfg.data = nodes["data", data]
        assert "statistics_batch_size" not in cfg.normalizer  # it comes from batch.statistics
        run_names.add((cfg.run_name, data))
    # Different settings never share a run directory (normalizer variants included); bkn and
    # bkn_analytic are the same settings, so they do.
    distinct_normalizers = {str(nodes["normalizer", n]) for n in NORMALIZER_CONFIGS}
    assert len(distinct_normalizers) == len(NORMALIZER_CONFIGS) - 1
    assert len(run_names) == len(MODEL_CONFIGS) * len(distinct_normalizers) * len(DATA_CONFIGS)


@pytest.mark.parametrize("model", MODEL_CONFIGS)
def test_every_model_validates_at_its_paper_size(model: str) -> None:
    size = 32 if model in ("cifar_net", "preact_resnet32", "preact_resnet110") else 224
    normalizer = ["normalizer=bn"] if model == "timm" else []  # timm models refuse the default, BKN
    plan = validate(compose_config([f"model={model}", *normalizer, "data=synthetic", f"data.image_size={size}"]),
                    environ={})
    assert plan.image_size == size


@pytest.mark.parametrize("normalizer", NORMALIZER_CONFIGS)
def test_every_normalizer_validates(normalizer: str) -> None:
    validate(compose_config([f"normalizer={normalizer}"]), environ={})


@pytest.mark.parametrize("data", DATA_CONFIGS)
def test_every_data_set_validates(data: str, tmp_path: Path) -> None:
    validate(compose_config([f"data={data}", f"data.root={tmp_path}"]), environ={})


def test_run_name_and_directories_come_from_the_settings() -> None:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["normalizer=bkn_monte_carlo", "batch.gradient=64", "batch.statistics=8",
                                           "seed=3", "experiment_name=table9"], return_hydra_config=True)
        assert cfg.run_name == "cifar_net_bkn-monte_carlo_g64_s8_seed3"
        assert cfg.hydra.run.dir == "runs/table9/cifar_net_bkn-monte_carlo_g64_s8_seed3"
        assert (cfg.hydra.sweep.dir, cfg.hydra.sweep.subdir) == ("runs/table9", cfg.run_name)
        assert compose("config", overrides=["normalizer=bn"]).run_name == "cifar_net_bn_g16_s2_seed0"


def test_slurm_launcher_runs_one_task_per_gpu() -> None:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=4"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.tasks_per_node == launcher.gpus_per_node == 4


def test_plan_splits_the_gradient_batch() -> None:
    cfg = compose_config(["batch.gradient=64", "batch.statistics=4", "batch.per_device=8"])
    plan = validate(cfg, environ={"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (plan.world.size, plan.accumulation, plan.groups_per_device, plan.eval_batch_size) == (4, 2, 2, 8)
    two_processes = {"RANK": "0", "WORLD_SIZE": "2"}
    assert validate(compose_config(["batch.gradient=32"]), environ=two_processes).per_device_batch_size == 16
    plan = plan.with_train_set(1000)  # 15 full gradient batches of 64, times 10 epochs
    assert (plan.steps_per_epoch, plan.steps) == (15, 150)
    assert "150 steps = 10.00 epochs" in plan.describe()
    steps_plan = validate(compose_config(["train.steps=7", "train.epochs=null"]), environ={}).with_train_set(1000)
    assert steps_plan.steps == 7


BAD_SETTINGS = [
    (["batch.statistics=3"], "batch.statistics=3 does not divide the device batch batch.per_device=16"),
    (["batch.gradient=20", "batch.per_device=8"], "batch.gradient=20 is not a multiple of batch.per_device x"),
    (["batch.eval=5"], "batch.eval=5 is not a multiple of batch.statistics=2"),
    (["batch.gradient=0"], "batch.gradient=0: expected an integer >= 1"),
    (["train.steps=5"], "set exactly one of them"),
    (["model.name=resnet7"], "model: unknown model 'resnet7'"),
    (["model=resnet50", "data.image_size=8"], "image_size=8 is too small"),
    (["+normalizer.momentum_typo=0.1"], "normalizer: normalizer 'bkn' has no option 'momentum_typo'"),
    (["normalizer.transition=kalman"], "transition must be 'linear', 'monte_carlo' or 'analytic'"),
    (["normalizer.gain=1.5"], "gain must lie in [0, 1]"),
    (["normalizer=bn", "+normalizer.statistics_batch_size=4"], "set by batch.statistics"),
    (["data=cifar10", "data.root=/nonexistent/cifar"], "data.root=/nonexistent/cifar does not exist"),
    (["data.name=mnist"], "data.name='mnist': choose one of"),
    (["eval.inference=[population,moving]"], "eval.inference="),
    (["schedule.milestones=[0.75,0.5]"], "schedule.milestones="),
    (["optim.lr=0"], "optim.lr=0: expected a number in (0"),
    (["amp=fp16", "device=cpu"], "amp=fp16 needs CUDA"),
    (["resume=/nonexistent/last.pt"], "no such checkpoint file"),
    (["run_name=a/b"], "run_name='a/b': expected a non-empty name without '/'"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_SETTINGS, ids=[" ".join(o) for o, _ in BAD_SETTINGS])
def test_bad_settings_are_rejected_with_one_line(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        validate(compose_config(overrides), environ={})
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_world_size_enters_the_divisibility_checks() -> None:
    with pytest.raises(ConfigError, match="does not split evenly over 3 processes"):
        validate(compose_config(["batch.gradient=16"]), environ={"RANK": "0", "WORLD_SIZE": "3"})


def test_plan_is_a_plain_value() -> None:
    plan = validate(compose_config([]), environ={})
    assert isinstance(plan, Plan) and plan.world == World() and plan.device == "cpu"
    assert plan.run_dir == Path("runs/default/cifar_net_bkn-analytic_g16_s2_seed0")
