"""``run(cfg, plan)``: one training run from start (or checkpoint) to its run record's final summary.

Holds the run directory against other processes (``bkn.engine.lock``), decides how the run starts
(``decide_start``, which the dry run prints too: ``resume=auto`` continues the newest intact
checkpoint of ``<run dir>/checkpoints/`` made with the same settings, skipping damaged ones, and
does nothing for a finished run, saying so if its final checkpoint is damaged;
``resume=null`` never overwrites a finished run of other settings; a checkpoint path must fit the
model), joins the process group, builds the session, logs the plan, trains, and keeps
``summary.json`` current: "running" while training, then "finished", "preempted" (SIGTERM /
SIGINT / SIGUSR2: checkpoint saved, then ``Interrupted`` is raised or, under submitit, the job
requeued), "diverged" or "failed".
"""

from __future__ import annotations

import logging
import signal
from contextlib import nullcontext
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any, Literal

import torch
from omegaconf import DictConfig, OmegaConf

from bkn.config import ConfigError, Plan, first_difference, is_under, normalizer_label, run_settings
from bkn.engine.checkpoint import (Interrupted, StopRequest, checkpoint_path, checksum_matches, drop_checkpoints_after,
                                   load_checkpoint, step_checkpoints)
from bkn.engine.disk import NoSpace, ensure_writable
from bkn.engine.distributed import process_group
from bkn.engine.evaluate import EvalResult
from bkn.engine.lock import hold_run_dir
from bkn.engine.logging import RunLogger, WandbLogger
from bkn.engine.loop import TrainingStopped, train
from bkn.engine.records import RunRecord, error_line, learning_verdict, read_metrics, read_summary
from bkn.engine.session import CHECKPOINT_FORMAT, Session, build_session

log = logging.getLogger("bkn")

MODEL_SHAPING_KEYS = ("model", "normalizer", "batch.statistics")  # what resume=<path> must share


@dataclass(frozen=True)
class Start:
    """How a run begins, as ``resume`` and the run directory decide: "new", "resume" (from
    ``checkpoint_file``, loaded as ``checkpoint``) or "finished" (nothing to do)."""

    kind: Literal["new", "resume", "finished"]
    checkpoint_file: Path | None = None
    checkpoint: dict[str, Any] | None = None
    step: int = 0
    damaged: Path | None = None  # a finished run's final checkpoint, if its checksum no longer matches

    def describe(self) -> str:
        if self.kind == "finished":
            damaged = f"; its final checkpoint {self.damaged} is damaged" if self.damaged else ""
            return f"finished at step {self.step}{damaged}: nothing to do (resume=null trains it again)"
        if self.kind == "resume":
            return f"resumes from {self.checkpoint_file} at step {self.step}"
        return "new"


def start_banner(plan: Plan, start: Start) -> str:
    """What the run will do: the plan and how it starts (logged by a run, printed by a dry run)."""
    return f"{plan.describe()}\n  {'start':<15} {start.describe()}"


def _read_checkpoint(path: Path, auto: bool) -> dict[str, Any]:
    """The checkpoint at ``path``: the run's own last.pt under ``resume=auto``, else ``resume=<path>``."""
    setting, fix = ((f"resume=auto: {path}", "pass resume=null to start the run over") if auto else
                    (f"resume={path}", "pass a run's checkpoints/last.pt, or resume=null to start over"))
    try:
        checkpoint = load_checkpoint(path)
    except Exception as error:  # noqa: BLE001 - a cut, text or foreign file fails torch.load in many ways (KeyError too)
        raise ConfigError(f"{setting} is not a bkn checkpoint ({type(error).__name__}); {fix}") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        found = checkpoint.get("format") if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ConfigError(f"{setting} is not a bkn checkpoint of format {CHECKPOINT_FORMAT} (found {found!r}); {fix}")
    return checkpoint


