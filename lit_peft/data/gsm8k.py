"""GSM8K grade-school math (Cobbe et al. 2021), scored by exact match of the final answer.

Sources: a folder with ``train.jsonl`` / ``test.jsonl`` (``{"question", "answer"}``, the final
answer after ``#### `` on the answer's last line), the hub (``openai/gsm8k``, ``main``) when no
folder is given, or ``gsm_symbolic`` problems generated offline by ``reasoning-gym``.

The response is the worked solution with the ``<<48/2=24>>`` calculator annotations stripped and
``#### N`` at the end (``with_solution``), or ``#### N`` alone. ``extract_answer`` reads ``#### N``
from a generation and falls back to its last number; exact match compares normalised numbers.

``gsm_symbolic`` is contaminated for GSM8K test: its generators are templates of GSM8K *test*
problems (GSM-Symbolic, Mirzadeh et al. 2024; e.g. generator 0 is test problem 990, Emily peeling
shrimp). Train on it to score on its own generated test split, never to report GSM8K test accuracy.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal, Optional

from lit_peft.data.prompts import PromptResponseData, Record
from lit_peft.errors import ConfigError

INSTRUCTION = "Solve the math problem step by step. Give the final answer as a number after '####'.\n\n"
CALCULATOR = re.compile(r"<<[^>]*>>")
FINAL = re.compile(r"####\s*(-?[$\d.,]+)")
NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


def normalize_number(text: str) -> str:
    """'$1,200.00' -> '1200'; '3.50' -> '3.5'; other text stripped."""
    text = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        value = float(text)
    except ValueError:
        return text
    return str(int(value)) if value == int(value) else repr(value)


def extract_answer(text: str) -> Optional[str]:
    """The number after '####', else the last number in the text, normalised; None if there is none."""
    match = FINAL.search(text)
    if match:
        return normalize_number(match.group(1))
    numbers = NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def strip_calculator(answer: str) -> str:
    return CALCULATOR.sub("", answer)


class GSM8KData(PromptResponseData):
    """GSM8K from a folder, the hub, or reasoning-gym's generated ``gsm_symbolic`` problems."""

    metric = "exact_match"

    def __init__(self, data_dir: Optional[str] = None, source: Literal["gsm8k", "gsm_symbolic"] = "gsm8k",
                 with_solution: bool = True, val_size: int = 200, symbolic_size: int = 1000,
                 max_length: int = 512, max_response_length: int = 256, batch_size: int = 8,
                 eval_batch_size: Optional[int] = None, num_workers: int = 0, limit_train_rows: Optional[int] = None,
                 limit_eval_rows: Optional[int] = None, pack: bool = False, system_prompt: Optional[str] = None,
                 seed: int = 42, tokenizer: Optional[str] = None, predict_file: Optional[str] = None,
                 group_by_length: bool = True) -> None:
        """
        Args:
            data_dir: folder with train.jsonl and test.jsonl; ``None`` reads ``openai/gsm8k`` from the hub.
            source: ``gsm8k``, or ``gsm_symbolic`` (reasoning-gym, generated offline; ignores data_dir).
                Its problems are templates of GSM8K test problems: do not train on them and report
                GSM8K test accuracy.
            with_solution: train on the worked solution (else on ``#### N`` alone).
            val_size: rows held out of the train file for validation (the last ones).
            symbolic_size: problems generated per split for ``gsm_symbolic``.
        """
        super().__init__(max_length=max_length, max_response_length=max_response_length, batch_size=batch_size,
                         eval_batch_size=eval_batch_size, num_workers=num_workers, limit_train_rows=limit_train_rows,
                         limit_eval_rows=limit_eval_rows, pack=pack, system_prompt=system_prompt, seed=seed,
                         tokenizer=tokenizer, predict_file=predict_file, group_by_length=group_by_length)
        if val_size < 1:
            raise ConfigError(f"val_size={val_size}: fit validates on rows held out of the train split; give at least 1")
        if data_dir is not None and source == "gsm8k" and not Path(data_dir).is_dir():
            raise ConfigError(f"GSM8K folder '{data_dir}' does not exist; give a folder with train.jsonl and test.jsonl, "
                              "or leave data_dir empty to read openai/gsm8k from the hub")
        self.data_dir, self.source, self.with_solution = data_dir, source, with_solution
        self.val_size, self.symbolic_size = val_size, symbolic_size
        self._raw: dict[str, list[tuple[dict, str]]] = {}

    def _rows(self, split: str) -> list[tuple[dict, str]]:
        """(row, where) pairs of the source's train or test split."""
        if split in self._raw:
            return self._raw[split]
        if self.source == "gsm_symbolic":
            rows = self._symbolic(split)
        elif self.data_dir is None:
            try:
                from datasets import load_dataset

                data = load_dataset("openai/gsm8k", "main", split=split)
            except Exception as err:  # offline, or the hub refused: say what to do instead
                raise ConfigError(f"could not read openai/gsm8k from the hub ({type(err).__name__}: {err}); give "
                                  "data_dir, a folder with train.jsonl and test.jsonl") from err
            rows = [(dict(x), f"openai/gsm8k[{split}:{i}]") for i, x in enumerate(data)]
        else:
            from lit_peft.data.text_classification import read_rows

            path = Path(self.data_dir) / f"{split}.jsonl"
            if not path.is_file():
                raise ConfigError(f"'{path}' does not exist: GSM8K folders hold train.jsonl and test.jsonl")
            rows = [(row, f"{path}:{n}") for n, row in read_rows(path)]
            if not rows:
                raise ConfigError(f"'{path}' is empty")
        self._raw[split] = rows
        return rows

    def _symbolic(self, split: str) -> list[tuple[dict, str]]:
        """reasoning-gym problems; problem i comes from seed + i, so the test split starts past the train's seeds."""
        try:
            import reasoning_gym
        except ImportError as err:
            raise ConfigError("source 'gsm_symbolic' needs reasoning-gym: pip install reasoning-gym") from err
        seed = self.cfg.seed + (0 if split == "train" else self.symbolic_size)
        rows = []
        for i, x in enumerate(reasoning_gym.create_dataset("gsm_symbolic", size=self.symbolic_size, seed=seed)):
            solution = str(x["metadata"].get("answer_cot", "")).strip()
            if not FINAL.search(solution):  # some generators end their solution with '#### N', others do not
                solution = f"{solution}\n#### {x['answer']}".strip()
            rows.append(({"question": x["question"], "answer": solution}, f"gsm_symbolic[{split}:{i}]"))
        return rows

    def to_record(self, row: dict, where: str, labelled: bool = True) -> Record:
        question, answer = row.get("question"), row.get("answer")
        if not isinstance(question, str) or not question.strip():
            raise ConfigError(f"{where}: the record has no 'question' text (GSM8K records need 'question' and 'answer')")
        if not labelled and answer is None:
            return Record(prompt=INSTRUCTION + question.strip(), response="", reference="", source=where)
        if not isinstance(answer, str) or not answer.strip():
            problem = "has no 'answer' field" if answer is None else f"has an 'answer' that is not text ({answer!r})"
            raise ConfigError(f"{where}: the record {problem}; GSM8K answers are text ending in '#### <number>'")
        answer = strip_calculator(answer).strip()
        final = FINAL.search(answer)
        if final is None:
            raise ConfigError(f"{where}: the answer has no final '#### <number>' line")
        reference = normalize_number(final.group(1))
        response = answer if self.with_solution else f"#### {reference}"
        return Record(prompt=INSTRUCTION + question.strip(), response=response, reference=reference, source=where)

    def split_rows(self, split: str) -> Optional[list[tuple[dict, str]]]:
        rows = self._rows("test" if split == "test" else "train")
        if split != "test" and self.val_size >= len(rows):
            raise ConfigError(f"val_size={self.val_size} leaves no training rows (the train split has {len(rows)}); "
                              "lower val_size")
        if split == "train":
            return rows[: len(rows) - self.val_size]
        if split == "val":
            return rows[len(rows) - self.val_size:] if self.val_size else None
        return rows
