"""Training-step speed and peak memory of BN, BRN and BKN, and the input pipeline's speed (issue 6).

Every variant (one model with one normalizer, eager or compiled) is built and warmed up, then all are timed
round-robin: each repeat runs ``steps`` training steps (forward, backward, SGD step on random data
of the model's input shape) of every variant in turn, starting one variant later each repeat, so
a drift of the shared machine hits all variants alike. The report gives the median examples/s and
its min/max over repeats (on CPU also examples per CPU-second of this process, which other
processes on the machine disturb far less), the median step time, the ratio to the setting's
baseline (our BN with one group; torch.nn.BatchNorm2d in the micro-batch presets), the ATen
operator calls of one step (:func:`count_aten_calls`; on a GPU each is at least one kernel launch,
which bounds a micro-batch step) and their ratio to the baseline's, the targets with pass/fail, and
the input pipeline's examples/s; it is written to ``results/benchmark/<preset>.md`` and ``.csv``
(or to ``--output``).

Peak memory of one training step is the variant's resident tensors (parameters, buffers, optimizer
state, the batch) plus the most that the step allocates on top of them:
- CUDA: ``torch.cuda.max_memory_allocated`` during the step minus the allocation before it.
- CPU: counted exactly by following every tensor storage the step's operators allocate and free
  (:class:`LiveTensorMemory`). Compiled kernels allocate outside the dispatcher, so with
  ``--compile`` the CPU column is the eager model's step.
Neither counts allocator caches or library workspaces, which are not tensors.

    python scripts/benchmark.py --preset cpu
    python scripts/benchmark.py --preset micro --repeats 3 --steps 5   # a quick look during development
    python scripts/benchmark.py --model cifar_net --norms bn,bkn_analytic --batch 32 --statistics 2
"""

from __future__ import annotations

import argparse
import csv
import datetime
import importlib.metadata
import os
import pickle
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import weakref
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import bkn.nn
from bkn.config import compile_modes
from bkn.data import build_datasets, build_loader, measure_loader_throughput
from bkn.functional import num_groups
from bkn.models import PAPER_INPUT, build_model
from bkn.nn import NormSpec

# name -> the normalizer, given the setting's statistics_batch_size. "bn" is the baseline.
VARIANTS: dict[str, Callable[[int], NormSpec]] = {
    "torch_bn": lambda statistics: {"name": "bn"},  # built as "bn", then swapped: see swap_in_torch_batchnorm
    "bn": lambda statistics: {"name": "bn"},
    "bn_groups": lambda statistics: {"name": "bn", "statistics_batch_size": statistics},
    "brn": lambda statistics: {"name": "brn", "statistics_batch_size": statistics},
    "bkn_linear": lambda statistics: {"name": "bkn", "statistics_batch_size": statistics, "transition": "linear"},
    "bkn_monte_carlo": lambda statistics: {"name": "bkn", "statistics_batch_size": statistics,
                                           "transition": "monte_carlo"},
    "bkn_analytic": lambda statistics: {"name": "bkn", "statistics_batch_size": statistics, "transition": "analytic"},
    "gn": lambda statistics: {"name": "gn"},  # bkn.nn.GroupNorm2d: torch's group_norm kernel, no statistics groups
}
BASELINE = "bn"
BKN_VARIANTS = ("bkn_linear", "bkn_monte_carlo", "bkn_analytic")
# data set -> (what the loader reads, image size and batch when no measured model sets them)
LOADER_DATA = {"cifar10": ("CIFAR-10 pickles", 32, 128), "imagenet": ("ImageNet JPEG folders", 224, 32)}


def data_set_of(model: str) -> str:
    """The paper's data for a model: CIFAR-10 for the 32x32 networks, ImageNet for the others."""
    return "cifar10" if PAPER_INPUT[model].image_size == 32 else "imagenet"


