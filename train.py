"""Train one model:  python train.py model=resnet101 normalizer=bkn batch.gradient=64 batch.statistics=8

Hydra composes the config from configs/ and the command line (``-m`` sweeps, e.g.
``-m normalizer=bn,brn,bkn``); bkn.config validates it into a plan before any work; the engine
runs it. The same command runs under ``torchrun`` (one process per device) and on SLURM
(``-m hydra/launcher=slurm``). Every key is explained in docs/training.md.

Exit codes: 0 finished or already finished; 1 diverged (non-finite steps, parameters or final
evaluation), out of disk space or quota (one line), or crashed; 2 a bad setting, bad data, an
out_dir that cannot be written or a run that another process holds, with a one-line message (printed once, by rank 0); 130 / 143 / 140 interrupted by SIGINT / SIGTERM /
SIGUSR2, with a checkpoint (a sweep stops there; under submitit on SLURM, SIGUSR2 requeues the job
instead).
"""

from __future__ import annotations

import difflib
import os
import re
import sys
import time
from pathlib import Path

# Hydra's own errors (a typo in a key or an option) reach the handler at the bottom as exceptions,
# turned into one line there, instead of Hydra's multi-line report.
os.environ.setdefault("HYDRA_FULL_ERROR", "1")

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from omegaconf import DictConfig  # noqa: E402
from torch.distributed.elastic.multiprocessing.errors import record  # noqa: E402

from bkn.config import ConfigError, defined_keys, detect_world, nearest_key, run_name, validate  # noqa: E402
from bkn.data import DataError  # noqa: E402
from bkn.engine import TrainingStopped, run  # noqa: E402
from bkn.engine.checkpoint import Interrupted  # noqa: E402
from bkn.engine.disk import NoSpace  # noqa: E402
from bkn.engine.lock import RunInUse  # noqa: E402
from bkn.engine.records import error_line  # noqa: E402
from bkn.engine.session import load_datasets  # noqa: E402
from bkn.engine.trainer import decide_start, start_banner  # noqa: E402

OTHER_RANKS_WAIT_S = 5
refusals: list[str] = []  # a dry run of a sweep checks every job, then reports them all
sweep_dirs: set[Path] = set()  # where Hydra wrote multirun.yaml before the jobs ran


def refuse(message: str, code: int = 2) -> None:
    world = detect_world()
    if not world.is_main:
        # Under torchrun every rank meets the same bad setting: rank 0 says it, and when it exits the
        # launcher stops the other ranks during this wait. A setting that only this rank refuses
        # (e.g. a GPU it lacks) is said after the wait, by this rank.
        time.sleep(OTHER_RANKS_WAIT_S)
        message = f"rank {world.rank}: {message}"
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


@record  # under torchrun: the failing rank's traceback is shown, not just its exit code
@hydra.main(config_path="configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:
        sweep_dirs.add(Path(hydra_cfg.sweep.dir))
    cfg.run_name = run_name(cfg, hydra_cfg.overrides.task, experiment_sweep=hydra_cfg.sweeper.get("params") or {})
    dry_run = cfg.get("dry_run") is True
    try:
        plan = validate(cfg)
        if dry_run:  # what the real run would check and do, without doing it
            start = decide_start(cfg, plan)
            datasets = load_datasets(cfg, plan)
            plan = plan.with_train_set(len(datasets.train), datasets.num_classes)
            print(start_banner(plan, start))
            return
        run(cfg, plan)
    except (ConfigError, DataError, RunInUse) as error:
        if dry_run and hydra_cfg.mode == RunMode.MULTIRUN:
            refusals.append(error_line(error))
            print(f"error: {error_line(error)}", file=sys.stderr)
            return
        refuse(error_line(error))
    except TrainingStopped as error:
        refuse(str(error), code=1)
    except NoSpace as error:  # its line names the folder and the OS's reason: a traceback adds nothing
        refuse(str(error), code=1)
    except Interrupted as interrupted:
        sys.exit(interrupted.exit_code)


def hydra_error_line(error: ConfigCompositionException | OverrideParseException) -> str:
    """One line for Hydra's errors about the command line, naming the nearest valid choice."""
    if isinstance(error, MissingConfigException) and error.missing_cfg_file and error.options:
        group, _, option = error.missing_cfg_file.rpartition("/")
        nearest = difflib.get_close_matches(option, error.options, n=3, cutoff=0)
        return f"{group}={option}: configs/{group}/ has no such option; nearest: {', '.join(nearest)}"
    typo = re.search(r"Could not override '([^']+)'", str(error))
    if typo:
        key, known = typo[1], defined_keys()
        if key in known:
            return (f"{key} is not a setting of the {key.split('.')[0]} option chosen (another option of "
                    f"configs/{key.split('.')[0]}/ has it); choose that option or drop {key}")
        return f"unknown key {key}{nearest_key(key, known)}; every key is listed in docs/training.md"
    return "; ".join(line.strip() for line in str(error).strip().splitlines() if line.strip())


def drop_lone_sweep_record() -> None:
    """A sweep that made no run (refused, or a dry run) leaves nothing: Hydra's multirun.yaml goes,
    and the folders that held only it."""
    for sweep_dir in sweep_dirs:
        if sweep_dir.is_dir() and [path.name for path in sweep_dir.iterdir()] == ["multirun.yaml"]:
            (sweep_dir / "multirun.yaml").unlink()
            sweep_dir.rmdir()
            if sweep_dir.parent.is_dir() and not any(sweep_dir.parent.iterdir()):  # out_dir
                sweep_dir.parent.rmdir()


def refuse_slurm_dry_run(arguments: list[str]) -> None:
    """A dry run validates here; with the SLURM launcher, Hydra would submit the jobs first."""
    if any(re.fullmatch(r"dry_run=[Tt]rue", a) for a in arguments) and any(
            re.fullmatch(r"hydra/launcher=\S*slurm", a) for a in arguments):
        refuse("dry_run=true with hydra/launcher=slurm would submit the sweep's jobs; dry-run the same -m "
               "command without hydra/launcher=slurm: it checks every job here")


if __name__ == "__main__":
    refuse_slurm_dry_run(sys.argv[1:])
    try:
        main()
    except (ConfigCompositionException, OverrideParseException) as error:  # before main's body runs
        refuse(hydra_error_line(error))
    finally:
        drop_lone_sweep_record()
    if refusals:
        refuse(f"dry run: {len(refusals)} job(s) of the sweep would be refused (above)")
