"""Forecasting windows: a split's series standardised by their training rows, the window starts
whose targets lie in a split, and ``SeriesWindows``, which gathers a batch of windows (values,
times, covariates) from one tensor at once."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

def standardised(columns: np.ndarray, train_rows: int) -> torch.Tensor:
    """Each column less its mean over the first ``train_rows`` rows, over their standard deviation."""
    values = torch.tensor(columns)
    train = values[:train_rows]
    return ((values - train.mean(dim=0)) / train.std(dim=0, unbiased=False).clamp_min(1e-8)).float()


def window_starts(lo: int, hi: int, context_len: int, horizon_len: int, stride: int) -> np.ndarray:
    """First target index of every window whose targets lie in [lo, hi) and whose context starts at
    row 0 or later, every ``stride`` rows."""
    first = max(lo, context_len)
    last = hi - horizon_len
    return np.arange(first, last + 1, stride) if last >= first else np.zeros(0, dtype=np.int64)


class SeriesWindows(Dataset):
    """Windows over series held as one (series, time) tensor: item i is series ``series[i]`` with
    targets starting at row ``starts[i]``. A batch (``__getitems__``) is gathered at once.

    Each window is a dict: ``past_values`` (context_len), ``future_values`` (horizon_len; NaN past
    the end of the data), ``freq``, ``loc`` and ``scale`` (the series' standardisation, to report
    errors in the original units), ``series`` and ``start`` (which window), and ``past_time`` /
    ``future_time`` (int64 nanoseconds since the epoch; ``times`` has one row per row of ``values``,
    or a single row that every series shares)."""

    def __init__(self, values: torch.Tensor, times: torch.Tensor, series: np.ndarray, starts: np.ndarray,
                 context_len: int, horizon_len: int, freq: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor,
                 rows: Optional[torch.Tensor] = None, season: Optional[torch.Tensor] = None,
                 past_covariates: Optional[torch.Tensor] = None, future_covariates: Optional[torch.Tensor] = None) -> None:
        """``rows`` maps a series to its row of ``values`` and ``times`` (default: series i is row i;
        series of unequal lengths can share one concatenated row, ``starts`` then being positions in it).
        ``season`` is each series' season length (MASE's seasonal naive lag), given to every window as
        ``season`` where set. ``past_covariates`` and ``future_covariates`` (rows of ``values``, time,
        covariates) give each window ``past_covariates`` over its context alone and
        ``future_covariates`` over its context and horizon."""
        self.values, self.times = values, times
        self.series = torch.as_tensor(series, dtype=torch.long)
        self.rows = rows if rows is not None else torch.arange(values.shape[0])
        self.starts = torch.as_tensor(starts, dtype=torch.long)
        self.context_len, self.horizon_len = context_len, horizon_len
        self.freq, self.loc, self.scale, self.season = freq, loc, scale, season
        self.past_covariates, self.future_covariates = past_covariates, future_covariates
        self._past = torch.arange(-context_len, 0)
        self._future = torch.arange(horizon_len)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.__getitems__([i]).items()}

    def __getitems__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        index = torch.as_tensor(indices, dtype=torch.long)
        series, starts = self.series[index], self.starts[index]
        row = self.rows[series][:, None]
        trow = row if self.times.shape[0] > 1 else torch.zeros_like(row)  # one time axis shared by every row
        past, future = starts[:, None] + self._past, starts[:, None] + self._future
        batch = {"past_values": self.values[row, past], "future_values": self.values[row, future],
                 "freq": self.freq[series], "loc": self.loc[series], "scale": self.scale[series],
                 "series": series, "start": starts, "past_time": self.times[trow, past], "future_time": self.times[trow, future]}
        if self.season is not None:
            batch["season"] = self.season[series]
        if self.past_covariates is not None:
            batch["past_covariates"] = self.past_covariates[row, past]  # never a value at or after the forecast start
        if self.future_covariates is not None:
            batch["future_covariates"] = self.future_covariates[row, torch.cat([past, future], dim=1)]
        return batch


def gathered(batch: Any) -> dict[str, torch.Tensor]:
    """Collate for ``SeriesWindows``: its ``__getitems__`` already returns the batch's tensors."""
    if isinstance(batch, dict):
        return batch
    from torch.utils.data import default_collate

    return default_collate(batch)