# --- what is measured -------------------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    """``variant`` relative to ``reference`` in the same setting: speed ratio >= bound, step time or
    memory ratio <= bound."""

    variant: str
    reference: str
    metric: Literal["speed", "time", "memory", "calls"]
    bound: float


@dataclass(frozen=True)
class Setting:
    """One model at one batch: ``batch`` examples per device, statistics groups of ``statistics``."""

    model: str
    image_size: int
    num_classes: int
    batch: int
    statistics: int
    variants: tuple[str, ...]

    compile_mode: str | None = None  # torch.compile's mode ("default", "reduce-overhead"); None: eager
    baseline: str = BASELINE  # the variant every ratio of this setting divides by
    targets: tuple[Target, ...] | None = None  # None: the device's (targets_for)

    @property
    def label(self) -> str:
        mode = "" if self.compile_mode is None else f", torch.compile (mode={self.compile_mode})"
        return (f"{self.model} {self.image_size}x{self.image_size}, batch {self.batch}, "
                f"statistics {self.statistics}{mode}")


@dataclass(frozen=True)
class Options:
    device: str
    warmup: int  # untimed steps per variant (compilation, allocator and oneDNN caches)
    steps: int  # timed steps per variant per repeat
    repeats: int
    amp: bool = False  # bfloat16 autocast
    channels_last: bool = False
    loaders: tuple[str, ...] = ()  # data sets whose input pipeline is measured
    loader_batches: int = 10
    loader_workers: int = 2
    seed: int = 0
    threads: int | None = None  # torch's intra-op threads (None: torch's default, all cores)


def targets_for(device_type: str) -> list[Target]:
    """The issue's targets; BKN and BN with groups have looser speed bounds on CPU than on GPU."""
    on_cpu = device_type == "cpu"
    targets = [Target("bn", "torch_bn", "speed", 0.95),
               Target("bn_groups", "bn", "speed", 0.90 if on_cpu else 0.95)]
    for variant in BKN_VARIANTS:
        targets += [Target(variant, "bn_groups", "speed", 0.90 if on_cpu else 0.985),
                    Target(variant, "bn_groups", "memory", 1.10)]
    return targets


def micro_settings(compile_modes: tuple[str, ...],
                   compiled_variants: tuple[str, ...] | None = None) -> tuple[Setting, ...]:
    """The paper's micro-batch regime on its CIFAR network, against torch.nn.BatchNorm2d (issue 19):
    (8, 2) and (16, 1) at 32x32, (8, 2) at 8x8 (the digits study), and (8, 2) compiled in each of
    torch.compile's ``compile_modes``, with ``compiled_variants`` (None: every variant).
    The bounds are step-time ratios to torch.nn.BatchNorm2d in the same setting."""
    variants = ("torch_bn", "gn", "bn", "bn_groups", "brn", *BKN_VARIANTS)

    def bounds(metric: str = "time", **ratio: float) -> tuple[Target, ...]:
        return tuple(Target(variant, "torch_bn", metric, bound) for variant, bound in ratio.items())

    # The targets of issue 31: step time and ATen calls a step against torch's BatchNorm2d.
    micro = partial(Setting, "preact_resnet32", num_classes=10, variants=variants, baseline="torch_bn")
    return (micro(image_size=32, batch=8, statistics=2,
                  targets=bounds(bn_groups=1.08, bkn_linear=1.20, bkn_analytic=1.30, bkn_monte_carlo=1.40)),
            micro(image_size=32, batch=16, statistics=1, targets=()),
            micro(image_size=8, batch=8, statistics=2,
                  targets=(*bounds(bkn_linear=1.80), *bounds("calls", bn_groups=1.25, brn=1.5, bkn_linear=2.5,
                                                               bkn_analytic=3.0, bkn_monte_carlo=3.0))),
            *(micro(image_size=32, batch=8, statistics=2, compile_mode=mode, variants=compiled_variants or variants,
                    targets=bounds(bkn_linear=1.10)) for mode in compile_modes))


PRESETS: dict[str, tuple[tuple[Setting, ...], Options]] = {
    # CIFAR net at (gradient 128, statistics 2) on one 2-core CPU. A step takes 7-15 s there, so each
    # variant runs 7 steps: warm-up, the two whose ATen calls are counted, memory, 3 timed.
    "cpu": ((Setting("cifar_net", 32, 10, 128, 2, ("torch_bn", *(v for v in VARIANTS if v not in ("torch_bn", "gn")))),),
            Options("cpu", warmup=1, steps=1, repeats=3, loaders=("cifar10", "imagenet"))),
    # InceptionV2 at (256, 32), 32 per device (8 GPUs), and with statistics groups of 4.
    "gpu": ((Setting("inception_v2", 224, 1000, 32, 32, ("torch_bn", "bn", "bn_groups", *BKN_VARIANTS)),
             Setting("inception_v2", 224, 1000, 32, 4, ("bn", "bn_groups", "brn", *BKN_VARIANTS))),
            Options("cuda", warmup=10, steps=20, repeats=7, amp=True, channels_last=True,
                    loaders=("imagenet",), loader_workers=8)),
    # Micro-batches, one thread (as the issue measured): 20 steps of 20-80 ms per variant and repeat.
    "micro": (micro_settings(("default",)), Options("cpu", warmup=3, steps=20, repeats=7, threads=1)),
    # The same on one GPU, where a micro-batch step is bound by kernel launches: eager (a launch per
    # ATen call), compiled (a launch per fused kernel) and in CUDA graphs (reduce-overhead: a launch
    # per graph). Compiled, only the variants with targets and their reference, so that the
    # compilations fit make gpu-check's time.
    "micro_gpu": (micro_settings(("default", "reduce-overhead"), ("torch_bn", "bn_groups", "bkn_linear")),
                  Options("cuda", warmup=10, steps=50, repeats=7)),
}


