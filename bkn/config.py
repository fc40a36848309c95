"""Validation of a composed config, and the plan derived from it, before any data is read or
any process group is joined.

``validate(cfg)`` checks every setting and returns a :class:`Plan` (device, processes, how the
gradient batch splits into device batches, accumulation steps and statistics groups, the run
directory). A bad setting raises :class:`ConfigError` with one line naming the key and the fix;
``train.py`` prints it and exits with code 2. The normalizer and model settings are checked by
building them (the model on the meta device: no memory, no time), so every option their
constructors accept is accepted here and nothing else.

Unknown keys are refused too: every key of the composed config must be one that ``configs/``
defines (``config.yaml`` or a file of its group; model, normalizer and data options are checked by
building them), so ``+train.step=3`` is an error naming ``train.steps``, not a silent no-op.

``run_name(cfg, overrides)`` is the run's folder name: config.yaml's ``run_name`` (model,
normalizer, ``(g, s)``, seed) plus a short hash of the command line's other run-defining overrides,
so that every job of a sweep gets its own folder.

Importing this module registers the ``bkn.normalizer_label`` and ``bkn.model_label`` resolvers
that ``run_name`` uses.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, ListConfig, OmegaConf

from bkn.data import BUILDERS
from bkn.models import build_model
from bkn.nn import build_norm

Launcher = Literal["single", "torchrun", "slurm"]


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    size: int = 1
    rank: int = 0
    local_rank: int = 0
    launcher: Launcher = "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def detect_world(environ: Mapping[str, str] = os.environ) -> World:
    """Read the launcher's environment: torchrun's variables first, then a submitit SLURM job's."""
    if "WORLD_SIZE" in environ and "RANK" in environ:
        return World(int(environ["WORLD_SIZE"]), int(environ["RANK"]), int(environ.get("LOCAL_RANK", 0)), "torchrun")
    # submitit runs the same command once per SLURM task; each task is one rank.
    if environ.get("SUBMITIT_EXECUTOR") == "slurm" and int(environ.get("SLURM_NTASKS", "1")) > 1:
        return World(int(environ["SLURM_NTASKS"]), int(environ["SLURM_PROCID"]), int(environ["SLURM_LOCALID"]), "slurm")
    return World()


INFERENCE_OPTIONS = ("population", "batch")
DATA_ON_DISK = ("cifar10", "cifar100", "imagenet", "folder")  # the others are bundled or generated


# The folder that train.py composes (the repository's configs/, next to the bkn package).
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
# Groups whose options are checked by building them (build_norm, build_model, the data builders).
BUILT_GROUPS = ("model", "normalizer", "data")

# The settings that decide what a run computes. resume refuses a checkpoint made with others, and a
# command-line override of one that the run name does not show gives the run its own folder.
RUN_DEFINING_KEYS = ("model", "normalizer", "data", "batch", "train.steps", "train.epochs", "optim", "schedule",
                     "seed", "amp")
# How the data is read. Which data (data.name, data.root, its size, subset and options) defines the run.
NOT_RUN_DEFINING_KEYS = ("data.download", "data.num_workers")
# What config.yaml's run_name shows: overriding these needs no suffix.
NAME_KEYS = ("model", "model.name", "model.width", "model.arch", "model.depth", "normalizer", "normalizer.name",
             "normalizer.transition", "batch.gradient", "batch.statistics", "seed")


class ConfigError(ValueError):
    """A setting is invalid; the message names the key and the fix."""


def is_under(key: str, prefixes: Sequence[str]) -> bool:
    return any(key == prefix or key.startswith(f"{prefix}.") for prefix in prefixes)


def config_leaves(value: Any, key: str = "") -> Iterator[tuple[str, Any]]:
    """``("optim.lr", 0.1), ...`` for a (nested) config or container; lists are leaves. Unresolved."""
    if isinstance(value, DictConfig):
        value = {name: value._get_node(name) for name in value.keys()}
    if isinstance(value, dict) and value:
        for name, child in value.items():
            yield from config_leaves(child, f"{key}.{name}" if key else str(name))
    else:
        yield key, value


