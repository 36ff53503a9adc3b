"""Methods carried by the Hugging Face ``peft`` library, and the generic one for any peft config.

``PeftAdapter`` wraps the backbone with ``peft.get_peft_model``; the task head is always in
``modules_to_save`` so it trains and is saved. ``merge`` is peft's ``merge_and_unload`` and
``export`` is peft's ``save_pretrained``, so an exported folder loads with
``peft.PeftModel.from_pretrained``.

``PeftMethod`` takes any peft config by class path, so LoHa, LoKr, VeRA, BOFT, OFT, FourierFT
and the rest work without new code:

    method:
      class_path: lit_peft.methods.PeftMethod
      init_args: {config_class: peft.LoHaConfig, config: {r: 8}, targets: qv}
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
from pathlib import Path
from typing import Any, Optional

from lightning.pytorch import Trainer
from torch import nn

from lit_peft.errors import ConfigError
from lit_peft.methods.base import Method
from lit_peft.methods.targets import Targets, resolve_targets


class PeftAdapter(Method, abc.ABC):
    """A method expressed as a peft config; subclasses build the config."""

    exportable = True

    def __init__(self, targets: Optional[Targets] = "qv") -> None:
        super().__init__()
        self.targets = targets

    @abc.abstractmethod
    def peft_config(self, task, target_modules: Optional[list[str]]) -> Any:
        """The ``peft.PeftConfig`` to apply, given the resolved target module names."""

    def apply(self, task, trainer: Optional[Trainer]) -> None:
        from peft import get_peft_model

        heads = task.head_modules()
        config = self.peft_config(task, self.target_modules(task, heads))
        config.task_type = task.peft_task_type
        config.modules_to_save = sorted(set(config.modules_to_save or []) | set(heads)) or None
        config.base_model_name_or_path = task.backbone_source
        try:
            task.backbone = get_peft_model(task.backbone, config)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"peft could not apply {type(config).__name__} to the backbone: {err}") from err
        self.initialize(task, trainer)

    def target_modules(self, task, heads: list[str]) -> Optional[list[str]]:
        """``targets`` resolved on this backbone (``None``: peft's per-architecture default)."""
        return None if self.targets is None else resolve_targets(task.backbone, self.targets, exclude=tuple(heads))

    def initialize(self, task, trainer: Optional[Trainer]) -> None:
        """Data-driven initialization after wrapping (EVA); nothing by default."""

    def merge(self, task) -> nn.Module:
        """Fold the adapter into the base weights (peft's ``merge_and_unload``); consumes ``task.backbone``."""
        return task.backbone.merge_and_unload()

    def export(self, task, output_dir: Path) -> None:
        task.backbone.save_pretrained(str(output_dir))


def import_object(path: str) -> Any:
    module_name, _, attr = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(f"cannot import '{path}': {err}. Give a full class path such as peft.LoHaConfig") from err


class PeftMethod(PeftAdapter):
    """Any peft method by its config class and keyword arguments.

    ``targets`` fills ``target_modules`` unless ``config`` sets it; ``targets: null`` leaves the
    choice to peft's per-architecture defaults. Configs without target modules (prompt tuning,
    prefix tuning, P-tuning: they add virtual tokens) ignore ``targets``.
    """

    def __init__(self, config_class: str = "peft.LoraConfig", config: Optional[dict[str, Any]] = None,
                 targets: Optional[Targets] = "qv") -> None:
        super().__init__(targets=targets)
        self.config_class = config_class
        self.config = dict(config or {})
        import peft

        cls = self._config_cls = import_object(config_class)
        self.name = cls.__name__.removesuffix("Config").lower()
        if self.name == "cpt":
            raise ConfigError("peft.CPTConfig computes its own loss from labels passed to the model; lit-peft's tasks "
                              "compute the loss themselves, so CPT would silently train plain cross-entropy. Use "
                              "peft.PromptTuningConfig or another method")
        self.mergeable = not (isinstance(cls, type) and issubclass(cls, peft.PromptLearningConfig))
        self.merge_note = "prompt-learning methods add virtual tokens, not weight deltas" if not self.mergeable else ""

    def target_modules(self, task, heads: list[str]) -> Optional[list[str]]:
        if "target_modules" in self.config or not self.takes_targets():
            return None
        return super().target_modules(task, heads)

    def takes_targets(self) -> bool:
        return "target_modules" in {f.name for f in dataclasses.fields(self._config_cls)}

    def peft_config(self, task, target_modules: Optional[list[str]]) -> Any:
        cls = self._config_cls
        kwargs = dict(self.config)
        if target_modules is not None:
            kwargs["target_modules"] = target_modules
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"bad arguments for {self.config_class}: {err}") from err
