"""Seeding, and saving / restoring every random number generator a training step draws from.

Python's ``random``, numpy and torch (CPU and every CUDA device) are all captured, so a resumed
run draws the same augmentations and the same Monte-Carlo transition noise as an uninterrupted
one. The captured state holds only tensors and plain Python values: ``torch.load(weights_only=True)``
reads it back.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def seed_process(seed: int, rank: int = 0) -> None:
    """Seed every generator from ``(seed, rank)``: ranks draw different augmentations and noise,
    and no two (seed, rank) pairs share a stream (numpy's SeedSequence mixes both)."""
    process_seed = int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])
    random.seed(process_seed)
    np.random.seed(process_seed)
    torch.manual_seed(process_seed)  # also seeds every CUDA device


def capture_rng_state() -> dict[str, Any]:
    _, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["position"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
