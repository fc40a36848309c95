"""The training engine: process group, session (data, model, optimizer), loop, evaluation,
checkpoints, run records and logging. ``run(cfg, plan)`` is what ``train.py`` calls."""

from bkn.engine.loop import TrainingStopped
from bkn.engine.trainer import run

__all__ = ["TrainingStopped", "run"]
