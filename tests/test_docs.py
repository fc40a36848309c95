"""The docs are true: every ``train.py`` command in README.md and docs/*.md composes and validates,
every ``key=value`` override they show in backticks composes and validates (with an option of its
group that has the key), every config key they name exists, and README's Python snippets run.

Generic on purpose: it reads whatever the docs say today, so a new doc line is checked too.
Paths in the docs (data roots, checkpoints) name other machines' files: a data root becomes an
empty folder here and a checkpoint path ``resume=null``; what is checked is the key, not the file.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from omegaconf import DictConfig, open_dict

from bkn.config import ConfigError, defined_keys, validate
from training_helpers import CONFIG_DIR, ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SECTIONS = ("batch", "train", "eval", "checkpoint", "distributed", "optim", "schedule", "logger", "model",
            "normalizer", "data")
GROUPS = sorted(path.name for path in CONFIG_DIR.iterdir() if path.is_dir() and path.name != "hydra")
KEY = r"[a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)+"
CHECKED = (*SECTIONS, *GROUPS, "resume", "seed")  # the first part of the overrides checked
# Errors a run meets while training (docs/faults.md), after its settings validated.
RUN_ERRORS = ("error: diverged at step", "error: stopped at step", "error: no space left", "error: out_dir=")
OVERRIDE = re.compile(rf"^[+~]{{0,2}}(?:{KEY}|[a-z_]+)=[^\s`]*$")


def _code_blocks(text: str) -> list[str]:
    return re.findall(r"```[a-z]*\n(.*?)```", text, re.S)


def _commands() -> list[tuple[str, list[str]]]:
    """``(where, overrides)`` of every ``train.py`` command line in a code block."""
    found = []
    for doc in DOCS:
        for block in _code_blocks(doc.read_text()):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split(" #")[0].removeprefix("$ ").strip()
                if "train.py" not in line or "..." in line or not re.search(r"(python|torchrun).*train\.py", line):
                    continue
                arguments = shlex.split(line.split("train.py", 1)[1])
                overrides = [a for a in arguments if not a.startswith("-")]
                if "--cfg" not in arguments:
                    found.append((f"{doc.name}: {line}", overrides))
    return found


def _inline_overrides() -> list[tuple[str, tuple[str, ...]]]:
    """``(where, overrides)`` of every backticked snippet of ``key=value`` words in the prose and
    tables (the words of one snippet go together: `train.steps=1000 train.epochs=null`)."""
    found = []
    for doc in DOCS:
        prose = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
        for snippet in re.findall(r"`([^`\n]+)`", prose):
            overrides = tuple(word for word in snippet.split() if OVERRIDE.match(word)
                              and word.lstrip("+~").split("=")[0].split(".")[0] in CHECKED
                              and not re.search(r"[<>()]|\.\.\.|=$", word))  # placeholders: data=<name>
            if overrides:
                found.append((doc.name, overrides))
    return sorted(set(found))


def _here(override: str, data_root: Path) -> str:
    """The override as this machine can check it (see the module docstring)."""
    key, _, value = override.partition("=")
    if key == "data.root":
        return f"data.root={data_root}"
    if key == "resume" and value not in ("auto", "null"):
        return "resume=null"
    if key == "device" and value == "cuda" and not torch.cuda.is_available():
        return "device=cpu"
    return override.split(",")[0] if "," in value and "[" not in value else override  # a sweep: its first job


def _compose_and_validate(overrides: list[str], data_root: Path) -> None:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg: DictConfig = compose("config", overrides=[*overrides, f"data.root={data_root}"],
                                  return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # as under train.py: validation reads the command line's keys
    with open_dict(cfg):
        del cfg["hydra"]  # as in train.py's task function
    try:
        validate(cfg, environ={})
    finally:
        HydraConfig.instance().cfg = None  # no other test may see this command line


def _documented_error(doc: Path, line: str) -> str | None:
    """The ``error: ...`` line the docs show right after a command, if any."""
    for block in _code_blocks(doc.read_text()):
        lines = block.splitlines()
        for number, text in enumerate(lines[:-1]):
            if text.removeprefix("$ ").strip() == line and lines[number + 1].startswith("error: "):
                return lines[number + 1]
    return None


@pytest.mark.parametrize(("where", "overrides"), _commands(), ids=lambda value: str(value)[:80])
def test_every_command_in_the_docs_composes_and_validates(where: str, overrides: list[str],
                                                         tmp_path: Path) -> None:
    doc, line = where.split(": ", 1)
    documented_error = _documented_error(ROOT / ("docs" if doc != "README.md" else "") / doc, line)
    here = [_here(override, tmp_path) for override in overrides]
    # A command shown with the error it gets must get it, unless the error is about a file of
    # the machine it ran on (a data root, a checkpoint): then its keys are checked below.
    if documented_error and documented_error.startswith(RUN_ERRORS):  # met by the run, not the settings
        _compose_and_validate(here, tmp_path)
        return
    if documented_error and here == overrides:
        with pytest.raises((ConfigError, HydraException)) as error:
            _compose_and_validate(here, tmp_path)
        if isinstance(error.value, ConfigError):
            assert f"error: {error.value}" == documented_error
        return
    if documented_error:  # its keys compose and validate; only that file may be missing here
        try:
            _compose_and_validate(overrides, tmp_path)
        except ConfigError as error:
            assert re.match(r"(data\.root|resume)=", str(error)), error
        return
    for override in overrides:  # every option of a swept group exists
        key, _, value = override.partition("=")
        if key in GROUPS and value != "null":
            for option in value.split(","):
                assert (CONFIG_DIR / key / f"{option}.yaml").is_file(), f"{where}: {key}={option}"
    _compose_and_validate(here, tmp_path)


def test_every_override_shown_in_the_prose_composes_and_validates(tmp_path: Path) -> None:
    failures = []
    for where, overrides in _inline_overrides():
        key = overrides[0].lstrip("+~").split("=")[0]
        group = key.split(".")[0]
        # A group option's key may need that option chosen (normalizer.r_max needs normalizer=brn).
        options = [[]] + [[f"{group}={path.stem}"] for path in sorted((CONFIG_DIR / group).glob("*.yaml"))
                          if group in GROUPS and "." in key]
        errors = []
        for option in options:
            try:
                _compose_and_validate([*option, *(_here(override, tmp_path) for override in overrides)], tmp_path)
                break
            except (ConfigError, HydraException, ValueError) as error:
                errors.append(str(error).splitlines()[0])
        else:
            failures.append(f"{where}: {' '.join(overrides)}: {errors[0]}")
    assert failures == []


def test_every_config_key_named_in_the_docs_exists() -> None:
    known = defined_keys()
    built = {f"{group}.{key}" for group in ("model", "normalizer", "data") for key in
             ("name", "image_size", "width", "root", "download", "num_workers")}
    missing = []
    for doc in DOCS:
        for snippet in re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)):
            for key in re.findall(rf"(?<![\w./+-]){KEY}(?![\w/(])", snippet):
                if re.search(r"\.(py|ya?ml|md|jsonl?|pt|log|csv|png)$", key):  # a file name
                    continue
                if key.split(".")[0] in SECTIONS and key not in known | built and not any(
                        known_key.startswith(f"{key}.") for known_key in known):
                    missing.append(f"{doc.name}: {key}")
    assert sorted(set(missing)) == []


def test_readme_python_snippets_run() -> None:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## In your own model"):text.index("## The normalizers")]
    namespace: dict = {}
    for block in re.findall(r"```python\n(.*?)```", section, re.S):
        exec(block, namespace)  # noqa: S102 - the README's own code
    assert "state" in namespace


def _fault_table(doc: Path) -> list[list[str]]:
    """The rows of the fault table ("| fault | exit code | ... | test |") of ``doc``, as cells."""
    text = doc.read_text()
    start = text.index("| fault | exit code | what survives | what to do | test |")
    lines = text[start:text.index("\n\n", start)].splitlines()[2:]
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines]


def test_the_fault_table_is_the_test_list() -> None:
    """Every row of README's fault table names the tests that make it true, and they exist;
    docs/faults.md has the same table."""
    rows = _fault_table(ROOT / "README.md")
    assert rows == _fault_table(ROOT / "docs" / "faults.md")
    defined = {(path.name, name) for path in (ROOT / "tests").glob("test_*.py")
               for name in re.findall(r"^def (test_\w+)", path.read_text(), re.M)}
    for row in rows:
        named = re.findall(r"`(?:(test_\w+\.py))?::(test_\w+)`", row[-1])
        assert named, f"the row {row[0]!r} names no test"
        file = None
        for test_file, test in named:
            file = test_file or file  # `::name` is in the file named before it
            assert (file, test) in defined, f"the row {row[0]!r} names {file}::{test}, which does not exist"
