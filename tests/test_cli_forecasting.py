"""`lit-peft` on forecasting end to end: fit and test report MSE/MAE with the efficiency figures,
predict writes forecasts.csv (one row per series and step, quantiles, timestamps after the data)
and a PNG per series, an existing forecast file is kept, merge gives a loadable TimesFM folder."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import TS_CONTEXT, TS_HORIZON
from test_cli import SUMMARY_KEYS, TOKEN_KEYS, cli, lit_peft


@pytest.fixture(scope="module")
def forecast_run(tiny_timesfm, toy_series, tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("cli-forecast")
    config = {
        "seed_everything": 7,
        "model": {"class_path": "lit_peft.tasks.Forecasting", "init_args": {"backbone": tiny_timesfm, "learning_rate": 1e-2}},
        "data": {"class_path": "lit_peft.data.ForecastingData",
                 "init_args": {"file": str(toy_series), "target_columns": None, "context_len": TS_CONTEXT,
                               "horizon_len": TS_HORIZON, "eval_horizon_len": 24, "stride": 4, "eval_stride": 8,
                               "batch_size": 32}},
        "method": {"class_path": "lit_peft.methods.LoRA", "init_args": {"r": 4, "alpha": 8, "targets": "all-linear"}},
        "trainer": {"max_epochs": 2, "accelerator": "cpu", "enable_progress_bar": False, "enable_model_summary": False,
                    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                               "init_args": {"save_dir": str(folder / "runs"), "name": "ts"}}},
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    cli("fit", "--config", str(path))
    return path, folder / "runs" / "ts" / "version_0"


def test_fit_and_test_report_errors_and_figures(forecast_run, tmp_path) -> None:
    config, run = forecast_run
    summary = json.loads((run / "summary.json").read_text())
    assert SUMMARY_KEYS - TOKEN_KEYS <= summary.keys() and summary["task"] == "forecasting" and summary["method"] == "lora"
    assert not TOKEN_KEYS & summary.keys()  # windows are all one length: no tokens, no padding to report
    # the original units: each series' error times its scale (train std; load's 2.1, temp's 0.73), so
    # over both series the ratio lies between the smaller and the larger scale (squared for the mse)
    from lit_peft.data import ForecastingData

    data = ForecastingData(**yaml.safe_load(config.read_text())["data"]["init_args"])
    data.setup("fit")
    low, high = float(data.scale.min()), float(data.scale.max())
    assert high / low > 2  # scales far enough apart that a metric in the wrong units would show
    assert 0 < summary["val_mse"] and 0 < summary["val_mae"]
    assert low**2 * (1 - 1e-4) <= summary["val_mse_original"] / summary["val_mse"] <= high**2 * (1 + 1e-4)
    assert low * (1 - 1e-4) <= summary["val_mae_original"] / summary["val_mae"] <= high * (1 + 1e-4)
    ckpt = next((run / "checkpoints").glob("*.ckpt"))
    cli("test", "--config", str(config), "--ckpt_path", str(ckpt), "--trainer.logger.init_args.save_dir", str(tmp_path))
    tested = json.loads((tmp_path / "ts" / "version_0" / "summary.json").read_text())
    assert {"test_mse", "test_mae", "test_mse_original", "test_mae_original", "test_loss"} <= tested.keys()


def test_predict_writes_forecasts_csv_and_a_png_per_series(forecast_run, toy_series, tmp_path) -> None:
    from PIL import Image

    config, run = forecast_run
    ckpt = next((run / "checkpoints").glob("*.ckpt"))
    out = tmp_path / "forecasts.csv"
    cli("predict", "--config", str(config), "--ckpt_path", str(ckpt), "--predictions.path", str(out),
        "--predictions.plots", "true", "--trainer.logger.init_args.save_dir", str(tmp_path))
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 24  # one row per series and step: the 24 hours after the file's last row
    assert list(rows[0]) == ["series", "forecast_start", "step", "timestamp", "forecast",
                             *[f"q{q / 10:g}" for q in range(1, 10)], "actual"]
    last = pd.read_csv(toy_series)["date"].iloc[-1]
    load = [r for r in rows if r["series"] == "load"]
    assert [r["step"] for r in load] == [str(i) for i in range(1, 25)]
    assert pd.Timestamp(load[0]["timestamp"]) == pd.Timestamp(last) + pd.Timedelta(hours=1)
    assert pd.Timestamp(load[-1]["timestamp"]) == pd.Timestamp(last) + pd.Timedelta(hours=24)
    assert all(r["actual"] == "" for r in rows)  # the future: nothing to compare with
    # forecasts are in the original units: the load series lives around 10, temp around 0
    assert 5 < sum(float(r["forecast"]) for r in load) / 24 < 15
    plots = sorted((tmp_path / "forecasts_plots").glob("*.png"))
    assert [p.name for p in plots] == ["load.png", "temp.png"]
    with Image.open(plots[0]) as image:
        assert image.size == (1000, 350)
    # predicting to the same file again is refused, and the first forecasts are kept
    before = out.read_text()
    result = lit_peft("predict", "--config", str(config), "--ckpt_path", str(ckpt), "--predictions.path", str(out),
                      "--trainer.logger.init_args.save_dir", str(tmp_path / "again"), cwd=tmp_path)
    assert result.returncode == 2 and "forecasts.csv' already exists" in result.stderr
    assert "Traceback" not in result.stderr and out.read_text() == before


def test_predict_on_the_test_split_carries_the_actual_values(forecast_run, toy_series, tmp_path) -> None:
    config, run = forecast_run
    ckpt = next((run / "checkpoints").glob("*.ckpt"))
    out = tmp_path / "test_forecasts.csv"
    cli("predict", "--config", str(config), "--ckpt_path", str(ckpt), "--predictions.path", str(out),
        "--data.init_args.predict_split", "test", "--trainer.logger.init_args.save_dir", str(tmp_path))
    rows = list(csv.DictReader(out.open()))
    table = pd.read_csv(toy_series, parse_dates=["date"]).set_index("date")
    windows = 2 * ((800 - 24 - 640) // 8 + 1)
    assert len(rows) == windows * 24
    for row in rows[::97]:  # each actual is the file's value at that timestamp, in its units
        assert float(row["actual"]) == pytest.approx(table.loc[pd.Timestamp(row["timestamp"]), row["series"]], rel=1e-5)


def test_merge_gives_a_timesfm_folder(forecast_run, tmp_path) -> None:
    from transformers import TimesFmModelForPrediction

    _, run = forecast_run
    ckpt = next((run / "checkpoints").glob("*.ckpt"))
    cli("merge", "--ckpt_path", str(ckpt), "--output_dir", str(tmp_path / "merged"))
    model = TimesFmModelForPrediction.from_pretrained(tmp_path / "merged")
    assert not any("lora" in name for name, _ in model.named_parameters())
    assert json.loads((tmp_path / "merged" / "lit_peft_merge.json").read_text())["method"] == "lora"
