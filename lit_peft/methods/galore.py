"""GaLore (Zhao et al. 2024, arXiv 2403.03507): gradient low-rank projection, through ``galore-torch``.

Every parameter trains (except modules named in ``freeze``), but the gradient of each projected
weight matrix is projected to rank ``rank`` before the optimizer sees it, so the optimizer's
moments are rank x n instead of m x n; the projection is refreshed from the gradient's SVD every
``update_proj_gap`` steps (an integer; or a fraction of the run's optimizer steps, so the refreshes fit
any length: GaLore's 200 steps never refresh a 125-step run) and the update is scaled by ``scale``
when projected back.

``targets`` picks the projected matrices: ``all`` (every 2-D weight outside the head, embeddings
included: on MiniLM the embeddings are half the parameters), ``all-linear`` (the linear layers),
a preset such as ``qkv``, or module names. A matrix whose smaller side is at most ``rank`` gains
nothing and is not projected. The projectors live in the optimizer's state as galore-torch
objects; checkpoints store them as plain fields and tensors (so they load with
``torch.load(weights_only=True)``), and resuming rebuilds them with the moments.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch
from lightning.pytorch import Trainer
from torch import nn

from lightning.pytorch import LightningModule

from lit_peft.errors import ConfigError
from lit_peft.methods.base import Method, default_param_groups
from lit_peft.methods.freeze import freeze, named_submodules, unfreeze
from lit_peft.methods.targets import Targets, resolve_targets

OPTIMIZERS = ("adamw", "adamw8bit", "adafactor")
PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")


class GaLore(Method):
    """Full-parameter training with GaLore's low-rank projected optimizer states."""

    name = "galore"
    trains_pretrained_weights = True
    # all of it is the optimizer's: the model is the plain backbone
    training_only = frozenset({"rank", "update_proj_gap", "scale", "proj_type", "optimizer", "targets", "freeze"})

    def __init__(self, rank: int = 64, update_proj_gap: Union[int, float] = 0.1, scale: float = 0.25, proj_type: str = "std",
                 optimizer: str = "adamw", targets: Targets = "all", freeze: Optional[list[str]] = None) -> None:
        """
        Args:
            rank: rank of the projected gradients (at most a quarter of the hidden size keeps the
                optimizer state under ~30% of AdamW's).
            update_proj_gap: optimizer steps between refreshes of each projection, or a fraction in (0, 1) of
                the run's optimizer steps (the default 0.1: ten projections over the run, whatever its length;
                the paper's 200 steps suit its long pretraining runs and never refresh a short fine-tune).
            scale: factor on the projected-back update.
            proj_type: galore-torch's projection side: std, reverse_std, left, right or full.
            optimizer: adamw, adamw8bit (bitsandbytes, CUDA only) or adafactor.
            targets: ``all``, ``all-linear``, a preset (``qv``, ``qkv``) or module names.
            freeze: modules that do not train at all (e.g. ``[embeddings]``).
        """
        super().__init__()
        if rank < 1:
            raise ConfigError(f"GaLore rank must be a positive integer, got {rank}")
        if (isinstance(update_proj_gap, float) and not 0 < update_proj_gap < 1) or (
                isinstance(update_proj_gap, int) and update_proj_gap < 1):
            raise ConfigError(f"update_proj_gap must be a number of steps (at least 1) or a fraction of the run in "
                              f"(0, 1), got {update_proj_gap}")
        if optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown GaLore optimizer '{optimizer}'; use one of {list(OPTIMIZERS)}")
        if proj_type not in PROJ_TYPES:
            raise ConfigError(f"unknown proj_type '{proj_type}'; use one of {list(PROJ_TYPES)}")
        self.rank, self.update_proj_gap, self.scale, self.proj_type = rank, update_proj_gap, scale, proj_type
        self.optimizer, self.targets, self.freeze = optimizer, targets, list(freeze or [])
        self.projected: set[str] = set()
        self._move_projectors = False  # set when a checkpoint restores projectors (on the CPU)

    def apply(self, task, trainer: Optional[Trainer]) -> None:
        backbone = task.backbone
        unfreeze(backbone)
        for module in named_submodules(backbone, self.freeze):
            freeze(module)
        heads = tuple(task.head_modules())
        if self.targets == "all":
            matrices = [(n, p) for n, p in backbone.named_parameters() if p.dim() == 2 and not n.startswith(heads)]
        else:
            suffixes = resolve_targets(backbone, self.targets, exclude=heads)
            layers = [n for n, _ in backbone.named_modules() if any(n == s or n.endswith("." + s) for s in suffixes)]
            without = [n for n in layers if not isinstance(getattr(backbone.get_submodule(n), "weight", None), torch.Tensor)]
            if without:
                raise ConfigError(f"GaLore target '{without[0]}' has no weight matrix to project; target linear layers "
                                  "(e.g. all-linear, or names such as query, value)")
            matrices = [(f"{n}.weight", backbone.get_submodule(n).weight) for n in layers]
        prefix = self._prefix(task, backbone)
        self.projected = {prefix + n for n, p in matrices if p.requires_grad and min(p.shape) > self.rank}
        if not self.projected:
            raise ConfigError(f"GaLore projects no weight: no trainable target matrix has both sides larger than rank={self.rank}")

    @staticmethod
    def _prefix(task, backbone: nn.Module) -> str:
        return next(n for n, m in task.named_children() if m is backbone) + "."

    def param_groups(self, task, lr: float, weight_decay: float,
                     lr_multipliers: Optional[dict[str, float]] = None,
                     weight_decay_multipliers: Optional[dict[str, float]] = None) -> list[dict[str, Any]]:
        """The usual groups, each split into its projected matrices (with GaLore's settings) and the rest."""
        names = {id(p): n for n, p in task.named_parameters()}
        groups = []
        for group in default_param_groups(task, lr, weight_decay, lr_multipliers, weight_decay_multipliers):
            projected = [p for p in group["params"] if names[id(p)] in self.projected]
            rest = [p for p in group["params"] if names[id(p)] not in self.projected]
            if rest:
                groups.append({**group, "params": rest})
            if projected:
                groups.append({**group, "params": projected, "name": group["name"] + "+galore", "rank": self.rank,
                               "update_proj_gap": self.gap_steps(None), "scale": self.scale, "proj_type": self.proj_type})
        return groups

    def build_optimizer(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        import galore_torch

        if self.optimizer == "adamw":
            return galore_torch.GaLoreAdamW(groups, lr=groups[0]["lr"], no_deprecation_warning=True)
        if self.optimizer == "adafactor":
            return galore_torch.GaLoreAdafactor(groups, lr=groups[0]["lr"], relative_step=False, scale_parameter=False,
                                                warmup_init=False)
        if not all(p.is_cuda for g in groups for p in g["params"]):
            raise ConfigError("GaLore's adamw8bit optimizer runs on CUDA only (galore-torch synchronises with the GPU "
                              "each step); use optimizer: adamw or adafactor on the CPU")
        return galore_torch.GaLoreAdamW8bit(groups, lr=groups[0]["lr"])

    # ---- checkpoints: projectors as plain data -------------------------------------------------
    PROJECTOR_FIELDS = ("rank", "update_proj_gap", "scale", "proj_type", "ortho_matrix")

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        for optimizer_state in checkpoint.get("optimizer_states", []):
            for key, state in optimizer_state["state"].items():
                projector = state.get("projector")
                if projector is not None and not isinstance(projector, dict):
                    # a new dict: the optimizer's state_dict shares its per-parameter dicts with the live state
                    optimizer_state["state"][key] = {**state, "projector": {f: getattr(projector, f) for f in self.PROJECTOR_FIELDS}}

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        from galore_torch.galore_projector import GaLoreProjector

        for optimizer_state in checkpoint.get("optimizer_states", []):
            for state in optimizer_state["state"].values():
                fields = state.get("projector")
                if isinstance(fields, dict):
                    projector = GaLoreProjector(fields["rank"], update_proj_gap=fields["update_proj_gap"],
                                                scale=fields["scale"], proj_type=fields["proj_type"])
                    projector.ortho_matrix = fields["ortho_matrix"]
                    state["projector"] = projector
        self._move_projectors = True  # checkpoints load on the CPU; the optimizer's tensors move, these do not

    def gap_steps(self, trainer: Optional[Trainer]) -> int:
        """``update_proj_gap`` in optimizer steps (a fraction needs the run's length: 1 until it is known)."""
        if isinstance(self.update_proj_gap, int):
            return self.update_proj_gap
        total = int(trainer.estimated_stepping_batches) if trainer is not None else 0
        return max(1, int(self.update_proj_gap * total))

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Set a fractional projection gap from the run's length (before the first step builds the projectors);
        put restored projection matrices on their parameters' device (galore-torch does not move them)."""
        if isinstance(self.update_proj_gap, float):
            for optimizer in trainer.optimizers:
                for group in optimizer.param_groups:
                    if "rank" in group:
                        group["update_proj_gap"] = self.gap_steps(trainer)
        if not self._move_projectors:
            return
        self._move_projectors = False
        for optimizer in trainer.optimizers:
            for param, state in optimizer.state.items():
                projector = state.get("projector")
                matrix = getattr(projector, "ortho_matrix", None)
                if isinstance(matrix, torch.Tensor):
                    projector.ortho_matrix = matrix.to(param.device)
                elif isinstance(matrix, (list, tuple)):  # proj_type full: a (U, V) pair
                    projector.ortho_matrix = type(matrix)(m.to(param.device) for m in matrix)
