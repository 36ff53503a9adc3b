"""ROUGE-1/2/L F-measures averaged over rows, kept as sums so that processes scoring different numbers
of rows sync in one collective.

torchmetrics' ``ROUGEScore`` keeps one tensor per row and, having no reduction for those lists,
gathers them one tensor at a time: under ``EvalShard`` (every row scored on exactly one rank) a rank
with 6 rows and one with 5 make different numbers of collective calls and wait on each other for
ever. The per-row scores are torchmetrics' own (``rouge_score``); the mean over rows is the figure
``ROUGEScore`` reports."""

from __future__ import annotations

from typing import Sequence

import torch
from torchmetrics import Metric
from torchmetrics.functional.text.rouge import rouge_score


class RougeMean(Metric):
    full_state_update = False

    def __init__(self, rouge_keys: Sequence[str] = ("rouge1", "rouge2", "rougeL")) -> None:
        super().__init__()
        self.rouge_keys = tuple(rouge_keys)
        self.add_state("total", torch.zeros(len(self.rouge_keys), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("rows", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: Sequence[str], target: Sequence[str]) -> None:
        for pred, ref in zip(preds, target, strict=True):
            scores = rouge_score(pred, ref, rouge_keys=self.rouge_keys)
            self.total += torch.stack([scores[f"{k}_fmeasure"] for k in self.rouge_keys]).to(self.total)
            self.rows += 1

    def compute(self) -> dict[str, torch.Tensor]:
        mean = (self.total / self.rows.clamp(min=1)).float()
        return {f"{key}_fmeasure": mean[i] for i, key in enumerate(self.rouge_keys)}
