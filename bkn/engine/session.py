"""Everything one training process works with, built from the config and plan: data, model (DDP-
wrapped and compiled as configured), optimizer, gradient scaler; and the checkpoint that saves
and restores all of it exactly.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from bkn.config import ConfigError, Plan, model_options, run_settings
from bkn.data import Datasets, build_datasets, build_loader
from bkn.data.loaders import usable_cpus
from bkn.engine.batches import StepBatches
from bkn.engine.distributed import Collective
from bkn.engine.optim import build_optimizer
from bkn.engine.rng import capture_rng_state, restore_rng_state, seed_process
from bkn.models import build_model
from bkn.nn import pool_statistics

log = logging.getLogger("bkn")

CHECKPOINT_FORMAT = 1
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Data keys the engine passes itself (or to the loaders); the rest are the data set's own options.
ENGINE_DATA_KEYS = ("name", "root", "download", "image_size", "num_workers")


def load_datasets(cfg: DictConfig, plan: Plan) -> Datasets:
    options = {key: value for key, value in OmegaConf.to_container(cfg.data).items() if key not in ENGINE_DATA_KEYS}
    return build_datasets(cfg.data.name, root=cfg.data.root, image_size=plan.image_size,
                          download=cfg.data.download, **options)


def data_workers(cfg: DictConfig) -> int:
    """``data.num_workers``, at most one per CPU this process may use (more only compete for them)."""
    cpus = usable_cpus()
    if cfg.data.num_workers > cpus:
        log.info("data.num_workers=%d: this process may use %d CPUs; reading with %d workers per loader",
                 cfg.data.num_workers, cpus, cpus)
    return min(cfg.data.num_workers, cpus)


def normalizer_spec(cfg: DictConfig, plan: Plan) -> dict[str, Any]:
    """The normalizer config as ``bkn.nn.build_norm`` arguments."""
    return {**OmegaConf.to_container(cfg.normalizer), "statistics_batch_size": plan.statistics_batch_size}


@dataclass
class Session:
    cfg: DictConfig
    plan: Plan
    device: torch.device
    collective: Collective
    raw_model: nn.Module  # the bare model: evaluation, state dicts
    model: nn.Module  # what training calls: DDP-wrapped and / or compiled
    ddp: DistributedDataParallel | None
    optimizer: torch.optim.SGD
    scaler: torch.amp.GradScaler
    batches: StepBatches
    test_loader: DataLoader | None  # main rank only
    num_classes: int
    num_parameters: int
    data_files: dict[str, Any] | None = None  # Datasets.files: what a resumed run must find unchanged
    step: int = 0  # optimizer steps done
    skipped_steps: int = 0
    train_seconds: float = 0.0  # in training steps (not evaluation), over every attempt of the run
    last_checkpoint_step: int | None = None
    earlier_wall_seconds: float = 0.0  # of the attempts before this one (until their last checkpoint)
    started: float = field(default_factory=time.perf_counter)

    def wall_seconds(self) -> float:
        return self.earlier_wall_seconds + time.perf_counter() - self.started

    def autocast(self) -> AbstractContextManager[None]:
        amp = self.cfg.amp
        return torch.autocast(self.device.type, dtype=AMP_DTYPES.get(amp), enabled=amp is not None)

    def to_device(self, images: Tensor) -> Tensor:
        memory_format = torch.channels_last if self.plan.channels_last else torch.contiguous_format
        return images.to(self.device, non_blocking=True, memory_format=memory_format)

    def checkpoint_state(self) -> dict[str, Any]:
        """Called on every rank (the RNG states are gathered); only the main rank's result is saved."""
        return {
            "format": CHECKPOINT_FORMAT,
            "settings": run_settings(self.cfg),  # what resume=<this file> must match
            "step": self.step,
            "data": self.batches.position(),
            "data_files": self.data_files,
            "skipped_steps": self.skipped_steps,
            "train_seconds": self.train_seconds,
            "wall_seconds": self.wall_seconds(),
            "model": self.raw_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": self.collective.all_gather_object(capture_rng_state()),
        }


def _unused_parameters(model: nn.Module, example: Tensor,
                       autocast: Callable[[], AbstractContextManager[None]]) -> list[str]:
    """Parameters that get no gradient (e.g. the linear transition of a network's first BKN layer,
    which has no predecessor). DDP must be told about them. Probed on a copy, RNG untouched."""
    probe = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[example.device] if example.device.type == "cuda" else []):
        with autocast():
            output = probe(example)
        output.float().sum().backward()
    return [name for name, parameter in probe.named_parameters() if parameter.requires_grad and parameter.grad is None]


