"""Write what ``predict`` returns to ``predictions.jsonl`` in the run folder, one line per example.

A task's ``predict_step`` returns a dict of per-example lists (``{"pred": [...], "probs": [...]}``);
this writer, built on Lightning's ``BasePredictionWriter``, splits them into rows as batches
arrive, so nothing is held in memory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter

from lit_peft.errors import ConfigError
from lit_peft.metrics import run_dir


class JsonlPredictionWriter(BasePredictionWriter):
    def __init__(self, path: Optional[str] = None) -> None:
        """
        Args:
            path: file to write; by default ``predictions.jsonl`` in the run folder.
        """
        super().__init__(write_interval="batch")
        self.path = path
        self._file = None

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        target = Path(self.path) if self.path else run_dir(trainer) / "predictions.jsonl"
        if trainer.world_size > 1:
            target = target.with_name(f"{target.stem}.rank{trainer.global_rank}{target.suffix}")
        target.parent.mkdir(parents=True, exist_ok=True)
        self.written = target
        if target.exists():  # never overwrite an earlier run's predictions
            raise ConfigError(f"'{target}' already exists; give another predictions.path (or move the file) so "
                              "earlier predictions are kept")
        self._file = target.open("x")

    def write_on_batch_end(self, trainer, pl_module, prediction: Any, batch_indices, batch, batch_idx: int,
                           dataloader_idx: int) -> None:
        if not isinstance(prediction, dict):
            return
        keys = list(prediction)
        for values in zip(*(prediction[k] for k in keys)):
            self._file.write(json.dumps(dict(zip(keys, values))) + "\n")

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            print(f"[lit-peft] predictions: {self.written}")
