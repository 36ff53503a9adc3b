"""What every lit-peft data module shares: the tokenizer (the model's, or a named backbone's),
tokenized splits, and loaders. The training loader is torchdata's ``StatefulDataLoader`` with a
sampler that draws each epoch's order from (seed, epoch) alone, so a resumed run sees the batches
an uninterrupted one would; evaluation loaders have a generator of their own.

Subclasses fill ``self.datasets`` (split -> a Dataset) in ``setup``, keep their settings in
``self.cfg`` (batch_size, eval_batch_size, num_workers, seed; tokenizer for ``TokenizedDataModule``)
and give ``collate_fn(train)``. ``SplitDataModule`` is the loaders alone (time-series windows need no
tokenizer); ``TokenizedDataModule`` adds the tokenizer lookup.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any, Callable, Optional

import torch
from lightning.pytorch import LightningDataModule
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, Dataset

from lit_peft.data.samplers import EpochShuffle, EvalShard, LengthGroupedShuffle, LengthSorted  # noqa: F401 (EpochShuffle re-exported)
from lit_peft.errors import ConfigError


class TokenizedDataset(Dataset):
    def __init__(self, encodings: list[dict[str, Any]]) -> None:
        self.encodings = encodings

    def __len__(self) -> int:
        return len(self.encodings)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.encodings[i]

    def lengths(self, key: str = "input_ids") -> torch.Tensor:
        """Tokens of ``key`` per row."""
        return torch.tensor([len(e[key]) for e in self.encodings], dtype=torch.long)


class TokenColumns(Dataset):
    """Tokenized rows stored by column: for each sequence key (``input_ids``, ``attention_mask``,
    ``token_type_ids``) one flat int32 tensor of every row's tokens, with the rows' offsets into
    it, and each integer scalar key (``labels``) as one long tensor. A row (``ds[i]``) is a dict of
    1-D long tensors and Python ints; a batch fetched by the DataLoader (``__getitems__``) is a
    ``RowSelection``, which ``PadCollator`` pads with one gather per key and any other collate
    function reads as a sequence of rows. Python lists of ints (what a tokenizer returns) take
    several times the memory, and padding them is the slow part of ``DataCollatorWithPadding``."""

    def __init__(self, encodings: dict[str, list[list[int]]], scalars: Optional[dict[str, list[int]]] = None) -> None:
        keys = list(encodings)
        if not keys:
            raise ValueError("TokenColumns needs at least one tokenized column")
        lengths = [len(r) for r in encodings[keys[0]]]
        self.offsets = torch.zeros(len(lengths) + 1, dtype=torch.long)
        torch.cumsum(torch.tensor(lengths, dtype=torch.long), 0, out=self.offsets[1:])
        self.columns = {}
        for key in keys:
            if [len(r) for r in encodings[key]] != lengths:
                raise ValueError(f"tokenized column '{key}' has rows of other lengths than '{keys[0]}'")
            self.columns[key] = torch.tensor(list(itertools.chain.from_iterable(encodings[key])), dtype=torch.int32)
        self.scalars = {k: torch.tensor(v, dtype=torch.long) for k, v in (scalars or {}).items()}

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> torch.Tensor:
        """Tokens per row."""
        return self.offsets[1:] - self.offsets[:-1]

    def position(self, i: int) -> int:
        """Row ``i`` as an index in [0, len), negative ones counting from the end."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"row {i} of {len(self)}")
        return i % len(self)

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = self.position(i)
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        row: dict[str, Any] = {k: v[start:end].long() for k, v in self.columns.items()}
        row.update({k: int(v[i]) for k, v in self.scalars.items()})
        return row

    def __getitems__(self, indices: list[int]) -> "RowSelection":
        return RowSelection(self, indices)


class RowSelection(Sequence):
    """The rows of a ``TokenColumns`` that make a batch: ``PadCollator`` pads them with one gather
    per key; to any other collate function (``default_collate``, a subclass's own) it is the
    sequence of row dicts a DataLoader would have fetched one by one."""

    def __init__(self, dataset: TokenColumns, indices: list[int]) -> None:
        self.dataset, self.indices = dataset, [dataset.position(i) for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self.dataset[i] for i in self.indices[k]]
        return self.dataset[self.indices[k]]


