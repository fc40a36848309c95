"""The CPU study: scripts/study.py's commands and scripts/study_report.py on run records this test
writes itself (in train.py's format, docs/run-records.md)."""

from __future__ import annotations

import json
import re
import shutil
import statistics
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir

import bkn.config  # noqa: F401  (registers the run_name resolvers)
from bkn.config import validate
from bkn.data import build_datasets

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import study  # noqa: E402  (scripts/ is not a package)
import study_report  # noqa: E402
from bkn.engine.checkpoint import checkpoint_path  # noqa: E402
from run_records import load_local  # noqa: E402
from study_results import figures, intervals, normalizers, variance_gap  # noqa: E402
from study_results.claims import write_claims  # noqa: E402
from study_results.records import load_runs, save_records  # noqa: E402


def overrides_of(spec: study.RunSpec) -> dict[str, str]:
    return dict(override.split("=", 1) for override in spec.overrides)


def test_every_part_runs_every_setting_variant_and_seed_once_on_the_same_examples(tmp_path: Path) -> None:
    for name, part in study.PARTS.items():
        specs = study.run_specs(part, tmp_path)
        learning_rates = len(part.learning_rates) or 1
        assert len(specs) == len(part.settings) * len(part.variants) * len(part.seeds) * learning_rates, name
        assert len({spec.name for spec in specs}) == len(specs), name
        for spec in specs:
            settings = overrides_of(spec)
            gradient, statistics_size = int(settings["batch.gradient"]), int(settings["batch.statistics"])
            if part.steps:
                assert (settings["train.steps"], settings["train.epochs"]) == (str(part.steps), "null")
            else:
                assert settings["train.epochs"] == str(part.epochs)  # the same examples at every setting
            if part.learning_rates:  # the default command's recipe: only these settings change
                assert float(settings["optim.lr"]) in part.learning_rates and "schedule" not in settings
                assert settings["model"] == part.model and "experiment" not in settings
            else:
                assert float(settings["optim.lr"]) == pytest.approx(0.1 * gradient / 64)
            assert settings["run_name"] == spec.name and settings["experiment_name"] == part.experiment
            if "normalizer.gain" in settings:
                assert float(settings["normalizer.gain"]) == (0.95 if statistics_size >= 32 else 0.1)
            if settings["normalizer"] == "brn":
                examples = part.steps * gradient if part.steps else part.epochs * study.TRAIN_EXAMPLES[part.data]
                assert int(settings["normalizer.relax_steps"]) == round(0.4 * examples / gradient)
    assert {v for p in ("g32_s2", "g16_s1_seed0") for v in study.PARTS[p].variants} >= set(study.ABLATIONS)
    for setting in ("g16_s1", "g8_s2", "fashion_baseline", "fashion_g16_s1", "fashion_g8_s2"):  # one seed a part
        assert sorted(seed for name, part in study.PARTS.items() if name.startswith(setting + "_")
                      for seed in part.seeds) == [0, 1, 2]


def test_the_training_set_sizes_the_study_assumes_are_the_data_sets_own() -> None:
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        fashion = compose("config", overrides=["experiment=study_fashion", "data=fashion_mnist"]).data
        assert fashion.train_size == study.TRAIN_EXAMPLES["fashion_mnist"]  # the files: tests/test_fashion_mnist.py
        for data in set(study.TRAIN_EXAMPLES) - {"fashion_mnist"}:
            options = compose("config", overrides=[f"data={data}"]).data
            extra = {k: v for k, v in options.items() if k not in ("name", "root", "download", "num_workers", "image_size")}
            assert len(build_datasets(options.name, image_size=options.image_size, **extra).train) == study.TRAIN_EXAMPLES[data]


def test_one_run_of_each_variant_composes_and_validates(tmp_path: Path) -> None:
    seen = set()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        for part in study.PARTS.values():
            for spec in study.run_specs(part, tmp_path):
                variant = spec.name.split("_", 2)[2].rsplit("_seed", 1)[0]
                if (variant, part.data, part.model) in seen:  # composing and validating takes ~1 s: once per variant
                    continue
                seen.add((variant, part.data, part.model))
                cfg = compose("config", overrides=list(spec.overrides))
                plan = validate(cfg).with_train_set(study.TRAIN_EXAMPLES[part.data])
                if part.steps:
                    assert plan.train_steps == part.steps and plan.train_epochs is None, spec.name
                else:
                    assert plan.train_epochs == part.epochs and plan.train_steps is None, spec.name
                assert plan.run_dir == tmp_path / part.experiment / spec.name
                if part.data == "fashion_mnist":
                    assert cfg.model.name == "preact_resnet" and cfg.data.train_size == study.TRAIN_EXAMPLES[part.data]
                    assert plan.eval_batch_size % plan.statistics_batch_size == 0
                else:
                    assert cfg.data.name == "digits" and cfg.model.name == part.model


def test_the_speed_rerun_is_g8_s2_seed0_as_configured_then(tmp_path: Path) -> None:
    """The same runs (names, overrides), in their own experiment; BKN without the later gain warm-up."""
    committed = {spec.name: spec.overrides for spec in study.run_specs(study.PARTS["g8_s2_seed0"], tmp_path)}
    rerun = {spec.name: spec.overrides for spec in study.run_specs(study.PARTS["speed_g8_s2_seed0"], tmp_path)}
    assert rerun.keys() == committed.keys()
    for name, overrides in rerun.items():
        expected = [o.replace("experiment_name=study", "experiment_name=study_speed") for o in committed[name]]
        if "_bkn" in name:
            gain = next(o for o in expected if o.startswith("normalizer.gain="))
            expected.insert(expected.index(gain), "normalizer.gain_warmup=0")
        assert list(overrides) == expected, name