def build_session(cfg: DictConfig, plan: Plan, collective: Collective, checkpoint: dict[str, Any] | None) -> Session:
    """Build the process's data, model and optimizer, restored from ``checkpoint`` if given."""
    world = plan.world
    device = torch.device("cuda", world.local_rank) if plan.device == "cuda" else torch.device("cpu")
    datasets = load_datasets(cfg, plan)
    plan = plan.with_train_set(len(datasets.train), datasets.num_classes)
    num_workers = data_workers(cfg)

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = build_model(cfg.model.name, datasets.num_classes, normalizer_spec(cfg, plan), plan.image_size,
                        in_channels=datasets.channels, **model_options(cfg))
    model.to(device, memory_format=torch.channels_last if plan.channels_last else torch.contiguous_format)
    optimizer = build_optimizer(model, cfg.optim)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    batches = StepBatches(datasets.train, per_device_batch_size=plan.per_device_batch_size,
                          accumulation=plan.accumulation, world_size=world.size, rank=world.rank,
                          num_workers=num_workers, seed=cfg.seed, pin_memory=device.type == "cuda")
    test_loader = None
    if world.is_main:
        test_loader = build_loader(datasets.test, plan.eval_batch_size, train=False,
                                   num_workers=num_workers, seed=cfg.seed, pin_memory=device.type == "cuda")
    session = Session(cfg, plan, device, collective, model, model, None, optimizer, scaler, batches, test_loader,
                      datasets.num_classes, sum(parameter.numel() for parameter in model.parameters()),
                      datasets.files)
    if checkpoint is not None:
        _restore(session, checkpoint)
    else:
        seed_process(cfg.seed, world.rank)

    if world.size > 1:
        example = torch.zeros(plan.statistics_batch_size, datasets.channels, plan.image_size, plan.image_size)
        unused = _unused_parameters(model, session.to_device(example), session.autocast)
        if unused:
            log.info("DDP: %d parameters get no gradient (e.g. %s); searching for unused parameters every step",
                     len(unused), unused[0])
        if plan.devices_per_statistics_group > 1:  # after the probe: a copy must not hold process groups
            pool_statistics(model, plan.devices_per_statistics_group)
        # Running statistics stay per rank (no buffer sync before each forward); evaluation uses rank 0's.
        session.ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                              forward_sync_buffers=False, find_unused_parameters=bool(unused))
        session.model = session.ddp
    if plan.compile_mode is not None:
        # Static shapes: training batches never change size, and inductor (torch 2.14) failed to
        # compile a BKN network with symbolic shapes ("cannot determine truth value of Relational").
        session.model = torch.compile(session.model, dynamic=False, mode=plan.compile_mode)
    return session


def _restore(session: Session, checkpoint: dict[str, Any]) -> None:
    """Restore a checkpoint whose format and settings trainer.decide_start has checked."""
    expected, found = session.raw_model.state_dict(), checkpoint["model"]
    missing, unexpected = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
    reshaped = sorted(key for key in expected.keys() & found.keys() if expected[key].shape != found[key].shape)
    if missing or unexpected or reshaped:  # an old checkpoint (no settings recorded) of another model
        problems = [f"{len(keys)} {what} (e.g. {keys[0]})" for keys, what in
                    ((missing, "missing"), (unexpected, "unexpected"), (reshaped, "of another shape")) if keys]
        raise ConfigError(f"resume: the checkpoint's model does not fit this config's: {', '.join(problems)} "
                          f"tensors; resume a checkpoint of the same model and normalizer, or pass resume=null")
    session.raw_model.load_state_dict(found)
    session.optimizer.load_state_dict(checkpoint["optimizer"])
    session.scaler.load_state_dict(checkpoint["scaler"])
    session.step = checkpoint["step"]
    session.skipped_steps = checkpoint["skipped_steps"]
    session.train_seconds = checkpoint["train_seconds"]
    session.earlier_wall_seconds = checkpoint["wall_seconds"]
    session.last_checkpoint_step = checkpoint["step"]
    session.batches.seek(**checkpoint["data"])
    world = session.plan.world
    if len(checkpoint["rng"]) == world.size:
        restore_rng_state(checkpoint["rng"][world.rank])
    else:  # a different number of processes: the data order is kept, the random draws are not
        log.warning("the checkpoint was written by %d processes, this run has %d: RNG streams are reseeded",
                    len(checkpoint["rng"]), world.size)
        seed_process(session.cfg.seed + session.step, world.rank)
