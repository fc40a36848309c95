"""train.py on a real SLURM cluster: a one-node cluster on this machine (scripts/slurm_cluster.sh),
reached through hydra-submitit-launcher (`-m hydra/launcher=slurm`), as on a CPU cluster.

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
from collections.abc import Iterator
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
            "hydra.launcher.timeout_min=10", "device=cpu"]
DDP_LAUNCHER = ["hydra/launcher=slurm", *CPU_NODE, "hydra.launcher.tasks_per_node=2"]
# Long enough (150 steps, ~20 s) to be preempted in the middle; checkpoints every 50 steps.
RUN = ["data=synthetic", "data.image_size=8", "data.train_size=64", "data.test_size=16", "data.num_classes=4",
       "model.width=0.25", "batch.gradient=8", "batch.statistics=2", "train.steps=150", "train.epochs=null",
       "train.log_every=10", "checkpoint.every=50"]
RUN_NAME = {"bn": "cifar_net-w0.25_bn_g8_s2_seed0", "bkn": "cifar_net-w0.25_bkn-analytic_g8_s2_seed0"}
JOB_TIMEOUT_S = 300
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
    return sorted(folder.name for folder in (sweep_dir / ".submitit").iterdir()
                  if (folder / f"{folder.name}_0_log.out").exists())


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def reference_sweep(cluster: None, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two jobs (BN, BKN), each two DDP ranks over gloo, run uninterrupted on the cluster."""
    out_dir = tmp_path_factory.mktemp("reference") / "runs"
    out_dir.mkdir()
    run_sweep(out_dir, *DDP_LAUNCHER, *RUN, "normalizer=bn,bkn")
    return out_dir / "default"


@pytest.mark.slurm
def test_a_sweep_runs_as_slurm_jobs_of_two_ddp_ranks(reference_sweep: Path) -> None:
    assert len(job_ids(reference_sweep)) == 2  # one SLURM job per sweep point
    for name in RUN_NAME.values():
        summary = read_summary(reference_sweep / name)
        assert summary is not None, name
        assert (summary["status"], summary["step"], summary["world_size"]) == ("finished", 150, 2)
        assert set(summary["final"]) == {"population", "batch"}


def requeue_state(job_id: str) -> tuple[str, int]:
    """(JobState, Restarts) of a job, from scontrol."""
    shown = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    state = re.search(r"JobState=(\w+)", shown)
    restarts = re.search(r"Restarts=(\d+)", shown)
    return (state.group(1) if state else "GONE", int(restarts.group(1)) if restarts else 0)


@pytest.mark.slurm
def test_a_preempted_job_is_requeued_and_ends_as_an_uninterrupted_one(reference_sweep: Path, tmp_path: Path) -> None:
    out_dir = tmp_path / "runs"
    out_dir.mkdir()
    sweep_dir, run_dir = out_dir / "default", out_dir / "default" / RUN_NAME["bkn"]
    sweep = subprocess.Popen(sweep_command(out_dir, *DDP_LAUNCHER, *RUN, "normalizer=bkn"), cwd=tmp_path,
                             env=JOB_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        metrics = run_dir / "metrics.jsonl"
        wait_for(lambda: metrics.exists() and '"step": 30,' in metrics.read_text(), JOB_TIMEOUT_S, "step 30")
        (job_id,) = job_ids(sweep_dir)
        # Preemption as submitit expects it: SIGUSR2 to every task. bkn checkpoints at the next step
        # boundary, then submitit's handler requeues the job (scontrol requeue).
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
        wait_for(lambda: requeue_state(job_id) == ("PENDING", 1), 120, "the job to be requeued")
        # SLURM holds a requeued job for two minutes before it may start again; start it now.
        subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True)
        _, stderr = sweep.communicate(timeout=JOB_TIMEOUT_S)
    finally:
        if sweep.poll() is None:
            sweep.send_signal(signal.SIGINT)
            sweep.wait(timeout=30)
    assert sweep.returncode == 0, stderr[-3000:]

    log = (run_dir / "train.log").read_text()
    stopped = re.search(r"preempted by SIGUSR2 at step (\d+)", log)
    resumed = re.search(r"resuming from \S+ at step (\d+)", log)
    assert stopped and resumed, log[-3000:]
    assert stopped.group(1) == resumed.group(1)  # the checkpoint written on the signal, not a periodic one
    assert 30 <= int(stopped.group(1)) < 150
    summary = read_summary(run_dir)
    assert summary is not None and (summary["status"], summary["step"]) == ("finished", 150)

    expected, actual = final_state(reference_sweep / RUN_NAME["bkn"]), final_state(run_dir)
    assert expected.keys() == actual.keys()
    for key in expected:  # parameters and running statistics, bit for bit
        assert torch.equal(expected[key], actual[key]), key


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