def defined_keys(config_dir: Path = CONFIG_DIR) -> set[str]:
    """Every key that configs/ defines: config.yaml's own and, under its group's name, each group
    file's. Files of the global package (experiment/, scale/) only set keys defined elsewhere."""
    keys = {key for key, _ in config_leaves(OmegaConf.load(config_dir / "config.yaml"))
            if not is_under(key, ("defaults", "hydra"))}
    for group in sorted(path for path in config_dir.iterdir() if path.is_dir() and path.name != "hydra"):
        for file in group.glob("*.yaml"):
            if "# @package _global_" not in file.read_text():
                keys |= {f"{group.name}.{key}" for key, _ in config_leaves(OmegaConf.load(file))
                         if not is_under(key, ("defaults",))}
    return keys


def nearest_key(key: str, known: set[str]) -> str:
    """`` (did you mean train.steps?)`` or ``""``."""
    matches = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    return f" (did you mean {matches[0]}?)" if matches else ""


def _refuse_unknown_keys(cfg: DictConfig, config_dir: Path = CONFIG_DIR) -> None:
    if not (config_dir / "config.yaml").is_file():  # bkn used as a library, without train.py's configs/
        return
    known = defined_keys(config_dir)
    for key, _ in config_leaves(cfg):
        if not is_under(key, BUILT_GROUPS) and key not in known:
            raise ConfigError(f"unknown key {key}{nearest_key(key, known)}; every key is listed in docs/training.md")


def run_settings(cfg: DictConfig) -> dict[str, Any]:
    """``{"optim.lr": 0.1, ...}``: the resolved run-defining settings, as plain values."""
    settings = {}
    for prefix in RUN_DEFINING_KEYS:
        value = OmegaConf.select(cfg, prefix, default=None)
        plain = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
        for key, leaf in config_leaves(plain, prefix):
            if not is_under(key, NOT_RUN_DEFINING_KEYS):
                settings[key] = leaf
    return settings


def first_difference(before: Mapping[str, Any], now: Mapping[str, Any]) -> str | None:
    """``"optim.lr=0.1, this config has optim.lr=0.05"``-style text for the first setting that
    differs; a changed ``name`` (another model, normalizer, data set) is named before its options."""
    for key in sorted(before.keys() | now.keys(), key=lambda key: (not key.endswith(".name"), key)):
        old, new = before.get(key, "<unset>"), now.get(key, "<unset>")
        if old != new:
            return f"{key}={old}, this config has {key}={new}"
    return None


def _parse_override(override: str) -> tuple[str, str | None]:
    """``("optim.lr", "0.1")`` for ``optim.lr=0.1``, ``+optim.lr=0.1`` or ``++optim.lr=0.1``;
    ``("model.width", None)`` for ``~model.width``."""
    key, _, value = override.lstrip("+~").partition("=")
    return key.partition("@")[0], (value if "=" in override and not override.startswith("~") else None)


def run_name(cfg: DictConfig, overrides: Sequence[str], experiment_sweep: Collection[str] = ()) -> str:
    """The run's folder name: ``cfg.run_name`` as given on the command line, else config.yaml's name
    plus ``_<hash>`` of the job's overrides of run-defining settings the name does not show (their
    resolved values; a group by its option), so that e.g. ``-m optim.lr=0.1,0.05`` gives each job
    its own folder and the same command always finds the same one. Keys that the experiment file
    sweeps itself (``experiment_sweep``: its ``hydra.sweeper.params``) are part of the experiment,
    whose run names tell its jobs apart."""
    parsed = [_parse_override(override) for override in overrides]
    if any(key == "run_name" for key, _ in parsed):
        return cfg.run_name
    settings = {}
    for key, value in parsed:
        if (is_under(key, RUN_DEFINING_KEYS) and not is_under(key, NOT_RUN_DEFINING_KEYS) and key not in NAME_KEYS
                and key not in experiment_sweep):
            resolved = OmegaConf.select(cfg, key, default=None)
            if isinstance(resolved, DictConfig):  # a group: its option's name
                settings[key] = value
            else:
                settings[key] = OmegaConf.to_container(resolved) if isinstance(resolved, ListConfig) else resolved
    if not settings:
        return cfg.run_name
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{cfg.run_name}_{digest}"


