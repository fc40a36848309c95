"""DDP: two gloo processes under torchrun train exactly like one process accumulating two
device batches, and the launcher environments are read correctly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bkn.config import World, detect_world
from bkn.engine.records import read_summary
from training_helpers import (TINY, TinyNet, final_state, register_tiny_net, run_fault_runner,
                              train_in_process)



def test_torchrun_and_slurm_environments_are_read() -> None:
    assert detect_world({}) == World()
    torchrun = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}
    assert detect_world(torchrun) == World(8, 3, 1, "torchrun")
    slurm = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_NTASKS": "16", "SLURM_PROCID": "9", "SLURM_LOCALID": "1"}
    assert detect_world(slurm) == World(16, 9, 1, "slurm")
    # A one-task SLURM job, or SLURM variables without submitit, is a single process.
    assert detect_world({**slurm, "SLURM_NTASKS": "1"}) == World()
    assert detect_world({k: v for k, v in slurm.items() if k != "SUBMITIT_EXECUTOR"}) == World()


def test_two_processes_train_like_one_process_with_accumulation(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # The same gradient batch of 8 as 2 processes x 4 examples, or 1 process x 2 accumulation steps
    # x 4 examples: the engine gives both the same examples per step in the same statistics groups
    # (bkn/engine/batches.py), synthetic data has no random augmentation, and the analytic BKN
    # transition draws no noise, so the parameters must agree up to float summation order.
    setting = [*TINY, "normalizer=bkn_analytic", "batch.per_device=4", "train.steps=5", "checkpoint.every=null"]
    result = run_fault_runner(tmp_path, [*setting, f"out_dir={tmp_path / 'ddp'}"], torchrun_processes=2)
    assert result.returncode == 0, result.stderr[-3000:]

    register_tiny_net(monkeypatch)
    single = train_in_process(tmp_path / "single", setting)
    ddp_run = tmp_path / "ddp" / single.relative_to(tmp_path / "single")
    distributed, reference = final_state(ddp_run), final_state(single)
    assert (read_summary(ddp_run)["world_size"], read_summary(single)["accumulation"]) == (2, 2)
    parameters = [key for key in reference if not key.rsplit(".", 1)[-1].startswith(("running_", "num_batches"))]
    assert len(parameters) == 8  # conv, norm weight and bias of two blocks; fc weight and bias
    for key in parameters:
        torch.testing.assert_close(distributed[key], reference[key], rtol=1e-5, atol=1e-6, msg=key)
    # Training moved the parameters: the comparison is not between two initializations.
    torch.manual_seed(0)  # the engine's initialization seed (seed=0)
    initial = TinyNet(4, {"name": "bn"}, 8).state_dict()
    assert not torch.allclose(initial["block1.conv.weight"], reference["block1.conv.weight"], atol=1e-4)


@pytest.mark.slow  # ~20 s; tests/test_pooled_statistics.py is its cheap sibling in the default suite
def test_a_statistics_group_pooled_over_two_processes_trains_like_one_process_holding_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # batch.statistics=8 over 2 processes x 4 examples: each layer all-reduces the group's statistics,
    # so the run must match one process holding the whole group of 8 (no accumulation).
    setting = [*TINY, "normalizer=bkn_analytic", "batch.statistics=8", "train.steps=5", "checkpoint.every=null"]
    result = run_fault_runner(tmp_path, [*setting, "batch.per_device=4", f"out_dir={tmp_path / 'ddp'}"],
                              torchrun_processes=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "each pooled over 2 devices" in result.stdout + result.stderr

    register_tiny_net(monkeypatch)
    single = train_in_process(tmp_path / "single", [*setting, "batch.per_device=8"])
    (ddp_run,) = {path.parent for path in (tmp_path / "ddp").rglob("summary.json")}  # named by its own overrides
    distributed, reference = final_state(ddp_run), final_state(single)
    for key in reference:  # parameters and running statistics alike
        torch.testing.assert_close(distributed[key].float(), reference[key].float(), rtol=1e-5, atol=1e-6, msg=key)
