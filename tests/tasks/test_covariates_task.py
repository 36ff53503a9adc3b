"""The forecasting task with covariates: the encoder starts as the pretrained forecaster and reads
only what it is given (a known-future value past its lookahead changes nothing), it learns what the
series alone cannot tell, XReg is the in-context ridge regression it is documented as, and a
fine-tuned encoder survives checkpoint, test and merge; settings that cannot work are refused."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from conftest import quiet_trainer
from lit_peft.data import ForecastingData
from lit_peft.errors import ConfigError
from lit_peft.tasks import Forecasting
from lit_peft.tasks.covariates import ENCODER, xreg

CONTEXT, HORIZON = 64, 32


@pytest.fixture(scope="module")
def promo_series(tmp_path_factory):
    """Hourly sales that jump by 3 when a promotion runs: the promotion (known ahead, random) is the
    only way to foresee the jumps; a load column leads the sales by an hour (past-only)."""
    rng = np.random.default_rng(1)
    n = 1200
    promo = (rng.random(n // 8).repeat(8)[:n] < 0.3).astype(float)
    base = 10 + np.sin(2 * np.pi * np.arange(n) / 24)
    sales = base + 3 * promo + rng.normal(0, 0.1, n)
    table = pd.DataFrame({"date": pd.date_range("2022-01-03", periods=n, freq="h"), "promo": promo,
                          "load": np.roll(sales, -1) + rng.normal(0, 0.1, n), "sales": sales})
    path = tmp_path_factory.mktemp("promo") / "promo.csv"
    table.to_csv(path, index=False)
    return path


def data(path, **kwargs) -> ForecastingData:
    defaults = dict(file=str(path), target_columns=["sales"], future_covariates=["promo"], calendar=["hour_of_day"],
                    past_covariates=["load"], context_len=CONTEXT, horizon_len=HORIZON, stride=4, eval_stride=8,
                    batch_size=32)
    return ForecastingData(**{**defaults, **kwargs})


def built(backbone: str, d: ForecastingData, **kwargs) -> Forecasting:
    d.setup("fit")
    task = Forecasting(backbone=backbone, covariate_dims=d.covariate_dims(), **kwargs)
    task.configure_backbone()
    return task.eval()


def test_the_encoder_starts_as_the_pretrained_forecaster_and_reads_what_it_is_given(tiny_timesfm, promo_series) -> None:
    d = data(promo_series, static_id=True)
    task, plain = built(tiny_timesfm, d), built(tiny_timesfm, data(promo_series), covariates="ignore")
    assert task.head_modules() == [ENCODER] and plain.head_modules() == []
    batch = next(iter(d.val_dataloader()))
    with torch.no_grad():
        before = task.forecast(batch["past_values"], batch["freq"], HORIZON, task.covariate_inputs(batch))
        torch.testing.assert_close(before, plain.forecast(batch["past_values"], batch["freq"], HORIZON))
        encoder = getattr(task.model, ENCODER)
        torch.manual_seed(0)
        torch.nn.init.normal_(encoder.mlp[2].weight, std=0.5)
        torch.nn.init.normal_(encoder.static.weight, std=0.5)
        after = task.forecast(batch["past_values"], batch["freq"], HORIZON, task.covariate_inputs(batch))[0]
        assert not torch.allclose(after, before[0])
        # a known-future value beyond the last patch's lookahead is not read; one inside it is
        beyond, inside = dict(batch), dict(batch)
        beyond["future_covariates"] = batch["future_covariates"].clone()
        beyond["future_covariates"][:, CONTEXT + HORIZON:] = 99.0  # nothing there: the window ends at the horizon
        inside["future_covariates"] = batch["future_covariates"].clone()
        inside["future_covariates"][:, CONTEXT + 3, 0] += 5.0
        torch.testing.assert_close(task.forecast(batch["past_values"], batch["freq"], HORIZON, task.covariate_inputs(beyond))[0], after)
        assert not torch.allclose(task.forecast(batch["past_values"], batch["freq"], HORIZON, task.covariate_inputs(inside))[0], after)
        other = dict(batch, series=torch.zeros_like(batch["series"]))  # one series here: its id embedding is row 0
        torch.testing.assert_close(task.forecast(batch["past_values"], batch["freq"], HORIZON, task.covariate_inputs(other))[0], after)


def test_xreg_is_in_context_ridge_regression_then_timesfm_on_the_residual(tiny_timesfm, promo_series) -> None:
    d = data(promo_series, past_covariates=None)
    task = built(tiny_timesfm, d, covariates="xreg", xreg_ridge=0.5)
    assert task.head_modules() == []  # nothing to learn
    batch = next(iter(d.val_dataloader()))
    past, known = batch["past_values"], batch["future_covariates"]
    X = torch.cat([known, torch.ones_like(known[..., :1])], dim=-1).double()
    penalty = torch.diag(torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64))
    with torch.no_grad():
        mean, quantiles = task.forecast(past, batch["freq"], HORIZON, task.covariate_inputs(batch))
        for i in (0, 7):
            Xc = X[i, :CONTEXT]
            beta = torch.linalg.solve(Xc.T @ Xc + penalty, Xc.T @ past[i].double())
            residual = (past[i].double() - Xc @ beta).float()
            expected, _ = task.forecast(residual[None], batch["freq"][i:i + 1], HORIZON)
            torch.testing.assert_close(mean[i], expected[0] + (X[i, CONTEXT:] @ beta).float(), rtol=1e-4, atol=1e-4)
    # a context that is exactly linear in its covariates leaves TimesFM a zero residual
    residual, ahead = xreg(X[:2, :CONTEXT, 0].float() * 2 + 1, known[:2].float(), ridge=1e-9)
    assert residual.abs().max() < 1e-4 and torch.allclose(ahead, known[:2, CONTEXT:, 0] * 2 + 1, atol=1e-4)


def fit_mse(backbone, d, covariates: str) -> float:
    from lit_peft.methods import LoRA

    torch.manual_seed(0)
    task = Forecasting(backbone=backbone, learning_rate=1e-2, covariates=covariates, quantile_loss_weight=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = quiet_trainer(max_epochs=3, callbacks=[LoRA(r=4, alpha=8, targets="all-linear")])
        trainer.fit(task, datamodule=d)
        return trainer.validate(task, datamodule=d, verbose=False)[0]["val_mse"]


def test_covariates_teach_what_the_series_alone_cannot(tiny_timesfm, promo_series) -> None:
    """The promotions are random: only their known-future values foretell the jumps (60 steps each)."""
    without = fit_mse(tiny_timesfm, data(promo_series, stride=1), "ignore")
    encoder = fit_mse(tiny_timesfm, data(promo_series, stride=1), "encoder")
    with_xreg = fit_mse(tiny_timesfm, data(promo_series, stride=1, past_covariates=None), "xreg")
    assert encoder < 0.6 * without and with_xreg < 0.6 * without, (without, encoder, with_xreg)


def test_a_fine_tuned_encoder_survives_checkpoint_test_and_merge(tiny_timesfm, promo_series, tmp_path) -> None:
    from test_cli import cli

    config = {
        "seed_everything": 3,
        "model": {"class_path": "lit_peft.tasks.Forecasting", "init_args": {"backbone": tiny_timesfm, "learning_rate": 1e-2}},
        "data": {"class_path": "lit_peft.data.ForecastingData",
                 "init_args": {"file": str(promo_series), "target_columns": ["sales"], "future_covariates": ["promo"],
                               "past_covariates": ["load"], "calendar": ["hour_of_day"], "context_len": CONTEXT,
                               "horizon_len": HORIZON, "stride": 16, "eval_stride": 16, "batch_size": 32}},
        "method": {"class_path": "lit_peft.methods.LoRA", "init_args": {"r": 2, "alpha": 4}},
        "trainer": {"max_steps": 6, "accelerator": "cpu", "enable_progress_bar": False, "enable_model_summary": False,
                    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                               "init_args": {"save_dir": str(tmp_path / "runs"), "name": "cov"}}},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    cli("fit", "--config", str(path))
    run = tmp_path / "runs" / "cov" / "version_0"
    fitted = json.loads((run / "summary.json").read_text())
    ckpt = next((run / "checkpoints").glob("*.ckpt"))
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert state["hyper_parameters"]["covariate_dims"] == {"past": 1, "future": 2, "series": 0, "lookahead": HORIZON}
    assert any(ENCODER in k for k in state["state_dict"])  # it trained, so it is saved
    cli("test", "--config", str(path), "--ckpt_path", str(ckpt), "--trainer.logger.init_args.save_dir", str(tmp_path / "t"))
    tested = json.loads((tmp_path / "t" / "cov" / "version_0" / "summary.json").read_text())
    cli("merge", "--ckpt_path", str(ckpt), "--output_dir", str(tmp_path / "merged"))
    d = data(promo_series, stride=16, eval_stride=16)
    merged = built(str(tmp_path / "merged"), d)
    metrics = quiet_trainer().validate(merged, datamodule=d, verbose=False)[0]
    assert metrics["val_mse"] == pytest.approx(fitted["val_mse"], rel=1e-4)  # the merged model is the fine-tuned one
    assert np.isfinite(tested["test_mse"]) and tested["test_mase"] > 0


def test_settings_that_cannot_work_are_refused(tiny_timesfm, tiny_patchtst, promo_series) -> None:
    with pytest.raises(ConfigError, match="covariates must be 'encoder', 'xreg' or 'ignore'"):
        Forecasting(backbone=tiny_timesfm, covariates="concat")
    with pytest.warns(UserWarning, match="xreg reads the known-future covariates only; the data's 1 past-only columns go unused"):
        built(tiny_timesfm, data(promo_series), covariates="xreg")
    with pytest.raises(ConfigError, match="covariates are read by TimesFM backbones; this one is patchtst"):
        built(tiny_patchtst, data(promo_series))
    task = built(tiny_timesfm, data(promo_series))
    other = data(promo_series, past_covariates=None)
    other.setup("fit")
    batch = next(iter(other.val_dataloader()))
    with pytest.raises(ConfigError, match="this model reads 1 past covariates and the data gives 0"):
        task.forecast(batch["past_values"], batch["freq"], HORIZON, task.covariate_inputs(batch))
