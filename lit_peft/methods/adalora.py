"""AdaLoRA (Zhang et al. 2023, arXiv 2303.10512) through peft.

LoRA in SVD form (P diag(E) Q) whose rank budget shrinks from ``init_r`` to ``target_r`` per layer
on average: after ``tinit`` warm-up steps the budget falls on a cubic schedule until ``tfinal``
steps before the end, pruning the singular values of least importance (a smoothed gradient-weight
sensitivity). peft's rank allocator does the pruning; this callback steps it once after every
optimizer step, adds the orthogonality regularizer to the loss, and saves the allocator's
importance estimates in the checkpoint so a resumed run prunes exactly as an uninterrupted one.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from lightning.pytorch import Trainer

from lit_peft.errors import ConfigError
from lit_peft.methods.peft_adapter import PeftAdapter
from lit_peft.methods.targets import Targets


class AdaLoRA(PeftAdapter):
    """Adaptive-rank LoRA with peft's rank allocator stepped on the trainer's global step."""

    name = "adalora"
    # the rank budget's schedule: the ranks it pruned are zeros in the saved weights
    training_only = frozenset({"dropout", "target_r", "tinit", "tfinal", "delta_t", "beta1", "beta2", "orth_reg_weight",
                               "total_step"})

    def __init__(self, init_r: int = 12, target_r: int = 8, alpha: float = 16, dropout: float = 0.1,
                 targets: Targets = "qv", tinit: Union[int, float] = 0.1, tfinal: Union[int, float] = 0.3,
                 delta_t: int = 1,
                 beta1: float = 0.85, beta2: float = 0.85, orth_reg_weight: float = 0.5,
                 total_step: Optional[int] = None) -> None:
        super().__init__(targets=targets)
        if any(isinstance(t, float) and not 0 <= t < 1 for t in (tinit, tfinal)) or any(
                isinstance(t, int) and t < 0 for t in (tinit, tfinal)):
            raise ConfigError(f"AdaLoRA's tinit ({tinit}) and tfinal ({tfinal}) are steps (integers >= 0) or "
                              "fractions of the run's steps (0 <= x < 1)")
        if isinstance(tinit, float) and isinstance(tfinal, float) and tinit + tfinal >= 1:
            raise ConfigError(f"AdaLoRA's tinit ({tinit}) + tfinal ({tfinal}) must leave part of the run for pruning "
                              "ranks: their sum must be below 1")
        if not 0 < target_r <= init_r:
            raise ConfigError(f"AdaLoRA needs 0 < target_r <= init_r, got target_r={target_r}, init_r={init_r}")
        self.init_r, self.target_r, self.alpha, self.dropout = init_r, target_r, alpha, dropout
        self.tinit, self.tfinal, self.delta_t = tinit, tfinal, delta_t
        self.beta1, self.beta2, self.orth_reg_weight = beta1, beta2, orth_reg_weight
        self.total_step = total_step
        self._last_step = -1

    def apply(self, task, trainer: Optional[Trainer]) -> None:
        # peft needs a length now; the real one is set in on_train_start (asking the trainer for it
        # during setup would build the training dataloader before a resumed run restores its position)
        self._config_total = self.total_step or steps(self.tinit, 0) + steps(self.tfinal, 0) + 1
        super().apply(task, trainer)

    def on_train_start(self, trainer: Trainer, pl_module) -> None:
        total = self.total_step or int(trainer.estimated_stepping_batches)
        tinit, tfinal = steps(self.tinit, total), steps(self.tfinal, total)
        if tinit + tfinal >= total:
            raise ConfigError(
                f"AdaLoRA's tinit ({self.tinit}: {tinit} steps) + tfinal ({self.tfinal}: {tfinal} steps) must be below "
                f"the number of training steps ({total}); give them as fractions of the run (tinit: 0.1, tfinal: 0.3), "
                "lower them or train longer"
            )
        model = pl_module.backbone
        config = model.peft_config["default"]
        config.tinit, config.tfinal, config.total_step = tinit, tfinal, total  # the rank allocator reads these
        model.base_model.rankallocator.set_total_step(total)

    def peft_config(self, task, target_modules: Optional[list[str]]) -> Any:
        from peft import AdaLoraConfig

        return AdaLoraConfig(init_r=self.init_r, target_r=self.target_r, lora_alpha=self.alpha,
                             lora_dropout=self.dropout, target_modules=target_modules, tinit=steps(self.tinit, 0),
                             tfinal=steps(self.tfinal, 0), deltaT=self.delta_t, beta1=self.beta1, beta2=self.beta2,
                             orth_reg_weight=self.orth_reg_weight, total_step=self._config_total)

    def on_train_batch_end(self, trainer: Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        # after optimizer.step() and before the next zero_grad(): the gradients are still there
        if trainer.global_step != self._last_step:
            self._last_step = trainer.global_step
            pl_module.backbone.base_model.update_and_allocate(trainer.global_step)

    def regularization(self, task) -> Optional[torch.Tensor]:
        """Mean Frobenius distance of P^T P and Q Q^T from the identity, times ``orth_reg_weight``."""
        terms = []
        for name, p in task.backbone.named_parameters():
            if p.requires_grad and ("lora_A" in name or "lora_B" in name):
                cov = p @ p.T if "lora_A" in name else p.T @ p
                terms.append(torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], device=p.device, dtype=p.dtype)))
        return self.orth_reg_weight * torch.stack(terms).mean() if terms else None

    # ---- checkpointed state: the allocator's importance estimates and the rank pattern -------
    def state_dict(self) -> dict[str, Any]:
        if self.task is None:
            return {}
        model = self.task.backbone
        alloc = model.base_model.rankallocator
        return {"last_step": self._last_step, "ipt": alloc.ipt,
                "exp_avg_ipt": alloc.exp_avg_ipt, "exp_avg_unc": alloc.exp_avg_unc,
                "rank_pattern": model.peft_config["default"].rank_pattern}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores callback state after setup(), so the adapter is already in place
        if not state_dict or self.task is None:
            return
        model = self.task.backbone
        alloc = model.base_model.rankallocator
        alloc.ipt, alloc.exp_avg_ipt, alloc.exp_avg_unc = state_dict["ipt"], state_dict["exp_avg_ipt"], state_dict["exp_avg_unc"]
        model.peft_config["default"].rank_pattern = state_dict["rank_pattern"]
        self._last_step = state_dict["last_step"]


def steps(value: Union[int, float], total: int) -> int:
    """AdaLoRA's ``tinit`` / ``tfinal`` in steps: an integer is steps, a fraction in [0, 1) is that share
    of the run's ``total`` steps (0 before the run's length is known)."""
    return int(value * total) if isinstance(value, float) else int(value)
