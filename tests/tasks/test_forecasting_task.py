"""The forecasting task: its TimesFM forward is transformers' forward, its loss is the documented
weighting (and transformers' own with the other setting), the all-patch pretraining loss is the
causal sum of per-patch forecasts, metrics in original units, a backbone with no tokenizer, the
pretrain-then-save path, and clear messages for backbones and settings that do not fit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import TS_CONTEXT, TS_HORIZON, quiet_trainer
from lit_peft import methods
from lit_peft.data import ForecastingData
from lit_peft.errors import ConfigError
from lit_peft.tasks import Forecasting
from lit_peft.tasks.forecasting import pinball


def loaded(folder: str, **kwargs) -> Forecasting:
    task = Forecasting(backbone=folder, **kwargs)
    task.configure_backbone()
    return task.eval()


def batch_of(toy_series, horizon: int = TS_HORIZON, context: int = TS_CONTEXT) -> dict[str, torch.Tensor]:
    """The first 8 validation windows (the same windows, in time order, whatever the horizon)."""
    data = ForecastingData(file=str(toy_series), target_columns=None, context_len=context, horizon_len=horizon,
                           batch_size=8)
    data.setup("fit")
    return next(iter(data.val_dataloader()))


@pytest.mark.parametrize("context", [TS_CONTEXT, 50])  # a whole number of patches, and not
def test_timesfm_forecast_is_transformers_forward(tiny_timesfm, toy_series, context) -> None:
    task = loaded(tiny_timesfm)
    batch = batch_of(toy_series, context=context)
    with torch.no_grad():
        mean, quantiles = task.forecast(batch["past_values"], batch["freq"], TS_HORIZON)
        reference = task.model(past_values=list(batch["past_values"]), freq=batch["freq"].tolist(),
                               forecast_context_len=TS_CONTEXT)
    torch.testing.assert_close(mean, reference.mean_predictions)
    torch.testing.assert_close(quantiles, reference.full_predictions[..., 1:])


@pytest.mark.parametrize("context", [TS_CONTEXT, 50])
def test_timesfm2_5_forecast_is_transformers_forward(tiny_timesfm2_5, toy_series, context) -> None:
    task = loaded(tiny_timesfm2_5)
    batch = batch_of(toy_series, context=context)
    padded = -(-context // 16) * 16
    with torch.no_grad():
        mean, quantiles = task.forecast(batch["past_values"], batch["freq"], TS_HORIZON)
        reference = task.model(past_values=list(batch["past_values"]), forecast_context_len=padded, truncate_negative=False)
        torch.testing.assert_close(mean, reference.mean_predictions)
        torch.testing.assert_close(quantiles, reference.full_predictions[..., 1:])
        # beyond the model's horizon the forecast is appended and decoded again
        longer, _ = task.forecast(batch["past_values"], batch["freq"], TS_HORIZON + 8)
        torch.testing.assert_close(longer[:, :TS_HORIZON], mean)
        again = task.model(past_values=list(torch.cat([batch["past_values"], mean], dim=1)),
                           forecast_context_len=-(-(context + TS_HORIZON) // 16) * 16, truncate_negative=False)
        torch.testing.assert_close(longer[:, TS_HORIZON:], again.mean_predictions[:, :8])
    assert task.probe_modules() == ["model.input_ff_layer", "output_projection_point", "output_projection_quantiles"]


def test_the_default_loss_is_the_reference_weighting_and_the_other_is_transformers(tiny_timesfm, toy_series) -> None:
    batch = batch_of(toy_series)
    task = loaded(tiny_timesfm)
    levels = torch.tensor(task.model.config.quantiles)
    with torch.no_grad():
        mean, quantiles = task.forecast(batch["past_values"], batch["freq"], TS_HORIZON)
        target = batch["future_values"]
        per = torch.stack([torch.maximum((q - 1) * (target - quantiles[..., i]), q * (target - quantiles[..., i])).mean()
                           for i, q in enumerate(levels.tolist())])
        torch.testing.assert_close(pinball(quantiles, target, levels), per)
        torch.testing.assert_close(task.loss(batch), F.mse_loss(mean, target) + 2 * per.sum())
        # weight 1 and the mean over quantiles: transformers' TimesFmModelForPrediction loss (full 32-step horizon here)
        hf = loaded(tiny_timesfm, quantile_loss_weight=1.0, quantile_reduction="mean")
        expected = hf.model(past_values=list(batch["past_values"]), freq=batch["freq"].tolist(),
                            future_values=target, forecast_context_len=TS_CONTEXT).loss
        torch.testing.assert_close(hf.loss(batch), expected)
        assert float(loaded(tiny_timesfm, quantile_loss_weight=0.0).loss(batch)) == pytest.approx(float(F.mse_loss(mean, target)))


def test_a_shorter_horizon_is_scored_on_its_first_steps(tiny_timesfm, toy_series) -> None:
    task = loaded(tiny_timesfm)
    short, full = batch_of(toy_series, horizon=20), batch_of(toy_series)
    torch.testing.assert_close(short["future_values"], full["future_values"][:, :20])  # the same windows, cut
    with torch.no_grad():
        mean, quantiles = task.forecast(full["past_values"], full["freq"], TS_HORIZON)
        expected = task.point_and_quantile_loss(mean[:, :20], quantiles[:, :20], short["future_values"])
        torch.testing.assert_close(task.loss(short), expected)


def test_all_patch_loss_scores_each_patch_on_the_values_after_it(tiny_timesfm, toy_series) -> None:
    """TimesFM's decoder is causal and normalises by the first patch, so patch i's forecast in one pass
    is the forecast from the context cut after patch i."""
    task = loaded(tiny_timesfm, loss_on="all_patches", quantile_loss_weight=0.0)
    batch = batch_of(toy_series)  # context 64 = 4 patches of 16; horizon 32
    full = torch.cat([batch["past_values"], batch["future_values"]], dim=1)
    with torch.no_grad():
        errors = []
        for end in (16, 32, 48, 64):
            mean, _ = task.forecast(full[:, :end], batch["freq"], TS_HORIZON)
            errors.append((mean - full[:, end:end + TS_HORIZON]) ** 2)
        torch.testing.assert_close(task.loss(batch), torch.cat(errors, dim=1).mean())


def test_metrics_are_reported_normalised_and_in_original_units(tiny_timesfm, toy_series) -> None:
    task = loaded(tiny_timesfm)
    data = ForecastingData(file=str(toy_series), target_columns=None, context_len=TS_CONTEXT, horizon_len=TS_HORIZON,
                           eval_stride=16, batch_size=16)
    metrics = quiet_trainer().validate(task, datamodule=data, verbose=False)[0]
    errors, original = [], []
    with torch.no_grad():
        for batch in data.val_dataloader():
            mean, _ = task.forecast(batch["past_values"], batch["freq"], TS_HORIZON)
            err = mean - batch["future_values"]
            errors.append(err)
            original.append(err * batch["scale"][:, None])
    errors, original = torch.cat(errors), torch.cat(original)
    assert metrics["val_mse"] == pytest.approx(float((errors ** 2).mean()), rel=1e-5)
    assert metrics["val_mae"] == pytest.approx(float(errors.abs().mean()), rel=1e-5)
    assert metrics["val_mse_original"] == pytest.approx(float((original ** 2).mean()), rel=1e-5)
    assert metrics["val_mae_original"] == pytest.approx(float(original.abs().mean()), rel=1e-5)


def test_a_forecaster_has_no_tokenizer_and_needs_none(tiny_timesfm) -> None:
    from pathlib import Path

    assert not any(p.name.startswith("tokenizer") for p in Path(tiny_timesfm).iterdir())
    task = Forecasting(backbone=tiny_timesfm)
    assert task.tokenizer is None and task.head_modules() == []
    assert loaded(tiny_timesfm).probe_modules() == ["decoder.input_ff_layer", "decoder.freq_emb", "horizon_ff_layer"]


def test_backbones_and_settings_that_do_not_fit_are_refused_clearly(tiny_bert, tiny_patchtst, toy_series, tmp_path,
                                                                     monkeypatch) -> None:
    with pytest.raises(ConfigError, match="is a bert model; forecasting takes patchtst or timesfm"):
        loaded(tiny_bert)
    patchtst = loaded(tiny_patchtst)
    with pytest.raises(ConfigError, match="reads contexts of 64 values; set data.init_args.context_len: 64"):
        patchtst.forecast(torch.zeros(2, 48), torch.zeros(2, dtype=torch.long), 8)
    with pytest.raises(ConfigError, match="forecasts 32 values; the data asks for 40"):
        patchtst.forecast(torch.zeros(2, 64), torch.zeros(2, dtype=torch.long), 40)
    with pytest.raises(ConfigError, match="all_patches is TimesFM 1.0/2.0's causal pretraining loss; PatchTST"):
        loaded(tiny_patchtst, loss_on="all_patches").loss(batch_of(toy_series))
    with pytest.raises(ConfigError, match="quantile_loss_weight must be 0 or more"):
        Forecasting(backbone=tiny_patchtst, quantile_loss_weight=-1)
    with pytest.raises(ConfigError, match="from_config needs model_type"):
        Forecasting(backbone=None, from_config={"hidden_size": 8})
    monkeypatch.setenv("LIT_PEFT_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr("lit_peft.backbones.SHIPPED", tmp_path / "not-shipped")
    with pytest.raises(ConfigError, match=r"run `lit-peft fit --config configs/pretrain_timesfm_small.yaml` once"):
        loaded("timesfm-small")


def test_pretraining_from_a_config_saves_a_backbone_that_loads(toy_series, tmp_path) -> None:
    from transformers import TimesFmModelForPrediction

    from lit_peft.pretrain import SaveBackbone

    config = {"model_type": "timesfm", "patch_length": 16, "context_length": 64, "horizon_length": 32,
              "num_hidden_layers": 1, "hidden_size": 16, "intermediate_size": 16, "head_dim": 4, "num_attention_heads": 4}
    data = ForecastingData(file=str(toy_series), target_columns=None, context_len=TS_CONTEXT, horizon_len=TS_HORIZON,
                           stride=8, batch_size=16)

    def pretrain() -> Forecasting:
        task = Forecasting(backbone=None, from_config=config, loss_on="all_patches", learning_rate=1e-2, warmup_ratio=0.0)
        method = methods.FullFineTune()
        quiet_trainer(max_epochs=2, callbacks=[method, SaveBackbone(alias=None, path=str(tmp_path / "small"))]).fit(
            task, datamodule=data)
        return task

    task = pretrain()
    saved = TimesFmModelForPrediction.from_pretrained(tmp_path / "small")
    assert (tmp_path / "small" / "lit_peft_pretraining.json").is_file()
    for (name, p), (_, q) in zip(task.model.named_parameters(), saved.named_parameters()):
        torch.testing.assert_close(p, q, msg=name)
    assert task.backbone_source == "random-init"
    # a second pretraining into the same folder is refused before it trains, and the folder is kept
    before = (tmp_path / "small" / "model.safetensors").read_bytes()
    with pytest.raises(ConfigError, match="already holds a model; it is kept as it is"):
        pretrain()
    assert (tmp_path / "small" / "model.safetensors").read_bytes() == before