def _newest_intact_checkpoint(run_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest of the run's checkpoints that matches its recorded checksum and loads, warning
    about each damaged one skipped; None if the run has none. All of them damaged is refused."""
    directory = checkpoint_path(run_dir).parent
    candidates = step_checkpoints(directory) or [path for path in [checkpoint_path(run_dir)] if path.exists()]
    damaged: list[str] = []
    for index, path in enumerate(candidates):
        if checksum_matches(path) is False:
            reason = "its SHA-256 differs from the one recorded when it was written"
        else:
            try:
                return path, _read_checkpoint(path, auto=True)
            except ConfigError:
                if len(candidates) == 1:  # the one checkpoint: its own message says why
                    raise
                reason = "it does not load as a bkn checkpoint"
        damaged.append(str(path))
        if index + 1 < len(candidates):
            log.warning("resume=auto: checkpoint %s is damaged (%s); resuming from the one before it, %s",
                        path, reason, candidates[index + 1].name)
    if not damaged:
        return None
    raise ConfigError(f"resume=auto: every checkpoint of {run_dir} is damaged ({', '.join(damaged)}); "
                      f"pass resume=null to start the run over")


def _damaged_final_checkpoint(run_dir: Path) -> Path | None:
    """A finished run's newest checkpoint if its checksum no longer matches."""
    newest = step_checkpoints(checkpoint_path(run_dir).parent)[:1]
    if not newest:
        return None  # written before checkpoints had checksums: nothing to check against
    return None if checksum_matches(newest[0]) else newest[0]


def _saved_settings(run_dir: Path) -> dict[str, Any] | None:
    saved_config = run_dir / "config.yaml"
    return run_settings(OmegaConf.load(saved_config)) if saved_config.exists() else None


def _model_shaping(settings: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in settings.items() if is_under(key, MODEL_SHAPING_KEYS)}


def decide_start(cfg: DictConfig, plan: Plan) -> Start:
    """What ``resume`` means for this run directory (the dry run prints it). A checkpoint or a
    finished run made with other run-defining settings is another run: refused, never continued
    or overwritten."""
    settings = run_settings(cfg)
    previous = read_summary(plan.run_dir)
    finished = previous is not None and previous["status"] == "finished"
    saved = _saved_settings(plan.run_dir)
    if cfg.resume != "auto":  # starting over, or from another checkpoint: never over another finished run
        difference = first_difference(saved, settings) if finished and saved is not None else None
        if difference:
            resume = "null" if cfg.resume is None else cfg.resume
            raise ConfigError(f"resume={resume}: {plan.run_dir} holds a finished run made with {difference}; "
                              f"delete that folder to replace it, or give this run its own run_name=...")
    if cfg.resume is None:
        return Start("new")
    if cfg.resume == "auto":
        directory = checkpoint_path(plan.run_dir).parent
        has_checkpoint = directory.is_dir() and any(directory.glob("*.pt"))
        if (finished or has_checkpoint) and saved is not None:
            difference = first_difference(saved, settings)
            if difference:
                fix = ("delete that folder to replace it" if finished  # resume=null would refuse too
                       else "pass resume=null to start it over")
                raise ConfigError(f"resume=auto: {plan.run_dir} holds a {'finished ' if finished else ''}run made "
                                  f"with {difference}; {fix}, or choose another run_name")
        if finished:
            return Start("finished", step=previous["step"], damaged=_damaged_final_checkpoint(plan.run_dir))
        intact = _newest_intact_checkpoint(plan.run_dir)
        if intact is None:
            return Start("new")
        path, checkpoint = intact
        return Start("resume", path, checkpoint, checkpoint["step"])
    # A checkpoint path continues that model with this config's length, schedule and data: only
    # the settings that shape the model must agree. Checkpoints record their settings; for older
    # ones, the config.yaml of the run they belong to (and, failing that, session's state check).
    source = Path(cfg.resume)
    checkpoint = _read_checkpoint(source, auto=False)
    made_with = checkpoint.get("settings") or _saved_settings(source.parent.parent)
    difference = (first_difference(_model_shaping(made_with), _model_shaping(settings))
                  if made_with is not None else None)
    if difference:
        raise ConfigError(f"resume={source}: that checkpoint was made with {difference}; resume it with the same "
                          f"settings, or pass resume=null to start over")
    return Start("resume", source, checkpoint, checkpoint["step"])


def _wandb(cfg: DictConfig, plan: Plan, config: dict[str, Any]) -> WandbLogger | None:
    settings = cfg.logger.wandb
    if not (settings.enabled and plan.world.is_main):
        return None
    # One group per experiment, so a dashboard puts all of a sweep's settings and normalizers side by
    # side; the job type is the normalizer (BKN with its transition), and the setting, normalizer and
    # data are config keys and tags to group, filter or colour by.
    setting = f"g{plan.gradient_batch_size}_s{plan.statistics_batch_size}"
    normalizer = normalizer_label(cfg.normalizer)
    tags = [cfg.model.name, normalizer, setting, cfg.data.name, *settings.tags]
    comparison = {"setting": setting, "normalizer_label": normalizer,
                  "data_label": cfg.data.name if cfg.data.root is None else f"{cfg.data.name} ({cfg.data.root})"}
    return WandbLogger(OmegaConf.to_container(settings), run_dir=plan.run_dir, name=cfg.run_name,
                       group=settings.group or cfg.experiment_name, job_type=settings.job_type or normalizer,
                       tags=tags, config={**config, **comparison})


def _summary(session: Session, status: str, final: dict[str, EvalResult],
             learned: bool | None = None, error: str | None = None) -> dict[str, Any]:
    cfg, plan = session.cfg, session.plan
    return {
        "experiment": cfg.experiment_name,
        "run": cfg.run_name,
        "status": status,
        "error": error,  # why a failed or diverged run stopped: the line train.py printed
        "model": cfg.model.name,
        "normalizer": cfg.normalizer.name,
        "transition": cfg.normalizer.get("transition"),
        "gradient_batch_size": plan.gradient_batch_size,
        "statistics_batch_size": plan.statistics_batch_size,
        "per_device_batch_size": plan.per_device_batch_size,
        "world_size": plan.world.size,
        "accumulation": plan.accumulation,
        "data": cfg.data.name,
        "data_root": cfg.data.root,
        "data_files": session.data_files,  # data=folder: the files of each split (a hash) and their mean, std
        "image_size": plan.image_size,
        "seed": cfg.seed,
        "steps": plan.steps,
        "step": session.step,
        "epochs": session.step / plan.steps_per_epoch,
        "skipped_steps": session.skipped_steps,
        "learned": learned,  # false: finished without learning (learning_verdict); null until finished
        "final": {inference: {"top1": result.top1, "top5": result.top5, "loss": result.loss,
                              "examples": result.examples} for inference, result in final.items()},
        "examples_per_s": (session.step * plan.gradient_batch_size / session.train_seconds
                           if session.train_seconds else None),
        "wall_time_s": session.wall_seconds(),
        "num_parameters": session.num_parameters,
        "versions": {"torch": torch.__version__, "bkn": version("bkn")},
    }


def _check_learned(session: Session, run_dir: Path, final: dict[str, EvalResult]) -> bool:
    """Whether a finished run learned; warns with the likely causes when it did not."""
    results = {inference: {"top1": result.top1} for inference, result in final.items()}
    reason = learning_verdict(read_metrics(run_dir), results, session.num_classes)
    if reason is not None:
        log.warning("this run did not learn: %s. Likely causes: a learning rate too high for this normalizer "
                    "and setting (optim.lr=%g; try a lower one or schedule.warmup_steps), too few steps, or "
                    "a data problem; its record says learned: false", reason, session.cfg.optim.lr)
    return reason is None


def run(cfg: DictConfig, plan: Plan) -> None:
    """Train as planned. Raises ``Interrupted`` after a SIGTERM / SIGINT / SIGUSR2 (checkpoint saved;
    under submitit SIGUSR2 requeues the job instead), ``TrainingStopped`` when the run diverges
    (status "diverged") and ``NoSpace`` when a write finds the disk or quota full; any error marks
    the run "failed", its line recorded as the summary's ``error``."""
    if not plan.world.is_main:
        logging.getLogger("bkn").setLevel(logging.WARNING)  # one rank speaks
    if plan.world.is_main:  # an out_dir that cannot be written is refused before any data is read
        ensure_writable(plan.run_dir, cfg.out_dir)
    # The main rank holds the run directory from before anything is read or written there until
    # the run ends: a second process on the same run (two terminals, a duplicated job) is refused.
    with hold_run_dir(plan.run_dir) if plan.world.is_main else nullcontext():
        _run_held(cfg, plan)


def _resume_point(session: Session) -> str:
    if session.last_checkpoint_step is None:
        return "it starts over (no checkpoint was written yet)"
    return f"it continues from {checkpoint_path(session.plan.run_dir)} (step {session.last_checkpoint_step})"


def _refuse_changed_data(session: Session, start: Start) -> None:
    """A run continued by resume=auto must train and evaluate on the files its checkpoint saw."""
    before = (start.checkpoint or {}).get("data_files")
    now = session.data_files
    if before is None or now is None or before["sha256"] == now["sha256"]:
        return
    changes = []
    for split in ("train", "test"):
        difference = now[split] - before[split]
        if difference:
            changes.append(f"{abs(difference)} file(s) {'added to' if difference > 0 else 'removed from'} the "
                           f"{split} split ({before[split]} -> {now[split]})")
    how = "; ".join(changes) or "as many files as before, but others (renamed or replaced)"
    raise ConfigError(f"data.root={session.cfg.data.root} changed since the checkpoint at step {start.step}: {how}; "
                      f"the split and its mean and std would change under the run. Put the files back to continue "
                      f"it, or pass resume=null to train it again on the folder as it is now")


def _run_held(cfg: DictConfig, plan: Plan) -> None:
    start = decide_start(cfg, plan)
    if start.kind == "finished":
        if start.damaged is not None:
            log.warning("%s already finished (step %d), but its final checkpoint %s is damaged (its SHA-256 "
                        "differs from the one recorded when it was written): its recorded results stand, its "
                        "weights are lost. Pass resume=null to train it again.", plan.run_dir, start.step,
                        start.damaged)
        else:
            log.info("%s already finished (step %d); nothing to do. Pass resume=null to train it again.",
                     plan.run_dir, start.step)
        return
    device = torch.device("cuda", plan.world.local_rank) if plan.device == "cuda" else torch.device("cpu")
    with process_group(plan.world, device, cfg.distributed.timeout_s) as collective, StopRequest() as stop:
        session = build_session(cfg, plan, collective, start.checkpoint)
        if cfg.resume == "auto":
            _refuse_changed_data(session, start)
        config = OmegaConf.to_container(cfg, resolve=True)
        record = RunRecord(plan.run_dir, writable=plan.world.is_main)
        resumed_step = session.step if start.checkpoint is not None else None
        record.start(config, resumed_step=resumed_step)
        if plan.world.is_main:
            drop_checkpoints_after(checkpoint_path(plan.run_dir).parent, resumed_step)
        final: dict[str, EvalResult] = {}

        def on_eval(results: dict[str, EvalResult]) -> None:
            final.update(results)
            record.write_summary(_summary(session, "running", final))

        status, error = "failed", None
        logger = RunLogger(record, _wandb(cfg, session.plan, config), total_steps=session.plan.steps,
                           start_step=session.step, enabled=plan.world.is_main)
        try:  # from here on the logger is closed whatever happens (its train.log handler is the bkn logger's)
            log.info("%s", start_banner(session.plan, start))
            record.write_summary(_summary(session, "running", final))
            status = train(session, logger, stop, checkpoint_path(plan.run_dir), on_eval)
        except TrainingStopped as stopped:
            status, error = "diverged", str(stopped)
            raise
        except NoSpace as full:
            error = f"{full}; free space and run the same command again: {_resume_point(session)}"
            raise NoSpace(error) from full
        except Exception as failure:
            error = error_line(failure)
            raise
        finally:
            learned = None
            if status == "finished" and plan.world.is_main:
                learned = _check_learned(session, record.run_dir, final)
            try:
                record.write_summary(_summary(session, status, final, learned, error))
            except NoSpace:  # still no space: the summary of the last evaluation stays
                log.warning("no space to record the status %r in %s", status, record.summary_path)
            if status == "preempted":  # before the logger closes: these lines belong in train.log too
                log.warning("preempted by %s at step %d; checkpoint saved to %s. Run the same command again "
                            "(resume=auto) to continue.", stop.signal_name, session.step,
                            checkpoint_path(plan.run_dir))
            elif status == "finished":
                log.info("finished %d steps; run record in %s", session.step, plan.run_dir)
            logger.close(status, error)
    if status == "preempted":
        stop.pass_on()  # under submitit on SLURM: requeue the job, which resumes from this checkpoint
    # A stop that came during the final evaluation still stops a sweep, except submitit's time-limit
    # warning (SIGUSR2): the job is done, there is nothing to requeue, and it must not exit as failed.
    if stop.requested and not (status == "finished" and stop.signal_number == signal.SIGUSR2):
        raise Interrupted(stop.signal_number)
