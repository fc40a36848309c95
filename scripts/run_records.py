"""Run records as plain Python objects: read from the run folders train.py writes, or pulled
from the W&B API. The record format is train.py's contract (docs/run-records.md); nothing here
imports training code, so the scripts work on records copied from any machine.

A local run is the folder ``<runs_dir>/<experiment>/<run>/`` holding ``summary.json``,
``config.yaml`` (the resolved config) and ``metrics.jsonl`` (one JSON object per line, ``kind``
``train`` or ``eval``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

# Classes of the data sets whose config may not spell them out (synthetic data does: data.num_classes).
DATA_SET_CLASSES = {"cifar10": 10, "cifar100": 100, "imagenet": 1000, "digits": 10}
INFERENCES = ("population", "batch")
EVAL_METRICS = ("top1", "top5", "loss")


@dataclass
class Run:
    """One training run: its summary, resolved config and evaluation history."""

    experiment: str
    name: str
    summary: dict[str, Any]
    config: dict[str, Any]
    evals: list[dict[str, Any]] = field(default_factory=list)  # the metrics.jsonl lines of kind "eval"
    directory: Path | None = None  # None for a run pulled from W&B
    trains: list[dict[str, Any]] = field(default_factory=list)  # the lines of kind "train" (local runs only)

    @property
    def status(self) -> str:
        return str(self.summary.get("status", "unknown"))

    @property
    def finished(self) -> bool:
        return self.status == "finished"

    @property
    def learned(self) -> bool:
        """False for a finished run whose record says it did not learn (train.py's learning verdict)."""
        return self.summary.get("learned") is not False

    @property
    def verdict(self) -> str:
        """The status as tables show it: "finished, did not learn" where the record says so."""
        return self.status if self.learned else f"{self.status}, did not learn"

    @property
    def setting(self) -> tuple[int, int]:
        """The paper's ``(gradient-batch-size, statistics-batch-size)``."""
        return int(self.summary["gradient_batch_size"]), int(self.summary["statistics_batch_size"])

    def final(self, inference: str, metric: str = "top1") -> float | None:
        """The final evaluation's ``metric`` under ``inference`` ('population' or 'batch'), if recorded."""
        value = (self.summary.get("final") or {}).get(inference, {}).get(metric)
        return None if value is None else float(value)

    def curve(self, inference: str, metric: str = "top1") -> list[tuple[int, float]]:
        """``(step, value)`` of every evaluation under ``inference``, in step order."""
        points = {int(line["step"]): float(line[metric]) for line in self.evals
                  if line.get("inference") == inference and line.get(metric) is not None}
        return sorted(points.items())

    def first_reach(self, inference: str, threshold: float) -> int | None:
        """The step of the first evaluation under ``inference`` whose top-1 is at or above ``threshold``
        (None: none is)."""
        return next((step for step, top1 in self.curve(inference) if top1 >= threshold), None)

    @property
    def variant(self) -> str:
        """The normalizer as the study names it: ``bn``, ``gn``, ``bkn-analytic``, with BKN's
        non-default options appended (``bkn-linear-no_propagation``, ``-learned_gain``, ``-state_input``,
        ``-no_gain_warmup``, also for records from before the gain warm-up existed)."""
        normalizer = self.config.get("normalizer") or {}
        name = str(self.summary.get("normalizer") or normalizer.get("name"))
        if name != "bkn":
            return name
        label = f"bkn-{normalizer.get('transition', self.summary.get('transition'))}"
        if normalizer.get("propagate") is False:
            label += "-no_propagation"
        if normalizer.get("learn_gain"):
            label += "-learned_gain"
        if normalizer.get("state_from") == "input":
            label += "-state_input"
        if normalizer.get("gain_warmup", 0) == 0:  # a record without the key predates the warm-up: ran without it
            label += "-no_gain_warmup"
        return label

    @property
    def data(self) -> str:
        """The data set's name, with the folder it was read from (``folder (/data/pets)``) when it has one."""
        data_config = self.config.get("data") or {}
        name = self.summary.get("data") or data_config.get("name")
        root = data_config.get("root")
        return str(name) if root is None else f"{name} ({root})"

    def train_losses(self) -> list[tuple[int, float]]:
        """``(step, training loss)`` of every logged training line that has a finite loss."""
        return [(int(line["step"]), float(line["loss"])) for line in self.trains if line.get("loss") is not None]

    def attributes(self) -> dict[str, Any]:
        """What table rows select runs by (see ``aggregate.Row.match``)."""
        data_config = self.config.get("data") or {}
        model_config = self.config.get("model") or {}
        data = self.summary.get("data") or data_config.get("name")
        per_device = self.summary.get("per_device_batch_size")
        return {
            "setting": self.setting,
            "model": self.summary.get("model"),
            "normalizer": self.summary.get("normalizer"),
            "transition": self.summary.get("transition"),
            "data": data,
            "classes": data_config.get("num_classes", DATA_SET_CLASSES.get(data)),
            "width": float(model_config.get("width", 1.0)),
            # Ordinary BN over the whole device batch (the CIFAR baseline) versus statistics groups.
            "whole_device_batch": per_device is not None and self.setting[1] == int(per_device),
        }


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    texts = path.read_text().splitlines()
    lines = []
    for number, text in enumerate(texts, start=1):
        if not text.strip():
            continue
        try:
            lines.append(json.loads(text))
        except json.JSONDecodeError:
            if number == len(texts):  # a run killed mid-write leaves a torn last line: skip it
                break
            raise ValueError(f"{path}:{number} is not JSON; the run record is corrupt") from None
    return lines


def load_run(directory: Path) -> Run:
    """The run recorded in ``directory`` (which holds its ``summary.json``)."""
    summary = json.loads((directory / "summary.json").read_text())
    config_path = directory / "config.yaml"
    config = (yaml.safe_load(config_path.read_text()) or {}) if config_path.exists() else {}
    lines = _read_jsonl(directory / "metrics.jsonl")
    evals = [line for line in lines if line.get("kind") == "eval"]
    trains = [line for line in lines if line.get("kind") == "train"]
    experiment = summary.get("experiment") or directory.parent.name
    return Run(experiment, summary.get("run") or directory.name, summary, config, evals, directory, trains)


def load_local(runs_dir: Path, experiments: Iterable[str]) -> list[Run]:
    """Every run of ``experiments`` under ``runs_dir`` (``<runs_dir>/<experiment>/<run>/summary.json``)."""
    runs = []
    for experiment in experiments:
        for summary_path in sorted((runs_dir / experiment).glob("*/summary.json")):
            runs.append(load_run(summary_path.parent))
    return runs


def _summary_from_wandb(config: dict[str, Any], remote_summary: dict[str, Any], state: str) -> dict[str, Any]:
    """The summary.json fields, rebuilt from what train.py logs to W&B: the resolved config, the
    ``status`` it sets at the end, and the last ``eval_<inference>/<metric>`` and ``train/*`` values."""
    batch, normalizer = config.get("batch") or {}, config.get("normalizer") or {}
    final = {inference: {metric: remote_summary[f"eval_{inference}/{metric}"] for metric in EVAL_METRICS
                         if f"eval_{inference}/{metric}" in remote_summary}
             for inference in INFERENCES if f"eval_{inference}/top1" in remote_summary}
    rebuilt = {
        "experiment": config.get("experiment_name"), "run": config.get("run_name"),
        "status": remote_summary.get("status", state), "model": (config.get("model") or {}).get("name"),
        "normalizer": normalizer.get("name"), "transition": normalizer.get("transition"),
        "gradient_batch_size": batch.get("gradient"), "statistics_batch_size": batch.get("statistics"),
        "per_device_batch_size": batch.get("per_device"), "data": (config.get("data") or {}).get("name"),
        "seed": config.get("seed"), "final": final, "examples_per_s": remote_summary.get("train/examples_per_s"),
    }
    # summary.json's own fields, where a run put them in its W&B summary, are the better source.
    return {**rebuilt, **{key: value for key, value in remote_summary.items() if "/" not in key}}


def load_wandb(project_path: str, experiments: Iterable[str]) -> list[Run]:
    """Every run of ``experiments`` in the W&B project ``entity/project`` (selected by the
    ``experiment_name`` of their config), with its evaluation history."""
    import wandb  # only this path needs the network, so only it pays the import

    api = wandb.Api(timeout=60)
    runs = []
    for experiment in experiments:
        for remote in api.runs(project_path, filters={"config.experiment_name": experiment}):
            config = dict(remote.config)
            remote_summary = {key: value for key, value in remote.summary.items() if not key.startswith("_")}
            evals = []
            for inference in INFERENCES:
                keys = [f"eval_{inference}/{metric}" for metric in EVAL_METRICS]
                for row in remote.scan_history(keys=["_step", *keys]):
                    evals.append({"kind": "eval", "step": row["_step"], "inference": inference,
                                  **{metric: row[key] for metric, key in zip(EVAL_METRICS, keys)}})
            runs.append(Run(experiment, remote.name, _summary_from_wandb(config, remote_summary, remote.state),
                            config, evals))
    return runs
