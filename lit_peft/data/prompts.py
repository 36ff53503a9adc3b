"""Prompt -> response data for causal language models: the base of GSM8K, summaries and the
user's own instruction and chat data (``InstructionData``).

A subclass turns its source into ``Record``s (a prompt and response, or a whole conversation; the
reference a generation is scored against; where the record came from). Each is rendered through
the tokenizer's chat template (``chat.ChatFormat``: assistant turns learned, up to and including the
template's end of turn; a plain template for tokenizers without one), tokenized, and batched:

- training batches: right-padded ids with ``labels`` = -100 outside the learned assistant turns;
  with ``pack`` whole examples share rows of ``max_length`` tokens, each with ``position_ids``
  restarting at 0, so that attention stays within each example (see ``pack``);
- evaluation batches: the same, plus the prompt that asks for the last assistant turn, left-padded,
  for batched generation, and the reference strings.

A prompt that leaves no room for the response inside ``max_length`` is an error naming the record,
as is a conversation with nothing left to learn once cut to ``max_length``; a response that does not
fit is cut (and counted in a message).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal, Optional

import torch

from lit_peft.data.base import TokenizedDataModule, TokenizedDataset
from lit_peft.data.chat import ChatFormat
from lit_peft.errors import ConfigError

SPLITS = ("train", "val", "test", "predict")


@dataclass
class Record:
    prompt: str
    response: str
    reference: str  # what the metric compares a generation with (GSM8K: the final number)
    source: str  # file:line or dataset:index, for error messages
    messages: Optional[list[dict]] = None  # a whole conversation (instruction data); else prompt -> response
    tools: Optional[list[dict]] = None  # tool definitions the chat template renders


class PromptResponseData(TokenizedDataModule, abc.ABC):
    """Batches of prompt/response pairs for a causal LM; subclasses say where records come from."""

    #: the task metric this data is scored with: "exact_match" or "rouge"
    metric = "exact_match"

    def __init__(self, max_length: int = 512, max_response_length: int = 256, batch_size: int = 8,
                 eval_batch_size: Optional[int] = None, num_workers: int = 0, limit_train_rows: Optional[int] = None,
                 limit_eval_rows: Optional[int] = None, pack: bool = False, system_prompt: Optional[str] = None,
                 seed: int = 42, tokenizer: Optional[str] = None, predict_file: Optional[str] = None,
                 group_by_length: bool = True, train_on: Literal["all", "last"] = "all",
                 overlong: Literal["cut", "drop"] = "cut") -> None:
        """
        Args:
            max_length: context budget in tokens for prompt + response.
            max_response_length: tokens kept of each training response.
            batch_size, eval_batch_size: examples per batch (eval defaults to batch_size).
            num_workers: dataloader workers.
            limit_train_rows, limit_eval_rows: keep this many rows (train: a seeded random subset).
            pack: put several whole training examples in each row of max_length tokens (no padding
                between them, no attention across them).
            system_prompt: a system message for chat templates that take one.
            seed: for the train subset and the epoch order.
            tokenizer: backbone whose tokenizer to use (default: the model's).
            predict_file: JSONL / CSV / TSV rows for ``predict`` (the prompt's fields; answers optional);
                without it ``predict`` generates for the test split.
            group_by_length: train on batches of examples (or packed rows) of similar length, and evaluate longest prompt first, so batched
                generation pads little; ``false`` draws training batches at random.
            train_on: learn every assistant turn of a conversation (``all``) or the last one only.
            overlong: what to do with a record longer than max_length: ``cut`` it there (counted; an error
                where nothing to learn is left), or ``drop`` it (counted).
        """
        super().__init__()
        if max_length < 2 or max_response_length < 1:
            raise ConfigError(f"max_length ({max_length}) and max_response_length ({max_response_length}) must be positive")
        self.cfg = SimpleNamespace(max_length=max_length, max_response_length=max_response_length, batch_size=batch_size,
                                   eval_batch_size=eval_batch_size or batch_size, num_workers=num_workers,
                                   limit_train_rows=limit_train_rows, limit_eval_rows=limit_eval_rows, pack=pack,
                                   system_prompt=system_prompt, seed=seed, tokenizer=tokenizer,
                                   group_by_length=group_by_length, train_on=train_on,
                                   overlong=overlong)
        if train_on not in ("all", "last") or overlong not in ("cut", "drop"):
            raise ConfigError(f"train_on must be all or last (got {train_on!r}), overlong cut or drop (got {overlong!r})")
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
    @property
    def chat(self) -> ChatFormat:
        """How this tokenizer renders conversations (built once per tokenizer)."""
        if getattr(self, "_chat", None) is None or self._chat.tok is not self.tokenizer:
            self._chat = ChatFormat(self.tokenizer, train_on=self.cfg.train_on)
        return self._chat

    def conversation(self, record: Record) -> list[dict]:
        """The record as chat turns: its own conversation, or system? + user prompt + assistant response;
        ``system_prompt`` goes first where the conversation has no system turn of its own."""
        if record.messages is not None:
            messages = list(record.messages)
        else:
            messages = [{"role": "user", "content": record.prompt}]
            if record.response:
                messages.append({"role": "assistant", "content": record.response})
        if self.cfg.system_prompt and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": self.cfg.system_prompt})
        return messages

    def encode(self, record: Record, train: bool) -> Optional[dict[str, Any]]:
        """Ids and labels of the whole conversation (see ``chat``), and for evaluation the prompt that asks
        for its last assistant turn; ``None`` for a record longer than ``max_length`` with ``overlong: drop``."""
        h, chat = self.cfg, self.chat
        messages = self.conversation(record)
        answered = messages[-1]["role"] == "assistant"
        try:
            if answered:  # the prompt is the conversation's own ids up to the last answer: what training saw
                ids, labels, prompt_len, cut = chat.encode(messages, record.tools, max_turn_tokens=h.max_response_length)
                prompt_ids = ids[:prompt_len]
            else:  # predict without a reference: the prompt alone
                prompt_ids = chat.prompt(messages, record.tools)
                ids, labels, cut = prompt_ids, [-100] * len(prompt_ids), False
        except ConfigError as err:
            raise ConfigError(f"{record.source}: {err}") from None
        if len(ids) > h.max_length and h.overlong == "drop":
            return None
        length = len(ids)
        ids, labels = ids[: h.max_length], labels[: h.max_length]
        nothing_learned = answered and all(t == -100 for t in labels[1:])
        if len(prompt_ids) >= h.max_length and (not train or nothing_learned):
            raise ConfigError(
                f"{record.source}: the prompt is {len(prompt_ids)} tokens, which leaves no room for the response in "
                f"max_length={h.max_length}; raise max_length, shorten the prompt, or drop the record"
            )
        if cut or length > h.max_length:
            self.truncated += 1  # a response's end is cut to fit the context
        if nothing_learned:
            raise ConfigError(
                f"{record.source}: the conversation is {length} tokens and nothing of its assistant turns fits in "
                f"max_length={h.max_length}; raise max_length, or drop records this long (overlong: drop)")
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
            dropped = sum(e is None for e in examples)
            if dropped:
                self.records[split] = [r for r, e in zip(records, examples) if e is not None]
                examples = [e for e in examples if e is not None]
                print(f"[lit-peft] {split}: dropped {dropped} of {len(records)} record(s) longer than "
                      f"max_length={h.max_length} tokens (overlong: drop)")
                if not examples:
                    raise ConfigError(f"every {split} record is longer than max_length={h.max_length} tokens; raise "
                                      "max_length, or use overlong: cut")
            if split == "train" and h.pack:
                examples = pack(examples, h.max_length)
            self.datasets[split] = TokenizedDataset(examples)
        if self.truncated:
            print(f"[lit-peft] {self.truncated} response(s) cut at max_length={h.max_length} or "
                  f"max_response_length={h.max_response_length} tokens")

    def row_lengths(self, split: str, train: bool) -> Optional[torch.Tensor]:
        """Training: the rows' tokens (packed rows too: batches of similar fill pad least); evaluation: the
        prompt's, which is what batched generation pads."""
        if train:
            return self.datasets[split].lengths()
        return self.datasets[split].lengths("prompt_ids")

    def collate_fn(self, train: bool) -> "Collator":
        return Collator(self.tokenizer.pad_token_id, with_prompts=not train)

    def predict_dataloader(self):
        return self._loader("predict" if "predict" in self.datasets else "test")


def pack(examples: list[dict[str, Any]], block: int) -> list[dict[str, Any]]:
    """Whole examples packed into rows of at most ``block`` tokens (best fit, longest first), each
    example's ``position_ids`` restarting at 0: transformers' models read a restart as a new sequence
    and attend within each example alone (sdpa and eager through the mask, flash-attention through
    its varlen path). An example's first label is dropped: run alone, nothing predicts it."""
    import bisect

    rows: list[list[int]] = []  # example indices per row
    room: list[tuple[int, int]] = []  # (free tokens, row), sorted: best fit is the first with enough room
    for i in sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"])):
        size = len(examples[i]["input_ids"])
        at = bisect.bisect_left(room, (size, -1))
        if at < len(room):
            free, row = room.pop(at)
        else:
            free, row = block, len(rows)
            rows.append([])
        rows[row].append(i)
        bisect.insort(room, (free - size, row))
    packed = []
    for members in rows:
        parts = [examples[i] for i in members]
        packed.append({"input_ids": [t for e in parts for t in e["input_ids"]],
                       "labels": [t for e in parts for t in [-100] + e["labels"][1:]],
                       "position_ids": [p for e in parts for p in range(len(e["input_ids"]))]})
    return [r for r in packed if any(t != -100 for t in r["labels"])]


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
        if "position_ids" in examples[0]:  # packed rows: the padding is one more sequence of its own
            width = batch["input_ids"].shape[1]
            batch["position_ids"] = torch.tensor([e["position_ids"] + list(range(width - len(e["position_ids"])))
                                                  for e in examples])
        if self.with_prompts:
            prompts = [e["prompt_ids"] for e in examples]
            batch["prompt_input_ids"] = self._pad(prompts, self.pad_id, left=True)
            batch["prompt_attention_mask"] = self._pad([[1] * len(r) for r in prompts], 0, left=True)
            batch["references"] = [e["reference"] for e in examples]
            batch["prompts"] = [e["prompt"] for e in examples]
        return batch