def test_all_runs_the_digits_parts_and_fashion_all_the_fashion_grid() -> None:
    assert (set(study.DIGITS_PARTS) | set(study.FASHION_PARTS) | set(study.PEER_PARTS)
            | {"quick", "fashion_quick", "speed_g8_s2_seed0"} == set(study.PARTS))
    assert not set(study.DIGITS_PARTS) & set(study.FASHION_PARTS) and not set(study.FASHION_PARTS) & set(study.PEER_PARTS)
    grid = {(s, v, seed) for name in study.FASHION_PARTS for part in [study.PARTS[name]]
            for s in part.settings for v in part.variants for seed in part.seeds}
    assert len(grid) == 3 * len(study.FASHION) * 3  # 3 settings x the variants x 3 seeds, each once
    assert {part.settings[0] for name in study.FASHION_PARTS for part in [study.PARTS[name]]} == \
        {study.FASHION_LARGE, *study.FASHION_MICRO}


def test_fashion_peers_are_the_grids_recipe_with_frn_evonorm_and_cbn(tmp_path: Path) -> None:
    peers = {(s, v, seed) for name in study.PEER_PARTS for part in [study.PARTS[name]]
             for s in part.settings for v in part.variants for seed in part.seeds}
    assert len(peers) == 27 and {v for _, v, _ in peers} == {"frn", "evonorm_s0", "cbn"}
    for setting in ("baseline", "g16_s1", "g8_s2"):
        for seed in (0, 1, 2):
            grid = study.run_specs(study.PARTS[f"fashion_{setting}_seed{seed}"], tmp_path)
            bn = next(spec for spec in grid if spec.name.endswith(f"_bn_seed{seed}"))
            for spec in study.run_specs(study.PARTS[f"fashion_peers_{setting}_seed{seed}"], tmp_path):
                variant = spec.name.split("_", 2)[-1].rsplit("_seed", 1)[0]
                # the same recipe, experiment and seed as the grid's BN run: only the normalizer differs
                assert [o for o in spec.overrides if not o.startswith(("normalizer", "run_name"))] == \
                    [o for o in bn.overrides if not o.startswith(("normalizer", "run_name"))]
                assert f"normalizer={variant}" in spec.overrides


