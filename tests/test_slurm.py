"""train.py on a real SLURM cluster: a one-node cluster on this machine (scripts/slurm_cluster.sh),
reached through hydra-submitit-launcher (`-m hydra/launcher=slurm`), as on a CPU cluster: a sweep
of DDP jobs, a preempted job and one that reaches its time limit (both requeued by submitit, both
ending with the parameters of an uninterrupted run), and a figure made from the cluster's runs.

The tests marked ``slurm`` run with `make test-slurm` (the default suite deselects them). They need
root and apt-get, to install and start the cluster, and skip with one line without them. The
cluster is started if it is not running and stopped again afterwards; one that was already running
is left running. The unmarked tests check, without a cluster, the piece of bkn that makes
submitit's requeue keep the work done: a checkpoint before submitit's own SIGUSR2 handler runs.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from bkn.engine.checkpoint import StopRequest
from bkn.engine.records import read_summary
from training_helpers import ROOT, final_state, subprocess_env

CLUSTER_SCRIPT = ROOT / "scripts" / "slurm_cluster.sh"

# A CPU cluster: no GPUs per node, one CPU and 1 GB per task (hydra.launcher.tasks_per_node is the
# number of DDP ranks of each job).
CPU_NODE = ["hydra.launcher.gpus_per_node=0", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1",
            "device=cpu"]
DDP_LAUNCHER = ["hydra/launcher=slurm", *CPU_NODE, "hydra.launcher.tasks_per_node=2"]
# Long enough (300 steps, 20-35 s on 2 cores) to be preempted in the middle; checkpoints every 50 steps.
STEPS = 300
# The time-limit test needs a run that outlasts its first job on any machine: SLURM signals a job
# 30-60 s after it starts (it checks time limits about every 30 s), and an idle machine trains the
# 300 steps before that. 600 steps take 2 jobs on an idle machine, 3 under a load of 4.
LONG_STEPS = 600


def run_overrides(steps: int) -> list[str]:
    return ["data=synthetic", "data.image_size=8", "data.train_size=64", "data.test_size=16", "data.num_classes=4",
            "model.width=0.25", "batch.gradient=8", "batch.statistics=2", f"train.steps={steps}",
            "train.epochs=null", "train.log_every=10", "checkpoint.every=50"]


RUN, LONG_RUN = run_overrides(STEPS), run_overrides(LONG_STEPS)
# Run folder names start so; the overrides add their hash (the same in every sweep of RUN here).
RUN_NAME = {"bn": "cifar_net-w0.25_bn_g8_s2_seed0", "bkn": "cifar_net-w0.25_bkn-linear_g8_s2_seed0"}
JOB_TIMEOUT_S = 450  # a busy machine slows the requeue cycles; idle, the slowest test takes ~3 minutes
# The jobs start Python in the sweep's folder: PYTHONPATH makes them import this checkout's bkn.
JOB_ENV = subprocess_env(PYTHONPATH=str(ROOT))


def why_no_cluster() -> str | None:
    if os.geteuid() != 0:
        return "SLURM tests need root: they install and start a one-node cluster (scripts/slurm_cluster.sh)"
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        return "SLURM tests need slurm-wlm installed or apt-get to install it (scripts/slurm_cluster.sh)"
    return None


def cluster_command(action: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(CLUSTER_SCRIPT), action], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    reason = why_no_cluster()
    if reason:
        pytest.skip(reason)
    was_running = cluster_command("status").returncode == 0
    if not was_running:
        started = cluster_command("start")
        assert started.returncode == 0, started.stderr
    yield
    if not was_running:
        stopped = cluster_command("stop")
        assert stopped.returncode == 0, stopped.stderr


def sweep_command(out_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), "-m", f"out_dir={out_dir}", *overrides]


def run_sweep(out_dir: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    """train.py -m, which submits its jobs and waits for them; fails the test if it does not end."""
    result = subprocess.run(sweep_command(out_dir, *overrides), cwd=out_dir.parent, env=JOB_ENV,
                            capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def job_ids(sweep_dir: Path) -> list[str]:
    """The SLURM jobs that ran for a sweep: submitit keeps a folder per job in <sweep dir>/.submitit,
    where task 0 writes <job id>_0_log.out (a job array's own folder holds no log)."""
    jobs = sweep_dir / ".submitit"
    if not jobs.is_dir():  # not submitted yet
        return []
    return sorted(folder.name for folder in jobs.iterdir() if (folder / f"{folder.name}_0_log.out").exists())


def run_dir_of(sweep_dir: Path, normalizer: str) -> Path:
    """The folder of ``normalizer``'s run in ``sweep_dir`` (where it will be, before it exists)."""
    found = sorted(sweep_dir.glob(f"{RUN_NAME[normalizer]}_*"))
    return found[0] if found else sweep_dir / RUN_NAME[normalizer]


def uninterrupted_sweep(tmp_path_factory: pytest.TempPathFactory, name: str, *overrides: str) -> Path:
    """A sweep of two-rank DDP jobs (gloo) run uninterrupted on the cluster; its sweep folder."""
    out_dir = tmp_path_factory.mktemp(name) / "runs"
    out_dir.mkdir()
    run_sweep(out_dir, *DDP_LAUNCHER, *overrides)
    return out_dir / "default"


@pytest.fixture(scope="module")
def reference_sweep(cluster: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two jobs (BN, BKN) of RUN."""
    return uninterrupted_sweep(tmp_path_factory, "reference", *RUN, "normalizer=bn,bkn")


@pytest.fixture(scope="module")
def long_reference_sweep(cluster: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The BKN job of LONG_RUN."""
    return uninterrupted_sweep(tmp_path_factory, "long_reference", *LONG_RUN, "normalizer=bkn")


@pytest.mark.slurm
def test_a_sweep_runs_as_slurm_jobs_of_two_ddp_ranks(reference_sweep: Path) -> None:
    assert len(job_ids(reference_sweep)) == 2  # one SLURM job per sweep point
    for normalizer in RUN_NAME:
        summary = read_summary(run_dir_of(reference_sweep, normalizer))
        assert summary is not None, normalizer
        assert (summary["status"], summary["step"], summary["world_size"]) == ("finished", STEPS, 2)
        assert set(summary["final"]) == {"population", "batch"}


def requeue_state(job_id: str) -> tuple[str, int]:
    """(JobState, Restarts) of a job, from scontrol."""
    shown = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    state = re.search(r"JobState=(\w+)", shown)
    restarts = re.search(r"Restarts=(\d+)", shown)
    return (state.group(1) if state else "GONE", int(restarts.group(1)) if restarts else 0)


def interrupted_sweep(tmp_path: Path, launcher: list[str], run: list[str],
                      interrupt: Callable[[Path], bool] | None = None) -> Path:
    """The BKN run of ``run`` as a one-job sweep; returns its run directory once the sweep has ended.

    ``interrupt(sweep_dir)`` is called while the job runs until it returns True. SLURM holds a
    requeued job for two minutes before it may start again; each requeued job is started at once."""
    out_dir = tmp_path / "runs"
    out_dir.mkdir()
    sweep_dir = out_dir / "default"
    log = tmp_path / "sweep.log"
    with log.open("w") as output:
        sweep = subprocess.Popen(sweep_command(out_dir, *launcher, *run, "normalizer=bkn"), cwd=tmp_path,
                                 env=JOB_ENV, stdout=output, stderr=subprocess.STDOUT)
        try:
            deadline, interrupted = time.monotonic() + 2 * JOB_TIMEOUT_S, interrupt is None
            while sweep.poll() is None:
                assert time.monotonic() < deadline, f"the sweep did not end in {2 * JOB_TIMEOUT_S} s"
                if not interrupted:
                    interrupted = interrupt(sweep_dir)
                for job_id in job_ids(sweep_dir):
                    state, restarts = requeue_state(job_id)
                    if state == "PENDING" and restarts > 0:
                        subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True)
                time.sleep(1)
        finally:
            if sweep.poll() is None:
                sweep.send_signal(signal.SIGINT)
                sweep.wait(timeout=30)
    assert sweep.returncode == 0, log.read_text()[-3000:]
    return run_dir_of(sweep_dir, "bkn")


def assert_resumed_like_the_reference(run_dir: Path, reference_sweep: Path, stops: int, steps: int) -> None:
    """At least ``stops`` SIGUSR2 stops, each resumed from the checkpoint it wrote (not a periodic
    one), and the final parameters of the uninterrupted reference run of ``steps`` steps."""
    log = (run_dir / "train.log").read_text()
    stopped = {int(step) for step in re.findall(r"preempted by SIGUSR2 at step (\d+)", log)}  # every rank logs it
    resumed = [int(step) for step in re.findall(r"resumes from \S+ at step (\d+)", log)]  # the start banner
    assert len(stopped) >= stops, log[-3000:]
    # A set: a job signalled before training started resumes from the same checkpoint once more.
    assert set(resumed) == set(stopped) and all(0 < step < steps for step in stopped)
    summary = read_summary(run_dir)
    assert summary is not None and (summary["status"], summary["step"]) == ("finished", steps)
    expected, actual = final_state(run_dir_of(reference_sweep, "bkn")), final_state(run_dir)
    assert expected.keys() == actual.keys()
    for key in expected:  # parameters and running statistics, bit for bit
        assert torch.equal(expected[key], actual[key]), key


@pytest.mark.slurm
def test_a_preempted_job_is_requeued_and_ends_as_an_uninterrupted_one(reference_sweep: Path, tmp_path: Path) -> None:
    def preempt_after_step_30(sweep_dir: Path) -> bool:
        metrics = run_dir_of(sweep_dir, "bkn") / "metrics.jsonl"
        if not (metrics.exists() and '"step": 30,' in metrics.read_text()):
            return False
        # Preemption as submitit expects it: SIGUSR2 to every task. bkn checkpoints at the next step
        # boundary, then submitit's handler requeues the job (scontrol requeue).
        (job_id,) = job_ids(sweep_dir)
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
        return True

    run_dir = interrupted_sweep(tmp_path, DDP_LAUNCHER, RUN, preempt_after_step_30)
    assert_resumed_like_the_reference(run_dir, reference_sweep, stops=1, steps=STEPS)


@pytest.mark.slurm
def test_a_job_at_its_time_limit_is_requeued_until_it_ends_as_an_uninterrupted_one(long_reference_sweep: Path,
                                                                                   tmp_path: Path) -> None:
    # sbatch --time=1 --signal=USR2@30: SLURM signals each attempt 30-60 s after it starts, before
    # LONG_RUN's 600 steps are done. A slow machine needs more attempts than the launcher's 5 requeues.
    time_limit = ["hydra.launcher.timeout_min=1", "hydra.launcher.signal_delay_s=30",
                  "hydra.launcher.max_num_timeout=20"]
    run_dir = interrupted_sweep(tmp_path, [*DDP_LAUNCHER, *time_limit], LONG_RUN)
    assert_resumed_like_the_reference(run_dir, long_reference_sweep, stops=1, steps=LONG_STEPS)


@pytest.mark.slurm
def test_make_a_figure_on_the_cluster(cluster: None, tmp_path: Path) -> None:
    runs, results = tmp_path / "runs", tmp_path / "results"
    # Figure 8 is the cheapest figure: two runs of the CIFAR net. `-o`: never reinstall the environment.
    launcher = " ".join([*CPU_NODE, "hydra.launcher.tasks_per_node=1"])  # LAUNCHER=slurm picks the launcher
    make = ["make", "-o", ".venv/.installed", "fig8", "LAUNCHER=slurm", "SCALE=smoke", f"PY={sys.executable}",
            f"RUNS_DIR={runs}", f"RESULTS_DIR={results}", f"ARGS={launcher}"]
    made = subprocess.run(make, cwd=ROOT, env=JOB_ENV, capture_output=True, text=True,
                          timeout=2 * JOB_TIMEOUT_S)
    assert made.returncode == 0, made.stderr[-3000:]
    assert len(job_ids(runs / "fig8")) == 2  # the BN and the BKN run, each a SLURM job
    for normalizer in ("bn", "bkn"):
        (run_dir,) = (runs / "fig8").glob(f"*_{normalizer}*_seed0")
        assert read_summary(run_dir)["status"] == "finished"
    table = (results / "fig8.md").read_text()
    assert "| BN |" in table and "| BKN |" in table
    assert (results / "fig8.png").stat().st_size > 0


def test_usr2_checkpoints_first_then_hands_the_signal_to_submitits_handler() -> None:
    handed: list[int] = []
    previous = signal.signal(signal.SIGUSR2, lambda number, frame: handed.append(number))
    try:
        with StopRequest() as stop:
            os.kill(os.getpid(), signal.SIGUSR2)
            assert stop.requested and not handed  # training stops at the next step; nothing requeued yet
        stop.pass_on()
        assert handed == [signal.SIGUSR2]
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_sigterm_is_not_handed_on() -> None:
    handed: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda number, frame: handed.append(number))
    try:
        with StopRequest() as stop:
            os.kill(os.getpid(), signal.SIGTERM)
        stop.pass_on()
        assert stop.requested and not handed  # a plain preemption: the run exits with its checkpoint
    finally:
        signal.signal(signal.SIGTERM, previous)
