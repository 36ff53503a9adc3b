"""IA3 (Liu et al. 2022, arXiv 2205.05638) through peft: learned vectors that rescale the keys,
values and feed-forward activations. By default peft's per-architecture choice of modules
(``targets: null``); give ``targets`` and ``feedforward_modules`` to choose.
"""

from __future__ import annotations

from typing import Any, Optional

from lit_peft.methods.peft_adapter import PeftAdapter
from lit_peft.methods.targets import Targets


class IA3(PeftAdapter):
    """Infused adapter by inhibiting and amplifying inner activations."""

    name = "ia3"

    def __init__(self, targets: Optional[Targets] = None, feedforward_modules: Optional[list[str]] = None) -> None:
        super().__init__(targets=targets)
        self.feedforward_modules = feedforward_modules

    def peft_config(self, task, target_modules: Optional[list[str]]) -> Any:
        from peft import IA3Config

        return IA3Config(target_modules=target_modules, feedforward_modules=self.feedforward_modules)