def normalizer_label(normalizer: DictConfig) -> str:
    """How a normalizer appears in run names: ``bn``, ``brn``, ``bkn-analytic``, ..."""
    transition = normalizer.get("transition")
    return normalizer.name if transition is None else f"{normalizer.name}-{transition}"


def model_label(model: DictConfig) -> str:
    """How a model appears in run names: its name, with its width when widened (``cifar_net-w1.17``),
    a timm model's architecture (``timm-resnet18``) and a pre-activation ResNet's depth (``preact_resnet-d14``)."""
    name = f"{model.name}-{model.arch}" if "arch" in model else model.name
    name = f"{name}-d{model.depth}" if "depth" in model else name
    width = model.get("width", 1.0)
    return name if width == 1.0 else f"{name}-w{width:g}"


OmegaConf.register_new_resolver("bkn.normalizer_label", normalizer_label, replace=True)
OmegaConf.register_new_resolver("bkn.model_label", model_label, replace=True)


@dataclass(frozen=True)
class Plan:
    """What a run will do, derived from the config and the launcher's environment."""

    world: World
    device: str  # "cpu" or "cuda"
    gradient_batch_size: int
    statistics_batch_size: int
    per_device_batch_size: int
    accumulation: int
    eval_batch_size: int
    image_size: int
    train_steps: int | None  # as configured: exactly one of train_steps and train_epochs is set
    train_epochs: int | None
    run_dir: Path
    amp: str | None
    channels_last: bool  # as applied: CUDA only
    compile_mode: str | None = None  # torch.compile's mode; None: eager
    # Known once the training set is loaded (with_train_set):
    train_examples: int | None = None
    steps_per_epoch: int | None = None
    steps: int | None = None
    num_classes: int | None = None

    @property
    def groups_per_device(self) -> int:
        """Statistics groups in a device batch; 0 where one group spans several devices."""
        return self.per_device_batch_size // self.statistics_batch_size

    @property
    def devices_per_statistics_group(self) -> int:
        """How many devices one statistics group spans: 1, or k where batch.statistics is k device batches."""
        return max(1, self.statistics_batch_size // self.per_device_batch_size)

    @property
    def epochs(self) -> float | None:
        """Passes over the training set (known once it is loaded)."""
        return None if self.steps is None else self.steps / self.steps_per_epoch

    def with_train_set(self, train_examples: int, num_classes: int | None = None) -> Plan:
        steps_per_epoch = train_examples // self.gradient_batch_size
        if steps_per_epoch == 0:
            raise ConfigError(f"the training set has {train_examples} examples, fewer than one gradient batch of "
                              f"batch.gradient={self.gradient_batch_size}; lower batch.gradient")
        steps = self.train_steps if self.train_steps is not None else self.train_epochs * steps_per_epoch
        return replace(self, train_examples=train_examples, steps_per_epoch=steps_per_epoch, steps=steps,
                       num_classes=num_classes)

    def describe(self) -> str:
        """The plan as the dry run prints it."""
        world = self.world
        if self.steps is None:
            length = (f"{self.train_steps} steps" if self.train_steps is not None
                      else f"{self.train_epochs} epochs (steps known once the data is loaded)")
        else:
            length = (f"{self.steps} steps = {self.epochs:.2f} epochs of {self.train_examples} "
                      f"training examples ({self.steps_per_epoch} steps per epoch)")
        rows = [
            ("run directory", str(self.run_dir)),
            ("processes", f"{world.size} ({world.launcher}), this one rank {world.rank}, device {self.device}"),
            ("gradient batch", f"{self.gradient_batch_size} = {self.per_device_batch_size} per device x {world.size} "
                               f"process(es) x {self.accumulation} accumulation step(s)"),
            ("statistics", f"groups of {self.statistics_batch_size} examples, " + (
                f"{self.groups_per_device} per device batch" if self.devices_per_statistics_group == 1 else
                f"each pooled over {self.devices_per_statistics_group} devices (an all-reduce of its statistics "
                f"in every normalization layer)")),
            ("evaluation", f"batches of {self.eval_batch_size}"),
            ("images", f"{self.image_size} x {self.image_size}"
                       + (f", {self.num_classes} classes" if self.num_classes is not None else "")),
            ("length", length),
            ("precision", f"{self.amp or 'fp32'}, channels_last {'on' if self.channels_last else 'off'}"),
            ("compile", "off (eager)" if self.compile_mode is None else f"torch.compile, mode {self.compile_mode}"),
        ]
        return "plan:\n" + "\n".join(f"  {name:<15} {value}" for name, value in rows)


# --- typed getters: each raises one line naming the key --------------------------------------

def _get(cfg: DictConfig, key: str) -> Any:
    value = OmegaConf.select(cfg, key, default=KeyError)
    if value is KeyError:
        raise ConfigError(f"{key} is missing from the config; add it (e.g. +{key}=...) or restore configs/")
    return value


def _int(cfg: DictConfig, key: str, minimum: int = 1, optional: bool = False) -> int | None:
    value = _get(cfg, key)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key}={value!r}: expected an integer >= {minimum}{' or null' if optional else ''}")
    return value


