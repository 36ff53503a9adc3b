"""Prompt -> response data for causal language models: the base of GSM8K and summarization.

A subclass turns its source into ``Record``s (prompt, response, reference, and where the record
came from); this module formats them with the tokenizer's chat template when it has one (a plain
``prompt\\n`` otherwise), tokenizes, and batches:

- training batches: prompt + response + EOS, right-padded, with ``labels`` = -100 on the prompt
  and the padding, so the loss covers the response only; with ``pack`` examples are concatenated
  into ``max_length`` blocks (fewer padding tokens; attention then spans neighbouring examples);
- evaluation batches: the same, plus the prompt alone, left-padded, for batched generation, and
  the reference strings.

A prompt that leaves no room for the response inside ``max_length`` is an error naming the record;
a response that does not fit is cut (and counted in a message).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

import torch

from lit_peft.data.base import TokenizedDataModule, TokenizedDataset
from lit_peft.errors import ConfigError

SPLITS = ("train", "val", "test", "predict")


@dataclass
class Record:
    prompt: str
    response: str
    reference: str  # what the metric compares a generation with (GSM8K: the final number)
    source: str  # file:line or dataset:index, for error messages


class PromptResponseData(TokenizedDataModule, abc.ABC):
    """Batches of prompt/response pairs for a causal LM; subclasses say where records come from."""

    #: the task metric this data is scored with: "exact_match" or "rouge"
    metric = "exact_match"

    def __init__(self, max_length: int = 512, max_response_length: int = 256, batch_size: int = 8,
                 eval_batch_size: Optional[int] = None, num_workers: int = 0, limit_train_rows: Optional[int] = None,
                 limit_eval_rows: Optional[int] = None, pack: bool = False, system_prompt: Optional[str] = None,
                 seed: int = 42, tokenizer: Optional[str] = None, predict_file: Optional[str] = None,
                 group_by_length: bool = True) -> None:
        """
        Args:
            max_length: context budget in tokens for prompt + response.
            max_response_length: tokens kept of each training response.
            batch_size, eval_batch_size: examples per batch (eval defaults to batch_size).
            num_workers: dataloader workers.
            limit_train_rows, limit_eval_rows: keep this many rows (train: a seeded random subset).
            pack: concatenate training examples into blocks of max_length tokens.
            system_prompt: a system message for chat templates that take one.
            seed: for the train subset and the epoch order.
            tokenizer: backbone whose tokenizer to use (default: the model's).
            predict_file: JSONL / CSV / TSV rows for ``predict`` (the prompt's fields; answers optional);
                without it ``predict`` generates for the test split.
            group_by_length: train on batches of examples of similar length (not with ``pack``, whose
                blocks are all ``max_length``), and evaluate longest prompt first, so batched
                generation pads little; ``false`` draws training batches at random.
        """
        super().__init__()
        if max_length < 2 or max_response_length < 1:
            raise ConfigError(f"max_length ({max_length}) and max_response_length ({max_response_length}) must be positive")
        self.cfg = SimpleNamespace(max_length=max_length, max_response_length=max_response_length, batch_size=batch_size,
                                   eval_batch_size=eval_batch_size or batch_size, num_workers=num_workers,
                                   limit_train_rows=limit_train_rows, limit_eval_rows=limit_eval_rows, pack=pack,
                                   system_prompt=system_prompt, seed=seed, tokenizer=tokenizer,
                                   group_by_length=group_by_length)
        self.datasets: dict[str, TokenizedDataset] = {}
        self.records: dict[str, list[Record]] = {}
        self.absent: set[str] = set()  # splits the source does not have
        self.tokenizer = None
        if predict_file is not None and not Path(predict_file).is_file():
            raise ConfigError(f"predict_file '{predict_file}' does not exist")
        self.predict_file = predict_file

    @abc.abstractmethod
    def split_rows(self, split: str) -> Optional[list[tuple[dict, str]]]:
        """(row, where) pairs of ``split`` (train, val, test), or ``None`` where the source has none."""

    @abc.abstractmethod
    def to_record(self, row: dict, where: str, labelled: bool = True) -> Optional[Record]:
        """The row as a Record (``None`` skips it, counted); ``labelled=False`` (predict) lets the
        response be absent."""

    def predict_rows(self) -> Optional[list[tuple[dict, str]]]:
        """Rows of ``predict_file`` (no responses needed); without one, predict uses the test split."""
        if self.predict_file is None:
            return None
        from lit_peft.data.text_classification import read_rows

        return [(row, f"{self.predict_file}:{line}") for line, row in read_rows(self.predict_file)]

    def load_split(self, split: str) -> Optional[list[Record]]:
        """Records of ``split``: row limits first (so a large source is not tokenized whole), then checks."""
        h = self.cfg
        rows = self.predict_rows() if split == "predict" else self.split_rows(split)
        if rows is None:
            return None
        if not rows:
            raise ConfigError(f"{type(self).__name__}: the {split} split is empty")
        if split == "train" and h.limit_train_rows is not None:
            generator = torch.Generator().manual_seed(h.seed)
            rows = [rows[i] for i in torch.randperm(len(rows), generator=generator)[: h.limit_train_rows]]
        elif split != "train" and h.limit_eval_rows is not None:
            rows = rows[: h.limit_eval_rows]
        records, skipped = [], 0
        for row, where in rows:  # files come through read_rows, which refuses rows that are not objects
            record = self.to_record(row, where, labelled=split != "predict")
            if record is None:
                skipped += 1
            else:
                records.append(record)
        if skipped:
            print(f"[lit-peft] {split}: skipped {skipped} record(s) with nothing to learn or score")
        if not records:
            raise ConfigError(f"{type(self).__name__}: the {split} split has no usable records")
        return records

    # ---- formatting ---------------------------------------------------------------------------
    def format_prompt(self, prompt: str) -> str:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            messages = ([{"role": "system", "content": self.cfg.system_prompt}] if self.cfg.system_prompt else [])
            messages.append({"role": "user", "content": prompt})
            return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return prompt + "\n"

    def encode(self, record: Record, train: bool) -> dict[str, Any]:
        tok, h = self.tokenizer, self.cfg
        prompt_ids = tok(self.format_prompt(record.prompt), add_special_tokens=False)["input_ids"]
        if tok.bos_token_id is not None and getattr(tok, "add_bos_token", False) and prompt_ids[:1] != [tok.bos_token_id]:
            prompt_ids = [tok.bos_token_id] + prompt_ids
        response_ids = tok(record.response, add_special_tokens=False)["input_ids"][: h.max_response_length]
        response_ids = response_ids + [tok.eos_token_id]
        if len(prompt_ids) >= h.max_length:
            raise ConfigError(
                f"{record.source}: the prompt is {len(prompt_ids)} tokens, which leaves no room for the response in "
                f"max_length={h.max_length}; raise max_length, shorten the prompt, or drop the record"
            )
        if len(prompt_ids) + len(response_ids) > h.max_length:
            self.truncated += 1  # the response's end is cut to fit the context
        ids = (prompt_ids + response_ids)[: h.max_length]
        labels = ([-100] * len(prompt_ids) + response_ids)[: h.max_length]
        return {"input_ids": ids, "labels": labels, "prompt_ids": prompt_ids, "reference": record.reference,
                "prompt": record.prompt}

    # ---- Lightning hooks -------------------------------------------------------------------------
    def setup(self, stage: Optional[str] = None) -> None:
        """Tokenize the splits the stage uses (all without a stage), each once."""
        if self.tokenizer is None:
            self.tokenizer = self._tokenizer()
        h = self.cfg
        self.truncated = 0
        needs = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",),
                 "predict": ("predict",) if self.predict_file else ("test",)}.get(stage or "", SPLITS)
        for split in needs:
            if split in self.datasets or split in self.absent:
                continue
            records = self.load_split(split)
            if records is None:
                self.absent.add(split)
                continue
            self.records[split] = records
            examples = [self.encode(r, train=split == "train") for r in records]
            if split == "train" and h.pack:
                examples = pack(examples, h.max_length)
            self.datasets[split] = TokenizedDataset(examples)
        if self.truncated:
            print(f"[lit-peft] {self.truncated} response(s) cut at max_length={h.max_length} or "
                  f"max_response_length={h.max_response_length} tokens")

    def row_lengths(self, split: str, train: bool) -> Optional[torch.Tensor]:
        """Training: prompt + response tokens (none when packed: every block is ``max_length``);
        evaluation: the prompt's, which is what batched generation pads."""
        if train:
            return None if self.cfg.pack else self.datasets[split].lengths()
        return self.datasets[split].lengths("prompt_ids")

    def collate_fn(self, train: bool) -> "Collator":
        return Collator(self.tokenizer.pad_token_id, with_prompts=not train)

    def predict_dataloader(self):
        return self._loader("predict" if "predict" in self.datasets else "test")


def pack(examples: list[dict[str, Any]], block: int) -> list[dict[str, Any]]:
    """Concatenate examples' ids and labels and cut them into blocks of ``block`` tokens; a block
    keeps only if some token after its first is a label (the first token is never predicted)."""
    ids = [t for e in examples for t in e["input_ids"]]
    labels = [t for e in examples for t in e["labels"]]
    return [{"input_ids": ids[i:i + block], "labels": labels[i:i + block]}
            for i in range(0, len(ids), block) if any(t != -100 for t in labels[i + 1:i + block])]


class Collator:
    """Right-padded ids/labels/mask for the loss; left-padded prompts and references for generation."""

    def __init__(self, pad_id: int, with_prompts: bool) -> None:
        self.pad_id, self.with_prompts = pad_id, with_prompts

    @staticmethod
    def _pad(rows: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
        width = max(len(r) for r in rows)
        return torch.tensor([([value] * (width - len(r)) + r) if left else (r + [value] * (width - len(r))) for r in rows])

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        ids = [e["input_ids"] for e in examples]
        batch: dict[str, Any] = {
            "input_ids": self._pad(ids, self.pad_id),
            "attention_mask": self._pad([[1] * len(r) for r in ids], 0),
            "labels": self._pad([e["labels"] for e in examples], -100),
        }
        if self.with_prompts:
            prompts = [e["prompt_ids"] for e in examples]
            batch["prompt_input_ids"] = self._pad(prompts, self.pad_id, left=True)
            batch["prompt_attention_mask"] = self._pad([[1] * len(r) for r in prompts], 0, left=True)
            batch["references"] = [e["reference"] for e in examples]
            batch["prompts"] = [e["prompt"] for e in examples]
        return batch
