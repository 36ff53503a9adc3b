"""Preemption under Slurm: Lightning's auto-requeue, taken at a step boundary on every rank at once.

Lightning's ``SLURMEnvironment(auto_requeue=True)`` saves an HPC checkpoint and runs ``scontrol
requeue`` from inside the SIGUSR1 handler, wherever the signal lands: mid-step, and on each rank at
a different point (a DDP rank may be inside an all-reduce while another enters the checkpoint's
barrier). ``RequeueAtStepEnd`` keeps Lightning's handler but defers it: the signal only sets a flag;
at the end of the next training step the ranks agree (one all-reduce) and all call Lightning's
handler together, so the checkpoint holds a whole step, the resumed job continues at the exact
step, and then every rank stops (``SIGTERMException``, as Lightning does on SIGTERM) instead of
training on into steps the requeued job will do again. The CLI adds it to every run; outside a
Slurm job with auto-requeue it does nothing.
"""

from __future__ import annotations

import signal
from typing import Any, Optional

from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info


class RequeueAtStepEnd(Callback):
    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self.deferred: Any = None
        self.requested = False

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
        if self.deferred is None or not trainer.strategy.reduce_boolean_decision(self.requested, all=False):
            return
        rank_zero_info(f"[lit-peft] requeue signal: saving an HPC checkpoint at step {trainer.global_step} and requeueing")
        self.deferred(self.signum, None)  # Lightning's: HPC checkpoint on every rank, `scontrol requeue` on rank 0
        self.deferred = None
        raise SIGTERMException()

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.deferred is not None and signal.getsignal(self.signum) is self._flag:
            signal.signal(self.signum, self.deferred)
        self.deferred = None