# --- torch.nn.BatchNorm2d as a reference --------------------------------------------------------

def swap_in_torch_batchnorm(model: nn.Module) -> nn.Module:
    """Replace every ``bkn.nn.BatchNorm2d`` with one statistics group by a ``torch.nn.BatchNorm2d``
    holding the same parameters and running statistics, in place; returns ``model``."""
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) is not bkn.nn.BatchNorm2d:
                continue
            if child.statistics_batch_size is not None or child.inference != "population":
                raise ValueError(f"{name} has statistics groups or batch inference; torch.nn.BatchNorm2d has "
                                 "neither: build the model with statistics_batch_size=None, inference='population'")
            state = child.state_dict()
            reference = nn.BatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                       child.track_running_stats,
                                       device=next(iter(state.values()), torch.empty(0)).device)
            reference.load_state_dict(state)
            setattr(parent, name, reference.train(child.training))
    return model


# --- one variant: a model, its optimizer and a training step ------------------------------------

@dataclass
class Candidate:
    """One built variant of one setting, with what has been measured of it."""

    setting: Setting
    variant: str
    step: Callable[[], None]
    examples_per_s: list[float] = field(default_factory=list)  # by the wall clock, one per repeat
    examples_per_cpu_s: list[float] = field(default_factory=list)  # per CPU-second of this process (all threads)
    peak_memory_bytes: int = 0
    aten_calls: int = 0  # ATen calls of one eager training step (count_aten_calls)
    # Graphs compiled without CUDA graphs in a mode that has them; None: not such a mode.
    cuda_graph_skips: int | None = None


# The optimizer step the measured steps start from: past BKN's gain warm-up (bkn.nn.norms.GAIN_WARMUP,
# 100 steps of runs that take thousands), as a run spends nearly all its steps; BRN stays in its
# warm-up (5000 steps by default), whose r and d cost the same ops as after it.
FIRST_STEP = 150


def make_train_step(forward: nn.Module, optimizer: torch.optim.Optimizer, inputs: Tensor, targets: Tensor,
                    amp: bool, first_step: int = FIRST_STEP) -> Callable[[], None]:
    """One training step as train.py runs it, set_step included: BRN's limits and BKN's gain warm-up
    follow the optimizer step, counted from ``first_step``."""
    steps_done = first_step

    def step() -> None:
        nonlocal steps_done
        bkn.nn.set_step(forward, steps_done)
        steps_done += 1
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(inputs.device.type, dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(forward(inputs), targets)
        loss.backward()
        optimizer.step()
    return step


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def storage_bytes(tensors: Iterable[Tensor]) -> dict[int, int]:
    """Bytes of each distinct storage behind ``tensors``, keyed by its address."""
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}


class LiveTensorMemory(TorchDispatchMode):
    """Counts the bytes of tensor storages that operators allocate while active, until each is freed.

    ``peak`` is the high-water mark of that count. Storages listed in ``existing`` (alive before)
    are ignored when an operator returns a view of them.
    """

    def __init__(self, existing: Iterable[int] = ()) -> None:
        super().__init__()
        self.existing = set(existing)
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _free(self, address: int) -> None:
        self.current -= self.live.pop(address)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if not isinstance(tensor, Tensor):
                continue
            storage = tensor.untyped_storage()
            address, size = storage.data_ptr(), storage.nbytes()
            if size == 0 or address in self.live or address in self.existing:
                continue  # empty, a view or in-place result of a counted storage, or older than us
            self.live[address] = size
            self.current += size
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._free, address)  # storages keep one Python object while alive
        return out


