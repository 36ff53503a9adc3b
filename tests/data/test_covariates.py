"""Covariate windows against hand-computed ones: past-only columns over the context alone (changing
every value from the forecast start on changes nothing a window holds), known-future columns and
calendar features over context and horizon, each column standardised on the training rows; and one
clear message for each bad covariate setting."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from lit_peft.data import ForecastingData
from lit_peft.errors import ConfigError

CONTEXT, HORIZON = 24, 12


def ett_like(n: int = 600) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    steps = np.arange(n)
    load = 5 + np.sin(2 * np.pi * steps / 24) + rng.normal(0, 0.1, n)
    return pd.DataFrame({"date": pd.date_range("2021-01-04", periods=n, freq="h"), "HUFL": load,
                         "LUFL": 2 * load + rng.normal(0, 0.1, n), "price": 30 + 5 * (steps % 24 > 8),
                         "OT": 20 + 0.5 * np.roll(load, 3) + rng.normal(0, 0.1, n)})


def data(path, **kwargs) -> ForecastingData:
    defaults = dict(file=str(path), target_columns=["OT"], past_covariates=["HUFL", "LUFL"], future_covariates=["price"],
                    calendar=["hour_of_day", "day_of_week"], context_len=CONTEXT, horizon_len=HORIZON, batch_size=16)
    return ForecastingData(**{**defaults, **kwargs})


def test_covariate_windows_are_the_hand_computed_ones(tmp_path) -> None:
    table = ett_like()
    table.to_csv(tmp_path / "ett.csv", index=False)
    d = data(tmp_path / "ett.csv")
    d.setup("fit")
    assert d.covariate_dims() == {"past": 2, "future": 3, "series": 0, "lookahead": HORIZON}
    train = table.iloc[:360]  # 60 % of 600 rows
    val = d.datasets["val"]
    item = val[17]
    start = int(item["start"])

    def standard(column: str, rows: slice) -> np.ndarray:
        return (table[column].to_numpy()[rows] - train[column].mean()) / train[column].std(ddof=0)

    past = item["past_covariates"].numpy()
    assert past.shape == (CONTEXT, 2)
    np.testing.assert_allclose(past[:, 0], standard("HUFL", slice(start - CONTEXT, start)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(past[:, 1], standard("LUFL", slice(start - CONTEXT, start)), rtol=1e-5, atol=1e-6)
    future = item["future_covariates"].numpy()
    assert future.shape == (CONTEXT + HORIZON, 3)
    np.testing.assert_allclose(future[:, 0], standard("price", slice(start - CONTEXT, start + HORIZON)), rtol=1e-5, atol=1e-6)
    when = table["date"].iloc[start - CONTEXT:start + HORIZON]
    np.testing.assert_allclose(future[:, 1], when.dt.hour / 23 - 0.5, atol=1e-6)
    np.testing.assert_allclose(future[:, 2], when.dt.dayofweek / 6 - 0.5, atol=1e-6)
    batch = next(iter(d.val_dataloader()))
    assert batch["past_covariates"].shape == (16, CONTEXT, 2) and batch["future_covariates"].shape == (16, CONTEXT + HORIZON, 3)
    torch.testing.assert_close(batch["past_covariates"][5], val[5]["past_covariates"])


def test_past_only_covariates_never_leak_the_future(tmp_path) -> None:
    table = ett_like()
    table.to_csv(tmp_path / "ett.csv", index=False)
    d = data(tmp_path / "ett.csv")
    d.setup("fit")
    item = d.datasets["val"][40]
    start = int(item["start"])
    changed = table.copy()
    changed.loc[start:, ["HUFL", "LUFL"]] = 1e6  # every past-only value from the forecast start on
    changed.to_csv(tmp_path / "changed.csv", index=False)
    other = data(tmp_path / "changed.csv")
    other.setup("fit")
    again = other.datasets["val"][40]
    assert int(again["start"]) == start
    torch.testing.assert_close(again["past_covariates"], item["past_covariates"])
    torch.testing.assert_close(again["future_covariates"], item["future_covariates"])


def test_predict_the_future_with_calendar_features_and_a_long_file(tmp_path) -> None:
    table = ett_like(300)
    table["shop"] = "a"
    second = ett_like(200).assign(shop="b")
    pd.concat([table, second]).to_csv(tmp_path / "long.csv", index=False)
    d = data(tmp_path / "long.csv", id_column="shop", future_covariates=None, eval_horizon_len=6, static_id=True)
    d.setup("predict")
    assert d.covariate_dims() == {"past": 2, "future": 2, "series": 2, "lookahead": 6}
    item = d.datasets["predict"][1]  # shop b: the 6 hours after its last row
    hours = pd.date_range(second["date"].iloc[-1], periods=7, freq="h")[1:].hour
    np.testing.assert_allclose(item["future_covariates"][-6:, 0].numpy(), hours / 23 - 0.5, atol=1e-6)
    assert torch.isfinite(item["past_covariates"]).all()


def test_bad_covariate_settings_get_one_clear_message(tmp_path) -> None:
    ett_like().to_csv(tmp_path / "ett.csv", index=False)
    path = tmp_path / "ett.csv"
    with pytest.raises(ConfigError, match="unknown calendar feature 'hour'; choose from minute_of_hour, hour_of_day"):
        data(path, calendar=["hour"])
    with pytest.raises(ConfigError, match="column 'OT' is both a target and one of past_covariates"):
        data(path, past_covariates=["OT"]).setup("fit")
    with pytest.raises(ConfigError, match="has no column 'HULL'; its columns are: date, HUFL, LUFL, price, OT"):
        data(path, past_covariates=["HULL"]).setup("fit")
    with pytest.raises(ConfigError, match="column 'price' is in both past_covariates and future_covariates"):
        data(path, past_covariates=["price"]).setup("fit")
    with pytest.raises(ConfigError, match="predict_split: future needs the future_covariates' values after the last row"):
        data(path).setup("predict")
    assert len(data(path, target_columns=None, past_covariates=["HUFL", "LUFL", "price"], future_covariates=None).windows("val").series.unique()) == 1  # covariates are not targets
