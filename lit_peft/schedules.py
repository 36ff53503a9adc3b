"""Learning-rate schedules whose length is read lazily from the trainer.

transformers' ``get_scheduler`` needs the number of training steps when the optimizer is built,
and asking Lightning for it then (``trainer.estimated_stepping_batches`` inside
``configure_optimizers``) builds the training dataloader before a resumed run's loader state is
restored, so a run resumed mid-epoch would replay the epoch's first batches. These schedules take
the same shapes (linear warm-up, then linear decay, cosine decay or constant) but ask for the
length at the first step, after the restore.
"""

from __future__ import annotations

import math
from typing import Callable

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

SHAPES = ("linear", "cosine", "constant")


def warmup_then(shape: str, warmup_ratio: float, total_steps: Callable[[], int]) -> Callable[[int], float]:
    """The learning-rate factor at each step; ``total_steps`` is called once, on the first step."""
    if shape not in SHAPES:
        raise ValueError(f"unknown schedule '{shape}'; use one of {SHAPES}")
    cache: dict[str, int] = {}

    def factor(step: int) -> float:
        if step == 0:  # at construction: no length needed yet
            return 0.0 if warmup_ratio > 0 else 1.0
        if "total" not in cache:
            cache["total"] = max(int(total_steps()), 1)
        total = cache["total"]
        warmup = int(warmup_ratio * total)
        if step < warmup:
            return step / max(1, warmup)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if shape == "linear":
            return 1.0 - progress
        if shape == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    return factor


def lazy_schedule(optimizer: Optimizer, shape: str, warmup_ratio: float, total_steps: Callable[[], int]) -> LambdaLR:
    return LambdaLR(optimizer, warmup_then(shape, warmup_ratio, total_steps))
