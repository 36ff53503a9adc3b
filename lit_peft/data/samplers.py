"""The orders rows are fed in: a fresh shuffle per epoch (``EpochShuffle``), batches of similar
length for training (``LengthGroupedShuffle``, the default for text), evaluation rows sorted by
length (``LengthSorted``), and each process's evaluation rows, none counted twice (``EvalShard``).

Our own rather than transformers' ``LengthGroupedSampler`` (what ``Trainer(group_by_length=True)``
uses): that one draws from the global random stream, so a resumed run cannot redraw the epoch; its
DDP variant shards after grouping, so one step's ranks get batches of different lengths (the fast
ranks wait for the slow one); and it knows nothing of the trainer's epoch. These are drawn from
(seed, epoch) alone, shard each global batch across ranks, and are ``DistributedSampler``s so that
Lightning does not wrap them (see ``EpochShuffle``).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator, Optional

import torch
from torch.utils.data import DistributedSampler, Sampler


class EpochShuffle(DistributedSampler):
    """A fresh permutation each epoch, drawn from (seed, epoch) alone; under DDP, this rank's share.

    No epoch's order depends on what was drawn before, and iterating draws nothing from the global
    random stream, so a resumed run (the loader fast-forwards through the epoch's first batches)
    sees the order an uninterrupted one would. The epoch is read from ``epoch_fn`` (the trainer's
    count of processed epochs) when the permutation is drawn: a resumed Lightning run creates its first iterator
    before it calls ``set_epoch``.

    With ``num_replicas`` processes, rank ``r`` takes every ``num_replicas``-th index of the
    permutation from ``r`` on (padded by repeating its start, as ``DistributedSampler`` does). It is a
    ``DistributedSampler`` so that Lightning does not wrap it in one: the wrapper would shuffle again
    with its own epoch counter, which a resumed run restarts at 0 (the resumed DDP run saw other
    batches than the uninterrupted one). ``DistributedSampler.__init__`` is not called: it would ask
    ``torch.distributed`` for the layout, which the trainer already knows.
    """

    def __init__(self, size: int, seed: int, epoch_fn: Optional[Callable[[], int]] = None,
                 num_replicas: int = 1, rank: int = 0) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.size, self.seed, self.epoch, self.epoch_fn = size, seed, 0, epoch_fn
        self.num_replicas, self.rank, self.shuffle, self.drop_last = num_replicas, rank, True, False
        self.num_samples = math.ceil(size / num_replicas)
        self.total_size = self.num_samples * num_replicas

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        epoch = self.epoch_fn() if self.epoch_fn is not None else self.epoch
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        if self.num_replicas == 1:
            return iter(order)
        order += (order * self.num_replicas)[: self.total_size - len(order)]
        return iter(order[self.rank:self.total_size:self.num_replicas])

    def __len__(self) -> int:
        return self.num_samples


class LengthGroupedShuffle(EpochShuffle):
    """Training batches of rows of similar length, in a random order, drawn from (seed, epoch) alone.

    Each epoch: a permutation (as ``EpochShuffle``'s), cut into mega-batches of ``mega_batches``
    global batches (``batch_size`` x processes rows each); each mega-batch sorted by length, longest
    first, and cut into global batches; the global batches shuffled, except that the one holding the
    longest row goes first (an out-of-memory error shows at step one, not hours in) and a short last
    batch stays last (so every other batch is whole; where it drew the longest row, that row trades
    places with the first batch's shortest). Rank ``r`` of ``num_replicas`` takes every
    ``num_replicas``-th row of each global batch from ``r`` on: one step's ranks get rows of the same
    lengths, and so wait on no straggler.

    With 50 mega-batches (transformers' choice too), SST-2's training rows padded to their batch's
    longest compute 1.05 times their real tokens, against 3.01 times in batches drawn at random.
    """

    def __init__(self, lengths: torch.Tensor, batch_size: int, seed: int, epoch_fn: Optional[Callable[[], int]] = None,
                 num_replicas: int = 1, rank: int = 0, mega_batches: int = 50) -> None:
        super().__init__(len(lengths), seed, epoch_fn, num_replicas, rank)
        if batch_size < 1 or mega_batches < 1:
            raise ValueError(f"batch_size ({batch_size}) and mega_batches ({mega_batches}) must be positive")
        self.lengths = torch.as_tensor(lengths, dtype=torch.long)
        self.batch_size, self.mega_batches = batch_size, mega_batches

    def global_batches(self) -> list[torch.Tensor]:
        """This epoch's global batches, in the order they run (every rank computes the same)."""
        if self.size == 0:
            return []
        epoch = self.epoch_fn() if self.epoch_fn is not None else self.epoch
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(self.size, generator=generator)
        if self.total_size > self.size:  # padded by repeating its start, as DistributedSampler does
            order = torch.cat([order, order.repeat(math.ceil(self.total_size / self.size))[: self.total_size - self.size]])
        width = self.batch_size * self.num_replicas
        batches: list[torch.Tensor] = []
        for chunk in order.split(width * self.mega_batches):
            by_length = torch.sort(self.lengths[chunk], descending=True, stable=True).indices
            batches.extend(chunk[by_length].split(width))
        tail = [batches.pop()] if len(batches[-1]) < width else []
        if not batches:
            return tail
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        longest = max(range(len(batches)), key=lambda i: int(self.lengths[batches[i]].max()))
        batches.insert(0, batches.pop(longest))
        if tail and int(self.lengths[tail[0]].max()) > int(self.lengths[batches[0]].max()):
            # the short last batch holds the longest row (a small last mega-batch): it trades places
            # with the first batch's shortest row, so the first step is still the longest one
            first, last = batches[0].clone(), tail[0].clone()
            i, j = int(self.lengths[last].argmax()), int(self.lengths[first].argmin())
            first[j], last[i] = int(tail[0][i]), int(batches[0][j])
            batches[0], tail = first, [last]
        return batches + tail

    def __iter__(self) -> Iterator[int]:
        r, world = self.rank, self.num_replicas
        return iter([int(i) for batch in self.global_batches() for i in batch[r::world]])


class EvalShard(DistributedSampler):
    """One process's evaluation rows, every row on exactly one process: rank ``r`` of ``num_replicas``
    takes every ``num_replicas``-th row of ``order`` (the evaluation order: dataset order, or longest
    first) from ``r`` on.

    Lightning's own ``DistributedSampler`` pads every rank to the same length with repeated rows, which
    the metrics then count twice (101 SST-2 rows on 2 ranks score 102; GSM8K's 1,319 test problems on
    8 GPUs count one twice). Not padding at all would give ranks different numbers of batches, and a
    sharded model's forward (FSDP) is a collective every rank must join. So a rank short of a row
    repeats its last one, and ``real_rows`` says how many rows of a batch are its own: ``own`` cuts
    a batch to them, before the task scores it (``PeftTask.evaluate``). A ``DistributedSampler``, so that
    Lightning does not wrap it in its padding one."""

    def __init__(self, order: list[int], num_replicas: int = 1, rank: int = 0) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.order, self.num_replicas, self.rank = list(order), num_replicas, rank
        self.shuffle, self.drop_last, self.epoch, self.seed = False, False, 0, 0
        self.mine = self.order[rank::num_replicas]
        self.num_samples = math.ceil(len(self.order) / num_replicas)
        self.total_size = self.num_samples * num_replicas

    def __iter__(self) -> Iterator[int]:
        filler = (self.mine or self.order)[-1:] * (self.num_samples - len(self.mine))
        return iter(self.mine + filler)

    def __len__(self) -> int:
        return self.num_samples

    def real_rows(self, batch_idx: int, batch_size: int, rows: int) -> int:
        """How many of the ``rows`` of batch ``batch_idx`` (batches of ``batch_size``) are this rank's own;
        the rest repeat a row another rank scores."""
        return max(0, min(rows, len(self.mine) - batch_idx * batch_size))

    def own(self, batch: dict[str, Any], batch_idx: int, batch_size: int) -> Optional[dict[str, Any]]:
        """Batch ``batch_idx`` cut to this rank's own rows (its first ones; tensors and lists with one entry
        a row are cut), or ``None`` where it holds none."""
        rows = next(v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
        keep = self.real_rows(batch_idx, batch_size, rows)
        if keep == rows:
            return batch

        def cut(value: Any) -> Any:
            if isinstance(value, torch.Tensor):
                return value[:keep] if value.dim() > 0 and value.shape[0] == rows else value
            return value[:keep] if isinstance(value, (list, tuple)) and len(value) == rows else value

        return {key: cut(value) for key, value in batch.items()} if keep else None


class LengthSorted(Sampler):
    """Evaluation rows, longest first, so each batch pads to nearly its own rows' length. Metrics
    are sums over rows and do not care about order; ``predict`` writes its rows back in dataset order
    (``PredictionWriter``). Under DDP ``EvalShard`` shards this order across ranks (every rank gets rows of
    similar lengths)."""

    def __init__(self, lengths: torch.Tensor) -> None:
        self.order = torch.sort(torch.as_tensor(lengths), descending=True, stable=True).indices.tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)


def padding_ratio(lengths: torch.Tensor, batches: list[list[int]]) -> float:
    """Tokens computed over real tokens when each batch is padded to its longest row."""
    lengths = torch.as_tensor(lengths)
    batches = [torch.as_tensor(b, dtype=torch.long) for b in batches if len(b)]
    computed = sum(len(b) * int(lengths[b].max()) for b in batches)
    return computed / max(sum(int(lengths[b].sum()) for b in batches), 1)
