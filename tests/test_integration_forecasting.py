"""Integration on the real ETTh1 file (skipped with a reason where ../shared is absent): a small
TimesFM fine-tuned with LoRA on oil-temperature windows forecasts the test months better than it
did before, and its errors in the original units are the normalised ones times the series' scale."""

from __future__ import annotations

import pytest

from conftest import needs_shared, quiet_trainer
from lit_peft import methods
from lit_peft.data import ForecastingData
from lit_peft.tasks import Forecasting


def test_lora_lowers_the_test_error_on_etth1(tiny_timesfm) -> None:
    folder = needs_shared("ett")
    data = ForecastingData(data_dir=str(folder), target_columns=["OT"], context_len=64, horizon_len=32, eval_stride=24,
                           limit_train_windows=2048, batch_size=64)
    task = Forecasting(backbone=tiny_timesfm, learning_rate=5e-3, warmup_ratio=0.0)
    method = methods.LoRA(r=4, alpha=8, targets="all-linear", dropout=0.0)
    method.attach(task)
    before = quiet_trainer().test(task, datamodule=data, verbose=False)[0]
    quiet_trainer(max_epochs=2, callbacks=[method], limit_val_batches=0).fit(task, datamodule=data)
    after = quiet_trainer().test(task, datamodule=data, verbose=False)[0]
    assert after["test_mse"] < 0.9 * before["test_mse"], (before, after)
    assert after["test_mae"] < before["test_mae"]
    scale = float(data.scale[0])  # OT's standard deviation over the training rows
    assert after["test_mse_original"] == pytest.approx(after["test_mse"] * scale ** 2, rel=1e-4)
    assert len(data.datasets["test"]) == (17420 - 32 - 13936) // 24 + 1
