"""The method contract: a transform of a task's backbone, applied once by the task's ``configure_model``
(where Lightning builds models, before a strategy wraps them), and a Callback for what runs per step.

A method says what it changes (``apply``), which parameters train and in which optimizer groups
(``param_groups``), what state of its own a checkpoint carries (``state_dict``), and how its
trained state folds into plain weights (``merge``) or leaves as a PEFT adapter (``export``).
The task finds it as ``task.method``; checkpoints record its class and init arguments so
``lit-peft merge`` and ``lit-peft export`` can rebuild it.
"""

from __future__ import annotations

import abc
import inspect
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn

from lit_peft.errors import ConfigError

if TYPE_CHECKING:
    from lit_peft.tasks.base import PeftTask

#: parameter names that get no weight decay (biases and normalisation weights)
NO_DECAY = ("bias", "LayerNorm.weight", "layernorm.weight", "layer_norm.weight", "norm.weight")


def default_param_groups(module: nn.Module, lr: float, weight_decay: float,
                         lr_multipliers: Optional[dict[str, float]] = None,
                         weight_decay_multipliers: Optional[dict[str, float]] = None) -> list[dict[str, Any]]:
    """Optimizer groups over the trainable parameters.

    Biases and normalisation weights get no weight decay. ``lr_multipliers`` maps regular
    expressions, searched in parameter names, to factors on the learning rate; a parameter matched
    by several gets their product. ``{"lora_B": 16}`` is LoRA+ with ratio 16; ``{"\\.value\\.": 4}``
    trains W_v at four times the rate of W_q and W_k. ``weight_decay_multipliers`` does the same for
    the weight decay (``{"embeddings": 0}`` exempts the embeddings).
    """
    patterns = {"lr_multipliers": dict(lr_multipliers or {}), "weight_decay_multipliers": dict(weight_decay_multipliers or {})}
    unused = {key: set(table) for key, table in patterns.items()}

    def factor(key: str, name: str) -> float:
        value = 1.0
        for pattern, times in patterns[key].items():
            if re.search(pattern, name):
                value *= times
                unused[key].discard(pattern)
        return value

    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, param in module.named_parameters():
        if param.requires_grad:
            decay = 0.0 if name.endswith(NO_DECAY) else factor("weight_decay_multipliers", name)
            groups.setdefault((factor("lr_multipliers", name), decay), []).append(param)
    for key, left in unused.items():
        if left:
            raise ConfigError(f"{key} pattern(s) {sorted(left)} match no trainable parameter; trainable names look "
                              f"like: {next((n for n, p in module.named_parameters() if p.requires_grad), '-')}")
    return [{"params": params, "lr": lr * lr_factor, "weight_decay": weight_decay * decay,
             "name": (f"decay*{decay:g}" if decay else "no_decay") + f"*{lr_factor:g}"}
            for (lr_factor, decay), params in sorted(groups.items(), key=lambda kv: (kv[0][0], -kv[0][1]))]