def _number(cfg: DictConfig, key: str, minimum: float, maximum: float = float("inf"),
            include_minimum: bool = True) -> float:
    """A finite number in the range: inf and nan are refused (an lr of inf diverges at step 1)."""
    value = _get(cfg, key)
    low_ok = isinstance(value, (int, float)) and (value >= minimum if include_minimum else value > minimum)
    if isinstance(value, bool) or not low_ok or not value <= maximum or not math.isfinite(value):
        bracket = "[" if include_minimum else "("
        high = f"{maximum}]" if math.isfinite(maximum) else "inf)"
        raise ConfigError(f"{key}={value!r}: expected a finite number in {bracket}{minimum}, {high}")
    return float(value)


def _finite_numbers(cfg: DictConfig) -> None:
    """No setting may be inf or nan, also those checked by building them (normalizer, data)."""
    for key, value in config_leaves(OmegaConf.to_container(cfg, resolve=False)):
        values = value if isinstance(value, list) else [value]
        if any(isinstance(item, float) and not math.isfinite(item) for item in values):
            raise ConfigError(f"{key}={value!r}: expected a finite number (inf and nan are refused)")


def _bool(cfg: DictConfig, key: str) -> bool:
    value = _get(cfg, key)
    if not isinstance(value, bool):
        raise ConfigError(f"{key}={value!r}: expected true or false")
    return value


def _choice(cfg: DictConfig, key: str, choices: Sequence[Any]) -> Any:
    value = _get(cfg, key)
    if value not in choices:
        raise ConfigError(f"{key}={value!r}: choose one of {', '.join(map(str, choices))}")
    return value


def _name(cfg: DictConfig, key: str) -> str:
    value = _get(cfg, key)
    if not isinstance(value, str) or not value or "/" in value or value in (".", ".."):
        raise ConfigError(f"{key}={value!r}: expected a non-empty name without '/' (it is a folder name)")
    return value


# --- the checks ------------------------------------------------------------------------------