class AtenCalls(TorchDispatchMode):
    """Counts, by operator (``aten.mul``), every ATen call that reaches the dispatcher while active:
    below autograd, so the backward's and the optimizer's calls too, each view and in-place op one
    call, and a composite op counted as the calls it decomposes into."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        self.calls[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def count_aten_calls(step: Callable[[], None], warmup: int = 2, steps: int = 2) -> Counter[str]:
    """The ATen calls (:class:`AtenCalls`) of one call of ``step``, after ``warmup`` uncounted calls
    (lazy state: the optimizer's momentum buffers; and any warm-up a step count drives, although
    BKN's gain and BRN's limits are tensor expressions of the step that cost the same calls
    throughout). ``steps`` calls are counted one by one and must make the same calls: a count that
    still changes raises, naming the counts, instead of reporting one of them."""
    if warmup < 0 or steps < 1:
        raise ValueError(f"count_aten_calls: warmup must be >= 0 and steps >= 1, got {warmup} and {steps}")
    for _ in range(warmup):
        step()
    counts = []
    for _ in range(steps):
        with AtenCalls() as counter:
            step()
        counts.append(counter.calls)
    if any(count != counts[0] for count in counts[1:]):
        raise ValueError(f"ATen calls differ from step to step after {warmup} warm-up step(s) "
                         f"({', '.join(str(sum(count.values())) for count in counts)}): count after a longer warm-up")
    return counts[0]


def measure_peak_memory(step: Callable[[], None], resident: dict[int, int], device: torch.device) -> int:
    """Peak bytes of one call of ``step``: ``resident`` (address -> bytes) plus what the step adds."""
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        synchronize(device)
        return sum(resident.values()) + torch.cuda.max_memory_allocated(device) - before
    with LiveTensorMemory(existing=resident) as tracker:
        step()
    return sum(resident.values()) + tracker.peak


def build_candidate(setting: Setting, variant: str, options: Options) -> Candidate:
    """Build, warm up and measure the memory of one variant; it is timed later, with the others."""
    device = torch.device(options.device)
    memory_format = torch.channels_last if options.channels_last else torch.contiguous_format
    torch.manual_seed(options.seed)
    model = build_model(setting.model, setting.num_classes, VARIANTS[variant](setting.statistics), setting.image_size)
    if variant == "torch_bn":
        swap_in_torch_batchnorm(model)
    model = model.to(device, memory_format=memory_format).train()
    inputs = torch.randn(setting.batch, 3, setting.image_size, setting.image_size, device=device)
    inputs = inputs.contiguous(memory_format=memory_format)
    targets = torch.randint(setting.num_classes, (setting.batch,), device=device)
    # A small rate: random data must not drive any variant into NaNs or denormals, which are slow.
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    eager_step = make_train_step(model, optimizer, inputs, targets, options.amp)
    step = eager_step
    # Inductor falls back to plain kernels, with a warning, where it cannot capture a CUDA graph
    # (a CPU tensor, a mutated input): counted, so that the report says whether the mode did its work.
    skipped_before = torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]
    if setting.compile_mode is not None:  # static shapes, as train.py compiles
        # Every variant compiles the same forward code anew; past dynamo's default limit of 8 entries
        # a code object, the variants built last would silently run eager.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * len(VARIANTS))
        compiled = torch.compile(model, dynamic=False, mode=setting.compile_mode)
        step = make_train_step(compiled, optimizer, inputs, targets, options.amp)
    for _ in range(options.warmup):
        step()
    # Counted on the eager step also where the timed one is compiled: a compiled graph's fused kernels
    # are not dispatcher calls. One uncounted step first if none ran (the optimizer's momentum buffers).
    aten_calls = sum(count_aten_calls(eager_step, warmup=0 if options.warmup else 1, steps=2).values())
    synchronize(device)
    optimizer.zero_grad(set_to_none=True)  # gradients are created inside the measured step
    optimizer_state = [value for state in optimizer.state.values() for value in state.values()
                       if isinstance(value, Tensor)]
    resident = storage_bytes([*model.parameters(), *model.buffers(), *optimizer_state, inputs, targets])
    memory_step = step if device.type == "cuda" else eager_step
    peak_memory_bytes = measure_peak_memory(memory_step, resident, device)  # compiles here if warm-up did not
    cuda_graph_skips = (torch._dynamo.utils.counters["inductor"]["cudagraph_skips"] - skipped_before
                        if setting.compile_mode is not None and compile_modes()[setting.compile_mode] else None)
    return Candidate(setting, variant, step, peak_memory_bytes=peak_memory_bytes, aten_calls=aten_calls,
                     cuda_graph_skips=cuda_graph_skips)


def time_round_robin(candidates: list[Candidate], options: Options) -> None:
    """Append one speed sample per repeat to every candidate, visiting them in rotating order."""
    device = torch.device(options.device)
    for repeat in range(options.repeats):
        shift = repeat % len(candidates)
        for candidate in candidates[shift:] + candidates[:shift]:
            synchronize(device)
            wall_start, cpu_start = time.perf_counter(), time.process_time()
            for _ in range(options.steps):
                candidate.step()
            synchronize(device)
            examples = options.steps * candidate.setting.batch
            candidate.examples_per_s.append(examples / (time.perf_counter() - wall_start))
            candidate.examples_per_cpu_s.append(examples / (time.process_time() - cpu_start))
        print(f"repeat {repeat + 1}/{options.repeats} done", flush=True)


# --- the input pipeline -------------------------------------------------------------------------

def write_cifar10(root: Path, images_per_file: int) -> None:
    """CIFAR-10's python layout with random images, in its real pickle format (bytes keys)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    generator = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": generator.integers(0, 256, (images_per_file, 3 * 32 * 32), dtype=np.uint8),
                 b"labels": generator.integers(0, 10, images_per_file).tolist()}
        with open(folder / name, "wb") as file:
            pickle.dump(batch, file, protocol=2)


