"""MASE, CRPS and WQL: each equal to its definition computed by hand over a validation run, and the
properties that make them what forecasters read (MASE is scale-free, CRPS of a point forecast is its
MAE); the season length follows the frequency and a bad one is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import TS_CONTEXT, TS_HORIZON, quiet_trainer
from lit_peft.data import ForecastingData
from lit_peft.data.time_index import seasonality
from lit_peft.errors import ConfigError
from lit_peft.tasks import Forecasting
from lit_peft.tasks.forecast_metrics import MASE, QuantileScores


def test_scores_of_a_validation_run_are_their_definitions(tiny_timesfm, toy_series) -> None:
    task = Forecasting(backbone=tiny_timesfm)
    task.configure_backbone()
    task.eval()
    data = ForecastingData(file=str(toy_series), target_columns=None, context_len=TS_CONTEXT, horizon_len=TS_HORIZON,
                           eval_stride=16, batch_size=16)
    metrics = quiet_trainer().validate(task, datamodule=data, verbose=False)[0]
    assert data.season_length == 24  # hourly
    levels = np.array(task.model.config.quantiles)
    ratios, crps, wql_num, wql_den = [], [], 0.0, 0.0
    with torch.no_grad():
        for batch in data.val_dataloader():
            mean, quantiles = task.forecast(batch["past_values"], batch["freq"], TS_HORIZON)
            for i in range(len(mean)):
                c, y = batch["past_values"][i].double().numpy(), batch["future_values"][i].double().numpy()
                f, q = mean[i].double().numpy(), quantiles[i].double().numpy()
                naive_error = np.mean([abs(c[t] - c[t - 24]) for t in range(24, len(c))])
                ratios.append(np.mean(np.abs(f - y)) / naive_error)
                s, l = float(batch["scale"][i]), float(batch["loc"][i])
                for h in range(len(y)):
                    crps.append(2 * np.mean([max((a - 1) * (y[h] - q[h, k]), a * (y[h] - q[h, k])) for k, a in enumerate(levels)]))
                    yo, qo = y[h] * s + l, q[h] * s + l
                    wql_num += 2 * np.mean([max((a - 1) * (yo - qo[k]), a * (yo - qo[k])) for k, a in enumerate(levels)])
                    wql_den += abs(yo)
    assert metrics["val_mase"] == pytest.approx(np.mean(ratios), rel=1e-4)
    assert metrics["val_crps"] == pytest.approx(np.mean(crps), rel=1e-4)
    assert metrics["val_wql"] == pytest.approx(wql_num / wql_den, rel=1e-4)


def test_mase_is_scale_free_and_one_for_a_forecast_as_bad_as_the_naive_one() -> None:
    torch.manual_seed(0)
    context, target, forecast = torch.randn(6, 48), torch.randn(6, 12), torch.randn(6, 12)
    season = torch.full((6,), 12)
    plain, scaled = MASE(), MASE()
    plain.update(forecast, target, context, season)
    scaled.update(forecast * 7 + 3, target * 7 + 3, context * 7 + 3, season)
    torch.testing.assert_close(plain.compute(), scaled.compute())
    # a forecast whose every error equals the context's seasonal naive error scores 1
    naive = (context[:, 12:] - context[:, :-12]).abs().mean(dim=1, keepdim=True)
    one = MASE()
    one.update(target + naive, target, context, season)
    assert float(one.compute()) == pytest.approx(1.0, rel=1e-6)
    # a constant context has no seasonal scale: left out, not infinite
    left_out = MASE()
    left_out.update(forecast, target, torch.ones(6, 48), season)
    assert left_out.windows == 0 and torch.isnan(left_out.compute())


def test_crps_of_a_point_forecast_is_its_mae_and_wql_its_weighted_error() -> None:
    torch.manual_seed(0)
    target, point = torch.randn(4, 10), torch.randn(4, 10)
    levels = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    scores = QuantileScores()
    as_quantiles = point[..., None].expand(-1, -1, len(levels))
    scores.update(as_quantiles, target, levels, as_quantiles + 5, target + 5)
    result = scores.compute()
    assert float(result["crps"]) == pytest.approx(float((point - target).abs().mean()), rel=1e-5)
    assert float(result["wql"]) == pytest.approx(float((point - target).abs().sum() / (target + 5).abs().sum()), rel=1e-5)


def test_the_season_follows_the_frequency_and_a_bad_one_is_refused(toy_series) -> None:
    assert [seasonality(a) for a in ("h", "15min", "D", "B", "W", "MS", "QS", "YS")] == [24, 96, 7, 5, 52, 12, 4, 1]
    short = ForecastingData(file=str(toy_series), target_columns=["load"], context_len=16, horizon_len=8)
    short.load()
    assert short.season_length == 1  # a day does not fit in 16 hourly values: the naive forecast instead
    with pytest.raises(ConfigError, match="season_length must be at least 1 and below context_len=16"):
        ForecastingData(file=str(toy_series), context_len=16, horizon_len=8, season_length=24)


def test_compare_tables_show_the_scores_of_the_metric_stage() -> None:
    from lit_peft import report

    def run(name: str, seed: int, mase: float) -> report.RunRecord:
        summary = {"test_mse": 0.4 + seed / 100, "test_mase": mase, "test_crps": mase / 3, "val_mase": 9.0,
                   "trainable_pct": 1.0}
        return report.RunRecord(name, seed, "finished", summary=summary)

    records = [run("lora", 1, 0.8), run("lora", 2, 1.0), run("full", 1, 1.2), run("full", 2, 1.4)]
    rows = report.method_table(records, "test_mse", "lora")
    assert [round(r["test_mase"], 4) for r in rows] == [0.9, 1.3]
    assert [round(r["test_crps"], 4) for r in rows] == [0.3, 0.4333]
    header = report.markdown(rows, records, "test_mse", "lora", "t").splitlines()[2]
    assert "test_mase" in header and "test_crps" in header and "val_mase" not in header and "test_wql" not in header
    assert not report.higher_is_better("test_wql") and not report.higher_is_better("test_mase")
    text_classification = [report.RunRecord("lora", 1, "finished", summary={"val_acc": 0.8, "test_mase": 1.0})]
    assert "test_mase" not in report.markdown(report.method_table(text_classification, "val_acc", None),
                                              text_classification, "val_acc", None, "t").splitlines()[2]
