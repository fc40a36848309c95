"""Shared by the engine's tests: composing configs, running train.py in-process or as a
subprocess, and a tiny two-block network for tests where the engine, not the model, is tested.

``TinyNet`` is registered as model ``tiny_net`` by ``register_tiny_net`` (in this process) or by
``FAULT_RUNNER`` (a train.py wrapper the subprocess tests run, which can also inject a fault:
``BKN_TEST_FAULT=kill@7`` SIGKILLs itself during optimizer step 7, ``term@7`` / ``int@7`` send
itself SIGTERM / SIGINT, ``raise@7:1`` raises on rank 1, ``wait@7`` writes a file ``paused`` in its
working directory and waits there for a file ``go``).
"""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from torch import Tensor, nn

from bkn.config import run_name, validate
from bkn.engine import run
from bkn.engine.checkpoint import checkpoint_path, load_checkpoint
from bkn.models import MODELS
from bkn.nn import ConvNormAct, NormSpec

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs"

# A run of a few steps of tiny_net (in the cifar_net config, less its width option): seconds on a
# CPU. TINY adds generated 8x8 images.
TINY_RUN = ["model.name=tiny_net", "~model.width", "batch.gradient=8", "batch.statistics=2", "train.steps=6",
            "train.epochs=null", "train.log_every=2", "checkpoint.every=3", "optim.lr=0.05"]
TINY = [*TINY_RUN, "data=synthetic", "data.image_size=8", "data.train_size=48", "data.test_size=20",
        "data.num_classes=4"]


class TinyNet(nn.Module):
    """Two conv -> norm -> ReLU blocks (the BKN state flows from the first to the second) and a classifier."""

    def __init__(self, num_classes: int, norm: NormSpec, image_size: int, in_channels: int = 3) -> None:
        super().__init__()
        self.block1 = ConvNormAct(in_channels, 8, 3, norm)
        self.block2 = ConvNormAct(8, 8, 3, norm)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x, state = self.block1(x)
        x, _ = self.block2(x, state)
        return self.fc(x.mean(dim=(2, 3)))


def register_tiny_net(monkeypatch: Any) -> None:
    monkeypatch.setitem(MODELS, "tiny_net", TinyNet)


def compose_config(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("config", overrides=overrides)


def train_in_process(out_dir: Path, overrides: list[str]) -> Path:
    """Compose, name, validate and run like train.py does; returns the run directory."""
    overrides = [f"out_dir={out_dir}", *overrides]
    cfg = compose_config(overrides)
    cfg.run_name = run_name(cfg, overrides)
    plan = validate(cfg, environ={})
    run(cfg, plan)
    return plan.run_dir


def the_run_dir(out_dir: Path) -> Path:
    """The one run directory under ``out_dir`` (its name depends on the overrides)."""
    (run_dir,) = {path.parent for path in out_dir.rglob("config.yaml") if path.parent.name != ".hydra"}
    return run_dir


def run_train_script() -> None:
    """Execute train.py as ``__main__`` (as ``python train.py`` would) in this process."""
    runpy.run_path(str(ROOT / "train.py"), run_name="__main__")


def run_train_main(monkeypatch: Any, overrides: list[str]) -> int:
    """Run train.py's ``main`` in this process with ``overrides``; returns its exit code."""
    monkeypatch.setattr(sys, "argv", ["train.py", *overrides])
    try:
        with warnings.catch_warnings():  # @record's fault handler needs a real stderr, pytest captures it
            warnings.filterwarnings("ignore", "Unable to enable fault handler")
            run_train_script()
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return 0


FAULT_RUNNER = f'''
import os, signal, sys, time
sys.path.insert(0, {str(ROOT)!r})
sys.path.insert(0, {str(Path(__file__).parent)!r})
import bkn.engine.loop as loop
from bkn.models import MODELS
from training_helpers import TinyNet, run_train_script

MODELS["tiny_net"] = TinyNet
fault = os.environ.get("BKN_TEST_FAULT")
if fault:
    action, where = fault.split("@")
    step, _, rank = where.partition(":")
    original_step = loop.optimizer_step

    def faulty_step(session, *args):
        if session.step == int(step) and session.plan.world.rank == int(rank or 0):
            if action == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            elif action == "term":
                os.kill(os.getpid(), signal.SIGTERM)
            elif action == "int":  # Ctrl+C
                os.kill(os.getpid(), signal.SIGINT)
            elif action == "wait":  # say so in the file "paused", then wait for a file "go"
                open("paused", "w").close()
                while not os.path.exists("go"):
                    time.sleep(0.05)
            else:
                raise RuntimeError(f"injected failure at step {{step}} on rank {{session.plan.world.rank}}")
        return original_step(session, *args)

    loop.optimizer_step = faulty_step
sys.argv[0] = {str(ROOT / "train.py")!r}
run_train_script()
'''


def subprocess_env(**extra: str) -> dict[str, str]:
    # One thread per process: the test machine's two cores are shared with other processes.
    return {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1", **extra}


def run_fault_runner(tmp_path: Path, args: list[str], fault: str | None = None, torchrun_processes: int = 0,
                     timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """train.py with tiny_net registered (and ``fault`` injected), as a subprocess or under torchrun."""
    script = tmp_path / "fault_runner.py"
    script.write_text(FAULT_RUNNER)
    if torchrun_processes:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={torchrun_processes}", str(script), *args]
    else:
        command = [sys.executable, str(script), *args]
    env = subprocess_env(**({"BKN_TEST_FAULT": fault} if fault else {}))
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


def final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    """The model state of a run's last checkpoint."""
    return load_checkpoint(checkpoint_path(run_dir))["model"]


def save_then_fail(monkeypatch: Any, error: Exception) -> None:
    """torch.save writes the first checkpoint, then fails half-way through every later one."""
    original, saves = torch.save, iter(range(10**6))

    def failing_save(state: Any, file: Any) -> None:
        if next(saves) == 0:
            return original(state, file)
        file.write(b"half a checkpoint")
        raise error

    monkeypatch.setattr(torch, "save", failing_save)