def write_imagenet(root: Path, images: int, classes: int = 4) -> None:
    """An ImageNet-style class-folder tree of photo-sized JPEGs (256 x 300 px, smooth random images)."""
    generator = torch.Generator().manual_seed(0)
    for split, count in (("train", images), ("val", classes)):
        for index in range(count):
            folder = root / split / f"n{index % classes:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            # Coarse noise upsampled: smooth like a photo, so decoding costs what a real JPEG costs.
            coarse = torch.randint(0, 256, (1, 3, 32, 38), generator=generator, dtype=torch.uint8).float()
            pixels = F.interpolate(coarse, size=(256, 300), mode="bilinear").squeeze(0).byte()
            Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(folder / f"{index:06d}.JPEG", quality=90)


@dataclass(frozen=True)
class LoaderResult:
    data: str
    image_size: int
    batch: int
    workers: int
    examples_per_s: float
    model_examples_per_s: float | None  # BN's training speed on that data's model, if measured


def measure_loaders(settings: list[Setting], candidates: list[Candidate], options: Options) -> list[LoaderResult]:
    """Examples/s of each data set's training loader, next to the matching model's BN speed."""
    results = []
    for data in options.loaders:
        matching = [s for s in settings if data_set_of(s.model) == data]
        image_size, batch = (matching[0].image_size, matching[0].batch) if matching else LOADER_DATA[data][1:]
        model_speed = next((statistics.median(c.examples_per_s) for c in candidates
                            if c.setting in matching and c.variant == BASELINE), None)
        examples_needed = batch * (options.loader_batches + 1)  # one warm-up batch
        with tempfile.TemporaryDirectory() as root:
            if data == "cifar10":
                write_cifar10(Path(root), images_per_file=-(-examples_needed // 5))
            else:
                write_imagenet(Path(root), images=examples_needed)
            datasets = build_datasets(data, root=root, image_size=image_size)
            loader = build_loader(datasets.train, batch, train=True, num_workers=options.loader_workers)
            speed = measure_loader_throughput(loader, options.loader_batches)
        results.append(LoaderResult(data, image_size, batch, options.loader_workers, speed, model_speed))
        print(f"loader {data}: {speed:.0f} examples/s", flush=True)
    return results


# --- the report ---------------------------------------------------------------------------------

def machine_description(device: torch.device) -> dict[str, str]:
    cpu_model = platform.processor() or "unknown"
    try:
        cpu_model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                         if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                                check=True, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "cpu": f"{cpu_model}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}",
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "none used",
        "python": platform.python_version(), "torch": torch.__version__, "bkn": f"{importlib.metadata.version('bkn')} (git {commit})",
    }


Clock = Literal["examples_per_s", "examples_per_cpu_s"]


def median(candidate: Candidate, clock: Clock = "examples_per_s") -> float:
    return statistics.median(getattr(candidate, clock))


def find(candidates: list[Candidate], setting: Setting, variant: str) -> Candidate | None:
    return next((c for c in candidates if c.setting == setting and c.variant == variant), None)


def rows(candidates: list[Candidate]) -> list[dict[str, Any]]:
    """One flat record per candidate: the CSV's rows and the Markdown tables' source."""
    records = []
    for c in candidates:
        baseline = find(candidates, c.setting, c.setting.baseline)
        records.append({
            "model": c.setting.model, "image_size": c.setting.image_size, "batch": c.setting.batch,
            "statistics": c.setting.statistics, "compile_mode": c.setting.compile_mode or "", "variant": c.variant,
            "normalizer": "torch.nn.BatchNorm2d" if c.variant == "torch_bn"
            else " ".join(f"{k}={v}" for k, v in VARIANTS[c.variant](c.setting.statistics).items()),
            "baseline": c.setting.baseline,
            "step_ms_median": round(1000 * c.setting.batch / median(c), 3),
            "examples_per_s_median": round(median(c), 3), "examples_per_s_min": round(min(c.examples_per_s), 3),
            "examples_per_s_max": round(max(c.examples_per_s), 3),
            "spread": round((max(c.examples_per_s) - min(c.examples_per_s)) / median(c), 4),
            "speed_vs_baseline": round(median(c) / median(baseline), 4) if baseline else "",
            "examples_per_cpu_s_median": round(median(c, "examples_per_cpu_s"), 3),
            "cpu_speed_vs_baseline": round(median(c, "examples_per_cpu_s") / median(baseline, "examples_per_cpu_s"), 4)
            if baseline else "",
            "peak_memory_mib": round(c.peak_memory_bytes / 2**20, 2),
            "memory_vs_baseline": round(c.peak_memory_bytes / baseline.peak_memory_bytes, 4) if baseline else "",
            "aten_calls": c.aten_calls,
            "aten_calls_vs_baseline": round(c.aten_calls / baseline.aten_calls, 4) if baseline else "",
            "cuda_graph_skips": "" if c.cuda_graph_skips is None else c.cuda_graph_skips,
        })
    return records


@dataclass(frozen=True)
class Check:
    setting: Setting
    target: Target
    ratio: float  # speed by the wall clock, or memory
    cpu_ratio: float | None  # speed by CPU time (None for memory)

    def passes(self, ratio: float) -> bool:
        return ratio >= self.target.bound if self.target.metric == "speed" else ratio <= self.target.bound

    @property
    def text(self) -> str:
        t = self.target
        what = {"speed": "examples/s >=", "time": "step time <=", "memory": "peak memory <=",
                "calls": "ATen calls a step <="}[t.metric]
        return f"{t.variant} {what} {t.bound} x {t.reference}"


def check_targets(candidates: list[Candidate], settings: list[Setting], device_type: str) -> list[Check]:
    """Every target whose two variants were measured in the same setting, with its ratios."""
    checks = []
    for setting in settings:
        for target in targets_for(device_type) if setting.targets is None else setting.targets:
            measured, reference = find(candidates, setting, target.variant), find(candidates, setting, target.reference)
            if measured is None or reference is None:
                continue
            if target.metric == "calls":
                checks.append(Check(setting, target, measured.aten_calls / reference.aten_calls, None))
            elif target.metric != "memory":
                speed, cpu_speed = (median(measured) / median(reference),
                                    median(measured, "examples_per_cpu_s") / median(reference, "examples_per_cpu_s"))
                ratios = (speed, cpu_speed) if target.metric == "speed" else (1 / speed, 1 / cpu_speed)
                checks.append(Check(setting, target, *ratios))
            else:
                checks.append(Check(setting, target, measured.peak_memory_bytes / reference.peak_memory_bytes, None))
    return checks


def ratio_text(ratio: float | str | None) -> str:
    return "" if ratio is None or ratio == "" else f"{ratio:.3f}"


def verdict(check: Check, ratio: float | None) -> str:
    return "" if ratio is None else "pass" if check.passes(ratio) else "FAIL"


def markdown_table(header: list[str], body: list[list[Any]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(str(cell) for cell in line) + " |" for line in body)]


def write_csv(path: Path, records: list[dict[str, Any]], options: Options, machine: dict[str, str]) -> None:
    run = {"device": options.device, "amp": options.amp,
           "channels_last": options.channels_last, "warmup": options.warmup, "steps": options.steps,
           "repeats": options.repeats, **machine}
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=[*records[0], *run])
        writer.writeheader()
        writer.writerows({**record, **run} for record in records)


