"""scripts/aggregate.py and scripts/plots.py on run records this test writes itself.

The records are fake but in train.py's format (docs/run-records.md); each test computes what the
table must hold from the values it wrote, and checks the paper's numbers come from PAPER_REFERENCE.
"""

from __future__ import annotations

import csv
import json
import statistics
import sys
from pathlib import Path

import matplotlib.image
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from bkn.data import build_datasets
from bkn.models import build_model
import bkn.config
from bkn.nn import KalmanNorm2d, set_inference

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))

import aggregate  # noqa: E402  (scripts/ is not a package)
import fig8_statistics  # noqa: E402
import prior_fit  # noqa: E402
from run_records import load_local  # noqa: E402


def write_run(runs_dir: Path, experiment: str, model: str, normalizer: str, seed: int, *,
              setting: tuple[int, int] = (256, 32), per_device: int = 32, top1: dict[str, float] | None = None,
              curve: list[tuple[int, float]] = (), status: str = "finished", config: dict | None = None,
              variant: str = "", **summary_fields) -> Path:
    """A run folder as train.py writes it; ``top1`` maps inference option to the final top-1."""
    name = f"{model}{variant}-{normalizer}-g{setting[0]}-s{setting[1]}-seed{seed}"
    directory = runs_dir / experiment / name
    directory.mkdir(parents=True)
    top1 = top1 or {}
    summary = {
        "experiment": experiment, "run": name, "status": status, "model": model, "normalizer": normalizer,
        "transition": "analytic" if normalizer == "bkn" else None, "gradient_batch_size": setting[0],
        "statistics_batch_size": setting[1], "per_device_batch_size": per_device, "world_size": 1,
        "accumulation": setting[0] // per_device, "data": "synthetic", "seed": seed, "steps": 100, "step": 100,
        "final": {inference: {"top1": value, "top5": 100.0, "loss": 1.0} for inference, value in top1.items()},
        "examples_per_s": 100.0, "wall_time_s": 1.0, "num_parameters": 1000, "versions": {}, **summary_fields,
    }
    (directory / "summary.json").write_text(json.dumps(summary))
    (directory / "config.yaml").write_text(yaml.safe_dump(config or {"model": {"name": model}, "seed": seed}))
    lines = [{"kind": "train", "step": step, "epoch": 0, "loss": 1.0, "lr": 0.1, "examples_per_s": 100.0,
              "skipped_steps": 0} for step, _ in curve]
    lines += [{"kind": "eval", "step": step, "inference": inference, "top1": value, "top5": 100.0, "loss": 1.0,
               "examples": 256} for step, value in curve for inference in ("population", "batch")]
    (directory / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return directory


def read_csv(path: Path) -> dict[tuple[str, str], dict[str, str]]:
    with open(path) as handle:
        return {(line["row"], line["metric"]): line for line in csv.DictReader(handle)}


def markdown_rows(path: Path) -> dict[str, dict[str, str]]:
    """The Markdown table of ``path`` as {row label: {column header: text}}."""
    lines = [line for line in path.read_text().splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]
    return {cells[0]: dict(zip(header, cells)) for cells in rows}


def test_table_shows_our_mean_and_the_papers_number_in_separate_columns(tmp_path: Path) -> None:
    runs, out = tmp_path / "runs", tmp_path / "out"
    bn_top1, bkn_top1 = [41.0, 43.5], [47.25, 44.0, 45.5]
    for seed, value in enumerate(bn_top1):
        write_run(runs, "table1", "inception_v2", "bn", seed, top1={"population": value})
    for seed, value in enumerate(bkn_top1):
        write_run(runs, "table1", "inception_v2", "bkn", seed, top1={"population": value})
    write_run(runs, "table1", "resnet101", "bkn", 0, status="running")

    aggregate.main(["table1", "--runs-dir", str(runs), "--out-dir", str(out), "--scale", "smoke"])

    table = read_csv(out / "table1.csv")
    bn = table["inception_v2/bn", "top1_population"]
    assert float(bn["ours_mean"]) == pytest.approx(statistics.fmean(bn_top1))
    assert float(bn["ours_std"]) == pytest.approx(statistics.stdev(bn_top1))
    assert bn["ours_seeds"] == "2"
    assert float(bn["paper"]) == aggregate.PAPER_REFERENCE["table1"]["inception_v2/bn"]["top1_population"]
    gap = table["inception_v2/bkn-bn", "top1_population"]
    assert float(gap["ours_mean"]) == pytest.approx(statistics.fmean(bkn_top1) - statistics.fmean(bn_top1))

    # No record: missing; a record of a run that has not finished: its status. Never a number.
    missing = table["resnet101/bn", "top1_population"]
    assert (missing["ours_mean"], missing["ours_status"]) == ("", "missing")
    assert float(missing["paper"]) == aggregate.PAPER_REFERENCE["table1"]["resnet101/bn"]["top1_population"]
    assert table["resnet101/bkn", "top1_population"]["ours_status"] == "running"

    markdown = markdown_rows(out / "table1.md")
    ours, paper = "top-1 % (population stats, option B) — ours", "top-1 % (population stats, option B) — paper"
    assert markdown["InceptionV2 + BN"][ours].startswith(f"{statistics.fmean(bn_top1):.2f} ± ")
    assert markdown["InceptionV2 + BN"][paper] == "73.10"
    assert markdown["ResNet101 + BN"][ours] == "missing"
    assert markdown["ResNet101 + BN"][paper] == "77.40"
    assert markdown["ResNet101 + BKN"][ours] == "running"
    assert "not the paper's experiment" in (out / "table1.md").read_text()


def test_steps_to_reach_bn_top1_reads_the_first_evaluation_at_or_above_it(tmp_path: Path) -> None:
    runs, out = tmp_path / "runs", tmp_path / "out"
    bn_curve = [(10, 20.0), (20, 30.0), (30, 40.0)]
    bkn_curve = [(10, 25.0), (20, 41.0), (30, 45.0)]
    write_run(runs, "table1", "inception_v2", "bn", 0, top1={"population": 40.0}, curve=bn_curve)
    write_run(runs, "table1", "inception_v2", "bkn", 0, top1={"population": 45.0}, curve=bkn_curve)

    aggregate.main(["table1", "--runs-dir", str(runs), "--out-dir", str(out)])

    table = read_csv(out / "table1.csv")
    expected = {"bn": next(s for s, v in bn_curve if v >= 40.0), "bkn": next(s for s, v in bkn_curve if v >= 40.0)}
    for normalizer, step in expected.items():
        assert float(table[f"inception_v2/{normalizer}", "steps_to_bn_top1"]["ours_mean"]) == step
    ratio = table["inception_v2/bkn/bn", "steps_to_bn_top1"]
    assert float(ratio["ours_mean"]) == pytest.approx(expected["bkn"] / expected["bn"])


def test_figure_reads_table1_baselines_and_draws_a_png(tmp_path: Path) -> None:
    runs, out = tmp_path / "runs", tmp_path / "out"
    curve = [(5, 10.0), (10, 20.0)]
    for normalizer in ("bn", "brn", "bkn"):
        for seed in (0, 1):
            write_run(runs, "fig3", "inception_v2", normalizer, seed, setting=(256, 4), top1={"population": 20.0},
                      curve=curve)
    write_run(runs, "table1", "inception_v2", "bn", 0, top1={"population": 33.0}, curve=curve)

    aggregate.main(["fig3", "--runs-dir", str(runs), "--out-dir", str(out)])

    table = read_csv(out / "fig3.csv")
    baseline = table["inception_v2/baseline", "top1_population"]
    assert (float(baseline["ours_mean"]), baseline["setting_ours"]) == (33.0, "(256, 32)")
    assert table["inception_v2/bkn", "top1_population"]["setting_ours"] == "(256, 4)"
    assert table["resnet101/bkn", "top1_population"]["ours_status"] == "missing"
    image = matplotlib.image.imread(out / "fig3.png")
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_fig4_reports_both_inference_options(tmp_path: Path) -> None:
    runs, out = tmp_path / "runs", tmp_path / "out"
    finals = {"bn": (30.0, 5.0), "brn": (31.0, 6.0), "bkn": (33.0, 4.0)}
    for normalizer, (batch, population) in finals.items():
        write_run(runs, "fig4", "inception_v2", normalizer, 0, setting=(256, 1), per_device=32,
                  top1={"batch": batch, "population": population}, curve=[(1, 1.0)])

    aggregate.main(["fig4", "--runs-dir", str(runs), "--out-dir", str(out)])

    table = read_csv(out / "fig4.csv")
    for normalizer, (batch, population) in finals.items():
        assert float(table[f"inception_v2/{normalizer}", "top1_batch"]["ours_mean"]) == batch
        assert float(table[f"inception_v2/{normalizer}", "top1_population"]["ours_mean"]) == population
    gap = table["inception_v2/bkn-brn", "top1_batch"]
    assert float(gap["ours_mean"]) == pytest.approx(finals["bkn"][0] - finals["brn"][0])
    assert float(gap["paper"]) == aggregate.PAPER_REFERENCE["fig4"]["inception_v2/bkn-brn"]["top1_batch"]
    assert (out / "fig4.png").exists()


def test_table3_separates_micro_baseline_widened_and_classes(tmp_path: Path) -> None:
    runs, out = tmp_path / "runs", tmp_path / "out"

    def cifar_run(normalizer: str, classes: int, setting: tuple[int, int], top1: float, width: float = 1.0) -> None:
        config = {"data": {"name": "synthetic", "num_classes": classes}, "model": {"name": "cifar_net",
                                                                                    "width": width}}
        write_run(runs, "table3", "cifar_net", normalizer, 0, setting=setting, per_device=setting[0],
                  top1={"batch": top1, "population": top1 - 1}, config=config, variant=f"-c{classes}-w{width}")

    cifar_run("bn", 10, (32, 2), 50.0)
    cifar_run("bkn", 10, (32, 2), 55.0)
    cifar_run("bn", 10, (32, 2), 52.0, width=1.25)
    cifar_run("bn", 10, (32, 32), 60.0)
    cifar_run("bkn", 100, (32, 2), 20.0)
    aggregate.main(["table3", "--runs-dir", str(runs), "--out-dir", str(out)])

    table = read_csv(out / "table3.csv")
    expected = {"cifar10/bn": 50.0, "cifar10/bkn": 55.0, "cifar10/bn_widened": 52.0, "cifar10/baseline": 60.0,
                "cifar100/bkn": 20.0}
    for row, top1 in expected.items():
        assert float(table[row, "top1_batch"]["ours_mean"]) == top1, row
    assert table["cifar100/bn", "top1_batch"]["ours_status"] == "missing"


def test_a_torn_last_metrics_line_is_skipped_and_a_corrupt_one_raises(tmp_path: Path) -> None:
    directory = write_run(tmp_path, "fig7", "resnet101", "bkn", 0, setting=(8, 2), curve=[(1, 5.0), (2, 6.0)])
    metrics = directory / "metrics.jsonl"
    with open(metrics, "a") as handle:
        handle.write('{"kind": "eval", "st')
    (run,) = load_local(tmp_path, ["fig7"])
    assert run.curve("batch") == [(1, 5.0), (2, 6.0)]
    metrics.write_text('{"kind": "eval", "st\n' + metrics.read_text())
    with pytest.raises(ValueError, match="metrics.jsonl:1 is not JSON"):
        load_local(tmp_path, ["fig7"])


def test_unknown_id_is_one_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        aggregate.main(["table9"])
    assert "unknown id 'table9'" in capsys.readouterr().err


class FakeWandbRun:
    """What ``wandb.Api().runs()`` yields, holding what train.py logs (docs/run-records.md)."""

    def __init__(self, normalizer: str, curve: list[tuple[int, float]]) -> None:
        self.name = f"inception_v2_{normalizer}_g256_s1_seed0"
        self.state = "finished"
        self.config = {"experiment_name": "fig4", "run_name": self.name, "seed": 0, "model": {"name": "inception_v2"},
                       "normalizer": {"name": normalizer}, "data": {"name": "imagenet"},
                       "batch": {"gradient": 256, "statistics": 1, "per_device": 32}}
        self.history = [{"_step": step, **{f"eval_{inference}/{metric}": value for inference in ("batch", "population")
                                           for metric in ("top1", "top5", "loss")}} for step, value in curve]
        self.history.insert(1, {"_step": 1, "train/loss": 2.0})  # a train row: no eval keys
        self.summary = {"status": "finished", "_runtime": 5, **self.history[-1]}

    def scan_history(self, keys: list[str]) -> list[dict]:
        return [row for row in self.history if all(key in row for key in keys)]


def test_wandb_runs_make_the_same_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    curves = {"bn": [(100, 10.0), (200, 20.0)], "bkn": [(100, 15.0), (200, 27.5)]}
    queries = []

    class FakeApi:
        def __init__(self, timeout: int) -> None:
            pass

        def runs(self, path: str, filters: dict) -> list[FakeWandbRun]:
            queries.append((path, filters))
            return [FakeWandbRun(normalizer, curve) for normalizer, curve in curves.items()]

    monkeypatch.setitem(sys.modules, "wandb", type(sys)("wandb"))
    monkeypatch.setattr(sys.modules["wandb"], "Api", FakeApi, raising=False)
    aggregate.main(["fig4", "--wandb", "me/bkn", "--out-dir", str(tmp_path)])

    assert queries == [("me/bkn", {"config.experiment_name": "fig4"})]
    table = read_csv(tmp_path / "fig4.csv")
    for normalizer, curve in curves.items():
        for metric in ("top1_batch", "top1_population"):
            assert float(table[f"inception_v2/{normalizer}", metric]["ours_mean"]) == curve[-1][1]
    assert table["inception_v2/brn", "top1_batch"]["ours_status"] == "missing"


@pytest.mark.parametrize("normalizer", ["bn", "bkn"])
def test_fig8_gaps_match_an_independent_variance_of_the_hooked_layer(tmp_path: Path, normalizer: str) -> None:
    # A fig8 run record at scale smoke whose checkpoint is an untrained network with random moving variances.
    with initialize_config_dir(config_dir=str(SCRIPTS.parent / "configs"), version_base="1.3"):
        config = compose("config", overrides=["experiment=fig8", "scale=smoke", f"normalizer={normalizer}",
                                              "data=synthetic", "data.num_classes=10"])
    statistics_batch_size, groups = config.batch.statistics, 8
    directory = write_run(tmp_path, "fig8", "cifar_net", normalizer, 0, config=OmegaConf.to_container(config, resolve=True))
    model = build_model("cifar_net", 10, {"name": normalizer, "statistics_batch_size": statistics_batch_size},
                        config.data.image_size)
    torch.manual_seed(0)
    for name, buffer in model.named_buffers():
        if name.endswith("running_var"):
            buffer.copy_(torch.rand_like(buffer) + 0.5)
        if name.endswith("num_batches_tracked"):  # as trained: past BKN's gain warm-up
            buffer.fill_(1000)
    (directory / "checkpoints").mkdir()
    torch.save({"model": model.state_dict()}, directory / "checkpoints" / "last.pt")
    (run,) = load_local(tmp_path, ["fig8"])

    gaps = fig8_statistics.measure(run, None, batches=groups, device=torch.device("cpu"))

    # Independently: the hooked layer's input on the first test examples, its unbiased variance per
    # statistics group (group g holds examples g, g + G, ...: bkn.functional's strided groups).
    test = build_datasets("synthetic", image_size=config.data.image_size, num_classes=10).test
    images = torch.stack([test[index][0] for index in range(groups * statistics_batch_size)])
    layer = model.eval().get_submodule(gaps.layer)
    set_inference(model, "batch")
    captured = []
    handle = layer.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0]))
    with torch.no_grad():
        model(images)
    handle.remove()
    x = captured[0]
    grouped = x.reshape(statistics_batch_size, groups, x.shape[1], -1).permute(1, 2, 0, 3).flatten(2)
    expected = (grouped.var(dim=2, unbiased=True).T - layer.running_var[:, None]).abs()
    torch.testing.assert_close(gaps.sample, expected, rtol=1e-4, atol=1e-5)
    if normalizer == "bn":  # BN normalizes with the sample variance itself
        torch.testing.assert_close(gaps.normalizing, gaps.sample)
    else:  # BKN normalizes with its Kalman estimate, which mixes in the prediction
        assert not torch.allclose(gaps.normalizing, gaps.sample)


