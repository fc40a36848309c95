"""Train one model:  python train.py model=resnet101 normalizer=bkn batch.gradient=64 batch.statistics=8

Hydra composes the config from configs/ and the command line (``-m`` sweeps, e.g.
``-m normalizer=bn,brn,bkn``); bkn.config validates it into a plan before any work; the engine
runs it. The same command runs under ``torchrun`` (one process per device) and on SLURM
(``-m hydra/launcher=slurm``). Every key is explained in docs/training.md.

Exit codes: 0 finished, already finished, or preempted with a checkpoint; 1 diverged (non-finite
steps, parameters or final evaluation) or crashed; 2 a bad setting or bad data, with a one-line message.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig
from torch.distributed.elastic.multiprocessing.errors import record

from bkn.config import ConfigError, validate
from bkn.data import DataError
from bkn.engine import TrainingStopped, run
from bkn.engine.session import load_datasets


def one_line(error: Exception) -> str:
    """The error's message; for one re-raised from a DataLoader worker (whose message is the
    worker's traceback), the original message, its last line."""
    last_line = str(error).strip().splitlines()[-1]
    return last_line.removeprefix(f"{type(error).__module__}.{type(error).__qualname__}: ")


@record  # under torchrun: the failing rank's traceback is shown, not just its exit code
@hydra.main(config_path="configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        plan = validate(cfg)
        if cfg.dry_run:
            print(plan.with_train_set(len(load_datasets(cfg, plan).train)).describe())
            return
        run(cfg, plan)
    except (ConfigError, DataError) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        sys.exit(2)
    except TrainingStopped as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