def _batch(cfg: DictConfig, world: World) -> tuple[int, int, int, int, int]:
    """(gradient, statistics, per_device, accumulation, eval) batch sizes."""
    gradient, statistics = _int(cfg, "batch.gradient"), _int(cfg, "batch.statistics")
    per_device = _int(cfg, "batch.per_device", optional=True)
    if per_device is None:
        if gradient % world.size:
            raise ConfigError(f"batch.gradient={gradient} does not split evenly over {world.size} processes; "
                              f"make it a multiple of {world.size} or set batch.per_device")
        per_device = gradient // world.size
    pooled = statistics > per_device and statistics % per_device == 0 and world.size % (statistics // per_device) == 0
    if per_device % statistics and not pooled:
        divisors = [d for d in range(1, per_device + 1) if per_device % d == 0]
        multiples = [per_device * k for k in range(2, world.size + 1) if world.size % k == 0]
        pooling = (f", or a group pooled over whole devices: one of {multiples}" if multiples else
                   " (or, with k processes, per_device x k: a group pooled over k devices)")
        raise ConfigError(f"batch.statistics={statistics} does not divide the device batch "
                          f"batch.per_device={per_device}: each device batch is cut into statistics groups; "
                          f"choose one of {divisors}{pooling}")
    if gradient % (per_device * world.size):
        raise ConfigError(f"batch.gradient={gradient} is not a multiple of batch.per_device x processes = "
                          f"{per_device} x {world.size}: the gradient batch is per_device x processes x accumulation "
                          f"steps; change batch.gradient or batch.per_device")
    accumulation = gradient // (per_device * world.size)
    eval_batch = _int(cfg, "batch.eval", optional=True) or max(per_device, statistics)
    if eval_batch % statistics:
        raise ConfigError(f"batch.eval={eval_batch} is not a multiple of batch.statistics={statistics}: option A "
                          f"normalizes test batches in groups of batch.statistics; choose a multiple")
    return gradient, statistics, per_device, accumulation, eval_batch


def _command_line_keys() -> set[str]:
    """The keys this job's command line sets (Hydra's record of its overrides); none outside Hydra."""
    if not HydraConfig.initialized():
        return set()
    return {_parse_override(override)[0] for override in HydraConfig.get().overrides.task}


def _training_length(cfg: DictConfig) -> tuple[int | None, int | None]:
    """Steps or epochs, exactly one. A length given alone on the command line replaces the
    config's (``train.steps=100`` over the default ``train.epochs: 10``); the resolved pair is
    written back into ``cfg``, so the run record says what ran."""
    given = _command_line_keys() & {"train.steps", "train.epochs"}
    if len(given) == 1:
        (key,) = given
        if OmegaConf.select(cfg, key) is not None:
            OmegaConf.update(cfg, "train.epochs" if key == "train.steps" else "train.steps", None)
    steps, epochs = _int(cfg, "train.steps", optional=True), _int(cfg, "train.epochs", optional=True)
    if steps is not None and epochs is not None and len(given) == 2:
        raise ConfigError(f"train.steps={steps} and train.epochs={epochs} are both given on the command line; "
                          f"give one of them")
    if (steps is None) == (epochs is None):
        raise ConfigError(f"train.steps={steps} and train.epochs={epochs}: set exactly one of them "
                          f"(e.g. train.steps=1000 train.epochs=null)")
    _int(cfg, "train.log_every")
    _int(cfg, "train.max_bad_steps")
    return steps, epochs


def _evaluation_and_checkpoints(cfg: DictConfig) -> None:
    _int(cfg, "eval.every", optional=True)
    _int(cfg, "checkpoint.every", optional=True)
    _int(cfg, "checkpoint.keep")
    inference = _get(cfg, "eval.inference")
    if (not isinstance(inference, ListConfig) or not inference or len(set(inference)) != len(inference)
            or not set(inference) <= set(INFERENCE_OPTIONS)):
        raise ConfigError(f"eval.inference={inference!r}: expected a non-empty list of distinct options from "
                          f"{list(INFERENCE_OPTIONS)} (population: option B, batch: option A)")


def _optimizer(cfg: DictConfig) -> None:
    _choice(cfg, "optim.name", ["sgd"])
    _number(cfg, "optim.lr", 0, include_minimum=False)
    momentum = _number(cfg, "optim.momentum", 0, 1)
    if _bool(cfg, "optim.nesterov") and momentum == 0:
        raise ConfigError("optim.nesterov=true needs optim.momentum > 0")
    _number(cfg, "optim.weight_decay", 0)
    _bool(cfg, "optim.decay_norm_and_bias")
    name = _choice(cfg, "schedule.name", ["step", "cosine"])
    _int(cfg, "schedule.warmup_steps", minimum=0)
    if name == "step":
        milestones = _get(cfg, "schedule.milestones")
        fractions = isinstance(milestones, ListConfig) and all(
            isinstance(m, (int, float)) and 0 < m < 1 for m in milestones)
        if not fractions or list(milestones) != sorted(set(milestones)):
            raise ConfigError(f"schedule.milestones={milestones!r}: expected increasing fractions of the training "
                              f"steps in (0, 1), e.g. [0.5, 0.75]")
        _number(cfg, "schedule.gamma", 0, 1, include_minimum=False)


def _normalizer(cfg: DictConfig, statistics: int) -> dict[str, Any]:
    """The normalizer spec for build_norm, checked by building one layer."""
    spec = OmegaConf.to_container(_get(cfg, "normalizer"))
    if "statistics_batch_size" in spec:
        raise ConfigError("normalizer.statistics_batch_size is set by batch.statistics; remove it from the normalizer")
    spec["statistics_batch_size"] = statistics
    try:
        build_norm(num_features=4, in_features=4, **spec)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"normalizer: {error}") from None
    return spec


