"""Covariates in fine-tuning a TimesFM forecaster: two ways, chosen by ``Forecasting(covariates=...)``.

- ``encoder`` (the default where the data has covariates): a small network trained with the method
  (it is a head: it trains under every method). For each input patch it reads that patch's past-only
  covariates (ETT's load columns for OT), its known-future covariates (columns and calendar
  features) and those of the ``lookahead`` steps after it, and a static series id, and adds the
  result to the patch's token embedding (a forward hook on ``decoder.input_ff_layer``, so the
  transformer attends over covariate-informed patches and peft wrappers need no change). Its output
  layers start at zero: before training the forecaster is exactly the pretrained one.
- ``xreg``: TimesFM's in-context regression ("xreg + timesfm"): per window, a ridge regression of the
  context on its known-future covariates; TimesFM forecasts the residual, and the regression on the
  horizon's covariates is added back to the mean and every quantile. Nothing is learned for it, and
  it cannot read past-only covariates (their horizon values are unknown) or a static id (constant
  within a window).

Written here because neither transformers nor the TimesFM package trains with covariates (TimesFM
applies XReg at inference only), and the measurement in ``docs/results.md`` chooses between the two.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

#: lit-peft's name of the encoder inside the transformers model (a top-level child: a head)
ENCODER = "covariate_encoder"


class CovariateEncoder(nn.Module):
    """Patch embeddings of covariates (see the module's note). ``dims``: ``past``, ``future`` (columns
    per step), ``series`` (static ids; 0: none), ``lookahead`` (future steps each patch reads)."""

    def __init__(self, dims: dict[str, int], patch: int, hidden: int) -> None:
        super().__init__()
        self.dims, self.patch = dict(dims), patch
        inputs = patch * dims["past"] + (patch + dims["lookahead"]) * dims["future"]
        self.mlp = nn.Sequential(nn.Linear(inputs, hidden), nn.SiLU(), nn.Linear(hidden, hidden)) if inputs else None
        self.static = nn.Embedding(dims["series"], hidden) if dims["series"] else None
        if self.mlp is not None:
            nn.init.zeros_(self.mlp[2].weight)
            nn.init.zeros_(self.mlp[2].bias)
        if self.static is not None:
            nn.init.zeros_(self.static.weight)

    def forward(self, context_len: int, past: Optional[torch.Tensor], future: Optional[torch.Tensor],
                series: Optional[torch.Tensor]) -> torch.Tensor:
        """(B, patches, hidden) for contexts of ``context_len`` front-padded to whole patches:
        ``past`` (B, context, past), ``future`` (B, context + horizon, future), ``series`` (B,)."""
        pad = (-context_len) % self.patch
        n = (context_len + pad) // self.patch
        parts = []
        if self.dims["past"]:
            steps = F.pad(past, (0, 0, pad, 0))  # (B, n * patch, C)
            parts.append(steps.reshape(steps.shape[0], n, -1))
        if self.dims["future"]:
            look = self.dims["lookahead"]
            steps = F.pad(future, (0, 0, pad, 0))  # position p of the padded context is row p here
            index = torch.arange(n, device=steps.device)[:, None] * self.patch + torch.arange(self.patch + look, device=steps.device)
            parts.append(steps[:, index].reshape(steps.shape[0], n, -1))  # the patch's steps and the lookahead after it
        out = 0.0
        if parts:
            weight = self.mlp[0].weight
            out = self.mlp(torch.cat(parts, dim=-1).to(weight.dtype))
        if self.static is not None:
            out = out + self.static(series)[:, None, :]
        return out


def xreg(context: torch.Tensor, future: torch.Tensor, ridge: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge regression of each context (B, T) on its covariates ``future[:, :T]`` (B, T + H, C) with an
    intercept: (the context less its fit (B, T), the fit over the horizon (B, H))."""
    T = context.shape[1]
    X = torch.cat([future, torch.ones_like(future[..., :1])], dim=-1).double()
    Xc, y = X[:, :T], context.double()
    eye = torch.eye(X.shape[-1], dtype=X.dtype, device=X.device)
    eye[-1, -1] = 0.0  # the intercept is not shrunk
    beta = torch.linalg.solve(Xc.transpose(1, 2) @ Xc + ridge * eye, Xc.transpose(1, 2) @ y[..., None])  # (B, C + 1, 1)
    fit = (X @ beta)[..., 0]
    return (y - fit[:, :T]).to(context.dtype), fit[:, T:].to(context.dtype)
