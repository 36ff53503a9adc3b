"""Preemption under Slurm: Lightning's auto-requeue, taken at an optimizer-step boundary on every rank
at once.

Lightning's ``SLURMEnvironment(auto_requeue=True)`` saves an HPC checkpoint and runs ``scontrol
requeue`` from inside the SIGUSR1 handler, wherever the signal lands: mid-step, and on each rank at
a different point (a DDP rank may be inside an all-reduce while another enters the checkpoint's
barrier). ``RequeueAtStepEnd`` keeps Lightning's handler but defers it: the signal only sets a flag,
and the ranks act on it together after an optimizer step, never between the micro-batches of an
accumulation window (a checkpoint holds no accumulated gradients, so one taken mid-window would
resume inexactly). There they all call Lightning's handler, so the checkpoint holds whole steps, the
resumed job continues at the exact step, and every rank stops (``SIGTERMException``, as Lightning
does on SIGTERM) instead of training on into steps the requeued job will do again.

Agreeing is a collective, and reading its result waits for the device: on several processes the
ranks check every ``n`` optimizer steps, with ``n`` set at each check from the slowest rank's step
time so that checks come about every ``check_seconds`` (``LIT_PEFT_REQUEUE_CHECK_SECONDS``, 30 s: well inside the signal's lead time,
``lit-peft slurm --signal_lead``, 300 s by default). One process checks its own flag at every step,
with no collective. The CLI adds it to every run; outside a Slurm job with auto-requeue it does
nothing.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any, Optional

import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from lit_peft import patches


class RequeueAtStepEnd(Callback):
    def __init__(self, check_seconds: Optional[float] = None) -> None:
        if check_seconds is None:  # the CLI's: LIT_PEFT_REQUEUE_CHECK_SECONDS, or 30
            check_seconds = float(os.environ.get("LIT_PEFT_REQUEUE_CHECK_SECONDS", "30"))
        self.signum: Optional[int] = None
        self.deferred: Any = None
        self.requested = False
        self.check_seconds = check_seconds
        self.next_check = 0  # the optimizer step at which the ranks next agree
        self.last: Optional[tuple[int, float]] = None  # (step, time) of the previous check

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Lightning registered its handler just before training starts; wrap it
        env = trainer._accelerator_connector.cluster_environment
        if not (isinstance(env, SLURMEnvironment) and env.auto_requeue and env.requeue_signal is not None):
            return
        self.signum = env.requeue_signal
        handler = signal.getsignal(self.signum)
        if callable(handler) and handler is not self._flag:
            self.deferred = handler
            signal.signal(self.signum, self._flag)

    def _flag(self, signum: int, frame: Any) -> None:
        self.requested = True

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.deferred is None or not patches.closes_window(trainer):
            return  # not under auto-requeue, or inside an accumulation window
        if not self.agreed(trainer):
            return
        rank_zero_info(f"[lit-peft] requeue signal: saving an HPC checkpoint at step {trainer.global_step} and requeueing")
        self.deferred(self.signum, None)  # Lightning's: HPC checkpoint on every rank, `scontrol requeue` on rank 0
        self.deferred = None
        raise SIGTERMException()

    def agreed(self, trainer: Trainer) -> bool:
        """Whether the ranks requeue now: this rank's flag alone in one process; in several, at check steps
        only, the flag of any rank, with the steps to the next check agreed in the same collective."""
        if trainer.world_size == 1:
            return self.requested
        step = trainer.global_step
        if step < self.next_check:
            return False
        now = time.monotonic()
        steps = 1
        if self.last is not None and step > self.last[0]:
            per_step = (now - self.last[1]) / (step - self.last[0])
            steps = max(1, int(self.check_seconds / max(per_step, 1e-9)))
        self.last = (step, now)
        # one collective: [any rank asked, -(the fewest steps any rank proposes)] under max
        both = torch.tensor([float(self.requested), -float(steps)], device=trainer.strategy.root_device)
        both = trainer.strategy.reduce(both, reduce_op="max").cpu()
        self.next_check = step + int(-both[1])
        return bool(both[0] > 0)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.deferred is not None and signal.getsignal(self.signum) is self._flag:
            signal.signal(self.signum, self.deferred)
        self.deferred = None
