"""The scores forecasters report beside MSE and MAE: MASE, and CRPS / weighted quantile loss from
quantile forecasts.

Written here because torchmetrics has neither in the form forecasters use: its
``ContinuousRankedProbabilityScore`` scores an ensemble of samples, and TimesFM forecasts nine
quantiles, not samples (an ensemble estimate over quantiles misses the tails' mass). Both are
torchmetrics ``Metric`` subclasses holding sums, so DDP sums them across ranks as it does MSE.

- ``MASE``: the mean absolute error of each window over the mean absolute error of the seasonal
  naive forecast inside its context (``|x_t - x_{t-m}|``, ``m`` the season length; GluonTS' per-item
  scaling), averaged over windows. Scale-free: the same on the normalised and the original scale.
  A window whose context is constant at lag ``m`` has no scale and is left out.
- ``QuantileScores``: ``crps``, the quantile approximation of the continuous ranked probability
  score, ``2 / |Q| * sum_q pinball_q`` per forecast point, averaged (on the scale it is given; for
  the median alone it is the MAE); and ``wql``, the weighted quantile loss (GluonTS'
  ``mean_wQuantileLoss``, Chronos' WQL): per quantile ``2 * sum pinball_q / sum |y|``, averaged
  over quantiles, on the original units (its denominator needs them).
"""

from __future__ import annotations

import torch
from torchmetrics import Metric


def seasonal_scale(context: torch.Tensor, season: torch.Tensor) -> torch.Tensor:
    """Mean ``|x_t - x_{t-m}|`` over each context (B, T) at its own lag ``m`` (B,); NaN where the
    context is not longer than ``m``."""
    length = context.shape[1]
    lags = season.clamp(min=1).to(context.device)
    positions = torch.arange(length, device=context.device)
    index = (positions[None, :] - lags[:, None]).clamp(min=0)
    diffs = (context - context.gather(1, index)).abs()
    valid = positions[None, :] >= lags[:, None]
    count = valid.sum(dim=1)
    scale = (diffs * valid).sum(dim=1) / count.clamp(min=1)
    return torch.where(count > 0, scale, torch.full_like(scale, float("nan")))


class MASE(Metric):
    """Mean absolute scaled error against the seasonal naive forecast (see the module's note)."""

    higher_is_better = False
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("windows", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, forecast: torch.Tensor, target: torch.Tensor, context: torch.Tensor, season: torch.Tensor) -> None:
        scale = seasonal_scale(context.double(), season)
        error = (forecast.double() - target.double()).abs().mean(dim=1)
        keep = torch.isfinite(scale) & (scale > 0) & torch.isfinite(error)
        self.total += (error[keep] / scale[keep]).sum()
        self.windows += keep.sum()

    def compute(self) -> torch.Tensor:
        return (self.total / self.windows).float() if self.windows > 0 else torch.tensor(float("nan"))


class QuantileScores(Metric):
    """``{"crps": ..., "wql": ...}`` from quantile forecasts (see the module's note). ``update`` takes the
    quantiles (B, H, Q) at ``levels`` (Q,) and the targets (B, H) on the scale CRPS is reported in, and
    the same in original units for WQL. The quantiles share WQL's denominator, so its mean over
    quantiles is one sum over them divided once."""

    higher_is_better = False
    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("crps_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("points", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("loss_original", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("abs_original", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    @staticmethod
    def scores(quantiles: torch.Tensor, target: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        """``2 / |Q| * sum_q pinball_q`` per point: (B, H)."""
        levels = levels.to(device=quantiles.device, dtype=torch.float64)
        error = target.double()[..., None] - quantiles.double()
        return 2 * torch.maximum((levels - 1) * error, levels * error).mean(dim=-1)

    def update(self, quantiles: torch.Tensor, target: torch.Tensor, levels: torch.Tensor,
               quantiles_original: torch.Tensor, target_original: torch.Tensor) -> None:
        self.crps_sum += self.scores(quantiles, target, levels).sum()
        self.points += target.numel()
        self.loss_original += self.scores(quantiles_original, target_original, levels).sum()
        self.abs_original += target_original.double().abs().sum()

    def compute(self) -> dict[str, torch.Tensor]:
        nan = torch.tensor(float("nan"))
        crps = (self.crps_sum / self.points).float() if self.points > 0 else nan
        wql = (self.loss_original / self.abs_original).float() if self.abs_original > 0 else nan
        return {"crps": crps, "wql": wql}