def test_prior_fit_ratios_match_an_independent_computation_at_each_bkn_layer(tmp_path: Path) -> None:
    with initialize_config_dir(config_dir=str(SCRIPTS.parent / "configs"), version_base="1.3"):
        config = compose("config", overrides=["experiment=fig8", "scale=smoke", "normalizer=bkn",
                                              "data=synthetic", "data.num_classes=10"])
    statistics_batch_size = config.batch.statistics
    directory = write_run(tmp_path, "fig8", "cifar_net", "bkn", 0, config=OmegaConf.to_container(config, resolve=True))
    model = build_model("cifar_net", 10, {"name": "bkn", "statistics_batch_size": statistics_batch_size},
                        config.data.image_size)
    (directory / "checkpoints").mkdir()
    torch.save({"model": model.state_dict()}, directory / "checkpoints" / "last.pt")
    (run,) = load_local(tmp_path, ["fig8"])

    ratios = prior_fit.layer_ratios(run, batches=1, device=torch.device("cpu"))

    # Independently: each BKN layer's input and prior on the first test batch; the observed variance
    # of statistics group g (examples g, g + G, ...) straight from torch.var.
    test = build_datasets("synthetic", image_size=config.data.image_size, num_classes=10).test
    validated = bkn.config.validate(config)
    images = torch.stack([test[index][0] for index in range(validated.eval_batch_size)])
    images = images[: len(images) - len(images) % statistics_batch_size]
    set_inference(model.eval(), "batch")
    expected = []

    def record(module, args):
        if len(args) > 1 and args[1] is not None:
            x = args[0]
            grouped = x.reshape(statistics_batch_size, -1, x.shape[1], x[0, 0].numel()).permute(1, 2, 0, 3).flatten(2)
            observed = grouped.var(dim=2, unbiased=False)
            expected.append((args[1].var / (observed + module.eps)).median().item())

    handles = [m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, KalmanNorm2d)]
    with torch.no_grad():
        model(images)
    for handle in handles:
        handle.remove()
    assert len(ratios) == len(expected) > 3
    assert ratios == pytest.approx(expected, rel=1e-4)