def write_report(output: Path, settings: list[Setting], candidates: list[Candidate], loaders: list[LoaderResult],
                 options: Options, command: str, load_at_start: float, seconds: float) -> None:
    device = torch.device(options.device)
    on_cpu = device.type == "cpu"
    machine = machine_description(device)
    records = rows(candidates)
    output.parent.mkdir(parents=True, exist_ok=True)
    write_csv(output.with_suffix(".csv"), records, options, machine)

    load_at_end = os.getloadavg()[0]
    shared = " (more than the cores: other processes shared the CPU)" if \
        max(load_at_start, load_at_end) > (os.cpu_count() or 1) + 0.5 else ""
    memory_note = ("torch.cuda.max_memory_allocated during one step, less what was allocated before it, "
                   "plus the variant's parameters, buffers, optimizer state and batch" if not on_cpu else
                   "tensor bytes alive at the high-water mark of one eager training step: parameters, buffers, "
                   "optimizer state and batch, plus every storage the step's operators allocate until it is freed "
                   "(allocator caches and library workspaces excluded)")
    lines = [
        f"# Training-step benchmark: {options.device}", "",
        f"Reproduce: `{command}` (run {datetime.date.today().isoformat()}, {seconds / 60:.1f} minutes).", "",
        f"- Machine: {machine['cpu']}; GPU: {machine['gpu']}; load average (1 min) {load_at_start:.1f} at the "
        f"start, {load_at_end:.1f} at the end{shared}.",
        f"- Versions: python {machine['python']}, torch {machine['torch']}, bkn {machine['bkn']}.",
        f"- Mode: eager unless the setting says torch.compile, {'bf16 autocast' if options.amp else 'fp32'}, "
        f"{'channels_last' if options.channels_last else 'contiguous'}; random data; SGD with momentum.",
        f"- Timing: {options.warmup} warm-up step(s) per variant, then {options.repeats} repeats of "
        f"{options.steps} step(s) per variant, interleaved round-robin (every setting's variants in one rotation); "
        "examples/s median (min-max over repeats); `step ms` is the median step time by the wall clock; "
        "`spread` is (max - min) / median of the repeats' examples/s.",
        f"- Peak memory: {memory_note}.",
        "- `ATen calls`: the ATen operator calls that reach the dispatcher in one eager training step as timed "
        "(bkn.nn.set_step, forward, backward, SGD step; views and in-place ops included), counted with a "
        "TorchDispatchMode after the warm-up, the same in two consecutive steps; in a compiled setting, the "
        "count of the same model's eager step (the compiled graph runs fused kernels instead). On a GPU each "
        "call is at least one kernel launch.",
        "- `vs <baseline>`: examples/s (or memory) relative to the setting's baseline variant in the same run: "
        "our BatchNorm2d with one statistics group (`bn`) or torch.nn.BatchNorm2d (`torch_bn`). "
        "A step-time target's ratio is the inverse of the examples/s ratio.",
    ]
    if on_cpu:
        lines.append("- `per CPU-s`: examples per second of CPU time of this process (all threads, user + system). "
                     "When other processes share the machine the wall clock also counts waiting for a core and "
                     "its ratios turn to noise; CPU time counts the work done (and threads' spin-waits) and stays "
                     "comparable. On an idle machine both clocks rank the variants alike.")
    # Profiles of this preset's steps (scripts/profile_step.py) say where the time goes; link those present.
    profiles = sorted(output.parent.glob(f"{output.stem}_profile*.md"))
    if profiles:
        lines.append("- Where a step's time goes (scripts/profile_step.py): "
                     + ", ".join(f"[{path.name}]({path.name})" for path in profiles) + ".")
    lines.append("")
    for setting in settings:
        versus = f"vs {setting.baseline}"
        header = ["variant", "normalizer", "step ms", "examples/s", "min-max", "spread", versus,
                  *(["per CPU-s", versus] if on_cpu else []), "peak MiB", versus, "ATen calls", versus]
        body = [[r["variant"], r["normalizer"], f"{r['step_ms_median']:.1f}", f"{r['examples_per_s_median']:.1f}",
                 f"{r['examples_per_s_min']:.1f}-{r['examples_per_s_max']:.1f}", f"{100 * r['spread']:.0f}%",
                 ratio_text(r["speed_vs_baseline"]),
                 *([f"{r['examples_per_cpu_s_median']:.2f}", ratio_text(r["cpu_speed_vs_baseline"])] if on_cpu else []),
                 f"{r['peak_memory_mib']:.1f}", ratio_text(r["memory_vs_baseline"]),
                 f"{r['aten_calls']:,}", ratio_text(r["aten_calls_vs_baseline"])]
                for r, c in zip(records, candidates) if c.setting == setting]
        lines += [f"## {setting.label}", "", *markdown_table(header, body), ""]
        skipped = {c.variant: c.cuda_graph_skips for c in candidates
                   if c.setting == setting and c.cuda_graph_skips is not None}
        if skipped:
            missed = [f"{variant} ({count} graph(s) skipped)" for variant, count in skipped.items() if count]
            lines += ["CUDA graphs: **not captured** for " + ", ".join(missed)
                      + "; inductor warned why as it compiled them" if missed
                      else "CUDA graphs: captured for every variant (inductor skipped none of their graphs)", ""]

    checks = check_targets(candidates, settings, device.type)
    lines += ["## Targets", ""]
    if checks:
        header = ["setting", "target", "ratio", "result", *(["ratio by CPU time", "result"] if on_cpu else [])]
        lines += markdown_table(header, [
            [c.setting.label, c.text, ratio_text(c.ratio), verdict(c, c.ratio),
             *([ratio_text(c.cpu_ratio), verdict(c, c.cpu_ratio)] if on_cpu else [])] for c in checks])
    else:
        lines.append("No target's two variants were measured together.")
    lines.append("")
    if loaders:
        lines += ["## Input pipeline", "",
                  "Training loader (bkn.data.build_loader, with augmentation) over files written in the real "
                  "formats to a temporary folder; model examples/s is the `bn` row of the matching model above.", ""]
        lines += markdown_table(
            ["data", "image size", "batch", "workers", "loader examples/s", "model examples/s", "loader / model"],
            [[LOADER_DATA[r.data][0], r.image_size, r.batch, r.workers, f"{r.examples_per_s:.0f}",
              "not measured in this run" if r.model_examples_per_s is None else f"{r.model_examples_per_s:.1f}",
              "" if r.model_examples_per_s is None else f"{r.examples_per_s / r.model_examples_per_s:.1f}"]
             for r in loaders])
        lines.append("")
    output.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


