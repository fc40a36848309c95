"""train.py as researchers use it from the command line (issue 13): a folder per sweep job,
typos refused in one line, Ctrl+C stopping a sweep, dry runs checking what real runs check, a
refused setting leaving nothing on disk, the start banner and progress lines, torchrun saying a
bad setting once, and compare_runs over experiment folders."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bkn.engine.records import read_summary
from training_helpers import (ROOT, TINY, register_tiny_net, run_fault_runner, run_train_main, subprocess_env,
                              the_run_dir, train_in_process)

SHORT = [*TINY, "train.steps=2", "checkpoint.every=null"]


def _run_dirs(out_dir: Path) -> list[Path]:
    return sorted(path.parent for path in out_dir.rglob("summary.json"))


def test_a_learning_rate_sweep_gives_each_job_its_own_folder_and_reruns_find_them(tmp_path: Path) -> None:
    sweep = ["-m", *SHORT, "optim.lr=0.1,0.05", "experiment_name=lrsweep", f"out_dir={tmp_path}"]
    result = run_fault_runner(tmp_path, sweep)
    assert result.returncode == 0, result.stderr[-3000:]
    first, second = _run_dirs(tmp_path)
    assert first.parent == second.parent == tmp_path / "lrsweep"
    assert {json.loads((run / "summary.json").read_text())["status"] for run in (first, second)} == {"finished"}
    lrs = {run.name: (run / "config.yaml").read_text().split("lr: ")[1].split()[0] for run in (first, second)}
    assert sorted(lrs.values()) == ["0.05", "0.1"]
    again = run_fault_runner(tmp_path, sweep)  # the finished runs are the cache
    assert again.returncode == 0 and again.stdout.count("already finished") == 2, again.stdout[-3000:]


@pytest.mark.parametrize(("overrides", "message"), [
    (["batch.gradiant=16"], "error: unknown key batch.gradiant (did you mean batch.gradient?)"),
    (["+train.step=3"], "error: unknown key train.step (did you mean train.steps?)"),
    (["+optim.weight_decy=0"], "error: unknown key optim.weight_decy (did you mean optim.weight_decay?)"),
    (["model=resnet105"], "error: model=resnet105: configs/model/ has no such option; nearest: resnet152, resnet101"),
    (["normalizer=bn", "normalizer.gain=0.5"], "error: normalizer.gain is not a setting of the normalizer option"),
    (["batch.statistics=3"], "error: batch.statistics=3 does not divide the device batch"),
    (["-m", "batch.statistics=3,5"], "error: batch.statistics=3 does not divide the device batch"),  # a sweep
])
def test_a_typo_or_bad_setting_is_one_line_exit_2_and_leaves_nothing_on_disk(
        overrides: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)  # Hydra's own folders would appear here
    assert run_train_main(monkeypatch, [*overrides, f"out_dir={tmp_path / 'runs'}"]) == 2
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if "[HYDRA]" not in line]
    assert len(lines) == 1 and lines[0].startswith(message), lines
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_stops_a_sweep_after_the_checkpoint(tmp_path: Path) -> None:
    sweep = ["-m", "seed=0,1", *TINY, "train.steps=10", "checkpoint.every=null", f"out_dir={tmp_path}"]
    result = run_fault_runner(tmp_path, sweep, fault="int@3")  # SIGINT arrives during step 4 of job 0
    assert result.returncode == 130, result.stderr[-3000:]  # 128 + SIGINT
    (run_dir,) = _run_dirs(tmp_path)  # job 1 never started
    assert run_dir.name.endswith("seed0_" + run_dir.name.rsplit("_", 1)[1])
    assert read_summary(run_dir)["status"] == "preempted" and read_summary(run_dir)["step"] == 4
    assert "preempted by SIGINT at step 4" in result.stdout + result.stderr


def test_a_dry_run_checks_every_job_as_the_real_run_would(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    register_tiny_net(monkeypatch)
    mine = [*SHORT, "run_name=mine", f"out_dir={tmp_path}"]  # every job in one folder: conflicts
    run_dir = train_in_process(tmp_path, [*mine, "optim.lr=0.1"])
    before = sorted(path.stat().st_mtime_ns for path in tmp_path.rglob("*") if path.is_file())
    code = run_train_main(monkeypatch, ["-m", *mine, "optim.lr=0.1,0.05,0.01", "dry_run=true"])
    output = capsys.readouterr()
    assert code == 2
    assert "start           finished at step 2: nothing to do" in output.out  # job 0 would be skipped
    refusals = [line for line in output.err.splitlines() if line.startswith("error: resume=auto")]
    assert [line.split("this config has ")[1].split(";")[0] for line in refusals] == ["optim.lr=0.05", "optim.lr=0.01"]
    assert output.err.strip().endswith("error: dry run: 2 job(s) of the sweep would be refused (above)")
    assert sorted(path.stat().st_mtime_ns for path in tmp_path.rglob("*") if path.is_file()
                  if path.name != "multirun.yaml") == before  # nothing trained or rewritten
    new = tmp_path / "new"
    assert run_train_main(monkeypatch, ["-m", *SHORT, "seed=0,1", f"out_dir={new}", "dry_run=true"]) == 0
    assert not new.exists()  # a dry run leaves nothing, not even Hydra's multirun.yaml
    assert read_summary(run_dir)["status"] == "finished"


def test_a_dry_run_on_slurm_submits_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch to call, had anything tried
    code = run_train_main(monkeypatch, ["-m", "hydra/launcher=slurm", "normalizer=bn,bkn", "dry_run=true"])
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        "error: dry_run=true with hydra/launcher=slurm would submit the sweep's jobs; dry-run the same -m command "
        "without hydra/launcher=slurm: it checks every job here")
    assert list(tmp_path.iterdir()) == []


def test_a_run_tells_its_plan_progress_and_checkpoints(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    register_tiny_net(monkeypatch)
    with caplog.at_level("INFO", logger="bkn"):
        run_dir = train_in_process(tmp_path, [*TINY, "train.steps=4", "checkpoint.every=2"])
    text = caplog.text
    for expected in ("plan:", f"run directory   {run_dir}", "1 (single)", "8 = 8 per device x 1 process(es) x 1 "
                     "accumulation step(s)", "groups of 2 examples, 4 per device batch", "4 steps = 0.67 epochs",
                     "start           new", "step 2/4 (epoch 0.33)", "checkpoint at step 2/4", "step 4/4"):
        assert expected in text, expected
    train_lines = [line for line in text.splitlines() if " - step " in line or "step 2/4 (" in line]
    assert train_lines and all(" ETA " in line for line in train_lines)
    logged = (run_dir / "train.log").read_text()
    assert "start           new" in logged and "checkpoint at step 4/4" in logged


@pytest.mark.slow  # ~25 s: torchrun's start and the other rank's wait
def test_torchrun_says_a_bad_setting_once(tmp_path: Path) -> None:
    result = run_fault_runner(tmp_path, ["batch.statistics=3", *TINY[2:3], f"out_dir={tmp_path}"],
                              torchrun_processes=2, timeout=120)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: batch.statistics=3 does not divide the device batch batch.per_device=4: each device "
                      "batch is cut into statistics groups; choose one of [1, 2, 4], or a group pooled over whole devices: "
                      "one of [8]"]
    assert "exitcode  : 2" in result.stderr  # rank 0's own exit code is what torchrun reports
    assert not _run_dirs(tmp_path)


@pytest.mark.slow  # ~15 s: two sweeps; the out_dir test covers compare_runs in the default suite
def test_compare_runs_takes_experiment_folders_and_shows_what_differs(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    register_tiny_net(monkeypatch)
    runs = tmp_path / "runs"
    train_in_process(runs, [*SHORT, "experiment_name=one"])
    train_in_process(runs, [*SHORT, "experiment_name=one", "optim.momentum=0.5"])
    same_name = train_in_process(runs, [*SHORT, "experiment_name=two"])
    (runs / "one" / "multirun.yaml").write_text("hydra: {}\n")  # written by a -m sweep: not a run
    command = [sys.executable, str(ROOT / "scripts" / "compare_runs.py"), str(runs / "one"), str(same_name)]
    result = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    header, _, *rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in result.stdout.splitlines()]
    assert header[:4] == ["run", "experiment", "data", "lr"] and header[-1] == "optim.momentum"
    assert sorted((row[1], row[2], row[3], row[-1]) for row in rows) == [
        ("one", "synthetic", "0.05", "0.5"), ("one", "synthetic", "0.05", "0.9"), ("two", "synthetic", "0.05", "0.9")]
    nothing = subprocess.run([*command[:2], str(runs / "one" / "multirun.yaml")], env=subprocess_env(),
                             capture_output=True, text=True, timeout=120)
    assert nothing.returncode == 2 and "no run records" in nothing.stderr
    assert the_run_dir(runs / "two") == same_name


def _copy_run(run_dir: Path, to: Path, top1: float, config: dict[str, object], **summary: object) -> None:
    """A copy of a run's record as if trained with other ``config`` values, to that top-1."""
    shutil.copytree(run_dir, to, ignore=shutil.ignore_patterns("checkpoints"))
    saved = yaml.safe_load((to / "config.yaml").read_text())
    for key, value in config.items():
        section, _, name = key.rpartition(".")
        (saved[section] if section else saved)[name] = value
    (to / "config.yaml").write_text(yaml.safe_dump(saved))
    record = read_summary(to)
    record["final"]["population"]["top1"] = top1
    (to / "summary.json").write_text(json.dumps({**record, **summary}))