def test_diverged_runs_are_shown_as_diverged_never_as_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runs, out = tmp_path / "runs", tmp_path / "out"
    for seed, value in enumerate([41.0, 43.0]):
        write_run(runs, "fig3", "inception_v2", "bn", seed, setting=(256, 4), top1={"population": value},
                  curve=[(5, value)])
    # A diverged seed's numbers (as train.py records them up to the verdict) must not count.
    write_run(runs, "fig3", "inception_v2", "bn", 2, setting=(256, 4), top1={"population": 99.0},
              curve=[(5, 99.0)], status="diverged")
    write_run(runs, "fig3", "resnet101", "bn", 0, setting=(256, 4), top1={"population": 99.0}, status="diverged")
    drawn = []
    monkeypatch.setattr(aggregate.plots, "plot_panels", lambda panels, *args: drawn.extend(panels))

    aggregate.main(["fig3", "--runs-dir", str(runs), "--out-dir", str(out)])

    table = read_csv(out / "fig3.csv")
    assert float(table["inception_v2/bn", "top1_population"]["ours_mean"]) == 42.0
    assert table["resnet101/bn", "top1_population"]["ours_status"] == "diverged"
    markdown = markdown_rows(out / "fig3.md")
    ours = "top-1 % (population stats, option B) — ours"
    assert markdown["InceptionV2 + BN"][ours].endswith("(n=2), 1 diverged")
    assert markdown["ResNet101 + BN"][ours] == "diverged"
    curves = {curve.label: curve for panel in drawn for curve in panel.curves}
    assert sorted(point for seed in curves["InceptionV2 + BN (1 diverged)"].seeds for point in seed) == [
        (5, 41.0), (5, 43.0)]
    assert curves["ResNet101 + BN (1 diverged)"].seeds == []
