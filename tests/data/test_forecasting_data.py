"""ForecastingData against hand-computed values: split bounds for both rules, window counts, targets
that never cross a split, normalisation from the training rows only, TimesFM's frequency index,
the future beyond the data for ``predict``, and one clear message for each kind of bad file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import needs_shared
from lit_peft.data import ForecastingData
from lit_peft.data.time_index import timesfm_freq
from lit_peft.errors import ConfigError


def write(folder: Path, table: pd.DataFrame, name: str = "series.csv") -> Path:
    path = folder / name
    if path.suffix == ".parquet":
        table.to_parquet(path, index=False)
    else:
        table.to_csv(path, index=False)
    return path


def hourly(n: int, start: str = "2021-03-01") -> pd.DataFrame:
    steps = np.arange(n, dtype=np.float64)
    return pd.DataFrame({"when": pd.date_range(start, periods=n, freq="h"), "a": steps, "b": 100 + (steps % 7) ** 2})


def data(path: Path, **kwargs) -> ForecastingData:
    defaults = dict(file=str(path), time_column="when", target_columns=["a", "b"], context_len=24, horizon_len=12)
    return ForecastingData(**{**defaults, **kwargs})


def test_ratio_split_and_window_counts(tmp_path) -> None:
    d = data(write(tmp_path, hourly(1000)), stride=3, eval_stride=2, eval_horizon_len=6)
    d.setup("fit")
    d.setup("test")
    assert d.bounds == (600, 800, 1000)  # int(0.6 n), + int(0.2 n), the rest
    # train: first target at row 24 (a whole context before it), last at 600 - 12, every 3 rows; 2 series
    assert len(d.datasets["train"]) == 2 * ((600 - 12 - 24) // 3 + 1)
    # validation: targets from row 600 (the context reaches back into train) to 800 - 6, every 2 rows
    assert len(d.datasets["val"]) == 2 * ((800 - 6 - 600) // 2 + 1)
    assert len(d.datasets["test"]) == 2 * ((1000 - 6 - 800) // 2 + 1)


def test_months_split_is_the_ett_protocol(tmp_path) -> None:
    n = 24 * 30 * 21  # 21 months of 30 days, hourly
    d = data(write(tmp_path, hourly(n)), split="months")
    d.setup("fit")
    d.setup("test")
    assert d.bounds == (8640, 11520, 14400)  # 12, 16, 20 months of 30 days; the 21st month is not used
    test = d.datasets["test"]
    assert len(test) == 2 * (2880 - 12 + 1)


@pytest.mark.parametrize("split", ["ratio", "months"])
def test_no_target_lies_in_another_split(tmp_path, split) -> None:
    d = data(write(tmp_path, hourly(24 * 30 * 21)), split=split, stride=5)
    d.setup("fit")
    d.setup("test")
    b1, b2, b3 = d.bounds
    for name, (lo, hi) in (("train", (0, b1)), ("val", (b1, b2)), ("test", (b2, b3))):
        ds = d.datasets[name]
        starts = ds.starts
        assert int(starts.min()) >= lo and int(starts.max()) + ds.horizon_len <= hi, name
        assert int(starts.min()) - ds.context_len >= 0
    assert int(d.datasets["val"].starts.min()) - d.cfg.context_len < b1  # the first validation context reaches back


def test_normalisation_uses_the_training_rows_only_and_windows_hold_the_normalised_values(tmp_path) -> None:
    table = hourly(1000)
    d = data(write(tmp_path, table))
    d.setup("fit")
    train = table.iloc[:600]
    np.testing.assert_allclose(d.loc.numpy(), train[["a", "b"]].mean().to_numpy())
    np.testing.assert_allclose(d.scale.numpy(), train[["a", "b"]].std(ddof=0).to_numpy())
    assert not np.allclose(d.loc.numpy(), table[["a", "b"]].mean().to_numpy())  # not the whole file's
    ds = d.datasets["val"]
    item = ds[len(ds) - 1]  # series b's last validation window
    start = int(item["start"])
    expected = (table["b"].to_numpy()[start - 24:start] - train["b"].mean()) / train["b"].std(ddof=0)
    np.testing.assert_allclose(item["past_values"].numpy(), expected, rtol=1e-5)
    assert int(item["series"]) == 1 and float(item["loc"]) == pytest.approx(train["b"].mean())
    when = pd.to_datetime(item["future_time"].numpy())
    assert when[0] == table["when"].iloc[start] and when[-1] == table["when"].iloc[start + 11]
    # a batch from the loader is the same windows, gathered at once
    batch = next(iter(d.val_dataloader()))
    assert batch["past_values"].shape == (64, 24) and batch["future_values"].shape == (64, 12)
    torch.testing.assert_close(batch["past_values"][3], ds[3]["past_values"])


@pytest.mark.parametrize("alias, index", [("s", 0), ("5min", 0), ("h", 0), ("D", 0), ("B", 0), ("W", 1), ("W-MON", 1),
                                          ("MS", 1), ("ME", 1), ("QS", 2), ("QE-DEC", 2), ("YS", 2), ("YE", 2)])
def test_timesfm_frequency_index(alias, index) -> None:
    assert timesfm_freq(alias) == index


def test_frequency_is_inferred_from_the_time_column_or_given(tmp_path) -> None:
    monthly = pd.DataFrame({"when": pd.date_range("2000-01-01", periods=120, freq="MS"), "a": np.arange(120.0)})
    d = data(write(tmp_path, monthly, "monthly.csv"), target_columns=["a"], context_len=12, horizon_len=6)
    d.setup("fit")
    assert (d.alias, d.freq_index) == ("MS", 1) and int(d.datasets["train"][0]["freq"]) == 1
    d = data(write(tmp_path, hourly(300), "hourly.parquet"), freq=2)
    d.setup("fit")
    assert int(d.datasets["train"][0]["freq"]) == 2
    with pytest.raises(ConfigError, match="unknown frequency 'fortnightly'"):
        timesfm_freq("fortnightly")


def test_every_numeric_column_is_a_series_when_no_targets_are_named(tmp_path) -> None:
    table = hourly(300)
    table["label"] = "x"  # not numeric: not a series
    d = data(write(tmp_path, table), target_columns=None)
    d.setup("fit")
    assert d.series_names == ["a", "b"]


def test_predict_forecasts_the_steps_after_the_last_row(tmp_path) -> None:
    table = hourly(300)
    d = data(write(tmp_path, table), eval_horizon_len=5)
    d.setup("predict")
    ds = d.datasets["predict"]
    assert len(ds) == 2  # one window per series
    item = ds[0]
    assert torch.isnan(item["future_values"]).all()
    np.testing.assert_allclose(item["past_values"].numpy() * float(item["scale"]) + float(item["loc"]),
                               table["a"].to_numpy()[-24:], rtol=1e-5)
    expected = pd.date_range(table["when"].iloc[-1], periods=6, freq="h")[1:]
    assert list(pd.to_datetime(item["future_time"].numpy())) == list(expected)


def test_limit_train_windows_keeps_windows_spread_over_the_split(tmp_path) -> None:
    d = data(write(tmp_path, hourly(1000)), target_columns=["a"], limit_train_windows=10)
    d.setup("fit")
    starts = d.datasets["train"].starts
    assert len(starts) == 10 and int(starts[0]) == 24 and int(starts[-1]) == 600 - 12


@pytest.mark.parametrize("change, message", [
    (lambda t: t.assign(a=t["a"].where(t.index != 7)), r"column 'a' has 1 missing values \(first at line 9\)"),
    (lambda t: t.iloc[[0, 1, 3, 2] + list(range(4, len(t)))], r"not strictly increasing at line 5"),
    (lambda t: t.assign(a=t["a"].astype(str).where(t.index != 4, "twelve")), r"column 'a' is not numeric \(line 6"),
], ids=["missing-value", "time-not-increasing", "not-numeric"])
def test_bad_files_get_one_clear_message(tmp_path, change, message) -> None:
    d = data(write(tmp_path, change(hourly(300))))
    with pytest.raises(ConfigError, match=message):
        d.setup("fit")


def test_bad_settings_get_one_clear_message(tmp_path) -> None:
    path = write(tmp_path, hourly(300))
    with pytest.raises(ConfigError, match="has no column 'c'; its columns are: when, a, b"):
        data(path, target_columns=["a", "c"]).setup("fit")
    with pytest.raises(ConfigError, match="has no time column 'date'"):
        data(path, time_column="date").setup("fit")
    with pytest.raises(ConfigError, match=r"the validation split \(rows 180-239, 60 rows\) is too short for one window"):
        data(path, horizon_len=12, eval_horizon_len=72).setup("fit")
    with pytest.raises(ConfigError, match="does not exist"):
        data(tmp_path / "absent.csv").setup("fit")
    with pytest.raises(ConfigError, match="unknown format"):
        data(write(tmp_path, hourly(10), "series.txt")).setup("fit")
    with pytest.raises(ConfigError, match="context_len must be a positive integer"):
        data(path, context_len=0)
    with pytest.raises(ConfigError, match="give data.init_args.data_dir"):
        ForecastingData()
    with pytest.raises(ConfigError, match="ETT file .*ETTm1.csv' does not exist"):
        ForecastingData(data_dir=str(tmp_path), dataset="ETTm1").setup("fit")


def test_etth1_splits_as_the_papers_do() -> None:
    folder = needs_shared("ett")
    d = ForecastingData(data_dir=str(folder), split="months", context_len=128, horizon_len=96)
    d.setup("fit")
    d.setup("test")
    assert d.bounds == (8640, 11520, 14400) and d.alias == "h" and d.freq_index == 0
    assert [len(d.datasets[s]) for s in ("train", "val", "test")] == [8640 - 96 - 128 + 1, 2880 - 96 + 1, 2880 - 96 + 1]
    d7 = ForecastingData(data_dir=str(folder), target_columns=None, context_len=128, horizon_len=96)
    d7.setup("fit")
    assert d7.bounds == (10452, 13936, 17420) and len(d7.series_names) == 7
    table = pd.read_csv(folder / "ETTh1.csv")
    np.testing.assert_allclose(d7.loc.numpy(), table.iloc[:10452, 1:].mean().to_numpy(), rtol=1e-6)
