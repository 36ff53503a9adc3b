"""What a tuning trial of ``lit-peft compare`` adds to its ``lit-peft fit``: two Lightning callbacks.

- ``HoldOutValidation`` validates on rows held out of the training split, so choosing a method's
  settings never sees the split the study reports (``SplitDataModule.hold_out``).
- ``ReportToTrial`` reports the metric to the Optuna trial at every validation and stops the fit when
  the study's median pruner says the trial is behind. Our own rather than optuna-integration's
  ``PyTorchLightningPruningCallback``: that one reports once an epoch (a study's budget is often one
  epoch, so it could never prune) and needs a database storage under DDP; this one reports at the
  global step (``trainer.val_check_interval`` sets how often), works with the journal file the study
  keeps, and under DDP rank 0 reports and tells every rank whether to stop.

A pruned trial ends its fit normally and leaves ``pruned.json`` in its run folder; ``lit-peft compare``
(``lit_peft.tuning``) marks it pruned in the study.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Union

from lightning.pytorch import Callback, LightningModule, Trainer

from lit_peft import files


class HoldOutValidation(Callback):
    """Validate on ``rows`` of the training split (a fraction, or a count) instead of the validation split."""

    def __init__(self, rows: Union[int, float] = 0.2, seed: int = 0) -> None:  # int first: 64 rows stays a count
        self.rows, self.seed = rows, seed

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        kept, held = trainer.datamodule.hold_out(self.rows, self.seed)
        if trainer.is_global_zero:
            print(f"[lit-peft] tuning trial: validating on {held} rows held out of the training split; training on {kept}")


class ReportToTrial(Callback):
    """Report ``monitor`` to trial ``trial_id`` of study ``study`` in the journal file ``storage`` at every
    validation; stop the fit when the median pruner prunes it."""

    def __init__(self, storage: str, study: str, trial_id: int, monitor: str, n_startup_trials: int = 2,
                 n_warmup_steps: int = 0, folder: Optional[str] = None) -> None:
        self.storage, self.study, self.trial_id, self.monitor = storage, study, trial_id, monitor
        self.n_startup_trials, self.n_warmup_steps, self.folder = n_startup_trials, n_warmup_steps, folder
        self._trial: Any = None

    def trial(self) -> Any:
        if self._trial is None:
            import optuna

            from lit_peft.tuning import journal

            study = optuna.load_study(study_name=self.study, storage=journal(Path(self.storage)),
                                      pruner=optuna.pruners.MedianPruner(n_startup_trials=self.n_startup_trials,
                                                                         n_warmup_steps=self.n_warmup_steps))
            self._trial = optuna.trial.Trial(study, self.trial_id)
        return self._trial

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        prune = False
        if trainer.is_global_zero:
            value = trainer.callback_metrics.get(self.monitor)
            if value is not None:
                trial = self.trial()
                trial.report(float(value), step=trainer.global_step)
                prune = trial.should_prune()
                if prune and self.folder:
                    files.write_text(Path(self.folder) / "pruned.json", json.dumps(
                        {"step": trainer.global_step, self.monitor: float(value)}) + "\n")
        prune = trainer.strategy.broadcast(prune)
        if prune:
            trainer.should_stop = True
            if trainer.is_global_zero:
                print(f"[lit-peft] tuning trial pruned at step {trainer.global_step}: {self.monitor} behind the "
                      "median of earlier trials")