def model_options(cfg: DictConfig) -> dict[str, Any]:
    """The model config as ``bkn.models.build_model`` keyword arguments (all but its name and image size)."""
    return {key: value for key, value in OmegaConf.to_container(_get(cfg, "model")).items()
            if key not in ("name", "image_size")}


def _model(cfg: DictConfig, norm: Mapping[str, Any]) -> int:
    """The input image size, checked by building the model on the meta device."""
    image_size = _int(cfg, "model.image_size", optional=True) or _int(cfg, "data.image_size", optional=True)
    if image_size is None:
        raise ConfigError("model.image_size and data.image_size are both null; set one of them")
    try:
        with torch.device("meta"):
            build_model(_get(cfg, "model.name"), 10, norm, image_size, **model_options(cfg))
    except (ValueError, TypeError) as error:
        raise ConfigError(f"model: {error}") from None
    return image_size


def _data(cfg: DictConfig) -> None:
    name = _choice(cfg, "data.name", list(BUILDERS))
    _int(cfg, "data.num_workers", minimum=0)
    root = _get(cfg, "data.root")
    if name == "folder" and root is None:
        raise ConfigError("data=folder needs data.root=<the folder that holds your class folders> (docs/data.md)")
    if name in DATA_ON_DISK and not _bool(cfg, "data.download") and not Path(root or ".").is_dir():
        download = "" if name in ("imagenet", "folder") else " or pass data.download=true"  # ImageNet needs a login
        raise ConfigError(f"data.root={root} does not exist; point data.root at the folder that holds {name} "
                          f"(docs/data.md says what goes inside){download}")


def _device(cfg: DictConfig, world: World) -> str:
    device = _choice(cfg, "device", ["auto", "cpu", "cuda"])
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and world.local_rank >= torch.cuda.device_count():
        raise ConfigError(f"device=cuda but this process (local rank {world.local_rank}) sees "
                          f"{torch.cuda.device_count()} CUDA device(s); use device=cpu or fewer processes per node")
    amp = _choice(cfg, "amp", [None, "bf16", "fp16"])
    if amp == "fp16" and device != "cuda":
        raise ConfigError("amp=fp16 needs CUDA (its gradient scaler is CUDA-only here); "
                          "use amp=bf16 or amp=null on CPU")
    return device