def test_compare_runs_takes_the_out_dir_aggregates_seeds_and_shows_errors(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    register_tiny_net(monkeypatch)
    runs = tmp_path / "runs"
    trained = train_in_process(runs, SHORT)
    _copy_run(trained, runs / "default" / "seed1", 60.0, {"seed": 1})
    _copy_run(trained, runs / "default" / "seed2", 10.0, {"seed": 2}, status="failed", error="disk full")
    _copy_run(trained, runs / "other" / "momentum", 50.0, {"optim.momentum": 0.5})  # a setting with one seed
    top1 = [read_summary(trained)["final"]["population"]["top1"], 60.0]
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "compare_runs.py"), str(runs)],
                            env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    runs_table, seeds_table = result.stdout.split("\n\nOver seeds")
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in runs_table.splitlines()]
    assert len(rows) == 2 + 4 and rows[0][-1] == "error"
    assert sorted(row[-1] for row in rows[2:]) == ["-", "-", "-", "disk full"]
    seeds_rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in seeds_table.splitlines()
                  if line.startswith("| ")]
    assert [row[0] for row in seeds_rows] == ["experiment", "-" * len(seeds_rows[1][0]), "default"]  # not "other"
    mean = sum(top1) / 2
    sample_sd = (sum((value - mean) ** 2 for value in top1) / (2 - 1)) ** 0.5
    assert seeds_rows[2][-3:-1] == ["3 (1 failed)", f"{mean:.2f} ± {sample_sd:.2f}% (n=2)"]
