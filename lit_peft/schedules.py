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
from typing import Any, Callable

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

SHAPES = ("linear", "cosine", "constant")


def warmup_then(shape: str, warmup_ratio: float, total_steps: Callable[[], int]) -> Callable[[int], float]:
    """The learning-rate factor at each step; ``total_steps`` is called once, on the first step."""
    if shape not in SHAPES:
        raise ValueError(f"unknown schedule '{shape}'; use one of {SHAPES}")
    cache: dict[str, int] = {}

    def factor(step: int) -> float:
        if step == 0 and "total" not in cache:  # at construction: no length yet (``settle`` redoes it)
            return 0.0 if warmup_ratio > 0 else 1.0
        settle_length()
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

    def settle_length() -> None:
        if "total" not in cache:
            cache["total"] = max(int(total_steps()), 1)

    factor.settle_length = settle_length  # type: ignore[attr-defined]
    return factor


def settle(scheduler: Any) -> None:
    """Once the run's length is known (training starts), set each group's learning rate from it. At
    construction a warm-up ratio means a first step at learning rate 0; where the ratio gives 0 warm-up
    steps (0.03 of 20 steps) that would be a step spent at 0, so the first step takes the full rate."""
    lambdas = getattr(scheduler, "lr_lambdas", [])
    if not any(hasattr(fn, "settle_length") for fn in lambdas):
        return
    for fn in lambdas:
        getattr(fn, "settle_length", lambda: None)()
    for group, base, fn in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, lambdas):
        group["lr"] = base * fn(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


def lazy_schedule(optimizer: Optimizer, shape: str, warmup_ratio: float, total_steps: Callable[[], int]) -> LambdaLR:
    return LambdaLR(optimizer, warmup_then(shape, warmup_ratio, total_steps))
