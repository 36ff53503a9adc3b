"""The user's own instruction and chat data: OpenAI-style ``messages``, ShareGPT or Alpaca records.

Records come from files (JSONL / JSON / CSV / TSV / parquet; a CSV cell holding a conversation is
read as JSON), a hub dataset, or ``chatterbot_corpus`` (the ``chatterbot-corpus`` package's English
conversations, human-written and offline; see ``chatterbot_rows``). Each record's form is detected
from its fields, or named with ``format``:

- ``messages``: ``{"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": ...,
  "tool_calls": [...]}, ...], "tools": [...]}`` (OpenAI's chat format; ``tools`` optional);
- ``sharegpt``: ``{"conversations": [{"from": "human"|"gpt"|"system"|..., "value": ...}], "system": ...}``;
- ``alpaca``: ``{"instruction": ..., "input": ..., "output": ..., "system": ...}``.

Every record becomes a conversation rendered through the tokenizer's chat template (``chat``), tool
calls and tool definitions passed to it. A record is refused, naming its file and line, for an
unknown role, an assistant turn with neither words nor tool calls, no assistant turn at all, or a
field of the wrong type. Turns after the last assistant turn are dropped (nothing to learn there).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any, Literal, Optional

import torch

from lit_peft.data.chat import ROLES
from lit_peft.data.prompts import PromptResponseData, Record
from lit_peft.data.sources import FilesOrHub
from lit_peft.errors import ConfigError

FORMATS = ("messages", "sharegpt", "alpaca")
#: ShareGPT's speakers, as the chat roles they are
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
                  "bard": "assistant", "bing": "assistant", "model": "assistant", "system": "system",
                  "function_call": "assistant", "observation": "tool", "tool": "tool", "function": "tool"}
#: chatterbot-corpus files left out: templated, heavily repeated text (tech_support: 1,050 conversations
#: on ~100 prompts; coding: generated code listings), not human conversation
CHATTERBOT_SKIP = {"tech_support.yml", "coding.yml"}
CHATTERBOT_SPLITS = {"train": (0.0, 0.8), "val": (0.8, 0.9), "test": (0.9, 1.0)}


def detect(row: dict, where: str) -> str:
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row and "output" in row:
        return "alpaca"
    raise ConfigError(f"{where}: cannot tell the record's format from its fields ({', '.join(sorted(map(str, row)))}); "
                      "instruction data needs 'messages' (OpenAI), 'conversations' (ShareGPT) or 'instruction' + "
                      "'output' (Alpaca), or set format")


def _listed(value: Any, field: str, where: str) -> list:
    if isinstance(value, str):  # a CSV cell holding JSON
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{where}: '{field}' is text that is not JSON ({err})") from err
    if not isinstance(value, list):
        raise ConfigError(f"{where}: '{field}' must be a list of turns, not {type(value).__name__}")
    return value


def to_messages(row: dict, form: str, where: str) -> tuple[list[dict], Optional[list]]:
    """The record's turns as chat messages, and its tool definitions."""
    tools = row.get("tools")
    if form == "alpaca":
        instruction, extra, output = row.get("instruction"), row.get("input") or "", row.get("output")
        for name, value in (("instruction", instruction), ("input", extra), ("output", output)):
            if not isinstance(value, str):
                raise ConfigError(f"{where}: Alpaca's '{name}' must be text, not {type(value).__name__}")
        messages = [{"role": "user", "content": f"{instruction}\n\n{extra}" if extra.strip() else instruction},
                    {"role": "assistant", "content": output}]
    elif form == "sharegpt":
        messages = []
        for k, turn in enumerate(_listed(row["conversations"], "conversations", where)):
            speaker = turn.get("from") if isinstance(turn, dict) else None
            if speaker not in SHAREGPT_ROLES:
                raise ConfigError(f"{where}: turn {k} is from {speaker!r}; ShareGPT speakers are "
                                  f"{', '.join(SHAREGPT_ROLES)}")
            messages.append({"role": SHAREGPT_ROLES[speaker], "content": turn.get("value")})
    else:
        messages = [dict(m) if isinstance(m, dict) else m for m in _listed(row["messages"], "messages", where)]
    if isinstance(tools, str):
        tools = _listed(tools, "tools", where)
    system = row.get("system")
    if form != "messages" and isinstance(system, str) and system.strip() and messages and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    return messages, tools or None


def check(messages: list, where: str, labelled: bool) -> list[dict]:
    """Refuse what no template can render or nothing can be learned from; drop turns after the last answer."""
    for k, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ConfigError(f"{where}: turn {k} must be an object with 'role' and 'content', not {type(m).__name__}")
        if m.get("role") not in ROLES:
            raise ConfigError(f"{where}: turn {k} has role {m.get('role')!r}; roles are {', '.join(ROLES)}")
        content = m.get("content")
        if content is not None and not isinstance(content, str):
            raise ConfigError(f"{where}: turn {k}'s content must be text, not {type(content).__name__}")
        if m["role"] == "assistant" and not (content or "").strip() and not m.get("tool_calls"):
            raise ConfigError(f"{where}: turn {k} is an empty assistant turn (no content, no tool calls); fill or "
                              "remove it")
        if m["role"] != "assistant" and content is None:
            raise ConfigError(f"{where}: turn {k} ({m['role']}) has no content")
    answers = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    if labelled and not answers:
        raise ConfigError(f"{where}: the conversation has no assistant turn, so nothing to learn or score; "
                          "add the answer or drop the record")
    if labelled:
        messages = messages[: answers[-1] + 1]
    if not any(m["role"] == "user" for m in messages):
        raise ConfigError(f"{where}: the conversation has no user turn")
    return messages


