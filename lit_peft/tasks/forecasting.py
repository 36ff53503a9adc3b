"""Time-series forecasting: fine-tune a pretrained forecaster on windows of series.

Two architectures, both transformers models read from a hub id, a folder, or the packaged alias
``timesfm-small`` (pretrained here by ``configs/pretrain_timesfm_small.yaml``):

- TimesFM 2.5 (``TimesFm2_5ModelForPrediction``, ``google/timesfm-2.5-200m-transformers``): its own
  ``forward`` (global scaling, flip invariance, continuous quantile head) on the batch's contexts;
  the point forecast is its median; beyond ``horizon_length`` the forecast is appended and decoded again.
- TimesFM (``TimesFmModelForPrediction``, TimesFM 1.0 / 2.0 checkpoints): a decoder over patches
  of 32 values that normalises each context itself and forecasts ``horizon_length`` (128) values
  per patch, a mean and nine quantiles. The forecast of a window is the last patch's output; a
  horizon beyond 128 is decoded autoregressively, as transformers' ``forward`` does. The batch's
  windows have one length, so the task feeds the decoder a tensor (front-padded to whole patches)
  rather than ``forward``'s list of series, and runs the output block on the last patch only.
- PatchTST (``PatchTSTForPrediction``, point forecasts; its ``context_length`` must be the data's).

The loss is ``MSE(mean) + quantile_loss_weight * Q`` where Q is the pinball loss of the quantile
heads over the forecast's first ``horizon`` steps, summed over quantiles (``quantile_reduction:
sum``) or averaged (``mean``). The default, weight 2 and the sum, is the TimesFM fine-tuning
reference's loss; weight 1 and the mean is transformers' own ``TimesFmModelForPrediction`` loss
(which takes only a full 128-step ``future_values``, hence the loss is computed here).
``loss_on: all_patches`` scores every patch's forecast of the values after it, TimesFM's
pretraining objective (``configs/pretrain_timesfm_small.yaml``).

Metrics per stage: MSE and MAE on the data's normalised scale (``val_mse``, ``test_mae``: what
papers report on ETT) and in the original units (``test_mse_original``); MASE against the seasonal
naive forecast (``test_mase``), and from the quantile heads CRPS (normalised scale) and the weighted
quantile loss (``test_crps``, ``test_wql``; ``forecast_metrics``). ``predict`` returns, per
window, the point forecast and quantiles in the original units with their timestamps and the
actual values where known; ``lit-peft predict`` writes them to ``forecasts.csv`` (one row per series,
window and step) and, with ``--predictions.plots true``, a PNG per series.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn

from lit_peft import backbones
from lit_peft.errors import ConfigError
from lit_peft.methods.freeze import find_blocks
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from lit_peft.tasks.base import PeftTask
from lit_peft.tasks.covariates import ENCODER, CovariateEncoder, xreg
from lit_peft.tasks.forecast_metrics import MASE, QuantileScores

ARCHITECTURES = {"timesfm": "TimesFmModelForPrediction", "timesfm2_5": "TimesFm2_5ModelForPrediction",
                 "patchtst": "PatchTSTForPrediction"}
TIMESFM = ("timesfm", "timesfm2_5")
STAGE_METRICS = ("mse", "mae", "mse_original", "mae_original", "mase", "crps", "wql")


def pinball(forecast: torch.Tensor, target: torch.Tensor, quantiles: torch.Tensor) -> torch.Tensor:
    """Mean pinball loss per quantile: ``forecast`` (B, H, Q), ``target`` (B, H) -> (Q,)."""
    error = target[..., None] - forecast
    return torch.maximum((quantiles - 1) * error, quantiles * error).mean(dim=(0, 1))


class Forecasting(PeftTask):
    """Forecast ``horizon`` values of a series from the ``context`` before them."""

    task_name = "forecasting"
    peft_task_type = None  # peft's plain PeftModel: no task-specific wrapper
    uses_tokenizer = False

    def __init__(
        self,
        backbone: Optional[str] = "timesfm-small",
        dtype: str = "default",
        learning_rate: float = 1e-4,
        weight_decay: float = 0.0,
        lr_schedule: Literal["linear", "cosine", "constant"] = "cosine",
        warmup_ratio: float = 0.05,
        lr_multipliers: Optional[dict[str, float]] = None,
        weight_decay_multipliers: Optional[dict[str, float]] = None,
        compile: bool = False,
        attn_implementation: Optional[str] = None,
        revision: Optional[str] = None,
        trust_remote_code: bool = False,
        gradient_checkpointing: bool = False,
        optimizer: Optional[OptimizerCallable] = None,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
        quantile_loss_weight: float = 2.0,
        quantile_reduction: Literal["sum", "mean"] = "sum",
        loss_on: Literal["last_patch", "all_patches"] = "last_patch",
        from_config: Optional[dict[str, Any]] = None,
        covariates: Literal["encoder", "xreg", "ignore"] = "encoder",
        covariate_dims: Optional[dict[str, int]] = None,
        xreg_ridge: float = 1.0,
    ) -> None:
        """
        Args:
            backbone: hub id (``google/timesfm-2.0-500m-pytorch``), a transformers folder, or
                ``timesfm-small`` (pretrained here; see ``configs/pretrain_timesfm_small.yaml``).
            quantile_loss_weight: weight of the quantile heads' pinball loss (0: MSE alone).
            quantile_reduction: ``sum`` over the quantiles (the TimesFM reference) or ``mean`` (transformers').
            loss_on: ``last_patch`` (fine-tuning: the forecast of the window) or ``all_patches``
                (TimesFM pretraining: every patch forecasts the values after it; TimesFM only).
            from_config: build a randomly initialised model from these transformers config arguments
                (``model_type: timesfm`` and its sizes) instead of loading ``backbone``: pretraining.
            covariates: how a TimesFM reads the data's covariates (``lit_peft.tasks.covariates``):
                ``encoder`` (trained with the method), ``xreg`` (in-context ridge regression on the
                known-future ones), ``ignore``. Data without covariates makes this moot.
            covariate_dims: what the data carries (``ForecastingData.covariate_dims()``); null: read
                from the run's data module when the model is built, and recorded in the checkpoint.
            xreg_ridge: the ridge penalty of ``xreg`` on the (standardised) covariates.
        """
        super().__init__(backbone=backbone if backbone is not None else "random-init", dtype=dtype,
                         learning_rate=learning_rate, weight_decay=weight_decay, lr_schedule=lr_schedule,
                         warmup_ratio=warmup_ratio, lr_multipliers=lr_multipliers,
                         weight_decay_multipliers=weight_decay_multipliers, compile=compile, attn_implementation=attn_implementation, revision=revision,
                         trust_remote_code=trust_remote_code, gradient_checkpointing=gradient_checkpointing,
                         optimizer=optimizer, lr_scheduler=lr_scheduler)
        if quantile_loss_weight < 0:
            raise ConfigError(f"quantile_loss_weight must be 0 or more, got {quantile_loss_weight}")
        if quantile_reduction not in ("sum", "mean"):
            raise ConfigError(f"quantile_reduction must be 'sum' or 'mean', got '{quantile_reduction}'")
        if loss_on not in ("last_patch", "all_patches"):
            raise ConfigError(f"loss_on must be 'last_patch' or 'all_patches', got '{loss_on}'")
        if from_config is not None and from_config.get("model_type") not in ARCHITECTURES:
            raise ConfigError(f"from_config needs model_type: one of {sorted(ARCHITECTURES)}, got {from_config.get('model_type')!r}")
        if backbone is None and from_config is None:
            raise ConfigError("give model.init_args.backbone (a hub id, folder or timesfm-small) or from_config")
        if covariates not in ("encoder", "xreg", "ignore"):
            raise ConfigError(f"covariates must be 'encoder', 'xreg' or 'ignore', got '{covariates}'")
        self.quantile_loss_weight, self.quantile_reduction, self.loss_on = quantile_loss_weight, quantile_reduction, loss_on
        self.covariates, self.covariate_dims, self.xreg_ridge = covariates, covariate_dims, xreg_ridge
        self._covariate_inputs: Optional[tuple] = None
        self.from_config = dict(from_config) if from_config is not None else None
        make = lambda: torchmetrics.MetricCollection({  # noqa: E731
            "mse": torchmetrics.MeanSquaredError(), "mae": torchmetrics.MeanAbsoluteError()})
        self.val_metrics, self.test_metrics = make(), make()
        self.val_original, self.test_original = make(), make()
        self.val_mase, self.test_mase = MASE(), MASE()
        self.val_quantile, self.test_quantile = QuantileScores(), QuantileScores()

    # ---- the backbone ------------------------------------------------------------------------
    @property
    def backbone_source(self) -> str:
        return "random-init" if self.from_config is not None else backbones.resolve(self.backbone_name)

    def load_backbone(self, **kwargs: Any) -> nn.Module:
        import transformers

        if self.from_config is not None:
            if kwargs:
                raise ConfigError("a model built from_config has no pretrained weights to quantize; load a backbone")
            config = transformers.AutoConfig.for_model(**self.from_config)
            dtype = self.loading_dtype()
            model = getattr(transformers, ARCHITECTURES[config.model_type])(config)
            return self.attach_covariates(model if dtype == "auto" else model.to(backbones.torch_dtype(dtype)), None)
        source = backbones.resolve(self.backbone_name)
        try:
            config = transformers.AutoConfig.from_pretrained(source, **{k: v for k, v in self.hub_kwargs().items()
                                                                    if k in ('revision', 'trust_remote_code')})
        except (OSError, ValueError) as err:
            raise ConfigError(f"could not load backbone '{self.backbone_name}' ({err}). Give a local folder, a reachable "
                              f"hub id, or one of the packaged backbones {sorted(backbones.PACKAGED)}") from err
        if config.model_type not in ARCHITECTURES:
            raise ConfigError(f"backbone '{self.backbone_name}' is a {config.model_type} model; forecasting takes "
                              f"{' or '.join(sorted(ARCHITECTURES))}")
        if config.model_type == "patchtst" and (config.loss != "mse" or config.num_input_channels != 1):
            raise ConfigError("a PatchTST backbone must forecast points (loss: mse) of one channel at a time "
                              f"(num_input_channels: 1); this one has loss={config.loss!r}, "
                              f"num_input_channels={config.num_input_channels}")
        model = backbones.load_model(self.backbone_name, getattr(transformers, ARCHITECTURES[config.model_type]),
                                     dtype=self.loading_dtype(), **self.hub_kwargs(), **kwargs)
        return self.attach_covariates(model, source)

    # ---- covariates ----------------------------------------------------------------------------
    def attach_covariates(self, model: nn.Module, source: Optional[str]) -> nn.Module:
        """Give the model a ``CovariateEncoder`` (a head) where the data has covariates and the task reads
        them with one; a merged folder's trained encoder weights are loaded back."""
        dims = self.covariate_dims
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if dims is None and hasattr(datamodule, "covariate_dims") and self.covariates != "ignore":
            dims = datamodule.covariate_dims()
        if self.covariates == "xreg" and dims and (dims.get("past") or dims.get("series")):
            from lightning.fabric.utilities.rank_zero import rank_zero_warn

            rank_zero_warn(f"covariates: xreg reads the known-future covariates only; the data's {dims.get('past', 0)} "
                           f"past-only columns{' and series id' if dims.get('series') else ''} go unused "
                           "(covariates: encoder reads them)")
        if self.covariates != "encoder":
            return model
        if not dims or not (dims.get("past") or dims.get("future") or dims.get("series")):
            return model
        if model.config.model_type not in TIMESFM:
            raise ConfigError(f"covariates are read by TimesFM backbones; this one is {model.config.model_type}: drop the "
                              "data's covariates or set model.init_args.covariates: ignore")
        if self.loss_on == "all_patches":
            raise ConfigError("covariates are for fine-tuning (loss_on: last_patch); pretraining reads series alone")
        self.covariate_dims = self.hparams["covariate_dims"] = dict(dims)  # the checkpoint rebuilds the same encoder
        encoder = CovariateEncoder(dims, model.config.patch_length, model.config.hidden_size)
        model.add_module(ENCODER, encoder.to(next(model.parameters()).dtype))
        if source is not None:
            self._load_encoder(model, source)
        import weakref

        task = weakref.ref(self)  # a hook holding the task itself would be deep-copied with the layer

        def add_covariates(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
            owner = task()
            inputs = owner._covariate_inputs if owner is not None else None
            if inputs is None:
                return output
            return output + getattr(owner.model, ENCODER)(*inputs).to(output.dtype)

        (model.decoder if model.config.model_type == "timesfm" else model.model).input_ff_layer.register_forward_hook(add_covariates)
        return model

    @staticmethod
    def _load_encoder(model: nn.Module, source: str) -> None:
        weights = Path(source) / "model.safetensors"
        if not weights.is_file():
            return
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as f:
            state = {k[len(ENCODER) + 1:]: f.get_tensor(k) for k in f.keys() if k.startswith(ENCODER + ".")}
        if state:
            getattr(model, ENCODER).load_state_dict(state)

    def head_modules(self) -> list[str]:
        """The covariate encoder where there is one (it is new: it trains under every method); nothing else
        is newly initialised: the output block is pretrained and trains only where a method says."""
        return [ENCODER] if hasattr(self.model, ENCODER) else []

    def covariate_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The batch's covariates, as ``forecast`` takes them."""
        return {k: batch[k] for k in ("past_covariates", "future_covariates", "series") if k in batch}

    @property
    def model(self) -> nn.Module:
        """The transformers model under any peft wrapper (adapters sit inside it)."""
        return self.backbone.get_base_model() if hasattr(self.backbone, "get_base_model") else self.backbone

    @property
    def architecture(self) -> str:
        return self.model.config.model_type

    def probe_modules(self) -> list[str]:
        """Everything outside the transformer stack (TimesFM's input and output residual blocks and
        frequency embedding: the TimesFM pipeline's linear probe; PatchTST's patch embedding and head)."""
        blocks, _ = find_blocks(self.model)
        found = []

        def visit(prefix: str, module: nn.Module) -> None:
            for name, child in module.named_children():
                path = f"{prefix}{name}"
                if path == blocks:
                    continue
                if blocks.startswith(path + "."):
                    visit(path + ".", child)
                elif any(True for _ in child.parameters()):
                    found.append(path)

        visit("", self.model)
        return found

    # ---- forecasting -------------------------------------------------------------------------
    def forecast(self, past_values: torch.Tensor, freq: torch.Tensor, horizon: int,
                 covariates: Optional[dict[str, torch.Tensor]] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(mean (B, horizon), quantiles (B, horizon, Q) or None) from contexts (B, T) and the windows'
        covariates (``covariate_inputs``), read as ``covariates`` says."""
        # under autocast the series stay float32 (autocast casts for the matmuls; the scaling TimesFM does
        # first keeps full precision); without it they take the weights' dtype
        autocast = torch.is_autocast_enabled(past_values.device.type)
        past_values = past_values.to(torch.float32 if autocast else self.weights_dtype)
        if self.architecture == "patchtst":
            return self._patchtst(past_values, horizon), None
        covariates = covariates or {}
        if self.covariates == "xreg" and "future_covariates" in covariates:
            known = covariates["future_covariates"][:, :past_values.shape[1] + horizon].to(past_values.dtype)
            residual, ahead = xreg(past_values, known, self.xreg_ridge)
            out = self._timesfm_steps(residual, freq, horizon) + ahead[..., None].to(past_values.dtype)
            return out[..., 0].contiguous(), out[..., 1:]
        self._covariate_inputs = self._encoder_inputs(past_values, horizon, covariates)
        try:
            out = self._timesfm_steps(past_values, freq, horizon)  # both TimesFM versions
        finally:
            self._covariate_inputs = None
        return out[..., 0].contiguous(), out[..., 1:]

    def _encoder_inputs(self, past_values: torch.Tensor, horizon: int, covariates: dict[str, torch.Tensor]) -> Optional[tuple]:
        """What the covariate encoder's hook reads during the decoder pass; None without an encoder."""
        if not hasattr(self.model, ENCODER):
            return None
        dims = self.covariate_dims
        given = {"past": covariates.get("past_covariates"), "future": covariates.get("future_covariates")}
        for kind, tensor in given.items():
            found = 0 if tensor is None else tensor.shape[-1]
            if found != dims[kind]:
                raise ConfigError(f"this model reads {dims[kind]} {kind} covariates and the data gives {found}: give the data "
                                  "the covariates it was fine-tuned with")
        if dims["future"] and horizon > self.model.config.horizon_length:
            raise ConfigError(f"with known-future covariates the horizon is at most the model's {self.model.config.horizon_length} "
                              f"steps (one decoder pass), got {horizon}")
        if dims["future"] and given["future"].shape[1] < past_values.shape[1] + dims["lookahead"]:
            raise ConfigError(f"the covariate encoder reads {dims['lookahead']} steps ahead and these windows have "
                              f"{given['future'].shape[1] - past_values.shape[1]}: keep horizon_len and eval_horizon_len")
        return (past_values.shape[1], given["past"], given["future"], covariates.get("series") if dims["series"] else None)

    def _patchtst(self, past_values: torch.Tensor, horizon: int) -> torch.Tensor:
        config = self.model.config
        if past_values.shape[1] != config.context_length:
            raise ConfigError(f"this PatchTST backbone reads contexts of {config.context_length} values; set "
                              f"data.init_args.context_len: {config.context_length} (got {past_values.shape[1]})")
        if horizon > config.prediction_length:
            raise ConfigError(f"this PatchTST backbone forecasts {config.prediction_length} values; the data asks for "
                              f"{horizon}: set the horizon to {config.prediction_length} or less")
        out = self.backbone(past_values=past_values[..., None]).prediction_outputs  # (B, prediction_length, 1)
        return out[:, :horizon, 0].contiguous()

    def _timesfm_decode(self, values: torch.Tensor, padding: torch.Tensor, freq: torch.Tensor, last_only: bool) -> torch.Tensor:
        """One decoder pass: (B, patches or 1, horizon_length, 1 + Q) in the input's scale."""
        model = self.model
        out = model.decoder(past_values=values, past_values_padding=padding, freq=freq[:, None])
        hidden = out.last_hidden_state[:, -1:] if last_only else out.last_hidden_state
        y = model.horizon_ff_layer(hidden)
        y = y.view(*y.shape[:2], model.config.horizon_length, len(model.config.quantiles) + 1)
        return y * out.scale[:, None, None, None] + out.loc[:, None, None, None]

    def _timesfm_inputs(self, past_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Contexts front-padded to whole patches, with TimesFM's padding indicator (1 = padded)."""
        patch = self.model.config.patch_length
        pad = (-past_values.shape[1]) % patch
        padding = torch.zeros_like(past_values)
        if pad:
            past_values = F.pad(past_values, (pad, 0))
            padding = F.pad(padding, (pad, 0), value=1.0)
        return past_values, padding

    def _timesfm2_5_step(self, past_values: torch.Tensor) -> torch.Tensor:
        """TimesFM 2.5's forecast of ``horizon_length`` steps, (B, horizon_length, 1 + Q): transformers'
        own ``forward`` (its global scaling, flip invariance and continuous quantile head), contexts
        front-padded to whole patches there. No clamping at zero: the data is standardised."""
        model = self.model
        patch = model.config.patch_length
        length = -(-past_values.shape[1] // patch) * patch
        out = model(past_values=list(past_values), forecast_context_len=length, truncate_negative=False)
        full = out.full_predictions
        mean = full[..., min(model.config.decode_index, full.shape[-1] - 1)]  # the median, 2.5's point forecast
        return torch.cat([mean[..., None], full[..., 1:]], dim=-1)

    def _timesfm_steps(self, past_values: torch.Tensor, freq: torch.Tensor, horizon: int) -> torch.Tensor:
        """The forecast of the last patch, (B, horizon, 1 + Q); beyond ``horizon_length`` the mean is
        appended to the context and decoded again."""
        step = self.model.config.horizon_length
        if self.architecture == "timesfm2_5":
            parts, values = [], past_values
            for _ in range(math.ceil(horizon / step)):
                parts.append(self._timesfm2_5_step(values))
                values = torch.cat([values, parts[-1][..., 0]], dim=1)
            return torch.cat(parts, dim=1)[:, :horizon]
        values, padding = self._timesfm_inputs(past_values)
        parts = []
        for _ in range(math.ceil(horizon / step)):
            out = self._timesfm_decode(values, padding, freq, last_only=True)[:, 0]
            parts.append(out)
            values = torch.cat([values, out[..., 0]], dim=1)
            padding = F.pad(padding, (0, step))
        return torch.cat(parts, dim=1)[:, :horizon]

    def activation_forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """One forward pass over a batch of windows (EVA reads the layers' inputs during it)."""
        return self.forecast(batch["past_values"], batch["freq"], batch["future_values"].shape[1], self.covariate_inputs(batch))[0]

    # ---- loss and metrics ----------------------------------------------------------------------
    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._loss_and_forecast(batch)[0]

    def _loss_and_forecast(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(loss, mean forecast, quantile forecasts); the forecasts are None under the all-patch loss."""
        target = batch["future_values"]
        if self.loss_on == "all_patches":
            return self._all_patch_loss(batch["past_values"], target, batch["freq"]), None, None
        mean, quantiles = self.forecast(batch["past_values"], batch["freq"], target.shape[1], self.covariate_inputs(batch))
        return self.point_and_quantile_loss(mean.float(), quantiles, target), mean, quantiles

    def point_and_quantile_loss(self, mean: torch.Tensor, quantiles: Optional[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        loss = F.mse_loss(mean, target)
        if quantiles is not None and self.quantile_loss_weight > 0:
            levels = torch.tensor(self.model.config.quantiles, dtype=torch.float32, device=target.device)
            per_quantile = pinball(quantiles.float(), target, levels)
            q = per_quantile.sum() if self.quantile_reduction == "sum" else per_quantile.mean()
            loss = loss + self.quantile_loss_weight * q
        return loss

    def _all_patch_loss(self, past_values: torch.Tensor, future_values: torch.Tensor, freq: torch.Tensor) -> torch.Tensor:
        """Every patch forecasts the ``horizon_length`` values after it (TimesFM's pretraining loss);
        forecast steps past the end of the window are not scored."""
        if self.architecture != "timesfm":
            raise ConfigError("loss_on: all_patches is TimesFM 1.0/2.0's causal pretraining loss; PatchTST forecasts from the "
                              "whole context, and TimesFM 2.5 is fine-tuned here, not pretrained")
        config = self.model.config
        patch, step = config.patch_length, config.horizon_length
        if past_values.shape[1] % patch:
            raise ConfigError(f"loss_on: all_patches needs context_len a multiple of the patch length {patch}")
        out = self._timesfm_decode(past_values, torch.zeros_like(past_values), freq, last_only=False)  # (B, N, step, 1+Q)
        full = torch.cat([past_values, future_values], dim=1)
        n = out.shape[1]
        ends = torch.arange(1, n + 1, device=full.device) * patch  # patch i forecasts from index ends[i]
        index = ends[:, None] + torch.arange(step, device=full.device)  # (N, step)
        valid = index < full.shape[1]
        targets = full[:, index.clamp(max=full.shape[1] - 1)]  # (B, N, step)
        mask = valid.expand_as(targets)
        # the scored (patch, step) pairs as one row: the same loss as a window's, over all of them
        mean, quant = out[..., 0].float()[mask][None], out[..., 1:].float()[mask][None]
        return self.point_and_quantile_loss(mean, quant, targets[mask][None])

    def step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        loss, mean, quantiles = self._loss_and_forecast(batch)
        rows = batch["past_values"].shape[0]
        self.log_mean(f"{stage}_loss", loss, rows, on_step=stage == "train", prog_bar=True)
        if stage != "train" and mean is not None:
            self.update_scores(stage, batch, mean.float(), quantiles)
        return loss

    def update_scores(self, stage: str, batch: dict[str, torch.Tensor], mean: torch.Tensor,
                      quantiles: Optional[torch.Tensor]) -> None:
        """MSE and MAE (normalised and original units), MASE, and CRPS / WQL where there are quantiles."""
        target = batch["future_values"]
        getattr(self, f"{stage}_metrics").update(mean, target)
        scale, loc = batch["scale"][:, None], batch["loc"][:, None]
        getattr(self, f"{stage}_original").update(mean * scale + loc, target * scale + loc)
        season = batch.get("season", torch.ones_like(batch["series"]))
        getattr(self, f"{stage}_mase").update(mean, target, batch["past_values"], season)
        if quantiles is not None:
            levels = torch.tensor(self.model.config.quantiles)
            quantiles = quantiles.float()
            getattr(self, f"{stage}_quantile").update(quantiles, target, levels, quantiles * scale[..., None] + loc[..., None],
                                                      target * scale + loc)

    def _log_epoch_metrics(self, stage: str) -> None:
        self.log_accumulated(getattr(self, f"{stage}_metrics"), lambda v: {f"{stage}_{k}": x for k, x in v.items()})
        self.log_accumulated(getattr(self, f"{stage}_original"),
                             lambda v: {f"{stage}_{k}_original": x for k, x in v.items()}, prog_bar=False)
        self.log_accumulated(getattr(self, f"{stage}_mase"), lambda v: {f"{stage}_mase": v}, prog_bar=False)
        self.log_accumulated(getattr(self, f"{stage}_quantile"), lambda v: {f"{stage}_{k}": x for k, x in v.items()},
                             prog_bar=False)

    def _reset_metrics(self, stage: str) -> None:
        """Fresh metric states in the stage's own grad mode: torchmetrics' MAE adds in place, and a state
        made under a ``validate`` call's inference mode cannot be updated in a fit's validation."""
        for kind in ("metrics", "original", "mase", "quantile"):
            getattr(self, f"{stage}_{kind}").reset()

    def on_validation_epoch_start(self) -> None:
        self._reset_metrics("val")

    def on_test_epoch_start(self) -> None:
        self._reset_metrics("test")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch_metrics("test")

    # ---- predictions --------------------------------------------------------------------------
    @torch.no_grad()
    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, list]:
        """Per window, in the original units: the forecast, its quantiles, the actual values (None
        where unknown) and the context, with ISO timestamps."""
        import pandas as pd

        horizon = batch["future_values"].shape[1]
        mean, quantiles = self.forecast(batch["past_values"], batch["freq"], horizon, self.covariate_inputs(batch))
        scale, loc = batch["scale"][:, None], batch["loc"][:, None]
        restore = lambda x: (x.float() * scale + loc).tolist()  # noqa: E731
        names = getattr(getattr(self.trainer, "datamodule", None), "series_names", None) if self._trainer else None
        stamp = lambda t: [str(s) for s in pd.to_datetime(t.reshape(-1).cpu().numpy()).strftime("%Y-%m-%d %H:%M:%S")]  # noqa: E731
        rows = {
            "series": [names[i] if names else str(i) for i in batch["series"].tolist()],
            "timestamp": [stamp(t) for t in batch["future_time"]],
            "forecast": restore(mean),
            "actual": [[None if math.isnan(v) else v for v in row] for row in restore(batch["future_values"])],
            "context_timestamp": [stamp(t) for t in batch["past_time"]],
            "context": restore(batch["past_values"]),
        }
        if quantiles is not None:
            levels = self.model.config.quantiles
            rows["quantiles"] = [{f"q{q:g}": [(v * s + l) for v in col] for q, col in zip(levels, window.T.tolist())}
                                 for window, s, l in zip(quantiles.float(), scale[:, 0].tolist(), loc[:, 0].tolist())]
        return rows

    # how ``lit-peft predict`` writes what predict_step returns (lit_peft.predictions)
    prediction_file = "forecasts.csv"

    @staticmethod
    def prediction_table(window: dict[str, Any]) -> list[dict[str, Any]]:
        """One CSV row per forecast step of a window."""
        rows = []
        quantiles = window.get("quantiles") or {}
        for i, (when, value, actual) in enumerate(zip(window["timestamp"], window["forecast"], window["actual"])):
            row = {"series": window["series"], "forecast_start": window["timestamp"][0], "step": i + 1,
                   "timestamp": when, "forecast": value}
            row.update({name: values[i] for name, values in quantiles.items()})
            row["actual"] = actual
            rows.append(row)
        return rows

    @staticmethod
    def plot_prediction(window: dict[str, Any], path: Path) -> None:
        """Context, forecast, the widest quantile band and the actual values of one window, as a PNG."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import pandas as pd

        past, future = pd.to_datetime(window["context_timestamp"]), pd.to_datetime(window["timestamp"])
        fig, ax = plt.subplots(figsize=(10, 3.5))
        ax.plot(past, window["context"], color="0.3", lw=1, label="context")
        quantiles = window.get("quantiles") or {}
        if quantiles:
            low, high = min(quantiles, key=lambda k: float(k[1:])), max(quantiles, key=lambda k: float(k[1:]))
            ax.fill_between(future, quantiles[low], quantiles[high], color="tab:blue", alpha=0.2, label=f"{low}-{high}")
        if any(v is not None for v in window["actual"]):
            ax.plot(future, [float("nan") if v is None else v for v in window["actual"]], color="black", lw=1, label="actual")
        ax.plot(future, window["forecast"], color="tab:blue", lw=1.5, label="forecast")
        ax.set_title(f"{window['series']}: forecast from {window['timestamp'][0]}")
        ax.legend(loc="upper left", fontsize=8)
        fig.autofmt_xdate()
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