class Rows(Dataset):
    """Some rows of a dataset, by index, in that order: what a tuning trial trains on and what it holds
    out of training to validate on (``SplitDataModule.hold_out``). Batches are fetched and lengths read
    through the underlying dataset (its ``__getitems__`` and ``lengths`` where it has them)."""

    def __init__(self, dataset: Dataset, indices: list[int]) -> None:
        self.dataset, self.indices = dataset, list(indices)
        base_lengths = getattr(dataset, "lengths", None)
        if callable(base_lengths):
            index = torch.tensor(self.indices, dtype=torch.long)
            self.lengths = lambda *args: base_lengths(*args)[index]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        return self.dataset[self.indices[i]]

    def __getitems__(self, indices: list[int]) -> Any:
        rows = [self.indices[i] for i in indices]
        fetch = getattr(self.dataset, "__getitems__", None)
        return fetch(rows) if fetch is not None else [self.dataset[i] for i in rows]


class PadCollator:
    """Pad a batch of rows to its longest row: each 1-D tensor key with its pad value (``pad_values``;
    0 for keys not named), on the tokenizer's padding side; scalar keys (labels) become a tensor.

    A batch from a ``TokenColumns`` (a ``RowSelection``) is padded with one gather per key; a list
    of row dicts (1-D tensors) with ``pad_sequence``.

    Our own rather than transformers' ``DataCollatorWithPadding``: that one pads Python lists
    through ``tokenizer.pad``: 0.72 ms for a batch of 32 SST-2 rows on this 2-core machine, against
    0.09 ms for the gather. Swapping it in took a tiny model's training step from 11.08 to about
    10.4 ms (``benchmarks/throughput.py --tiny``); the batches are the same
    (``tests/data/test_text_classification.py``)."""

    def __init__(self, pad_values: dict[str, int], padding_side: str = "right") -> None:
        if padding_side not in ("right", "left"):
            raise ConfigError(f"padding_side must be 'right' or 'left', not '{padding_side}'")
        self.pad_values, self.padding_side = pad_values, padding_side

    def __call__(self, rows: "RowSelection | list[dict[str, Any]]") -> dict[str, torch.Tensor]:
        if isinstance(rows, RowSelection):
            return self._gather(rows)
        batch = {}
        for key, first in rows[0].items():
            values = [r[key] for r in rows]
            if isinstance(first, torch.Tensor) and first.dim() == 1:
                batch[key] = pad_sequence(values, batch_first=True, padding_value=self.pad_values.get(key, 0),
                                          padding_side=self.padding_side)
            else:
                batch[key] = torch.tensor(values)
        return batch

    def _gather(self, selection: RowSelection) -> dict[str, torch.Tensor]:
        ds = selection.dataset
        index = torch.as_tensor(selection.indices, dtype=torch.long)
        starts = ds.offsets[index]
        lengths = ds.offsets[index + 1] - starts
        steps = torch.arange(int(lengths.max()))
        if self.padding_side == "left":
            pads = (len(steps) - lengths)[:, None]
            valid = steps >= pads
        else:
            pads, valid = 0, steps < lengths[:, None]
        positions = torch.where(valid, starts[:, None] + steps - pads, 0)
        batch = {}
        for key, column in ds.columns.items():
            batch[key] = column[positions].long().masked_fill_(~valid, self.pad_values.get(key, 0))
        batch.update({key: column[index] for key, column in ds.scalars.items()})
        return batch


