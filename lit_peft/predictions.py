"""Write what ``predict`` returns to a file in the run folder, one line per example.

A task's ``predict_step`` returns a dict of per-example lists (``{"pred": [...], "probs": [...]}``);
this writer, built on Lightning's ``BasePredictionWriter``, splits them into examples and writes
them out as batches arrive. Where the rows go is the task's to say:

- ``prediction_file``: the default file name (``predictions.jsonl``; a forecaster's ``forecasts.csv``).
  A ``.jsonl`` file gets one JSON object per example, a ``.csv`` file the rows of
  ``prediction_table(example)`` (one per forecast step for a forecaster) under one header.
- ``plot_prediction(example, path)``: with ``plots: true``, a PNG of each series' last example,
  next to the file (tasks without it refuse the option).

Batches may come in another order than the dataset's (text is predicted longest row first, see
``LengthSorted``; under DDP each rank has its share), so each rank writes its examples, with their
dataset indices, to a part file; at the end rank zero writes the one file (and the plots) in dataset
order and removes the parts. Only each example's index and place in its part are held in memory
while it does (two numbers an example); a failed run removes its parts.
"""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path
from typing import Any, Optional

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter

from lit_peft import files
from lit_peft.errors import ConfigError
from lit_peft.metrics import run_dir


class PredictionWriter(BasePredictionWriter):
    def __init__(self, path: Optional[str] = None, plots: bool = False) -> None:
        """
        Args:
            path: file to write (``.jsonl`` or ``.csv``); by default the task's file name in the run folder.
            plots: also draw one PNG per series (forecasting), in a ``plots`` folder beside the file.
        """
        super().__init__(write_interval="batch")
        self.path, self.plots = path, plots
        self._file = None
        self.written: Optional[Path] = None

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        default = getattr(pl_module, "prediction_file", "predictions.jsonl")
        target = Path(self.path) if self.path else run_dir(trainer) / default
        if target.suffix not in (".jsonl", ".csv"):
            raise ConfigError(f"predictions.path '{target}' must end in .jsonl or .csv")
        if self.plots and not hasattr(pl_module, "plot_prediction"):
            raise ConfigError(f"{type(pl_module).__name__} draws no plots; leave predictions.plots false")
        plot_dir = target.with_name(f"{target.stem}_plots")
        for existing in (target, plot_dir) if self.plots else (target,):
            if existing.exists():  # never overwrite an earlier run's predictions
                raise ConfigError(f"'{existing}' already exists; give another predictions.path (or move it) so "
                                  "earlier predictions are kept")
        target.parent.mkdir(parents=True, exist_ok=True)
        self.written, self._plot_dir = target, plot_dir
        self._table = getattr(pl_module, "prediction_table", lambda example: [example])
        self._last: dict[str, dict[str, Any]] = {}
        self._csv: Optional[csv.DictWriter] = None
        self._part = self.part_file(trainer.global_rank)  # this rank's rows, merged in dataset order at the end
        self._file = self._part.open("w")

    def part_file(self, rank: int) -> Path:
        return self.written.with_name(f".{self.written.name}.rank{rank}.part")

    def write_on_batch_end(self, trainer, pl_module, prediction: Any, batch_indices, batch, batch_idx: int,
                           dataloader_idx: int) -> None:
        if not isinstance(prediction, dict):
            return
        keys = list(prediction)
        for j, values in enumerate(zip(*(prediction[k] for k in keys))):
            example = dict(zip(keys, values))
            if not batch_indices:  # rows run longest first: without their indices the order cannot be restored
                raise ConfigError("the predict loader gave no dataset indices, so predictions cannot be written in "
                                  "the data's order; give predict a map-style dataset (one with __getitem__)")
            self._file.write(f"{int(batch_indices[j])}\t{json.dumps(example)}\n")

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        """A failed predict leaves no part file behind (the earlier run's results were never touched)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if getattr(self, "written", None) is not None:
            self.part_file(trainer.global_rank).unlink(missing_ok=True)

    def _emit(self, example: dict[str, Any]) -> None:
        if self.plots:
            self._last[str(example.get("series", "all"))] = example
        if self.written.suffix == ".jsonl":
            self._file.write(json.dumps(example) + "\n")
            return
        for row in self._table(example):
            if self._csv is None:
                self._csv = csv.DictWriter(self._file, fieldnames=list(row))
                self._csv.writeheader()
            self._csv.writerow(row)

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._file is None:
            return
        self._file.close()
        self._file = None
        trainer.strategy.barrier("lit_peft.predictions")  # every rank's part is complete
        if not trainer.is_global_zero:
            return
        parts = [self.part_file(rank) for rank in range(trainer.world_size)]
        places = []  # (dataset index, part, offset of the line in the part)
        for p, part in enumerate(parts):
            with part.open("rb") as lines:
                offset = 0
                for line in lines:
                    places.append((int(line[:line.index(b"\t")]), p, offset))
                    offset += len(line)
        places.sort()
        tmp = files.temporary(self.written)  # written whole, then linked into place (never over another file)
        self._file = tmp.open("x", newline="")
        readers = [part.open("rb") for part in parts]
        try:
            last = None
            for index, p, offset in places:
                if index != last:  # the sampler pads no rank in predict, but be sure
                    readers[p].seek(offset)
                    self._emit(json.loads(readers[p].readline().split(b"\t", 1)[1]))
                    last = index
            self._file.close()
            self._file = None
            files.place_new(tmp, self.written)  # fails rather than replace a file that appeared meanwhile
        except BaseException:
            for part in parts:  # every rank is done with its part (the barrier)
                part.unlink(missing_ok=True)
            raise
        finally:
            for reader in readers:
                reader.close()
            if self._file is not None:
                self._file.close()
                self._file = None
            tmp.unlink(missing_ok=True)
        for part in parts:
            part.unlink()
        print(f"[lit-peft] predictions: {self.written}")
        if self.plots and self._last:
            self._plot_dir.mkdir(parents=True)
            for series, example in self._last.items():
                pl_module.plot_prediction(example, self._plot_dir / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', series)}.png")
            print(f"[lit-peft] plots: {self._plot_dir} ({len(self._last)} series)")


JsonlPredictionWriter = PredictionWriter  # the name earlier configs and code use
