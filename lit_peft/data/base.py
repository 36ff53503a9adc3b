"""What every lit-peft data module shares: the tokenizer (the model's, or a named backbone's),
tokenized splits, and loaders. The training loader is torchdata's ``StatefulDataLoader`` with a
sampler that draws each epoch's order from (seed, epoch) alone, so a resumed run sees the batches
an uninterrupted one would; evaluation loaders have a generator of their own.

Subclasses fill ``self.datasets`` (split -> ``TokenizedDataset``) in ``setup``, keep their settings
in ``self.cfg`` (tokenizer, batch_size, eval_batch_size, num_workers, seed) and give
``collate_fn(train)``.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Optional

import torch
from torch.nn.utils.rnn import pad_sequence
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, Sampler

from lit_peft.errors import ConfigError


class TokenizedDataset(Dataset):
    def __init__(self, encodings: list[dict[str, Any]]) -> None:
        self.encodings = encodings

    def __len__(self) -> int:
        return len(self.encodings)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.encodings[i]


def as_rows(encodings: dict[str, list[list[int]]], extra: Optional[list[dict[str, Any]]] = None) -> list[dict[str, Any]]:
    """A tokenizer's batch output as one dict per row whose sequences are 1-D long tensors (views
    into one tensor per key, built in a single call), ready for ``PadCollator``; ``extra[i]`` is
    merged into row ``i`` (labels)."""
    columns = {}
    for key, seqs in encodings.items():
        lengths = [len(s) for s in seqs]
        columns[key] = torch.tensor(list(itertools.chain.from_iterable(seqs)), dtype=torch.long).split(lengths)
    n = len(next(iter(encodings.values()))) if encodings else 0
    return [{**{k: v[i] for k, v in columns.items()}, **(extra[i] if extra else {})} for i in range(n)]


class PadCollator:
    """Pad a batch of rows to its longest row: each 1-D tensor key with its pad value (``pad_values``;
    0 for keys not named), on the tokenizer's padding side; scalar keys (labels) become a tensor.

    Our own rather than transformers' ``DataCollatorWithPadding``: that one pads Python lists
    through ``tokenizer.pad``, 0.70 ms for a batch of 32 SST-2 rows on one core here, against
    0.16 ms for ``pad_sequence`` over rows tokenized to tensors once in ``setup``. Per step that is
    about 4% of a tiny model's step (``benchmarks/throughput.py --tiny``); the batches are the same.
    """

    def __init__(self, pad_values: dict[str, int], padding_side: str = "right") -> None:
        if padding_side not in ("right", "left"):
            raise ConfigError(f"padding_side must be 'right' or 'left', not '{padding_side}'")
        self.pad_values, self.padding_side = pad_values, padding_side

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = {}
        for key, first in rows[0].items():
            values = [r[key] for r in rows]
            if isinstance(first, torch.Tensor) and first.dim() == 1:
                batch[key] = pad_sequence(values, batch_first=True, padding_value=self.pad_values.get(key, 0),
                                          padding_side=self.padding_side)
            else:
                batch[key] = torch.tensor(values)
        return batch


class EpochShuffle(Sampler[int]):
    """A fresh permutation each epoch, drawn from (seed, epoch) alone.

    No epoch's order depends on what was drawn before, and iterating draws nothing from the global
    random stream, so a resumed run (the loader fast-forwards through the epoch's first batches)
    sees the order an uninterrupted one would. The epoch is read from ``epoch_fn`` (the trainer's
    count of processed epochs) when the permutation is drawn: a resumed Lightning run creates its first iterator
    before it calls ``set_epoch``.
    """

    def __init__(self, size: int, seed: int, epoch_fn: Optional[Callable[[], int]] = None) -> None:
        self.size, self.seed, self.epoch, self.epoch_fn = size, seed, 0, epoch_fn

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        epoch = self.epoch_fn() if self.epoch_fn is not None else self.epoch
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


class TokenizedDataModule(LightningDataModule):
    """Tokenizer lookup and the four loaders over ``self.datasets``."""

    datasets: dict[str, TokenizedDataset]

    def collate_fn(self, train: bool) -> Callable:
        raise NotImplementedError

    def _tokenizer(self):
        if self.cfg.tokenizer is not None:
            from lit_peft.backbones import load_tokenizer

            return load_tokenizer(self.cfg.tokenizer)
        module = self.trainer.lightning_module if self.trainer is not None else None
        tokenizer = getattr(module, "tokenizer", None)
        if tokenizer is None:
            raise ConfigError("the data module needs a tokenizer: set data.init_args.tokenizer to a backbone name")
        return tokenizer

    def _loader(self, split: str, train: bool = False):
        if split not in self.datasets:
            raise ConfigError(f"{type(self).__name__} has no '{split}' split; give the file for it")
        h = self.cfg
        if train:
            from torchdata.stateful_dataloader import StatefulDataLoader

            return StatefulDataLoader(self.datasets[split], batch_size=h.batch_size,
                                      sampler=EpochShuffle(len(self.datasets[split]), h.seed, self._epoch),
                                      generator=torch.Generator().manual_seed(h.seed),
                                      collate_fn=self.collate_fn(True), num_workers=h.num_workers)
        # a generator of its own, so iterating does not draw from the global random stream (exact resume)
        return DataLoader(self.datasets[split], batch_size=h.eval_batch_size or h.batch_size, shuffle=False,
                          collate_fn=self.collate_fn(False), num_workers=h.num_workers,
                          generator=torch.Generator().manual_seed(h.seed))

    def _epoch(self) -> int:
        # the value Lightning gives set_epoch, read when the permutation is drawn
        return self.trainer.fit_loop.epoch_progress.current.processed if self.trainer is not None else 0

    def train_dataloader(self):
        return self._loader("train", train=True)

    def val_dataloader(self):
        return self._loader("val")

    def test_dataloader(self):
        return self._loader("test")

    def predict_dataloader(self):
        return self._loader("predict")
