"""``run(cfg, plan)``: one training run from start (or checkpoint) to its run record's final summary.

Decides whether to resume (``resume=auto`` continues ``<run dir>/checkpoints/last.pt`` made with the
same settings and does nothing for a finished run), joins the process group, builds the session,
trains, and keeps ``summary.json`` current: "running" while training, then "finished",
"preempted" (SIGTERM / SIGINT: checkpoint saved) or "failed".
"""

from __future__ import annotations

import logging
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from bkn.config import ConfigError, Plan
from bkn.engine.checkpoint import StopRequest, checkpoint_path, load_checkpoint
from bkn.engine.distributed import process_group
from bkn.engine.evaluate import EvalResult
from bkn.engine.logging import RunLogger, WandbLogger
from bkn.engine.loop import train
from bkn.engine.records import RunRecord, read_summary
from bkn.engine.session import Session, build_session

log = logging.getLogger("bkn")

# The settings that define a run's trajectory: resume=auto refuses a checkpoint made with others.
RUN_DEFINING_KEYS = ("model", "normalizer", "data.name", "data.image_size", "batch", "train.steps", "train.epochs",
                     "optim", "schedule", "seed", "amp")


def _leaves(value: Any, key: str) -> dict[str, Any]:
    """``{"optim.lr": 0.1, ...}`` for a (nested) config value at ``key``."""
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, dict) and value:
        return {leaf: item for name, child in value.items() for leaf, item in _leaves(child, f"{key}.{name}").items()}
    return {key: value}


def _check_same_run(saved_config: Path, cfg: DictConfig) -> None:
    saved = OmegaConf.load(saved_config)
    for key in RUN_DEFINING_KEYS:
        before, now = _leaves(OmegaConf.select(saved, key), key), _leaves(OmegaConf.select(cfg, key), key)
        for leaf in sorted(before.keys() | now.keys()):
            old, new = before.get(leaf, "<unset>"), now.get(leaf, "<unset>")
            if old != new:
                raise ConfigError(f"resume=auto: {saved_config.parent} holds a run made with {leaf}={old}, this "
                                  f"config has {leaf}={new}; pass resume=null to start it over, or choose another "
                                  f"run_name")


def _resume_source(cfg: DictConfig, plan: Plan) -> Path | None:
    """The checkpoint to start from: resume=auto finds this run's own (made with the same settings)."""
    if cfg.resume is None:
        return None
    if cfg.resume != "auto":
        return Path(cfg.resume)
    last = checkpoint_path(plan.run_dir)
    return last if last.exists() else None


def _wandb(cfg: DictConfig, plan: Plan, config: dict[str, Any]) -> WandbLogger | None:
    settings = cfg.logger.wandb
    if not (settings.enabled and plan.world.is_main):
        return None
    setting = f"g{plan.gradient_batch_size}_s{plan.statistics_batch_size}"
    tags = [cfg.model.name, cfg.normalizer.name, setting, cfg.data.name, *settings.tags]
    if cfg.normalizer.get("transition"):
        tags.append(f"transition={cfg.normalizer.transition}")
    group = settings.group or f"{cfg.experiment_name}/{cfg.model.name}/{setting}"
    return WandbLogger(OmegaConf.to_container(settings), run_dir=plan.run_dir, name=cfg.run_name, group=group,
                       tags=tags, config=config)


def _summary(session: Session, status: str, final: dict[str, EvalResult]) -> dict[str, Any]:
    cfg, plan = session.cfg, session.plan
    return {
        "experiment": cfg.experiment_name,
        "run": cfg.run_name,
        "status": status,
        "model": cfg.model.name,
        "normalizer": cfg.normalizer.name,
        "transition": cfg.normalizer.get("transition"),
        "gradient_batch_size": plan.gradient_batch_size,
        "statistics_batch_size": plan.statistics_batch_size,
        "per_device_batch_size": plan.per_device_batch_size,
        "world_size": plan.world.size,
        "accumulation": plan.accumulation,
        "data": cfg.data.name,
        "image_size": plan.image_size,
        "seed": cfg.seed,
        "steps": plan.steps,
        "step": session.step,
        "epochs": session.step / plan.steps_per_epoch,
        "skipped_steps": session.skipped_steps,
        "final": {inference: {"top1": result.top1, "top5": result.top5, "loss": result.loss,
                              "examples": result.examples} for inference, result in final.items()},
        "examples_per_s": (session.step * plan.gradient_batch_size / session.train_seconds
                           if session.train_seconds else None),
        "wall_time_s": session.wall_seconds(),
        "num_parameters": session.num_parameters,
        "versions": {"torch": torch.__version__, "bkn": version("bkn")},
    }


def run(cfg: DictConfig, plan: Plan) -> str:
    """Train as planned; returns the final status ("finished" or "preempted"). Raises
    ``TrainingStopped`` after too many non-finite steps; any other error marks the run "failed"."""
    if not plan.world.is_main:
        logging.getLogger("bkn").setLevel(logging.WARNING)  # one rank speaks
    previous = read_summary(plan.run_dir)
    finished = cfg.resume == "auto" and previous is not None and previous["status"] == "finished"
    source = _resume_source(cfg, plan)
    saved_config = plan.run_dir / "config.yaml"
    if cfg.resume == "auto" and (finished or source is not None) and saved_config.exists():
        _check_same_run(saved_config, cfg)  # a changed setting is another run, not this one
    if finished:
        log.info("%s already finished (step %d of %d); nothing to do. Pass resume=null to train it again.",
                 plan.run_dir, previous["step"], previous["steps"])
        return "finished"
    device = torch.device("cuda", plan.world.local_rank) if plan.device == "cuda" else torch.device("cpu")
    with process_group(plan.world, device, cfg.distributed.timeout_s) as collective, StopRequest() as stop:
        checkpoint = load_checkpoint(source) if source is not None else None
        session = build_session(cfg, plan, collective, checkpoint)
        if checkpoint is not None:
            log.info("resuming from %s at step %d", source, session.step)
        config = OmegaConf.to_container(cfg, resolve=True)
        record = RunRecord(plan.run_dir, writable=plan.world.is_main)
        record.start(config, resumed_step=session.step if checkpoint is not None else None)
        logger = RunLogger(record, _wandb(cfg, session.plan, config), total_steps=session.plan.steps,
                           start_step=session.step, enabled=plan.world.is_main)
        final: dict[str, EvalResult] = {}

        def on_eval(results: dict[str, EvalResult]) -> None:
            final.update(results)
            record.write_summary(_summary(session, "running", final))

        status = "failed"
        record.write_summary(_summary(session, "running", final))
        try:
            status = train(session, logger, stop, checkpoint_path(plan.run_dir), on_eval)
        finally:
            record.write_summary(_summary(session, status, final))
            logger.close(status)
    if status == "preempted":
        log.warning("preempted by %s at step %d; checkpoint saved to %s. Run the same command again "
                    "(resume=auto) to continue.", stop.signal_name, session.step, checkpoint_path(plan.run_dir))
        stop.pass_on()  # under submitit on SLURM: requeue the job, which resumes from this checkpoint
    else:
        log.info("finished %d steps; run record in %s", session.step, plan.run_dir)
    return status
