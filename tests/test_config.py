"""The config tree composes for every model x normalizer x data set, run names and directories
are derived from the settings, and bad settings are rejected with one line naming key and fix."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from bkn.config import ConfigError, Plan, World, compile_modes, defined_keys, run_name, validate
from bkn.data import BUILDERS
from bkn.models import list_models
from bkn.nn import NORMALIZERS
from bkn.nn.norms import TIMM_NORMALIZERS
from training_helpers import CONFIG_DIR, compose_config, run_train_main

NORMALIZER_CONFIGS = sorted(path.stem for path in (CONFIG_DIR / "normalizer").glob("*.yaml"))
DATA_CONFIGS = sorted(path.stem for path in (CONFIG_DIR / "data").glob("*.yaml"))
MODEL_CONFIGS = sorted(path.stem for path in (CONFIG_DIR / "model").glob("*.yaml"))


def test_every_model_normalizer_and_data_set_has_a_config() -> None:
    assert MODEL_CONFIGS == sorted(list_models())
    assert {"bn", "brn", "bkn"} <= set(NORMALIZER_CONFIGS)
    assert set(BUILDERS) <= set(DATA_CONFIGS)  # plus variants of a data set, such as digits_hard


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
    assert {nodes["normalizer", n].name for n in NORMALIZER_CONFIGS} == {*NORMALIZERS, *TIMM_NORMALIZERS}
    assert {nodes["data", d].name for d in DATA_CONFIGS} == set(BUILDERS)
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
    size = 32 if model in ("cifar_net", "preact_resnet", "preact_resnet32", "preact_resnet110") else 224
    plan = validate(compose_config([f"model={model}", "data=synthetic", f"data.image_size={size}"]),
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
        # Hydra makes no folder of its own: a run makes its record once validated.
        assert (cfg.hydra.run.dir, cfg.hydra.sweep.subdir, cfg.hydra.output_subdir) == (".", ".", None)
        assert "file" not in cfg.hydra.job_logging.handlers
        assert compose("config", overrides=["normalizer=bn"]).run_name == "cifar_net_bn_g16_s2_seed0"


NAME_ONLY = ["normalizer=bn", "model=resnet18", "batch.gradient=64", "batch.statistics=8", "seed=3",
             "experiment=table1", "scale=smoke", "out_dir=elsewhere", "resume=null", "logger=wandb", "device=cpu",
             "data.num_workers=2", "data.download=true", "checkpoint.every=5", "eval.every=7", "dry_run=true"]


def test_run_name_gets_a_suffix_only_for_run_defining_overrides_it_does_not_show() -> None:
    def name(overrides: list[str]) -> str:
        return run_name(compose_config(overrides), overrides)

    assert name(NAME_ONLY) == compose_config(NAME_ONLY).run_name  # the make targets' names, unchanged
    lr_01, lr_005 = name(["optim.lr=0.1"]), name(["optim.lr=0.05"])
    assert lr_01.startswith("cifar_net_bkn-linear_g16_s2_seed0_") and len({lr_01, lr_005}) == 2
    assert name(["optim.lr=0.1"]) == lr_01  # stable: a rerun finds its folder
    assert name(["optim.lr=1e-1"]) == lr_01  # resolved values, not spellings
    assert len({name(["data=synthetic"]), name(["data=digits"]), name(["schedule=cosine"]),
                name(["train.steps=2", "train.epochs=null"]), name(["++optim.lr=0.2"]), name(["normalizer.gain=0.5"]),
                name(["data=synthetic", "data.train_size=64"]), name(["data.root=/somewhere"]),
                name(["data.root=/elsewhere"])}) == 9  # which data is read is part of the run
    assert name(["optim.lr=0.1", "run_name=mine"]) == "mine"  # given explicitly: used as given
    swept = ["experiment=fig8", "data=cifar10", "normalizer=bn"]  # a job of fig8's own sweep (data: cifar10)
    plain = compose_config(swept).run_name
    assert run_name(compose_config(swept), swept, experiment_sweep={"data", "normalizer"}) == plain
    assert run_name(compose_config(swept), swept) != plain  # the same override from the command line


def test_unknown_keys_are_refused_with_the_nearest_known_key() -> None:
    for overrides, message in [(["+train.step=3"], "unknown key train.step (did you mean train.steps?)"),
                               (["+optim.weight_decy=0"], "unknown key optim.weight_decy (did you mean optim.weight_"),
                               (["+eval.evry=5"], "unknown key eval.evry (did you mean eval.every?)"),
                               (["+colour=red"], "unknown key colour;")]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            validate(compose_config(overrides), environ={})
    known = defined_keys()
    assert {"optim.lr", "schedule.milestones", "logger.wandb.tags", "train.steps", "normalizer.gain"} <= known
    assert not any(key.startswith(("hydra", "defaults", "experiment.", "scale.")) for key in known)


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


def test_a_statistics_group_of_whole_devices_is_pooled_over_them() -> None:
    four_processes = {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}
    plan = validate(compose_config(["batch.gradient=32", "batch.statistics=16"]), environ=four_processes)
    assert (plan.per_device_batch_size, plan.devices_per_statistics_group, plan.eval_batch_size) == (8, 2, 16)
    assert "groups of 16 examples, each pooled over 2 devices" in plan.describe()
    with pytest.raises(ConfigError, match=r"choose one of \[1, 2, 4, 8\], or a group pooled over whole devices: one of \[16, 32\]$"):
        validate(compose_config(["batch.gradient=32", "batch.statistics=24"]), environ=four_processes)
    with pytest.raises(ConfigError, match="normalizer=cbn cannot pool batch.statistics=16 over devices"):
        validate(compose_config(["batch.gradient=32", "batch.statistics=16", "normalizer=cbn"]), environ=four_processes)


BAD_SETTINGS = [
    (["batch.statistics=3"], "batch.statistics=3 does not divide the device batch batch.per_device=16"),
    (["batch.statistics=32"], "choose one of [1, 2, 4, 8, 16] (or, with k processes, per_device x k: a group pooled"),
    (["batch.gradient=20", "batch.per_device=8"], "batch.gradient=20 is not a multiple of batch.per_device x"),
    (["batch.eval=5"], "batch.eval=5 is not a multiple of batch.statistics=2"),
    (["batch.gradient=0"], "batch.gradient=0: expected an integer >= 1"),
    (["train.epochs=null"], "set exactly one of them"),
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
    (["optim.lr=0"], "optim.lr=0: expected a finite number in (0, inf)"),
    (["optim.lr=inf"], "optim.lr=inf: expected a finite number"),
    (["optim.momentum=nan"], "optim.momentum=nan: expected a finite number"),
    (["normalizer.gain=inf"], "normalizer.gain=inf: expected a finite number"),
    (["data=folder", "data.mean=[0.5,nan,0.5]"], "data.mean=[0.5, nan, 0.5]: expected a finite number"),
    (["amp=fp16", "device=cpu"], "amp=fp16 needs CUDA"),
    (["compile=fast"], "compile='fast': choose false, true (torch.compile's default mode) or a mode of torch.compile: "
                       "default,"),
    (["compile=reduce-overhead", "device=cpu"], "compile=reduce-overhead captures the training step in CUDA graphs, "
                                                "which needs device=cuda; on cpu use compile=true or a mode without them"),
    (["compile=max-autotune", "device=cpu"], "compile=max-autotune captures the training step in CUDA graphs"),
    (["resume=/nonexistent/last.pt"], "no such checkpoint file"),
    (["run_name=a/b"], "run_name='a/b': expected a non-empty name without '/'"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_SETTINGS, ids=[" ".join(o) for o, _ in BAD_SETTINGS])
def test_bad_settings_are_rejected_with_one_line(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        validate(compose_config(overrides), environ={})
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_missing_imagenet_is_not_told_to_download() -> None:
    """ImageNet cannot be downloaded (it needs a login): its error offers only data.root."""
    with pytest.raises(ConfigError) as imagenet:
        validate(compose_config(["data=imagenet", "data.root=/nonexistent/imagenet"]), environ={})
    assert "data.download" not in str(imagenet.value)
    with pytest.raises(ConfigError, match="or pass data.download=true"):
        validate(compose_config(["data=cifar100", "data.root=/nonexistent/cifar"]), environ={})


def test_world_size_enters_the_divisibility_checks() -> None:
    with pytest.raises(ConfigError, match="does not split evenly over 3 processes"):
        validate(compose_config(["batch.gradient=16"]), environ={"RANK": "0", "WORLD_SIZE": "3"})


def test_plan_is_a_plain_value() -> None:
    plan = validate(compose_config([]), environ={})
    assert isinstance(plan, Plan) and plan.world == World() and plan.device == "cpu"
    assert plan.run_dir == Path("runs/default/cifar_net_bkn-linear_g16_s2_seed0")


@pytest.mark.parametrize(("value", "mode"), [("false", None), ("true", "default"), ("default", "default"),
                                             ("max-autotune-no-cudagraphs", "max-autotune-no-cudagraphs")])
def test_compile_takes_true_false_or_a_mode_of_torch_compile(value: str, mode: str | None) -> None:
    plan = validate(compose_config([f"compile={value}", "device=cpu"]), environ={})
    assert plan.compile_mode == mode
    assert ("off (eager)" if mode is None else f"torch.compile, mode {mode}") in plan.describe()


def test_compile_modes_are_torchs_and_those_with_cuda_graphs_are_named() -> None:
    modes = compile_modes()
    assert set(modes) == set(torch._inductor.list_mode_options())  # every mode this torch defines
    assert modes["reduce-overhead"] and modes["max-autotune"]  # torch.compile's docs: they use CUDA graphs
    assert not modes["default"] and not modes["max-autotune-no-cudagraphs"]


TRAINING_LENGTHS = [
    (["train.steps=7"], "7 steps = "),  # over the default train.epochs: 10
    (["scale=smoke", "train.epochs=2"], "steps = 2.00 epochs"),  # over the smoke scale's train.steps: 4
    (["train.steps=7", "train.epochs=null"], "7 steps = "),
    (["train.epochs=3"], "steps = 3.00 epochs"),
]


@pytest.mark.parametrize(("overrides", "length"), TRAINING_LENGTHS, ids=[" ".join(o) for o, _ in TRAINING_LENGTHS])
def test_a_training_length_alone_on_the_command_line_wins(overrides: list[str], length: str, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert run_train_main(monkeypatch, [*overrides, f"out_dir={tmp_path}", "dry_run=true"]) == 0
    assert length in capsys.readouterr().out


def test_steps_and_epochs_both_on_the_command_line_is_one_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert run_train_main(monkeypatch, ["train.steps=7", "train.epochs=2", f"out_dir={tmp_path}", "dry_run=true"]) == 2
    error = capsys.readouterr().err
    assert error == "error: train.steps=7 and train.epochs=2 are both given on the command line; give one of them\n"


def test_readme_docs_and_configs_point_at_nothing_outside_the_project() -> None:
    root = CONFIG_DIR.parent
    files = [root / "README.md", *(root / "docs").rglob("*.md"), *CONFIG_DIR.rglob("*.yaml")]
    outside = [f"{path.relative_to(root)}:{number}: {line.strip()}" for path in files
               for number, line in enumerate(path.read_text().splitlines(), 1)
               if "../shared" in line or "shared/design" in line or "/work/" in line]
    assert len(files) > 20 and outside == []


def test_a_preact_resnet_depth_is_shown_in_the_run_name_not_hashed() -> None:
    overrides = ["model=preact_resnet", "model.depth=14"]
    assert run_name(compose_config(overrides), overrides) == "preact_resnet-d14_bkn-linear_g16_s2_seed0"