def compile_modes() -> dict[str, bool]:
    """torch.compile's modes, each with whether it captures the step in CUDA graphs, as this torch
    defines them (``torch._inductor.list_mode_options``, which torch.compile's documentation names)."""
    from torch._inductor import list_mode_options  # imported only when compiling: it takes a second

    return {mode: bool(options.get("triton.cudagraphs")) for mode, options in list_mode_options().items()}


def _compile_mode(cfg: DictConfig, device: str) -> str | None:
    """``compile``: false (eager), true (torch.compile's default mode) or one of its modes. A mode that
    captures CUDA graphs does nothing of the kind on a CPU, so it is refused there."""
    value = _get(cfg, "compile")
    if value is False or value is True:
        return "default" if value else None
    modes = compile_modes()
    if not isinstance(value, str) or value not in modes:
        raise ConfigError(f"compile={value!r}: choose false, true (torch.compile's default mode) or a mode of "
                          f"torch.compile: {', '.join(modes)}")
    if modes[value] and device != "cuda":
        without = [mode for mode, cuda_graphs in modes.items() if not cuda_graphs]
        raise ConfigError(f"compile={value} captures the training step in CUDA graphs, which needs device=cuda; "
                          f"on {device} use compile=true or a mode without them: {', '.join(without)}")
    return value


def _run_settings(cfg: DictConfig) -> Path:
    _int(cfg, "seed", minimum=0)
    for key in ("channels_last", "dry_run", "logger.wandb.enabled"):
        _bool(cfg, key)
    _choice(cfg, "logger.wandb.mode", ["offline", "online", "disabled"])
    _number(cfg, "logger.wandb.init_timeout_s", 0, include_minimum=False)
    _number(cfg, "distributed.timeout_s", 0, include_minimum=False)
    resume = _get(cfg, "resume")
    if resume not in (None, "auto") and not Path(str(resume)).is_file():
        raise ConfigError(f"resume={resume}: no such checkpoint file; "
                          f"use resume=auto, resume=null or a path to a .pt file")
    out_dir = _get(cfg, "out_dir")
    if not isinstance(out_dir, str) or not out_dir:
        raise ConfigError(f"out_dir={out_dir!r}: expected a folder path")
    return Path(out_dir) / _name(cfg, "experiment_name") / _name(cfg, "run_name")


def validate(cfg: DictConfig, environ: Mapping[str, str] = os.environ) -> Plan:
    """Check every setting of ``cfg`` (as composed by Hydra) and derive the run's plan. The one
    change made to ``cfg``: a training length given alone on the command line clears the other."""
    world = detect_world(environ)
    _finite_numbers(cfg)
    gradient, statistics, per_device, accumulation, eval_batch = _batch(cfg, world)
    steps, epochs = _training_length(cfg)
    _evaluation_and_checkpoints(cfg)
    _optimizer(cfg)
    norm = _normalizer(cfg, statistics)
    if statistics > per_device and norm["name"] == "cbn":
        raise ConfigError(f"normalizer=cbn cannot pool batch.statistics={statistics} over devices (its window of past "
                          f"statistics is per device); choose a batch.statistics that divides batch.per_device={per_device}")
    _data(cfg)
    image_size = _model(cfg, norm)
    device = _device(cfg, world)
    compile_mode = _compile_mode(cfg, device)
    run_dir = _run_settings(cfg)
    _refuse_unknown_keys(cfg)
    return Plan(world=world, device=device, gradient_batch_size=gradient, statistics_batch_size=statistics,
                per_device_batch_size=per_device, accumulation=accumulation, eval_batch_size=eval_batch,
                image_size=image_size, train_steps=steps, train_epochs=epochs, run_dir=run_dir, amp=cfg.amp,
                channels_last=cfg.channels_last and device == "cuda", compile_mode=compile_mode)