# --- command line -------------------------------------------------------------------------------

def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), help="the issue's settings; other options override it")
    parser.add_argument("--model", choices=list(PAPER_INPUT), help="the bkn.models network")
    parser.add_argument("--norms", help=f"comma-separated variants of {', '.join(VARIANTS)}, or all")
    parser.add_argument("--batch", type=int, help="examples per device per step (default 32)")
    parser.add_argument("--statistics", type=int, help="statistics_batch_size of the grouped variants (default 2)")
    parser.add_argument("--image-size", type=int, help="default 32 for cifar_net, 224 otherwise")
    parser.add_argument("--device", help="cpu or cuda (default cpu)")
    parser.add_argument("--warmup", type=int, help="untimed steps per variant (default 2)")
    parser.add_argument("--steps", type=int, help="timed steps per variant per repeat (default 3)")
    parser.add_argument("--repeats", type=int, help="interleaved repeats (default 5)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction,
                        help="torch.compile every model (--no-compile: every model eager)")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, help="bfloat16 autocast")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, help="channels_last inputs/weights")
    parser.add_argument("--loader", nargs="+", choices=[*LOADER_DATA, "none"],
                        help="the data sets whose input pipeline is measured, or none")
    parser.add_argument("--loader-batches", type=int, help="timed loader batches (default 10)")
    parser.add_argument("--loader-workers", type=int, help="loader worker processes (default 2)")
    parser.add_argument("--output", type=Path,
                        help="report path without suffix (default results/benchmark/<preset>, else <device>)")
    return parser.parse_args(argv)