def test_finished_runs_are_skipped(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(study, "RECORDS", tmp_path / "records")
    part = study.PARTS["quick"]
    specs = study.run_specs(part, tmp_path.resolve())
    done = tmp_path / part.experiment / specs[0].name
    done.mkdir(parents=True)
    (done / "summary.json").write_text(json.dumps({"status": "finished"}))
    running = tmp_path / part.experiment / specs[1].name
    running.mkdir(parents=True)
    (running / "summary.json").write_text(json.dumps({"status": "running"}))
    study.main(["quick", "--runs-dir", str(tmp_path), "--dry-run"])
    out = capsys.readouterr().out
    assert f"{len(specs)} runs, 1 finished, {len(specs) - 1} to run" in out
    assert specs[0].name not in out and specs[1].name in out
    committed = tmp_path / "records" / part.experiment / specs[2].name  # a committed record counts too
    committed.mkdir(parents=True)
    (committed / "summary.json").write_text(json.dumps({"status": "finished"}))
    study.main(["quick", "--runs-dir", str(tmp_path), "--dry-run"])
    assert f"{len(specs)} runs, 2 finished, {len(specs) - 2} to run" in capsys.readouterr().out


def test_an_interrupted_invocation_still_logs_its_wall_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(study, "RECORDS", tmp_path / "records")
    specs = study.run_specs(study.PARTS["quick"], tmp_path.resolve())
    calls = []

    def train_then_interrupt(spec: study.RunSpec, logs: Path) -> tuple[str, int, float]:
        calls.append(spec.name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return spec.name, 0, 1.0

    monkeypatch.setattr(study, "train", train_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        study.main(["quick", "--runs-dir", str(tmp_path), "--workers", "1"])
    (line,) = (tmp_path / "logs" / "quick" / "wall_times.jsonl").read_text().splitlines()
    entry = json.loads(line)
    assert (entry["part"], entry["runs"], entry["interrupted_after_runs"]) == ("quick", len(specs), 1)
    assert entry["wall_s"] >= 0


def write_study_run(runs_dir: Path, experiment: str, setting: tuple[int, int], normalizer: dict, seed: int, *,
                    top1: float, losses: list[float], curve: list[tuple[int, float]], status: str = "finished",
                    batch_top1: float | None = None, learned: bool = True, wall_time_s: float = 60.0) -> None:
    """A run's record; ``top1``: its final top-1 with population statistics (with batch statistics
    ``batch_top1``, one point less if not given); ``curve``: its evaluations under both options."""
    variant = "-".join(str(value) for key, value in normalizer.items() if key in ("name", "transition", "state_from"))
    name = f"g{setting[0]}_s{setting[1]}_{variant}_seed{seed}"
    if normalizer["name"] == "bkn":  # as train.py's config holds it (records without it predate the warm-up)
        normalizer = {"gain_warmup": 100, **normalizer}
    directory = runs_dir / experiment / name
    directory.mkdir(parents=True)
    summary = {"experiment": experiment, "run": name, "status": status, "normalizer": normalizer["name"],
               "transition": normalizer.get("transition"), "gradient_batch_size": setting[0],
               "statistics_batch_size": setting[1], "per_device_batch_size": setting[0], "seed": seed,
               "learned": learned, "wall_time_s": wall_time_s, "final": {"population": {"top1": top1},
                                             "batch": {"top1": top1 - 1 if batch_top1 is None else batch_top1}}}
    (directory / "summary.json").write_text(json.dumps(summary))
    (directory / "config.yaml").write_text(yaml.safe_dump({"normalizer": normalizer, "seed": seed}))
    lines = [{"kind": "train", "step": 10 * (i + 1), "loss": loss} for i, loss in enumerate(losses)]
    lines += [{"kind": "eval", "step": step, "inference": inference, "top1": value}
              for step, value in curve for inference in ("population", "batch")]
    (directory / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def report(runs: Path, out: Path) -> None:
    study_report.main(["--runs-dir", str(runs), "--out-dir", str(out), "--no-checkpoints"])


def test_report_rows_final_loss_and_steps_to_the_baseline(tmp_path: Path) -> None:
    runs, out = tmp_path / "runs", tmp_path / "out"
    baseline = [98.0, 99.0]
    for seed, top1 in enumerate(baseline):
        write_study_run(runs, "study", (64, 64), {"name": "bn"}, seed, top1=top1, losses=[2.0] * 10 + [0.1] * 20,
                        curve=[(5, 50.0), (10, top1)])
    micro = {0: (90.0, [(20, 80.0), (40, 94.0), (60, 95.0)]), 1: (96.0, [(10, 93.5), (20, 93.6), (40, 96.0)])}
    falling = [3.0 * 0.8 ** i for i in range(20)]  # still falling by a third per tenth of the run: not flat
    for seed, (top1, curve) in micro.items():
        write_study_run(runs, "study", (16, 1), {"name": "bkn", "transition": "analytic"}, seed, top1=top1,
                        losses=falling, curve=curve)
    write_study_run(runs, "study", (16, 1), {"name": "bn"}, 0, top1=0.0, losses=[], curve=[], status="diverged")

    report(runs, out)
    saved = sorted(path.parent.name for path in (out / "records" / "study").glob("*/summary.json"))
    assert saved == ["g16_s1_bkn-analytic_seed0", "g16_s1_bkn-analytic_seed1", "g64_s64_bn_seed0",
                     "g64_s64_bn_seed1"]  # finished runs only
    for directory in runs.glob("study/g64*"):  # the committed records stand in for runs no longer here
        shutil.rmtree(directory)
    report(runs, out)

    lines = [line for line in (out / "study.md").read_text().splitlines() if line.startswith("| (")]
    cells = {tuple(c.strip() for c in line.strip("|").split("|")[:2]): [c.strip() for c in line.strip("|").split("|")]
             for line in lines}
    bn_baseline = cells["(64, 64)", "BN"]
    assert bn_baseline[3] == f"{statistics.fmean(baseline):.1f} ± {statistics.stdev(baseline):.1f}"
    half = 12.7062 * statistics.stdev(baseline) / 2 ** 0.5  # Student's t, 1 degree of freedom, 97.5%
    assert bn_baseline[4] == f"[{statistics.fmean(baseline) - half:.1f}, {statistics.fmean(baseline) + half:.1f}]"
    assert bn_baseline[7] == "0.100 ± 0.000" and bn_baseline[8] == "2/2"
    bkn = cells["(16, 1)", "BKN (analytic)"]
    assert bkn[3] == f"{statistics.fmean([90.0, 96.0]):.1f} ± {statistics.stdev([90.0, 96.0]):.1f}"
    assert bkn[7] == f"{statistics.fmean(falling[-2:]):.3f} ± 0.000" and bkn[8] == "0/2"
    assert cells["(16, 1)", "BN"][9] == "g16_s1_bn_seed0: diverged" and cells["(16, 1)", "BN"][3] == "—"

    threshold = 0.95 * statistics.fmean(baseline)  # 93.575: seed 0 reaches it at step 40, seed 1 at 20
    speed = [line for line in (out / "steps_to_baseline.md").read_text().splitlines() if line.startswith("| (16, 1) | BKN")]
    expected_steps = statistics.fmean([next(s for s, v in c if v >= threshold) for _, c in micro.values()])
    assert speed[0].split("|")[3].strip() == f"{expected_steps:.0f}"
    assert speed[0].split("|")[4].strip() == f"{expected_steps * 16:,.0f}"
    assert speed[0].split("|")[5].strip() == "2/2"


def test_a_rerun_is_set_beside_the_runs_it_repeats(tmp_path: Path) -> None:
    runs, out = tmp_path / "runs", tmp_path / "out"
    bkn = {"name": "bkn", "transition": "linear", "gain_warmup": 0}
    for seed, top1 in enumerate([98.0, 99.0, 99.5]):
        write_study_run(runs, "study", (8, 2), {"name": "bn"}, seed, top1=top1, losses=[0.1] * 20,
                        curve=[(1, top1)], wall_time_s=200.0)
    for seed, top1 in enumerate([97.0, 98.0]):
        write_study_run(runs, "study", (8, 2), bkn, seed, top1=top1, losses=[0.1] * 20, curve=[(1, top1)],
                        wall_time_s=400.0)
    write_study_run(runs, "study_speed", (8, 2), {"name": "bn"}, 0, top1=98.5, losses=[0.1] * 20,
                    curve=[(1, 98.5)], wall_time_s=100.0)
    write_study_run(runs, "study_speed", (8, 2), bkn, 0, top1=90.0, losses=[0.1] * 20, curve=[(1, 90.0)],
                    wall_time_s=300.0)

    report(runs, out)
    text = (out / "study_speed_against_study.md").read_text()
    assert table_row(text, "| g8_s2_bn_seed0 |") == ["g8_s2_bn_seed0", "98.0", "98.5", "98.0-99.5", "97.0", "97.5",
                                                     "97.0-98.5", "yes", "200", "100", "0.50"]
    assert table_row(text, "| g8_s2_bkn-linear_seed0 |")[1:8] == ["97.0", "90.0", "97.0-98.0", "96.0", "89.0",
                                                                  "96.0-97.0", "**no**"]
    assert "All runs: 10.0 min committed, 6.7 min rerun (0.67x), summed over runs." in text


@pytest.mark.parametrize("baseline, word", [(96.0, "NOT CONVERGED"), (98.5, "converged"), (None, "INCOMPLETE")])
def test_readme_first_line_says_whether_the_baseline_converged(tmp_path: Path, baseline, word) -> None:
    runs, out = tmp_path / "runs", tmp_path / "out"
    write_study_run(runs, "study", (32, 2), {"name": "gn"}, 0, top1=90.0, losses=[1.0] * 20, curve=[(1, 90.0)])
    if baseline is not None:
        write_study_run(runs, "study", (64, 64), {"name": "bn"}, 0, top1=baseline, losses=[1.0] * 20,
                        curve=[(1, baseline)])
    out.mkdir()
    (out / "README.md").write_text("Status: an old line\n\n# The CPU study\n\nWritten by hand.\n")
    logs = runs / "logs" / "quick"
    logs.mkdir(parents=True)
    (logs / "wall_times.jsonl").write_text(json.dumps({"part": "quick", "wall_s": 600.0}) + "\n")
    report(runs, out)
    shutil.rmtree(runs / "logs")  # a new machine: the committed records keep the wall time
    report(runs, out)
    first, *rest = (out / "README.md").read_text().splitlines()
    assert first.endswith("Wall time per part (records/wall_times.jsonl): quick 10 min.")
    assert first.startswith(f"Status: {word}")
    if baseline is not None:
        assert f"{baseline:.1f}%" in first
    assert rest == ["", "# The CPU study", "", "Written by hand."]
    (out / "README.md").write_text("# A README without a status line\n")
    report(runs, out)
    assert (out / "README.md").read_text().splitlines()[1:] == ["# A README without a status line"]
    assert "= B" in (out / "study.md").read_text()  # GN: options A and B are one thing


def test_initial_prior_fit_tells_input_from_output_states() -> None:
    """At initialization the ResNet's residual stream makes the input-state prior far too wide."""
    import prior_fit

    rows = {row["variant"]: row for row in prior_fit.initial_rows(batches=1, seeds=(0,))}
    assert set(rows) == {"bkn-analytic", "bkn-analytic-state_input", "bkn-monte_carlo", "bkn-monte_carlo-state_input"}
    for transition in ("analytic", "monte_carlo"):
        passed_input, passed_output = rows[f"bkn-{transition}-state_input"], rows[f"bkn-{transition}"]
        assert passed_input["highest"] > 10 * passed_output["highest"]
        assert passed_input["far"] > passed_output["far"]


def test_the_harder_digits_get_their_own_speed_table(tmp_path: Path) -> None:
    runs, out = tmp_path / "runs", tmp_path / "out"
    write_study_run(runs, "study_hard", (64, 64), {"name": "bn"}, 0, top1=90.0, losses=[0.5] * 20,
                    curve=[(5, 50.0), (10, 90.0)])
    write_study_run(runs, "study_hard", (32, 1), {"name": "gn"}, 0, top1=88.0, losses=[0.5] * 20,
                    curve=[(20, 80.0), (40, 86.0), (60, 88.0)])
    report(runs, out)
    assert not (out / "steps_to_baseline.md").exists()  # the main grid has no runs here
    rows = [line.split("|") for line in (out / "steps_to_baseline_hard.md").read_text().splitlines()
            if line.startswith("| (32, 1) | GN")]
    assert rows[0][3].strip() == "40"  # 95% of its own baseline, 85.5%: first reached at step 40


def write_robustness_run(runs_dir: Path, model: str, setting: tuple[int, int], lr: float, normalizer: dict,
                         seed: int, top1: tuple[float, float], learned: bool = True) -> None:
    variant = normalizer["name"] + (f"-{normalizer['transition']}" if "transition" in normalizer else "")
    directory = runs_dir / "study_robustness" / f"{model}_{setting}_{lr}_{variant}_{seed}"
    if normalizer["name"] == "bkn":  # as train.py's config holds it (records without it predate the warm-up)
        normalizer = {"gain_warmup": 100, **normalizer}
    directory.mkdir(parents=True)
    summary = {"experiment": "study_robustness", "run": directory.name, "status": "finished", "model": model,
               "normalizer": normalizer["name"], "transition": normalizer.get("transition"),
               "gradient_batch_size": setting[0], "statistics_batch_size": setting[1], "seed": seed,
               "learned": learned, "final": {"population": {"top1": top1[0]}, "batch": {"top1": top1[1]}}}
    (directory / "summary.json").write_text(json.dumps(summary))
    (directory / "config.yaml").write_text(yaml.safe_dump({"normalizer": normalizer, "optim": {"lr": lr}}))


def test_robustness_report_finds_the_largest_learning_rate_and_checks_the_default(tmp_path: Path) -> None:
    runs, linear = tmp_path / "runs", {"name": "bkn", "transition": "linear"}
    for seed in (0, 1):
        for lr, bn, bkn in ((0.1, (98.0, 91.0), (97.0, 96.5)), (0.4, (93.0, 90.0), (40.0, 12.0))):
            write_robustness_run(runs, "cifar_net", (16, 2), lr, {"name": "bn"}, seed, bn)
            write_robustness_run(runs, "cifar_net", (16, 2), lr, linear, seed, bkn, learned=lr < 0.4)
    report(runs, tmp_path / "out")
    text = (tmp_path / "out" / "study_robustness.md").read_text()
    assert "| (16, 2) | 0.4 | 93.0 / 90.0 (n=2) | 40.0 / 12.0* (n=2) |" in text  # * : did not learn
    assert "| cifar_net | (16, 2) | 0.4 | 0.1 |" in text  # BN trains up to 0.4, the BKN up to 0.1
    assert "| cifar_net | (16, 2) | 0.1 | 98.0 | 97.0 | yes |" in text
    assert "| cifar_net | (16, 2) | 0.4 | 93.0 | 40.0 | **no** |" in text
    assert (tmp_path / "out" / "study_robustness.png").stat().st_size > 0


T_975 = {2: 4.302653}  # Student's t, 97.5% quantile, by degrees of freedom (a printed table's value)
AUTHORS_BKN = {"name": "bkn", "transition": "monte_carlo", "state_from": "input"}
FASHION_NORMALIZERS = {"bn": {"name": "bn"}, "brn": {"name": "brn"}, "gn": {"name": "gn"},
                       "bkn-linear": {"name": "bkn", "transition": "linear"}, "bkn-monte_carlo-state_input": AUTHORS_BKN}
FASHION_MICRO = ((16, 1), (8, 2))
SEED_OFFSETS = (-0.3, 0.0, 0.3)  # three seeds: std 0.3, 95% interval mean ± 0.75


def write_fashion_cell(runs: Path, setting: tuple[int, int], variant: str, population: float, batch: float,
                       reached_at: int | None) -> None:
    """Three seeds of one cell of study_fashion, evaluated at steps 100, 200 and 300: at 50% before
    ``reached_at``, at 95% from it on (None: never)."""
    curve = [(step, 95.0 if reached_at is not None and step >= reached_at else 50.0) for step in (100, 200, 300)]
    for seed, offset in enumerate(SEED_OFFSETS):
        write_study_run(runs, "study_fashion", setting, FASHION_NORMALIZERS[variant], seed, top1=population + offset,
                        batch_top1=batch + offset, losses=[1.0] * 20, curve=curve)


def write_fashion_grid(runs: Path, bkn_ahead: bool) -> None:
    """The BN baseline at 91% (threshold 86.45%) and, at both micro-batch settings, every normalizer:
    BKN far ahead of BN and BRN (higher top-1, options closer, faster), or, with ``bkn_ahead`` false,
    far behind (the numbers swapped). GN at 85% between them."""
    ahead, behind = (90.0, 89.5, 100), (60.0, 85.0, None)  # B, A, first evaluation at 95%
    for variant in FASHION_NORMALIZERS:
        write_fashion_cell(runs, (128, 128), variant, 91.0, 90.0, 100)
    for setting in FASHION_MICRO:
        write_fashion_cell(runs, setting, "gn", 85.0, 85.0, 200)
        for variant in ("bn", "brn", "bkn-linear", "bkn-monte_carlo-state_input"):
            is_bkn = variant.startswith("bkn")
            write_fashion_cell(runs, setting, variant, *(ahead if is_bkn == bkn_ahead else behind))


def sections(text: str) -> dict[str, str]:
    """A markdown file's sections by the first word of their ``##`` heading."""
    return {part.split()[0]: part for part in text.split("\n## ")[1:]}


def table_row(text: str, start: str) -> list[str]:
    return next([cell.strip() for cell in line.strip("|").split("|")] for line in text.splitlines()
                if line.startswith(start))


def test_fashion_report_writes_its_tables_with_confidence_intervals(tmp_path: Path) -> None:
    runs, out = tmp_path / "runs", tmp_path / "out"
    report(runs, out)
    assert not list(out.glob("study_fashion*"))  # no runs yet: nothing written, no crash
    write_fashion_grid(runs, bkn_ahead=True)
    write_study_run(runs, "study_fashion", (8, 2), {"name": "bn"}, 3, top1=10.0, losses=[2.3] * 20,
                    curve=[(100, 10.0)], learned=False)
    report(runs, out)
    assert {path.name for path in out.glob("study_fashion*")} == {
        "study_fashion.md", "study_fashion.csv", "study_fashion.png", "study_fashion_final.png",
        "study_fashion_steps_to_baseline.md", "study_fashion_claims.md"}  # the Fig. 8 analogue needs checkpoints
    assert not (out / "steps_to_baseline.md").exists()  # the digits' own files are not touched

    text = (out / "study_fashion.md").read_text()
    assert "Top-1 on the 10,000 test images" in text
    row = table_row(text, "| (16, 1) | BKN (linear) |")
    population = [90.0 + offset for offset in SEED_OFFSETS]
    half = T_975[2] * statistics.stdev(population) / 3 ** 0.5
    assert row[3] == f"{statistics.fmean(population):.1f} ± {statistics.stdev(population):.1f}"
    assert row[4] == f"[{statistics.fmean(population) - half:.1f}, {statistics.fmean(population) + half:.1f}]"
    assert row[6] == f"[{89.5 - half:.1f}, {89.5 + half:.1f}]"
    assert table_row(text, "| (8, 2) | BN |")[9] == "g8_s2_bn_seed3: finished, did not learn"
    assert table_row(text, "| (8, 2) | GN |")[5:7] == ["= B", "= B"]

    speed = (out / "study_fashion_steps_to_baseline.md").read_text()
    assert "baseline (128, 128) reaches 91.0%" in speed and "one every 3 epochs" in speed
    assert table_row(speed, "| (16, 1) | BKN (linear) |")[2:5] == ["100", "1,600", "3/3"]

    claims = (out / "study_fashion_claims.md").read_text()
    references = sections(claims)["Beside"]
    assert "| BN at (128, 128), B | 91.0 [90.3, 91.7] | ours: the baseline |" in references
    for network, top1 in (("2 Conv+pooling+BN", "93.4"), ("ResNet18", "94.9"), ("WRN-28-10", "95.9")):
        assert f"| {network} | {top1} | theirs: a contributor's, in the data set's README" in references


@pytest.mark.parametrize("bkn_ahead", [True, False])
def test_fashion_claims_verdicts_follow_the_numbers(tmp_path: Path, bkn_ahead: bool) -> None:
    write_fashion_grid(tmp_path / "runs", bkn_ahead)
    runs = load_local(tmp_path / "runs", ["study_fashion"])
    gaps = {run.name: (0.1, 0.05) if run.variant.startswith("bkn") == bkn_ahead else (0.3, 0.15) for run in runs
            if run.variant in ("bn", "bkn-linear", "bkn-monte_carlo-state_input")}
    write_claims("study_fashion", runs, 91.0, gaps, tmp_path)
    claims = sections((tmp_path / "study_fashion_claims.md").read_text())

    overall, row = ("holds", "better") if bkn_ahead else ("not shown", "worse")
    for claim, n in (("(a)", 16), ("(b)", 16), ("(c)", 12)):  # (c): the A-B gap and two variance gaps
        better, worse = (n, 0) if bkn_ahead else (0, n)
        assert (f"**Verdict: {overall}** ({n} comparisons: better in {better}, level in 0, worse in {worse}, "
                "undecided in 0).") in claims[claim]
    assert table_row(claims["(a)"], "| (8, 2) | BKN (monte_carlo, state_input) | BRN |")[5:9:3] == [f"**{row}**"] * 2
    assert table_row(claims["(b)"], "| (16, 1) | BKN (linear) | BN |")[3:6] == (
        ["100 [100, 100]", "— (0/3)", "**better**"] if bkn_ahead else ["— (0/3)", "100 [100, 100]", "**worse**"])
    assert table_row(claims["(c)"], "| (16, 1) | BKN (linear) | BN |")[5] == f"**{row}**"
    fig8 = claims["(c)"].split("The Fig. 8 analogue")[-1]
    small, large = "0.100 [0.100, 0.100]", "0.300 [0.300, 0.300]"
    small_relative, large_relative = "0.050 [0.050, 0.050]", "0.150 [0.150, 0.150]"
    expected = ([small, large, "**better**", small_relative, large_relative, "**better**"] if bkn_ahead
                else [large, small, "**worse**", large_relative, small_relative, "**worse**"])  # its gaps, BN's
    assert table_row(fig8, "| (8, 2) | BKN (linear) | BN |")[3:] == expected
    # GN at 85% beats whoever is at 60% with population statistics (B), and is level with their 85% with A.
    losers = ("BN", "BRN") if bkn_ahead else ("BKN (linear)", "BKN (monte_carlo, state_input)")
    wins = "; ".join(f"{loser} at {setting} with B" for setting in FASHION_MICRO for loser in losers)
    assert f"GN is better than {wins}." in claims["Where"]


def test_the_final_top1_figure_zooms_on_the_close_cells_and_leaves_a_collapse_below() -> None:
    collapsed, best, close = [22.0, 21.0], [91.0, 91.4, 91.2], [88.0, 88.6]
    low, high = figures.zoomed_range([collapsed, best, close])
    two_seed_interval = 88.3 + 12.706 * statistics.stdev(close) / 2 ** 0.5  # t(0.975, 1 dof) = 12.706
    assert low == pytest.approx(88.3 - (two_seed_interval - 88.3) - 0.5, abs=0.01)  # the close cell's interval
    assert high == pytest.approx(two_seed_interval + 0.5, abs=0.01)  # above the best seed (91.4): the interval
    assert low > max(collapsed)  # BN's collapse is drawn at the bottom edge, not on the axis
    low, high = figures.zoomed_range([[99.8, 99.9, 99.7], [99.0, 99.5, 99.2]])
    assert high == 100.0  # never above 100, though the interval's bound is
    wide = figures.zoomed_range([[91.0, 91.2, 91.4], [70.0, 95.0]])  # mean 82.5: in, its interval clipped
    assert wide[0] == pytest.approx(91.2 - figures.ZOOM_POINTS - 0.5)


def test_overlapping_intervals_are_level_however_far_apart_the_means() -> None:
    ours = [90.0, 91.0, 92.0]  # mean 91, 95% interval 91 ± 4.30 / sqrt(3) = [88.52, 93.48]
    assert intervals.verdict(ours, [86.0, 87.0, 88.0]) == "level"  # [84.52, 89.48]: 4 points, inside the spread
    assert intervals.verdict(ours, [84.0, 85.0, 86.0]) == "better"  # [82.52, 87.48]
    assert intervals.verdict([84.0, 85.0, 86.0], ours) == "worse"
    assert intervals.verdict(ours, [84.0, 85.0, 86.0], higher_is_better=False) == "worse"
    assert intervals.verdict([91.0], [50.0, 51.0]) == "undecided"  # one seed: no interval


def test_steps_verdict_compares_like_with_like() -> None:
    never = [None, None, None]
    assert intervals.speed_verdict([300, 300, 300], [600, 600, 600]) == "better"
    assert intervals.speed_verdict([300, 300, 300], never) == "better"
    assert intervals.speed_verdict(never, [600, 600, 600]) == "worse"
    assert intervals.speed_verdict([300, None, 300], never) == "undecided"  # a seed of ours never got there
    assert intervals.speed_verdict([300], [None]) == "undecided"


def test_fashion_claims_without_a_baseline_say_what_is_missing(tmp_path: Path) -> None:
    for setting in FASHION_MICRO:
        for variant in ("bn", "bkn-linear"):
            write_fashion_cell(tmp_path / "runs", setting, variant, 80.0, 80.0, None)
    report(tmp_path / "runs", tmp_path / "out")
    claims = sections((tmp_path / "out" / "study_fashion_claims.md").read_text())
    assert "Not testable yet: the BN baseline (128, 128) has not finished." in claims["(b)"]
    assert "**Verdict: not shown** (4 comparisons: better in 0, level in 4," in claims["(a)"]  # no BRN, no authors' BKN
    assert "was not measured here: it needs the runs' checkpoints" in claims["(c)"]
    assert not (tmp_path / "out" / "study_fashion_steps_to_baseline.md").exists()


def test_where_gn_wins_says_when_nothing_is_decided_yet(tmp_path: Path) -> None:
    """With one seed a side no comparison has an interval: the claims say so, not that GN never wins."""
    for variant, top1 in (("gn", 85.0), ("bn", 60.0)):
        write_study_run(tmp_path / "runs", "study_fashion", (16, 1), FASHION_NORMALIZERS[variant], 0, top1=top1,
                        batch_top1=top1, losses=[1.0] * 20, curve=[(100, top1)])
    runs = load_local(tmp_path / "runs", ["study_fashion"])
    write_claims("study_fashion", runs, None, {}, tmp_path)
    where = sections((tmp_path / "study_fashion_claims.md").read_text())["Where"]
    assert "no comparison is decided yet" in where and "better than none" not in where


def test_fashion_fig8_analogue_compares_the_default_and_the_authors_bkn_with_bn(tmp_path: Path, monkeypatch) -> None:
    """The measured gaps (here faked: no trained network) of every seed go to the grid's own files and
    to claim (c), with an interval over the seeds; a seed without a measurement is left out and counted."""
    write_fashion_grid(tmp_path / "runs", bkn_ahead=True)
    runs = load_local(tmp_path / "runs", ["study_fashion"])

    def measure(run, layer, batches, device) -> SimpleNamespace:
        gap = (0.1 if run.variant.startswith("bkn") else 0.3) + 0.01 * run.summary["seed"]
        return SimpleNamespace(run=run, layer="blocks.2.conv1.norm", normalizing=torch.full((4, batches), gap),
                               sample=torch.full((4, batches), gap), moving=torch.full((4,), 2.0))

    monkeypatch.setattr(variance_gap, "measure", measure)
    monkeypatch.setattr(variance_gap, "plot", lambda gaps, title, path: path.write_text(
        " ".join(f"{variant}:{gap.run.summary['seed']}" for variant, gap in gaps.items())))
    gaps = variance_gap.write_variance_gap("study_fashion", runs, tmp_path)
    expected = {run.name: (0.1 if run.variant.startswith("bkn") else 0.3) + 0.01 * run.summary["seed"]
                for run in runs if run.variant in ("bn", "bkn-linear", "bkn-monte_carlo-state_input")}
    assert gaps == {name: (pytest.approx(gap), pytest.approx(gap / 2)) for name, gap in expected.items()}
    assert set((tmp_path / "study_fashion_variance_gap_g8_s2.png").read_text().split()) == {
        "bn:0", "bkn-linear:0", "bkn-monte_carlo-state_input:0"}  # the heat map: each one's lowest seed
    half = T_975[2] * 0.01 / 3 ** 0.5  # seeds 0.11, 0.12, 0.13 (BKN): std 0.01
    row = table_row((tmp_path / "study_fashion_variance_gap.md").read_text(), "| (8, 2) | BKN (monte_carlo, state_input) |")
    assert row[2:6] == ["`blocks.2.conv1.norm`", "0, 1, 2", "0.1, 0.11, 0.12", f"0.11 [{0.11 - half:.4g}, {0.11 + half:.4g}]"]

    del gaps[next(name for name in gaps if name.startswith("g16_s1_bn_"))]  # a BN seed not measured
    write_claims("study_fashion", runs, 91.0, gaps, tmp_path)
    fig8 = sections((tmp_path / "study_fashion_claims.md").read_text())["(c)"].split("The Fig. 8 analogue")[-1]
    assert table_row(fig8, "| (8, 2) | BKN (monte_carlo, state_input) | BN |")[3:6] == [
        f"0.110 [{0.11 - half:.3f}, {0.11 + half:.3f}]", f"0.310 [{0.31 - half:.3f}, {0.31 + half:.3f}]", "**better**"]
    assert table_row(fig8, "| (8, 2) | BKN (monte_carlo, state_input) | BN |")[6] == (  # relative: moving variance 2
        f"0.055 [{0.055 - half / 2:.3f}, {0.055 + half / 2:.3f}]")
    assert table_row(fig8, "| (16, 1) | BKN (linear) | BN |")[4] .endswith("(2/3)")  # judged on the two measured


def test_the_status_line_says_how_far_the_fashion_grid_has_run(tmp_path: Path) -> None:
    runs, out = tmp_path / "runs", tmp_path / "out"
    write_fashion_cell(runs, (16, 1), "gn", 85.0, 85.0, 200)  # 3 runs, no baseline yet
    report(runs, out)
    first = (out / "README.md").read_text().splitlines()[0]
    assert "Fashion-MNIST: 3 of 45 runs finished; its BN baseline (128, 128) has not finished." in first
    write_study_run(runs, "study_fashion", (128, 128), {"name": "bn"}, 0, top1=90.5, losses=[1.0] * 20,
                    curve=[(1, 90.5)])
    report(runs, out)
    first = (out / "README.md").read_text().splitlines()[0]
    assert ("Fashion-MNIST: 4 of 45 runs finished; its BN baseline (128, 128) reaches 90.5% top-1 (population "
            "statistics, 1 of 3 seeds; below the 91% required).") in first


def test_a_runs_fig8_gaps_are_measured_once_and_kept_with_its_record(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    runs, records = tmp_path / "runs", tmp_path / "records"
    write_study_run(runs, "study_fashion", (16, 1), {"name": "bn"}, 0, top1=90.0, losses=[1.0] * 20, curve=[(1, 90.0)])
    (run,) = load_runs(runs, records, "study_fashion")
    assert not variance_gap.has_gaps(run, measure_checkpoints=True)  # no checkpoint, nothing saved
    checkpoint = checkpoint_path(run.directory)
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.write_bytes(b"")
    assert variance_gap.has_gaps(run, measure_checkpoints=True) and not variance_gap.has_gaps(run, False)
    measured = []

    def measure(run, layer, batches, device):
        measured.append(run.name)
        return variance_gap.Gaps(run, "stage3.0.norm2", torch.rand(4, 3), torch.rand(4, 3), torch.rand(4))

    monkeypatch.setattr(variance_gap, "measure", measure)
    first, again = variance_gap.run_gaps(run), variance_gap.run_gaps(run)
    assert measured == [run.name]  # the second time from variance_gap.json
    assert again.layer == first.layer
    for key in ("normalizing", "sample", "moving"):
        torch.testing.assert_close(getattr(again, key), getattr(first, key))
    save_records([run], records)
    (saved,) = load_runs(tmp_path / "no_runs", records, "study_fashion")
    assert variance_gap.has_gaps(saved, measure_checkpoints=False)  # a new machine: the record has them


def test_a_cells_seeds_come_in_the_same_order_from_the_runs_dir_and_from_the_records(tmp_path: Path) -> None:
    """A report written while some seeds still lie in the runs dir lists them as one from the records alone."""
    runs, records = tmp_path / "runs", tmp_path / "records"
    for seed in range(3):
        write_study_run(runs, "study_fashion", (16, 1), {"name": "bn"}, seed, top1=90.0, losses=[1.0] * 20,
                        curve=[(1, 90.0)])
    save_records(load_runs(runs, records, "study_fashion"), records)
    for seed in (0, 1):  # seeds 0 and 1 only committed, seed 2 still in the runs dir
        shutil.rmtree(runs / "study_fashion" / f"g16_s1_bn_seed{seed}")
    mixed = [run.summary["seed"] for run in load_runs(runs, records, "study_fashion")]
    alone = [run.summary["seed"] for run in load_runs(tmp_path / "no_runs", records, "study_fashion")]
    assert mixed == alone == [0, 1, 2]


def test_a_new_normalizer_is_one_entry_of_the_list_every_table_reads(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A per-example normalizer added to NORMALIZERS after GN: its own rows in that place, option A
    shown as B, and named where the table says which normalizers' options are one."""
    runs, out = tmp_path / "runs", tmp_path / "out"
    added = normalizers.Normalizer("pen", "PEN", per_example=True)
    monkeypatch.setattr(normalizers, "NORMALIZERS", (*normalizers.NORMALIZERS[:3], added, *normalizers.NORMALIZERS[3:]))
    for variant in ({"name": "bkn", "transition": "linear"}, {"name": "pen"}, {"name": "bn"}):
        write_study_run(runs, "study_quick", (32, 2), variant, 0, top1=80.0, batch_top1=20.0, losses=[1.0] * 20,
                        curve=[(1, 80.0)])
    report(runs, out)
    text = (out / "study_quick.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| (32, 2)")]
    assert [row.split("|")[2].strip() for row in rows] == ["BN", "PEN", "BKN (linear)"]
    assert [cell.strip() for cell in rows[1].split("|")[4:8:2]] == ["80.0", "= B"]  # B, then A: "= B"
    assert rows[0].split("|")[6].strip() == "20.0"  # BN's own option A
    assert "GN and PEN have per-example statistics, so their A is their B" in text


def test_a_run_of_a_normalizer_the_report_does_not_know_gets_one_line_naming_the_list(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs, out = tmp_path / "runs", tmp_path / "out"
    write_study_run(runs, "study", (64, 64), {"name": "bn"}, 0, top1=98.0, losses=[1.0] * 20, curve=[(1, 98.0)])
    write_study_run(runs, "study_quick", (32, 2), {"name": "no_such_norm"}, 0, top1=80.0, losses=[1.0] * 20,
                    curve=[(1, 80.0)])
    with pytest.raises(SystemExit) as stopped:
        report(runs, out)
    assert stopped.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: the study's report does not know the normalizer 'no_such_norm' (run variant 'no_such_norm'): "
        "add it to NORMALIZERS in scripts/study_results/normalizers.py"]
    assert not any(out.iterdir())  # stopped before writing anything


def committed_numbers(paths: list[Path]) -> list[float]:
    return [float(number) for path in paths for number in re.findall(r"\d+\.\d+", path.read_text())]


@pytest.mark.parametrize("readme, start, end", [
    ("results/study/README.md", "\n## Fashion-MNIST", "\n## Digits"),
    ("README.md", "\n*Fashion-MNIST*", "\n*Digits*"),
])
def test_every_fashion_number_in_the_readmes_is_in_the_committed_tables(readme: str, start: str, end: str) -> None:
    """The Fashion-MNIST paragraphs are written by hand from the generated tables: each decimal they
    give (an accuracy, a spread, a gap) must be a committed table's number at the precision shown, or
    an accuracy of the design's trials in scripts/study.py (the same number there, followed by %), so
    that the text cannot drift from the records."""
    text = (ROOT / readme).read_text()
    section = text[text.index(start):text.index(end)]
    tables = committed_numbers(sorted((ROOT / "results" / "study").glob("study_fashion*.md")))
    trials = re.findall(r"(?<![\d.])(\d+\.\d+)%", (ROOT / "scripts" / "study.py").read_text())
    for shown in re.findall(r"\d+\.\d+", section):
        half_step = 0.5 * 10 ** -len(shown.split(".")[1]) + 1e-9
        assert any(abs(float(shown) - number) <= half_step for number in tables) or shown in trials, \
            f"{readme}: {shown} is in no committed Fashion-MNIST table (results/study/study_fashion*.md)"