def chatterbot_rows(split: str) -> list[tuple[dict, str]]:
    """chatterbot-corpus's English conversations (alternating user / assistant utterances) as messages,
    split 80/10/10 by a fixed shuffle; a conversation ending on a user turn loses that turn."""
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or spec.origin is None:
        raise ConfigError("source 'chatterbot_corpus' needs its package: pip install --no-deps chatterbot-corpus==1.3.3")
    import yaml

    rows = []
    for path in sorted((Path(spec.origin).parent / "data" / "english").glob("*.yml")):
        if path.name in CHATTERBOT_SKIP:
            continue
        for k, talk in enumerate(yaml.safe_load(path.read_text(encoding="utf-8")).get("conversations", [])):
            if not isinstance(talk, list) or len(talk) < 2:
                continue  # one entry of trivia.yml is a string, not a conversation
            turns = [str(t).strip() for t in talk][: len(talk) // 2 * 2]
            messages = [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)]
            rows.append(({"messages": messages}, f"{path.name}[{k}]"))
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()
    start, stop = CHATTERBOT_SPLITS[split]
    return [rows[i] for i in order[int(start * len(rows)):int(stop * len(rows))]]


class InstructionData(FilesOrHub, PromptResponseData):
    """Instruction or chat records (messages / ShareGPT / Alpaca) for a causal LM."""

    def __init__(self, source: str = "files", train_file: Optional[str] = None, val_file: Optional[str] = None,
                 test_file: Optional[str] = None, format: Literal["auto", "messages", "sharegpt", "alpaca"] = "auto",
                 val_size: int = 100, metric: Literal["rouge", "exact_match"] = "rouge", max_length: int = 1024,
                 max_response_length: int = 512, batch_size: int = 8, eval_batch_size: Optional[int] = None,
                 num_workers: int = 0, limit_train_rows: Optional[int] = None, limit_eval_rows: Optional[int] = None,
                 pack: bool = False, system_prompt: Optional[str] = None, seed: int = 42,
                 tokenizer: Optional[str] = None, predict_file: Optional[str] = None, group_by_length: bool = True,
                 train_on: Literal["all", "last"] = "all", overlong: Literal["cut", "drop"] = "cut") -> None:
        """
        Args:
            source: ``files`` (train_file / val_file / test_file), ``chatterbot_corpus``, or a hub dataset id
                (its ``train`` / ``validation`` / ``test`` splits).
            format: ``auto`` (from each record's fields), ``messages``, ``sharegpt`` or ``alpaca``.
            val_size: training records held out for validation where the source has no validation split.
            metric: how test generations are scored against the last assistant turn: ``rouge`` or
                ``exact_match`` (of the final number, as GSM8K).
            system_prompt: a system turn for conversations that have none.
            max_response_length: tokens kept of each assistant turn.
        """
        super().__init__(max_length=max_length, max_response_length=max_response_length, batch_size=batch_size,
                         eval_batch_size=eval_batch_size, num_workers=num_workers, limit_train_rows=limit_train_rows,
                         limit_eval_rows=limit_eval_rows, pack=pack, system_prompt=system_prompt, seed=seed,
                         tokenizer=tokenizer, predict_file=predict_file, group_by_length=group_by_length,
                         train_on=train_on, overlong=overlong)
        if format not in ("auto",) + FORMATS:
            raise ConfigError(f"format must be auto, {', '.join(FORMATS)}; got {format!r}")
        if metric not in ("rouge", "exact_match"):
            raise ConfigError(f"metric must be rouge or exact_match, got {metric!r}")
        self.format, self.metric = format, metric
        self.init_sources(source, {"train": train_file, "val": val_file, "test": test_file}, val_size)

    def _read(self, split: str) -> Optional[list[tuple[dict, str]]]:
        return chatterbot_rows(split) if self.source == "chatterbot_corpus" else super()._read(split)

    def to_record(self, row: dict, where: str, labelled: bool = True) -> Record:
        form = detect(row, where) if self.format == "auto" else self.format
        if form == "messages" and "messages" not in row or form == "sharegpt" and "conversations" not in row:
            raise ConfigError(f"{where}: format '{form}' needs the field "
                              f"'{'messages' if form == 'messages' else 'conversations'}'")
        messages, tools = to_messages(row, form, where)
        messages = check(messages, where, labelled)
        answer = (messages[-1]["content"] or "") if messages[-1]["role"] == "assistant" else ""
        question = next(m["content"] for m in reversed(messages) if m["role"] == "user")
        return Record(prompt=question, response=answer, reference=answer, source=where, messages=messages, tools=tools)