class Method(Callback, abc.ABC):
    """Base of every fine-tuning method. Subclasses implement ``apply`` and keep each ``__init__``
    argument as an attribute of the same name (as scikit-learn estimators do), so ``spec`` can
    record them and a checkpoint can rebuild the method."""

    #: short name used in summaries and file names
    name = "method"
    #: whether ``merge`` can fold the trained state into plain backbone weights, and if not, why
    mergeable = True
    merge_note = ""
    #: whether ``export`` can save the trained state as a PEFT adapter
    exportable = False
    #: whether applying the method reads the pretrained weights (an SVD or QR of them, activations, a
    #: quantization): then every rank loads them, rather than all but one building empty under FSDP
    initializes_from_weights = False
    #: whether the backbone's own pretrained weights train (full, partial, GaLore): they load in float32
    #: under ``dtype: default`` rather than in bf16
    trains_pretrained_weights = False
    #: init arguments that shape only training, not the trained model's forward pass: a checkpoint may be
    #: evaluated or resumed with other values of these (``checkpoints.method_differences``)
    training_only: frozenset[str] = frozenset({"dropout"})

    #: the task this method was applied to (set by ``attach``)
    task: Optional["PeftTask"] = None

    # ---- applying -------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Name this method to the task; the task applies it in ``configure_model``, which Lightning
        calls after every callback's ``setup``, under the strategy's init context."""
        self._check_task(pl_module)
        pl_module.use_method(self)

    def attach(self, task: "PeftTask", trainer: Optional[Trainer] = None) -> None:
        """Outside a Trainer (merge, export, tests): name this method to ``task`` and build the model
        with it, as ``configure_model`` does in a run. A second call is a no-op."""
        self._check_task(task)
        task.use_method(self)
        if trainer is not None and task._trainer is None:
            task.trainer = trainer  # the method's options that read the run (QLoRA's device, EVA's data)
        task.configure_model()

    def _check_task(self, task: Any) -> None:
        if not hasattr(task, "use_method"):
            raise ConfigError(
                f"method '{self.name}' needs a lit-peft task (a subclass of lit_peft.tasks.PeftTask, which owns a "
                f"`backbone`), but the model is a {type(task).__name__}; subclass a lit-peft task, or set `method: null`"
            )

    def adopt_checkpoint(self, task: "PeftTask", checkpoint: dict[str, Any]) -> None:
        """Reshape to a checkpoint's recorded layout before its weights load (EVA's ranks); nothing by default."""

    def backbone_kwargs(self, trainer: Optional[Trainer] = None) -> dict[str, Any]:
        """Extra ``from_pretrained`` arguments the method needs when the backbone loads (quantization)."""
        return {}

    @abc.abstractmethod
    def apply(self, task: "PeftTask", trainer: Optional[Trainer]) -> None:
        """Rewrite ``task.backbone`` in place and set ``requires_grad`` on what trains."""

    # ---- training -------------------------------------------------------------------------
    def param_groups(self, task: "PeftTask", lr: float, weight_decay: float,
                     lr_multipliers: Optional[dict[str, float]] = None,
                     weight_decay_multipliers: Optional[dict[str, float]] = None) -> list[dict[str, Any]]:
        """Optimizer parameter groups over what trains (see ``default_param_groups``)."""
        return default_param_groups(task, lr, weight_decay, lr_multipliers, weight_decay_multipliers)

    def build_optimizer(self, groups: list[dict[str, Any]]) -> Optional[torch.optim.Optimizer]:
        """An optimizer of the method's own (GaLore's); ``None`` lets the task use AdamW."""
        return None

    def regularization(self, task: "PeftTask") -> Optional[torch.Tensor]:
        """An extra loss term the method adds to the task's loss (AdaLoRA's orthogonality)."""
        return None

    def checkpoint_keys(self, task: "PeftTask") -> set[str]:
        """State-dict keys a checkpoint keeps: what trains, plus buffers the method changed."""
        return {name for name, p in task.named_parameters() if p.requires_grad}

    # ---- merging and exporting -------------------------------------------------------------
    def merge(self, task: "PeftTask") -> nn.Module:
        """Return a plain transformers model with the trained state folded into its weights."""
        return task.backbone

    def export(self, task: "PeftTask", output_dir: Path) -> None:
        """Save the trained state as a PEFT adapter folder."""
        raise ConfigError(
            f"method '{self.name}' trains ordinary weights, not an adapter, so there is nothing to export "
            "in PEFT's format; use `lit-peft merge` to save the fine-tuned model"
        )

    def save_trained_state(self, task: "PeftTask", output_dir: Path) -> None:
        """Export in lit-peft's own adapter format, for methods PEFT has no format for: the trained
        state (``adapter_model.safetensors``) and what rebuilds the task and method
        (``lit_peft_adapter.json``); ``lit_peft.export.load_adapter`` loads it on the base backbone."""
        import json

        from safetensors.torch import save_file

        keys = task.trained_keys()
        state = {k: v.detach().cpu().contiguous() for k, v in task.state_dict().items() if k in keys}
        save_file(state, str(Path(output_dir) / "adapter_model.safetensors"), metadata={"format": "pt"})
        meta = {"format": "lit-peft-adapter", "task": task.spec(), "method": self.spec(),
                "base_model_name_or_path": task.backbone_source}
        (Path(output_dir) / "lit_peft_adapter.json").write_text(json.dumps(meta, indent=2) + "\n")

    # ---- description ----------------------------------------------------------------------
    def spec(self) -> dict[str, Any]:
        """Class path and init arguments: enough to build this method again."""
        cls = type(self)
        params = [p for p in inspect.signature(cls.__init__).parameters.values()
                  if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        missing = [p.name for p in params if not hasattr(self, p.name)]
        if missing:
            raise TypeError(f"{cls.__name__} must keep its init arguments as attributes; missing: {missing}")
        return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": {p.name: getattr(self, p.name) for p in params}}
