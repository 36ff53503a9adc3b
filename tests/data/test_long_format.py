"""Several series in one long-format file (``id_column``): series of different lengths and start
dates, daily rather than hourly, each split, standardised and windowed on its own; a series too
short for a window in every split is left out and counted, and none left is one clear message."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from lit_peft.data import ForecastingData
from lit_peft.errors import ConfigError

LENGTHS = {"store-a": 400, "store-b": 250, "store-c": 30}
STARTS = {"store-a": "2020-01-01", "store-b": "2020-06-01", "store-c": "2021-01-01"}


def long_table() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    parts = []
    for k, (store, n) in enumerate(LENGTHS.items()):
        days = pd.date_range(STARTS[store], periods=n, freq="D")
        sales = 50 * (k + 1) + 10 * np.sin(2 * np.pi * np.arange(n) / 7) + rng.normal(0, 1, n)
        parts.append(pd.DataFrame({"store": store, "day": days, "sales": sales}))
    # rows ordered by date, the stores interleaved, as exports from a database often are
    return pd.concat(parts).sort_values(["day", "store"], kind="stable").reset_index(drop=True)


def data(path, **kwargs) -> ForecastingData:
    defaults = dict(file=str(path), time_column="day", id_column="store", target_columns=["sales"], context_len=28,
                    horizon_len=14)
    return ForecastingData(**{**defaults, **kwargs})


def test_each_series_is_split_standardised_and_windowed_on_its_own(tmp_path) -> None:
    table = long_table()
    path = tmp_path / "sales.csv"
    table.to_csv(path, index=False)
    d = data(path)
    with pytest.warns(UserWarning, match=r"left out 1 of 3 series too short for one window in each split: store-c \(30 rows\)"):
        d.setup("fit")
    assert d.series_names == ["store-a", "store-b"] and d.skipped == ["store-c (30 rows)"]
    assert (d.alias, d.freq_index, d.season_length) == ("D", 0, 7)  # daily: TimesFM's high band, a weekly season
    assert d.series_bounds.tolist() == [[240, 320, 400], [150, 200, 250]]  # 60/20/20 of each series' own rows
    for name, i in (("store-a", 0), ("store-b", 1)):
        own = table[table.store == name]
        train = own.sales.to_numpy()[: int(0.6 * LENGTHS[name])]
        assert float(d.loc[i]) == pytest.approx(train.mean()) and float(d.scale[i]) == pytest.approx(train.std())
        val = d.datasets["val"]
        index = [j for j in range(len(val)) if int(val.series[j]) == i]
        b1, b2, _ = d.series_bounds[i].tolist()
        assert [int(val.starts[j]) for j in index] == list(range(b1, b2 - 14 + 1))
        item = val[index[-1]]
        start = int(item["start"])
        np.testing.assert_allclose(item["past_values"].numpy() * float(item["scale"]) + float(item["loc"]),
                                   own.sales.to_numpy()[start - 28:start], rtol=1e-5)
        assert list(pd.to_datetime(item["future_time"].numpy())) == list(own.day.iloc[start:start + 14])
    # training windows come from both series and never from a split after their own training rows
    train = d.datasets["train"]
    assert set(train.series.tolist()) == {0, 1}
    assert all(int(s) + 14 <= int(d.series_bounds[int(o)][0]) for s, o in zip(train.starts, train.series))


def test_predict_forecasts_after_each_series_own_end(tmp_path) -> None:
    table = long_table()
    path = tmp_path / "sales.parquet"
    table.to_parquet(path, index=False)
    d = data(path, eval_horizon_len=10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d.setup("predict")
    ds = d.datasets["predict"]
    assert len(ds) == 2
    for i, name in enumerate(["store-a", "store-b"]):
        item = ds[i]
        own = table[table.store == name]
        assert torch.isnan(item["future_values"]).all()
        np.testing.assert_allclose(item["past_values"].numpy() * float(item["scale"]) + float(item["loc"]),
                                   own.sales.to_numpy()[-28:], rtol=1e-5)
        expected = pd.date_range(own.day.iloc[-1], periods=11, freq="D")[1:]
        assert list(pd.to_datetime(item["future_time"].numpy())) == list(expected)


def test_a_long_file_fits_end_to_end(tiny_timesfm, tmp_path) -> None:
    from conftest import quiet_trainer
    from lit_peft.methods import LoRA
    from lit_peft.tasks import Forecasting

    path = tmp_path / "sales.csv"
    long_table().to_csv(path, index=False)
    d = data(path, context_len=32, horizon_len=32, batch_size=8)
    task = Forecasting(backbone=tiny_timesfm, learning_rate=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = quiet_trainer(max_steps=4, limit_val_batches=2, callbacks=[LoRA(r=2, alpha=4)])
        trainer.fit(task, datamodule=d)
        metrics = trainer.validate(task, datamodule=d, verbose=False)[0]
    assert trainer.global_step == 4
    assert all(np.isfinite(metrics[k]) for k in ("val_mse", "val_mase", "val_crps", "val_wql"))


@pytest.mark.parametrize("change, message", [
    (lambda t: t[t.store == "store-c"], r"no series is long enough for one window in each split .* the longest has 30 rows"),
    (lambda t: t.drop(columns="store"), r"has no id column 'store'; its columns are: day, sales. Set data.init_args.id_column"),
    (lambda t: t.assign(store=t.store.where(t.index != 5)), r"id column 'store' has a missing id at line 7"),
    (lambda t: t.iloc[[0, 3, 2, 1] + list(range(4, len(t)))],
     r"not strictly increasing for id 'store-b' at line 5 \(2020-06-01 00:00:00 after 2020-06-02 00:00:00\)"),
], ids=["none-long-enough", "no-id-column", "missing-id", "unsorted-within-id"])
def test_bad_long_files_get_one_clear_message(tmp_path, change, message) -> None:
    table = long_table()
    table = table[table.day >= "2020-06-01"].reset_index(drop=True)  # store-b's first day is row 0
    path = tmp_path / "sales.csv"
    change(table).to_csv(path, index=False)
    with pytest.raises(ConfigError, match=message):
        data(path, context_len=20, horizon_len=10).setup("fit")