class SplitDataModule(LightningDataModule):
    """The four loaders over ``self.datasets`` (split -> Dataset); ``self.cfg`` holds batch_size,
    eval_batch_size, num_workers and seed. Tokenized and windowed (time series) data share it."""

    datasets: dict[str, Dataset]

    def collate_fn(self, train: bool) -> Optional[Callable]:
        raise NotImplementedError

    def _loader(self, split: str, train: bool = False):
        if split not in self.datasets:
            raise ConfigError(f"{type(self).__name__} has no '{split}' split; give the file for it")
        h, dataset = self.cfg, self.datasets[split]
        lengths = self.row_lengths(split, train) if getattr(h, "group_by_length", False) else None
        if train:
            from torchdata.stateful_dataloader import StatefulDataLoader

            if lengths is not None:
                sampler = LengthGroupedShuffle(lengths, h.batch_size, h.seed, self._epoch, *self._replicas())
            else:
                sampler = EpochShuffle(len(dataset), h.seed, self._epoch, *self._replicas())
            return StatefulDataLoader(dataset, batch_size=h.batch_size, sampler=sampler,
                                      generator=torch.Generator().manual_seed(h.seed),
                                      collate_fn=self.collate_fn(True), num_workers=h.num_workers)
        sampler = LengthSorted(lengths) if lengths is not None else None
        world, rank = self._replicas()
        if world > 1:  # each row scored on one rank only (Lightning's padding sampler counts some twice)
            sampler = EvalShard(list(sampler) if sampler is not None else list(range(len(dataset))), world, rank)
        # a generator of its own, so iterating does not draw from the global random stream (exact resume)
        return DataLoader(dataset, batch_size=h.eval_batch_size or h.batch_size, sampler=sampler, shuffle=False,
                          collate_fn=self.collate_fn(False), num_workers=h.num_workers,
                          generator=torch.Generator().manual_seed(h.seed))

    def hold_out(self, rows: float | int, seed: int) -> tuple[int, int]:
        """Validate on rows held out of the training split instead of the validation split: what a tuning
        trial does (``lit_peft.trial.HoldOutValidation``), so choosing a method's settings never sees the
        split a study reports. ``rows``: a fraction of the training rows (0.2) or a count (500). Returns
        (training rows kept, rows held out)."""
        if "train" not in self.datasets:
            raise ConfigError(f"{type(self).__name__} has no training split to hold validation rows out of")
        train = self.datasets["train"]
        total = len(train)
        count = int(round(total * rows)) if isinstance(rows, float) else int(rows)
        if not 0 < count < total:
            raise ConfigError(f"tune.holdout={rows} holds out {count} of the {total} training rows; give a fraction "
                              "in (0, 1) or a count below the number of training rows")
        held, dropped = self.held_out_rows(total, count, seed)
        left_out = set(held) | set(dropped)
        self.datasets["val"] = Rows(train, held)
        self.datasets["train"] = Rows(train, [i for i in range(total) if i not in left_out])
        return len(self.datasets["train"]), len(held)

    def held_out_rows(self, total: int, count: int, seed: int) -> tuple[list[int], list[int]]:
        """(the ``count`` training rows ``hold_out`` validates on, rows it drops from training as well): a
        seeded random draw, in row order, dropping nothing. Data whose rows are not exchangeable (time-series
        windows) says otherwise."""
        order = torch.randperm(total, generator=torch.Generator().manual_seed(seed)).tolist()
        return sorted(order[:count]), []

    def row_lengths(self, split: str, train: bool) -> Optional[torch.Tensor]:
        """Tokens per row of ``split``: what training batches are grouped by and evaluation rows
        sorted by (with ``group_by_length``); ``None`` where rows do not vary in length."""
        lengths = getattr(self.datasets[split], "lengths", None)
        return lengths() if callable(lengths) else None

    def _replicas(self) -> tuple[int, int]:
        """(processes, this one's rank) of the run: each takes its share of every epoch."""
        t = self.trainer
        return (t.world_size, t.global_rank) if t is not None else (1, 0)

    def _epoch(self) -> int:
        """The epoch a permutation is drawn for: training batches run so far over batches an epoch.
        Not Lightning's epoch count (the value it gives ``set_epoch``): resumed from a checkpoint
        written at an epoch's last batch, Lightning runs the next epoch still counted as the saved
        one, then skips a number, so that epoch would have repeated the saved epoch's order."""
        t = self.trainer
        if t is None:
            return 0
        world, _ = self._replicas()
        per_epoch = math.ceil(math.ceil(len(self.datasets["train"]) / world) / self.cfg.batch_size)
        limit = t.limit_train_batches  # as Lightning applies it (its num_training_batches is unset here on a resume)
        per_epoch = min(per_epoch, limit) if isinstance(limit, int) else int(per_epoch * limit)
        return t.fit_loop.epoch_loop.batch_progress.total.ready // max(per_epoch, 1)

    def train_dataloader(self):
        return self._loader("train", train=True)

    def val_dataloader(self):
        return self._loader("val")

    def test_dataloader(self):
        return self._loader("test")

    def predict_dataloader(self):
        return self._loader("predict")


class TokenizedDataModule(SplitDataModule):
    """Loaders over tokenized splits (``TokenizedDataset`` of row dicts, or ``TokenColumns``), and the
    tokenizer: the one named in ``cfg.tokenizer``, else the model's."""

    def _tokenizer(self):
        if self.cfg.tokenizer is not None:
            from lit_peft.backbones import load_tokenizer

            return load_tokenizer(self.cfg.tokenizer)
        module = self.trainer.lightning_module if self.trainer is not None else None
        tokenizer = getattr(module, "tokenizer", None)
        if tokenizer is None:
            raise ConfigError("the data module needs a tokenizer: set data.init_args.tokenizer to a backbone name")
        return tokenizer
