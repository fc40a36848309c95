"""Top-1 / top-5 accuracy and loss on the test set with either inference option of the paper.

- ``population`` (option B): every normalizer uses its running statistics, so an example's output
  does not depend on the rest of its batch, and a batch of any size is evaluated whole.
- ``batch`` (option A): each test batch is normalized in groups of the training
  ``statistics_batch_size`` with its own statistics. A last batch is trimmed to a multiple of it
  (a group must be full), and the result reports how many examples were evaluated. A model with
  a layer that keeps no running statistics (``track_running_stats=False``) normalizes with batch
  statistics under either option, so its batches are trimmed under both.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bkn.nn import set_inference
from bkn.nn.norms import _GroupedNorm


@dataclass(frozen=True)
class EvalResult:
    top1: float  # percent
    top5: float  # percent (top-k with k = the number of classes when there are fewer than 5)
    loss: float  # mean cross-entropy
    examples: int


def _uses_batch_statistics(model: nn.Module, inference: str) -> bool:
    """Whether a test batch is normalized in statistics groups: option A, or a layer that says it
    uses batch statistics in eval mode (one without running statistics). Call after ``model.eval()``."""
    return inference == "batch" or any(isinstance(module, _GroupedNorm) and module._uses_batch_statistics()
                                       for module in model.modules())


def whole_groups(images: Tensor, labels: Tensor, statistics_batch_size: int) -> tuple[Tensor, Tensor]:
    """The batch without its last, incomplete statistics group (batch statistics need whole groups)."""
    keep = len(labels) - len(labels) % statistics_batch_size
    return images[:keep], labels[:keep]


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], *, inference: str,
             statistics_batch_size: int, to_device: Callable[[Tensor], Tensor],
             autocast: Callable[[], AbstractContextManager[None]]) -> EvalResult:
    """Evaluate ``model`` (unwrapped: no DDP, no compile) on ``batches`` of (images, labels);
    ``to_device`` moves an image batch to the model's device and memory format."""
    was_training = model.training
    model.eval()
    set_inference(model, inference)
    device = next(model.parameters()).device
    correct1 = torch.zeros((), device=device, dtype=torch.long)
    correct5 = torch.zeros_like(correct1)
    loss_sum = torch.zeros((), device=device)
    examples = 0
    trim = _uses_batch_statistics(model, inference)
    try:
        for images, labels in batches:
            if trim:
                images, labels = whole_groups(images, labels, statistics_batch_size)
            if len(labels) == 0:
                continue
            labels = labels.to(device, non_blocking=True)
            with autocast():
                logits = model(to_device(images)).float()
            loss_sum += F.cross_entropy(logits, labels, reduction="sum")
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]
            correct1 += top[:, 0].sum()
            correct5 += top.any(dim=1).sum()
            examples += len(labels)
    finally:
        set_inference(model, "population")
        model.train(was_training)
    if examples == 0:
        raise ValueError(f"no test batch holds a full statistics group of {statistics_batch_size} examples; "
                         f"lower batch.statistics or use more test data")
    return EvalResult(100 * correct1.item() / examples, 100 * correct5.item() / examples,
                      loss_sum.item() / examples, examples)
