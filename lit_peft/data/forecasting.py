"""Time-series forecasting data: the ETT benchmarks (ETTh1, ETTh2, ETTm1, ETTm2) from a folder of
their CSVs, or your own CSV / parquet file with a time column and the columns to forecast.

Every target column is a univariate series; a window is ``context_len`` values of one series and
the ``horizon_len`` values that follow (channel-independent, as TimesFM and PatchTST forecast). A
long-format file (``id_column``) holds several series, each id's rows its own, of any length and
start. Covariates travel with the windows: past-only columns over the context alone, known-future
columns and calendar features over context and horizon (``lit_peft.tasks.covariates`` reads them).
``target_columns: [OT]`` is ETT's univariate protocol, ``target_columns: null`` takes every
numeric column (its multivariate protocol).

Splits are by time, and no target point of one split lies in another:

- ``split: ratio`` (default, the TimesFM fine-tuning pipeline's): the first ``int(0.6 n)`` rows
  train, the next ``int(0.2 n)`` validate, the rest test (``split_ratios``).
- ``split: months``: the usual ETT protocol, 12 / 4 / 4 months of 30 days from the first timestamp
  (``split_months``); rows after the last month are not used (ETTh1: 8,640 / 2,880 / 2,880 rows).

Time axes (frequency, season, calendar features, split bounds) are ``time_index``'s; windows
(``SeriesWindows``) are ``windows``'s.

A validation or test window's context may reach back into the previous split (the first
forecasts of a split need one); its targets never do. Values are standardised per series with
the mean and (population) standard deviation of the training rows only. The frequency (TimesFM's
``freq`` input: 0 up to daily, 1 weekly and monthly, 2 quarterly and yearly) is inferred from the
time column, or given as a pandas alias (``h``, ``15min``, ``MS``) or as the index itself.

Windows are slices of one tensor per split rule, gathered a batch at a time; the training loader
is the shared stateful one (``SplitDataModule``), so a resumed run sees the batches an
uninterrupted one would. Files are read with pandas (which reads CSV and parquet with the time
column parsed), checked before any window is cut: a missing column, a missing value, a time
column that does not increase, or a split too short for one window is one message naming the file.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from lit_peft.data.base import SplitDataModule
from lit_peft.data.time_index import CALENDAR, calendar_features, infer_freq, seasonality, split_bounds, timesfm_freq
from lit_peft.data.windows import SeriesWindows, gathered, standardised, window_starts
from lit_peft.errors import ConfigError

ETT = ("ETTh1", "ETTh2", "ETTm1", "ETTm2")
def read_table(path: Path) -> "Any":
    import pandas as pd

    if not path.is_file():
        raise ConfigError(f"data file '{path}' does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            return pd.read_csv(path)
        if suffix == ".parquet":
            return pd.read_parquet(path)
    except (ValueError, OSError, pd.errors.ParserError) as err:
        raise ConfigError(f"could not read '{path}': {err}") from err
    raise ConfigError(f"data file '{path}' has an unknown format; use .csv or .parquet")


class ForecastingData(SplitDataModule):
    """Windows of one or more series from an ETT file or your own table, split by time."""

    metric = "mse"

    def __init__(
        self,
        data_dir: Optional[str] = None,
        dataset: Literal["ETTh1", "ETTh2", "ETTm1", "ETTm2"] = "ETTh1",
        file: Optional[str] = None,
        time_column: str = "date",
        id_column: Optional[str] = None,
        past_covariates: Optional[list[str]] = None,
        future_covariates: Optional[list[str]] = None,
        calendar: Optional[list[str]] = None,
        static_id: bool = False,
        target_columns: Optional[list[str]] = ("OT",),
        context_len: int = 128,
        horizon_len: int = 128,
        eval_horizon_len: Optional[int] = None,
        stride: int = 1,
        eval_stride: int = 1,
        split: Literal["ratio", "months"] = "ratio",
        split_ratios: tuple[float, float, float] = (0.6, 0.2, 0.2),
        split_months: tuple[int, int, int] = (12, 4, 4),
        normalize: bool = True,
        freq: Optional[Union[str, int]] = None,
        season_length: Optional[int] = None,
        predict_split: Literal["future", "test"] = "future",
        limit_train_windows: Optional[int] = None,
        batch_size: int = 64,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 0,
        seed: int = 42,
    ) -> None:
        """
        Args:
            data_dir: folder holding ``<dataset>.csv`` (the ETT files); not needed with ``file``.
            dataset: which ETT file of ``data_dir``.
            file: your own ``.csv`` or ``.parquet`` (instead of an ETT file).
            time_column: the column of timestamps (ETT's is ``date``).
            id_column: a long-format file's series id: each id's rows (sorted by time) are its own series
                of every target column, of any length and start; a series too short for a window in
                each split is left out and counted.
            past_covariates: columns known up to the forecast start only (ETT's six load columns for OT,
                the "MS" setting): each window sees their context, never their future.
            future_covariates: columns known ahead (a promotion plan, a forecast temperature): each
                window sees them over its context and its horizon.
            calendar: calendar features derived from the time column, known ahead by definition:
                any of ``minute_of_hour, hour_of_day, day_of_week, day_of_month, day_of_year,
                week_of_year, month_of_year`` (each scaled to [-0.5, 0.5]).
            static_id: give the model each window's series as a static categorical covariate.
            target_columns: the columns to forecast, each as a univariate series; ``null``: every
                numeric column except the time, id and covariate columns.
            context_len: values the model sees before each forecast.
            horizon_len: values each training window forecasts.
            eval_horizon_len: values each validation/test/predict window forecasts (default: horizon_len).
            stride: rows between the starts of consecutive training windows.
            eval_stride: the same for validation, test and ``predict_split: test``.
            split: ``ratio`` (``split_ratios`` of the rows) or ``months`` (``split_months`` of 30 days).
            normalize: standardise each series with its training rows' mean and standard deviation.
            freq: a pandas frequency alias or TimesFM's index (0, 1, 2); inferred from the time column if null.
            season_length: the seasonal naive forecast's lag that MASE scales by; null: from the frequency
                (24 hourly, 96 at 15 minutes, 7 daily, 12 monthly: ``seasonality``), or 1 where that is
                not shorter than ``context_len``.
            predict_split: what ``predict`` forecasts: ``future`` (the ``eval_horizon_len`` steps after
                the last row of each series) or ``test`` (every test window, with the actual values).
            limit_train_windows: keep this many training windows, evenly spaced in time (quick runs).
        """
        super().__init__()
        for name, value in (("context_len", context_len), ("horizon_len", horizon_len), ("stride", stride),
                            ("eval_stride", eval_stride), ("batch_size", batch_size)):
            if value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value}")
        if season_length is not None and not 1 <= season_length < context_len:
            raise ConfigError(f"season_length must be at least 1 and below context_len={context_len} (MASE compares with "
                              f"the forecast that repeats the value season_length steps back), got {season_length}")
        if eval_horizon_len is not None and eval_horizon_len < 1:
            raise ConfigError(f"eval_horizon_len must be a positive integer, got {eval_horizon_len}")
        if file is None and data_dir is None:
            raise ConfigError("give data.init_args.data_dir (a folder of ETT CSVs, e.g. ../shared/data/ett) or "
                              "data.init_args.file (your own .csv or .parquet)")
        self.cfg = SimpleNamespace(
            data_dir=data_dir, dataset=dataset, file=file, time_column=time_column, id_column=id_column,
            past_covariates=None if past_covariates is None else list(past_covariates),
            future_covariates=None if future_covariates is None else list(future_covariates),
            calendar=None if calendar is None else list(calendar), static_id=static_id,
            target_columns=None if target_columns is None else list(target_columns), context_len=context_len,
            horizon_len=horizon_len, eval_horizon_len=eval_horizon_len or horizon_len, stride=stride,
            eval_stride=eval_stride, split=split, split_ratios=tuple(split_ratios), split_months=tuple(split_months),
            normalize=normalize, freq=freq, season_length=season_length, predict_split=predict_split, limit_train_windows=limit_train_windows,
            batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers, seed=seed)
        if split not in ("ratio", "months"):
            raise ConfigError(f"unknown split '{split}'; use 'ratio' or 'months'")
        unknown = [c for c in calendar or [] if c not in CALENDAR]
        if unknown:
            raise ConfigError(f"unknown calendar feature '{unknown[0]}'; choose from {', '.join(CALENDAR)}")
        if future_covariates and predict_split == "future":
            self._future_refusal = ("predict_split: future needs the future_covariates' values after the last row, "
                                    "which the file does not hold; use predict_split: test, or calendar features")
        else:
            self._future_refusal = None
        self.datasets: dict[str, Dataset] = {}
        self._loaded = False

    @property
    def source(self) -> Path:
        h = self.cfg
        return Path(h.file) if h.file is not None else Path(h.data_dir) / f"{h.dataset}.csv"

    # ---- reading and checking ----------------------------------------------------------------
    def load(self) -> None:
        """Read and check the file; cut it into series; compute each series' split bounds and
        standardisation, and the frequency. Series of a long-format file too short for a window in
        every split are left out and counted (``skipped``); none left is an error."""
        if self._loaded:
            return
        h, path = self.cfg, self.source
        if h.file is None and not path.is_file():
            raise ConfigError(f"ETT file '{path}' does not exist: data_dir must hold {h.dataset}.csv "
                              "(../shared/data/ett holds ETTh1.csv and ETTh2.csv)")
        table = read_table(path)
        targets = self._targets(table, path)
        past_columns, future_columns = self._covariate_columns(table, path, targets)
        groups = self._groups(table, path)
        columns = lambda rows, names: table.iloc[rows][names].to_numpy(dtype=np.float64).reshape(len(rows), len(names))  # noqa: E731
        raw = [(name, times, columns(rows, targets), columns(rows, past_columns), columns(rows, future_columns))
               for name, rows, times in groups]
        longest = max(raw, key=lambda r: len(r[1]))[1]
        self.alias = infer_freq(longest) if h.freq is None or isinstance(h.freq, int) else str(h.freq)
        if h.freq is None and self.alias is None:
            raise ConfigError(f"{path}: cannot infer the frequency of '{h.time_column}'; set data.init_args.freq")
        self.freq_index = timesfm_freq(h.freq if h.freq is not None else self.alias)
        self.season_length = h.season_length or self._season()
        series, skipped = [], []
        for group, times_ns, values, past, future in raw:
            bounds = split_bounds(times_ns, h.split, h.split_ratios, h.split_months)
            short = self._too_short(bounds)
            if short is not None:
                if h.id_column is None:
                    raise ConfigError(f"{path}: {short}; use shorter windows or another split")
                skipped.append(f"{group} ({len(times_ns)} rows)")
                continue
            for j, column in enumerate(targets):
                name = str(column) if h.id_column is None else str(group) if len(targets) == 1 else f"{group}/{column}"
                series.append((name, times_ns, values[:, j], bounds, past, future))
        if not series:
            raise ConfigError(f"{path}: no series is long enough for one window in each split (context_len="
                              f"{h.context_len}, horizon {h.horizon_len} / {h.eval_horizon_len}, split {h.split}); the "
                              f"longest has {len(longest)} rows. Use shorter windows or another split")
        self.skipped = skipped
        if skipped:
            from lightning.fabric.utilities.rank_zero import rank_zero_warn

            rank_zero_warn(f"{path}: left out {len(skipped)} of {len(raw)} series too short for one window in each split: "
                           + ", ".join(skipped[:5]) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""))
        self._build(series)
        self.path = path
        self._loaded = True

    def _covariate_columns(self, table: "Any", path: Path, targets: list[str]) -> tuple[list[str], list[str]]:
        """The past-only and known-future covariate columns, checked as targets are."""
        h = self.cfg
        past, future = list(h.past_covariates or []), list(h.future_covariates or [])
        for role, names in (("past_covariates", past), ("future_covariates", future)):
            both = [c for c in names if c in targets]
            if both:
                raise ConfigError(f"column '{both[0]}' is both a target and one of {role}; a series cannot be its own covariate")
            self._check_numeric(table, path, names)
        if set(past) & set(future):
            raise ConfigError(f"column '{sorted(set(past) & set(future))[0]}' is in both past_covariates and future_covariates")
        return past, future

    def _targets(self, table: "Any", path: Path) -> list[str]:
        """The target columns, checked: present, numeric, no missing value."""
        import pandas as pd

        h = self.cfg
        columns = list(table.columns)
        for role, column in (("time column", h.time_column), ("id column", h.id_column)):
            if column is not None and column not in columns:
                raise ConfigError(f"{path} has no {role} '{column}'; its columns are: {', '.join(map(str, columns))}. "
                                  f"Set data.init_args.{role.replace(' ', '_')}")
        keys = {h.time_column, h.id_column, *(h.past_covariates or []), *(h.future_covariates or [])}
        if h.target_columns is None:
            targets = [c for c in columns if c not in keys and pd.api.types.is_numeric_dtype(table[c])]
        else:
            targets = h.target_columns
            unknown = [c for c in targets if c not in columns]
            if unknown:
                raise ConfigError(f"{path} has no column '{unknown[0]}'; its columns are: {', '.join(map(str, columns))}")
        if not targets:
            raise ConfigError(f"{path} has no numeric column to forecast besides '{h.time_column}'")
        self._check_numeric(table, path, targets)
        return list(targets)

    @staticmethod
    def _check_numeric(table: "Any", path: Path, names: list[str]) -> None:
        """Every named column exists, is numeric and has no missing value."""
        import pandas as pd

        columns = list(table.columns)
        for column in names:
            if column not in columns:
                raise ConfigError(f"{path} has no column '{column}'; its columns are: {', '.join(map(str, columns))}")
            if not pd.api.types.is_numeric_dtype(table[column]):
                bad = pd.to_numeric(table[column], errors="coerce").isna() & table[column].notna()
                line = int(np.argmax(bad.to_numpy())) + 2
                raise ConfigError(f"{path}: column '{column}' is not numeric (line {line}: {table[column].iloc[line - 2]!r})")
            missing = table[column].isna().to_numpy()
            if missing.any():
                line = int(np.argmax(missing)) + 2  # the header is line 1
                raise ConfigError(f"{path}: column '{column}' has {int(missing.sum())} missing values (first at line "
                                  f"{line}); fill or drop them before forecasting")

    def _groups(self, table: "Any", path: Path) -> list[tuple[str, np.ndarray, np.ndarray]]:
        """(id, row labels, times in ns) per series group: the whole table, or each id of ``id_column``
        in the order of first appearance; times parsed and strictly increasing within a group."""
        import pandas as pd

        h = self.cfg
        try:
            times = pd.to_datetime(table[h.time_column])
        except (ValueError, TypeError) as err:
            raise ConfigError(f"{path}: time column '{h.time_column}' does not parse as dates: {err}") from err
        if times.isna().any():
            line = int(np.argmax(times.isna().to_numpy())) + 2
            raise ConfigError(f"{path}: time column '{h.time_column}' has a missing timestamp at line {line}")
        if getattr(times.dt, "tz", None) is not None:
            times = times.dt.tz_convert("UTC").dt.tz_localize(None)
        times_ns = times.to_numpy(dtype="datetime64[ns]").astype(np.int64)
        if h.id_column is None:
            labelled = [("", np.arange(len(table)))]
        else:
            ids = table[h.id_column]
            if ids.isna().any():
                line = int(np.argmax(ids.isna().to_numpy())) + 2
                raise ConfigError(f"{path}: id column '{h.id_column}' has a missing id at line {line}")
            labelled = [(str(key), np.asarray(rows)) for key, rows in ids.groupby(ids, sort=False).indices.items()]
        groups = []
        for name, rows in labelled:
            steps = np.diff(times_ns[rows])
            if (steps <= 0).any():
                i = int(np.argmax(steps <= 0)) + 1
                which = f" for id '{name}'" if h.id_column is not None else ""
                raise ConfigError(f"{path}: time column '{h.time_column}' is not strictly increasing{which} at line "
                                  f"{rows[i] + 2} ({times.iloc[rows[i]]} after {times.iloc[rows[i - 1]]}); sort the rows "
                                  "by time and drop duplicates")
            groups.append((name, rows, times_ns[rows]))
        return groups

    def _too_short(self, bounds: tuple[int, int, int]) -> Optional[str]:
        """Why a series with these split bounds has no window in some split; None where each has one."""
        h = self.cfg
        b1, b2, b3 = bounds
        for name, (lo, hi), horizon, stride in (("training", (0, b1), h.horizon_len, h.stride),
                                                ("validation", (b1, b2), h.eval_horizon_len, h.eval_stride),
                                                ("test", (b2, b3), h.eval_horizon_len, h.eval_stride)):
            if len(window_starts(lo, hi, h.context_len, horizon, stride)) == 0:
                return (f"the {name} split (rows {lo}-{hi - 1}, {hi - lo} rows) is too short for one window of "
                        f"context_len={h.context_len} and horizon {horizon}")
        return None

    def _build(self, series: list[tuple[str, np.ndarray, np.ndarray, tuple[int, int, int], np.ndarray, np.ndarray]]) -> None:
        """One (series, time) tensor of standardised values, NaN past each series' end (the unknown
        future ``predict`` forecasts, and the padding of shorter series), and its timestamps, one
        period apart past the end; the split bounds and length of each series; the covariates, each
        column standardised on the series' training rows, and the calendar features of every
        timestamp (the future's included)."""
        h = self.cfg
        n_series, pad = len(series), h.eval_horizon_len
        lengths = [len(s[1]) for s in series]
        width = max(lengths) + pad
        values = torch.full((n_series, width), float("nan"))
        shared = h.id_column is None  # one time axis for every column of a wide table
        times = torch.zeros((1 if shared else n_series, width), dtype=torch.long)
        self.loc = torch.zeros(n_series, dtype=torch.float64)
        self.scale = torch.ones(n_series, dtype=torch.float64)
        step = self._period_ns(series[0][1])
        n_past, n_future = series[0][4].shape[1], series[0][5].shape[1]
        past_cov = torch.full((n_series, width, n_past), float("nan"))
        future_cov = torch.full((n_series, width, n_future + len(h.calendar or [])), float("nan"))
        for i, (_, times_ns, raw, (b1, _, _), past, future) in enumerate(series):
            if h.normalize:
                train = torch.tensor(raw[:b1])
                self.loc[i], self.scale[i] = train.mean(), train.std(unbiased=False).clamp_min(1e-8)
            values[i, :len(raw)] = ((torch.tensor(raw) - self.loc[i]) / self.scale[i]).float()
            extra = times_ns[-1] + step * np.arange(1, width - len(times_ns) + 1)
            stamps = np.concatenate([times_ns, extra])
            if not shared or i == 0:
                times[i] = torch.tensor(stamps)
            past_cov[i, :len(raw)] = standardised(past, b1)
            future_cov[i, :len(raw), :n_future] = standardised(future, b1)
            future_cov[i, :, n_future:] = calendar_features(stamps, h.calendar or [])
        self.values, self.times = values, times
        self.past_covariates = past_cov if n_past else None
        self.future_covariates = future_cov if future_cov.shape[2] else None
        self.series_names = [s[0] for s in series]
        self.series_bounds = torch.tensor([s[3] for s in series], dtype=torch.long)
        self.series_rows = torch.tensor(lengths, dtype=torch.long)
        self.bounds = series[0][3]  # every series' bounds where the table is wide (one time axis)
        self.n_rows = lengths[0] if shared else None

    def _season(self) -> int:
        """MASE's lag from the frequency, 1 where there is no alias or a season would not fit in a context."""
        season = seasonality(self.alias) if self.alias is not None else 1
        return season if season < self.cfg.context_len else 1

    def _period_ns(self, times_ns: np.ndarray) -> int:
        import pandas as pd

        if self.alias is not None:
            try:
                offset = pd.tseries.frequencies.to_offset(self.alias)
                last = pd.Timestamp(int(times_ns[-1]))
                return int(((last + offset) - last).value)
            except (ValueError, TypeError):
                pass
        return int(np.median(np.diff(times_ns))) if len(times_ns) > 1 else 1

    # ---- windows ------------------------------------------------------------------------------
    def windows(self, split: str) -> SeriesWindows:
        """The windows of ``split`` (train, val, test, predict) over every series."""
        self.load()
        h = self.cfg
        n_series = len(self.series_names)
        horizon = h.horizon_len if split == "train" else h.eval_horizon_len
        owners, starts = [], []
        for i in range(n_series):
            if split == "predict" and h.predict_split == "future":
                found = np.array([int(self.series_rows[i])])
            else:
                b1, b2, b3 = self.series_bounds[i].tolist()
                lo, hi = {"train": (0, b1), "val": (b1, b2), "test": (b2, b3), "predict": (b2, b3)}[split]
                found = window_starts(lo, hi, h.context_len, horizon, h.stride if split == "train" else h.eval_stride)
                if split == "train" and h.limit_train_windows and h.limit_train_windows < len(found):
                    keep = np.linspace(0, len(found) - 1, h.limit_train_windows).round().astype(np.int64)
                    found = found[np.unique(keep)]
            owners.append(np.full(len(found), i))
            starts.append(found)
        if split == "predict" and h.predict_split == "future" and self._future_refusal:
            raise ConfigError(self._future_refusal)
        freq = torch.full((n_series,), self.freq_index, dtype=torch.long)
        return SeriesWindows(self.values, self.times, np.concatenate(owners), np.concatenate(starts), h.context_len, horizon,
                             freq, self.loc.float(), self.scale.float(), rows=torch.arange(n_series),
                             season=torch.full((n_series,), self.season_length, dtype=torch.long),
                             past_covariates=self.past_covariates, future_covariates=self.future_covariates)

    def covariate_dims(self) -> dict[str, int]:
        """How many covariates a window carries: past-only, known-future (columns and calendar), the
        number of series where each window's is a static categorical id (``static_id``; else 0), and
        the known-future steps every window holds past its context (``lookahead``)."""
        self.load()
        h = self.cfg
        return {"past": 0 if self.past_covariates is None else self.past_covariates.shape[2],
                "future": 0 if self.future_covariates is None else self.future_covariates.shape[2],
                "series": len(self.series_names) if h.static_id else 0,
                "lookahead": min(h.horizon_len, h.eval_horizon_len)}

    def held_out_rows(self, total: int, count: int, seed: int) -> tuple[list[int], list[int]]:
        """Windows are not exchangeable: a random draw would validate on hours whose neighbours trained.
        The held-out windows are the latest by the time of their first target (series alike), and the
        training windows whose targets reach that time are dropped, as the validation split's would be."""
        train = self.datasets["train"]
        row = train.rows[train.series] if train.times.shape[0] > 1 else torch.zeros_like(train.series)
        first = train.times[row, train.starts]
        last = train.times[row, train.starts + train.horizon_len - 1]
        cut = torch.sort(first, descending=True).values[count - 1]  # the latest ``count`` windows start here or later
        held = [i for i in range(total) if first[i] >= cut]
        dropped = [i for i in range(total) if first[i] < cut and last[i] >= cut]
        return held, dropped

    def setup(self, stage: str) -> None:
        splits = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}[stage]
        for split in splits:
            if split not in self.datasets:
                self.datasets[split] = self.windows(split)

    def collate_fn(self, train: bool):
        return gathered
