"""The training loop: accumulation, AMP, skipped non-finite steps, periodic evaluation and
checkpoints, a clean stop on SIGTERM / SIGINT / SIGUSR2, and the verdict "diverged".

One optimizer step = ``accumulation`` forward/backward passes over device batches (DDP syncs
gradients only on the last, ``no_sync`` on the others), then one fused SGD update. Whether the
step's loss or gradient is non-finite is computed as a flag tensor on the device and handed to the
optimizer, which skips the update on the device: the host reads the flag (with the loss) only at
the log points, every ``train.log_every`` steps. Transient bad steps are skipped; a run diverges
(``TrainingStopped``) when ``train.max_bad_steps`` come in a row, when the parameters are no longer
finite at a log point, or when the final evaluation's loss is not finite.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bkn.engine.batches import Batch
from bkn.engine.checkpoint import StopRequest, save_checkpoint
from bkn.engine.evaluate import EvalResult, evaluate
from bkn.engine.logging import RunLogger
from bkn.engine.optim import learning_rate
from bkn.engine.session import Session
from bkn.nn import set_step

EvalCallback = Callable[[dict[str, EvalResult]], None]


class TrainingStopped(RuntimeError):
    """Training diverged (the run's status is "diverged"); the message names the step and the fix."""


class NonFiniteCounter:
    """Counts non-finite steps on the device: all skipped steps, the current run of them in a row
    (and the step it began at) and the longest such run; also the loss of the finite steps since
    the last read."""

    def __init__(self, device: torch.device, skipped_before: int) -> None:
        zero = torch.zeros((), device=device)
        self.in_a_row, self.longest, self.bad_since = zero.clone(), zero.clone(), zero.clone()
        self.loss_sum, self.finite_steps = zero.clone(), zero.clone()
        self.skipped = torch.full((), float(skipped_before), device=device)  # over the whole run

    def update(self, found_inf: Tensor, loss: Tensor, step: int) -> None:
        self.bad_since = torch.where((found_inf > 0) & (self.in_a_row == 0), step, self.bad_since)
        self.in_a_row = (self.in_a_row + 1) * found_inf  # back to 0 after a finite step
        self.longest = torch.maximum(self.longest, self.in_a_row)
        self.skipped += found_inf
        self.loss_sum += torch.where(found_inf > 0, 0.0, loss)
        self.finite_steps += 1 - found_inf

    def read(self) -> tuple[int, int, float | None]:
        """(skipped steps, longest run in a row, mean finite loss since the last read): one host sync."""
        skipped, longest, loss_sum, finite = torch.stack(
            [self.skipped, self.longest, self.loss_sum, self.finite_steps]).tolist()
        self.loss_sum.zero_()
        self.finite_steps.zero_()
        return int(skipped), int(longest), loss_sum / finite if finite else None

    def skipped_steps(self) -> int:
        return int(self.skipped.item())

    def last_good_step(self, step: int) -> int:
        """The last step whose update was applied: ``step`` itself unless a run of bad steps goes on."""
        return int(self.bad_since.item()) - 1 if self.in_a_row.item() > 0 else step


class BufferSnapshot:
    """The model's floating-point buffers (running statistics) as they were before a step, put
    back if the step is skipped, without a host sync: the buffers travel as one flat tensor, so
    it costs a few kernels per step, not a few per buffer. (Integer buffers, BN's
    ``num_batches_tracked``, count forward passes and are left alone.)"""

    def __init__(self, model: nn.Module) -> None:
        self.buffers = [buffer for buffer in model.buffers() if buffer.is_floating_point()]
        self.saved: Tensor | None = None

    def _flat(self) -> Tensor:
        return torch.cat([buffer.reshape(-1) for buffer in self.buffers])

    def take(self) -> None:
        if self.buffers:
            self.saved = self._flat()

    def restore_where(self, skipped: Tensor) -> None:
        """Buffers back to the snapshot if ``skipped`` (a 0-dim tensor) is 1.0. A select, not
        arithmetic: a skipped step's buffers may hold NaN, and NaN x 0 is NaN."""
        if self.buffers:
            kept = torch.where(skipped.bool(), self.saved, self._flat())
            parts = kept.split([buffer.numel() for buffer in self.buffers])
            torch._foreach_copy_(self.buffers, [part.view_as(buffer) for part, buffer in zip(parts, self.buffers)])


class Stopwatch:
    """Seconds of training, excluding the evaluations and checkpoints paused out of it."""

    def __init__(self) -> None:
        self.total = 0.0
        self._since: float | None = time.perf_counter()

    def pause(self) -> None:
        if self._since is not None:
            self.total += time.perf_counter() - self._since
            self._since = None

    def resume(self) -> None:
        self._since = time.perf_counter()

    def lap(self) -> float:
        """Training seconds since the last lap."""
        self.pause()
        seconds, self.total = self.total, 0.0
        self.resume()
        return seconds


def forward_backward(session: Session, device_batches: list[Batch]) -> Tensor:
    """Accumulate the gradient of the gradient batch's mean loss; returns that loss (no sync)."""
    accumulation = len(device_batches)
    total = torch.zeros((), device=session.device)
    for index, (images, labels) in enumerate(device_batches):
        last = index == accumulation - 1
        with session.ddp.no_sync() if session.ddp is not None and not last else nullcontext():
            with session.autocast():
                logits = session.model(session.to_device(images))
            loss = F.cross_entropy(logits.float(), labels.to(session.device, non_blocking=True)) / accumulation
            session.scaler.scale(loss).backward()
        total += loss.detach()
    return total


def optimizer_step(session: Session, loss: Tensor, buffers_before: BufferSnapshot) -> Tensor:
    """Apply the accumulated gradients unless the loss or a gradient is non-finite on any rank;
    returns that flag (1.0: skipped) without reading it. A skipped step also puts back the
    buffers (running statistics) as they were before its forward passes."""
    optimizer = session.optimizer
    session.scaler.unscale_(optimizer)  # fp16 only; gradients overflowed by the scale become inf
    gradients = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    finite = torch.isfinite(loss) & torch.isfinite(torch.nn.utils.get_total_norm(gradients))
    found_inf = session.collective.all_reduce_max_((~finite).float())
    optimizer.found_inf, optimizer.grad_scale = found_inf, None  # fused SGD skips on the device
    optimizer.step()
    session.scaler.update()
    optimizer.zero_grad(set_to_none=True)
    buffers_before.restore_where(found_inf)
    return found_inf


def save(session: Session, path: Path) -> None:
    """Checkpoint on every rank's behalf (the main rank writes) and wait until it is on disk."""
    state = session.checkpoint_state()
    if session.plan.world.is_main:
        save_checkpoint(path, state, keep=session.cfg.checkpoint.keep)
    session.collective.barrier()
    session.last_checkpoint_step = session.step


def evaluate_all(session: Session, logger: RunLogger) -> dict[str, EvalResult]:
    """Every configured inference option, on the main rank with its running statistics."""
    results = {}
    if session.test_loader is not None:
        for inference in session.cfg.eval.inference:
            results[inference] = evaluate(
                session.raw_model, session.test_loader, inference=inference,
                statistics_batch_size=session.plan.statistics_batch_size, to_device=session.to_device,
                autocast=session.autocast)
            logger.eval({"step": session.step, "inference": inference, **asdict(results[inference])})
    session.collective.barrier()
    return results


def _due(step: int, every: int | None) -> bool:
    return every is not None and step % every == 0


def train(session: Session, logger: RunLogger, stop: StopRequest, checkpoint_file: Path,
          on_eval: EvalCallback) -> str:
    """Train from ``session.step`` to the plan's last step, then checkpoint and evaluate.
    Returns "finished" or "preempted"; raises TrainingStopped when the run diverges."""
    cfg, plan, optimizer = session.cfg, session.plan, session.optimizer
    counter = NonFiniteCounter(session.device, session.skipped_steps)
    buffers_before = BufferSnapshot(session.raw_model)
    clock = Stopwatch()
    steps_since_log = 0

    def checkpoint() -> None:
        session.skipped_steps = counter.skipped_steps()
        save(session, checkpoint_file)
        logger.checkpoint(session.step, checkpoint_file)

    session.model.train()
    while session.step < plan.steps:
        if session.collective.any(stop.requested):
            session.train_seconds += clock.lap()
            checkpoint()
            return "preempted"
        set_step(session.raw_model, session.step)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(session.step, plan.steps, cfg.optim.lr, cfg.schedule)
        buffers_before.take()
        loss = forward_backward(session, session.batches.next_step())
        counter.update(optimizer_step(session, loss, buffers_before), loss, session.step + 1)
        session.step += 1
        steps_since_log += 1
        logger.step(session.step)

        if _due(session.step, cfg.train.log_every) or session.step == plan.steps:
            seconds = clock.lap()
            session.train_seconds += seconds
            session.skipped_steps, longest, mean_loss = counter.read()
            logger.train({"step": session.step, "epoch": session.step / plan.steps_per_epoch, "loss": mean_loss,
                          "lr": optimizer.param_groups[0]["lr"],
                          "examples_per_s": steps_since_log * plan.gradient_batch_size / seconds,
                          "skipped_steps": session.skipped_steps})
            steps_since_log = 0
            if longest >= cfg.train.max_bad_steps:
                raise TrainingStopped(_bad_steps_message(session, longest, checkpoint_file))
            if not _parameters_finite(session.raw_model):
                raise TrainingStopped(_diverged_message(session, counter, "the parameters are no longer finite"))
        if session.step < plan.steps:
            clock.pause()
            if _due(session.step, cfg.eval.every):
                on_eval(evaluate_all(session, logger))
            if _due(session.step, cfg.checkpoint.every):
                checkpoint()
            clock.resume()

    session.train_seconds += clock.lap()
    if session.last_checkpoint_step != session.step:
        checkpoint()
    final = evaluate_all(session, logger)
    on_eval(final)
    not_finite = [inference for inference, result in final.items() if not math.isfinite(result.loss)]
    if not_finite:
        inference = not_finite[0]
        what = f"the final evaluation's loss is {final[inference].loss} ({inference} statistics)"
        raise TrainingStopped(_diverged_message(session, counter, what))
    return "finished"


def _parameters_finite(model: nn.Module) -> bool:
    """Whether every parameter is finite: one host sync (at log points only). Not a norm, which
    overflows for huge but finite weights."""
    return bool(torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all())


def _advice(session: Session) -> str:
    lr = f"Lower optim.lr (it is {session.cfg.optim.lr:g})"
    return f"{lr}, use amp=bf16 instead of fp16, or check the data" if session.cfg.amp == "fp16" else \
        f"{lr} or check the data"


def _diverged_message(session: Session, counter: NonFiniteCounter, what: str) -> str:
    return (f"diverged at step {counter.last_good_step(session.step)}: {what}; {counter.skipped_steps()} of "
            f"{session.step} steps were skipped as non-finite. {_advice(session)}")


def _bad_steps_message(session: Session, longest: int, checkpoint_file: Path) -> str:
    if session.last_checkpoint_step is None:
        survivor = "no checkpoint was written yet"
    else:
        survivor = f"the last good checkpoint is {checkpoint_file} (step {session.last_checkpoint_step})"
    return (f"stopped at step {session.step}: {longest} optimizer steps in a row had a non-finite loss or "
            f"gradient and were skipped (train.max_bad_steps={session.cfg.train.max_bad_steps}); {survivor}. "
            f"{_advice(session)}")