def resolve(args: argparse.Namespace) -> tuple[list[Setting], Options]:
    """The preset (or the free-run defaults) with every given argument applied; bad values raise one line."""
    if args.preset is None and args.model is None:
        raise ValueError("nothing to measure: pass --preset cpu|gpu or --model NAME")
    if args.preset is not None:
        settings, options = PRESETS[args.preset]
    else:
        settings = (Setting(args.model, *PAPER_INPUT[args.model], batch=32, statistics=2, variants=tuple(VARIANTS)),)
        options = Options("cpu", warmup=2, steps=3, repeats=5)
    overrides = {"model": args.model, "batch": args.batch, "statistics": args.statistics,
                 "image_size": args.image_size}
    if args.compile is not None:
        overrides["compile_mode"] = "default" if args.compile else None
    if args.norms is not None:
        variants = tuple(VARIANTS) if args.norms == "all" else tuple(args.norms.split(","))
        unknown = [v for v in variants if v not in VARIANTS]
        if unknown:
            raise ValueError(f"--norms: unknown variant {unknown[0]!r}; choose from {', '.join(VARIANTS)} or all")
        overrides["variants"] = variants
    settings = [replace(s, **{k: v for k, v in overrides.items() if v is not None or k == "compile_mode"})
                for s in settings]
    options = replace(options, **{k: v for k, v in {
        "device": args.device, "warmup": args.warmup, "steps": args.steps, "repeats": args.repeats,
        "amp": args.amp, "channels_last": args.channels_last,
        "loaders": None if args.loader is None else tuple(d for d in args.loader if d != "none"), "loader_batches": args.loader_batches,
        "loader_workers": args.loader_workers}.items() if v is not None})
    for setting in settings:
        num_groups(setting.batch, setting.statistics)  # raises naming the fix if statistics does not divide batch
    if options.device not in ("cpu", "cuda"):
        raise ValueError(f"--device {options.device}: use cpu or cuda")
    cuda_graphs = [s.compile_mode for s in settings if s.compile_mode is not None and compile_modes()[s.compile_mode]]
    if cuda_graphs and options.device != "cuda":
        raise ValueError(f"torch.compile mode {cuda_graphs[0]} runs the step in CUDA graphs, which needs --device cuda; "
                         "on a CPU pass --compile (the default mode) or --no-compile")
    if options.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no CUDA device; use --device cpu (or --preset cpu)")
    if min(options.warmup + 1, options.steps, options.repeats, options.loader_batches) < 1:
        raise ValueError("--steps, --repeats and --loader-batches must be >= 1, --warmup >= 0")
    return settings, options


def main(argv: list[str] | None = None) -> None:
    args = parse_arguments(argv)
    try:
        settings, options = resolve(args)
    except ValueError as error:
        sys.exit(f"benchmark: {error}")
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    started, load_at_start = time.perf_counter(), os.getloadavg()[0]
    candidates = []
    for setting in settings:
        for variant in setting.variants:
            candidates.append(build_candidate(setting, variant, options))
            print(f"built {setting.label}: {variant}", flush=True)
    time_round_robin(candidates, options)
    loaders = measure_loaders(settings, candidates, options)
    output = args.output or Path("results/benchmark") / (args.preset or options.device)
    command = shlex.join(["python", "scripts/benchmark.py", *(sys.argv[1:] if argv is None else argv)])
    write_report(output, settings, candidates, loaders, options, command, load_at_start,
                 time.perf_counter() - started)
    print(f"wrote {output}.md and .csv")


if __name__ == "__main__":
    main()
