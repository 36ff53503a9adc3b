"""Methods that train a chosen subset of the backbone's own weights, with no new modules.

- ``FullFineTune``: every weight trains.
- ``LinearProbe``: only the task's probe modules train (``task.probe_modules()``): the head, the
  classic probe of frozen features; for a forecaster, everything outside the transformer stack.
- ``PartialFineTune``: the probe modules, the last ``last_n_blocks`` transformer blocks, and any
  modules named in ``modules`` (e.g. ``embeddings``) train; everything else is frozen.

The trained weights are the backbone's own, so ``merge`` is the backbone itself.
"""

from __future__ import annotations

from typing import Optional

from lightning.pytorch import Trainer
from torch import nn

from lit_peft.errors import ConfigError
from lit_peft.methods.base import Method


def freeze(module: nn.Module) -> None:
    for param in module.parameters():
        param.requires_grad_(False)


def unfreeze(module: nn.Module) -> None:
    for param in module.parameters():
        param.requires_grad_(True)


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The longest ``nn.ModuleList`` in the model: its transformer blocks."""
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise ConfigError(f"could not find the transformer blocks (an nn.ModuleList) in {type(model).__name__}")
    return max(lists, key=lambda item: len(item[1]))


def named_submodules(model: nn.Module, names: list[str]) -> list[nn.Module]:
    """Modules whose dotted name is one of ``names`` or ends with ``.<name>``; an unknown name is an error."""
    found = []
    for wanted in names:
        matches = [m for n, m in model.named_modules() if n == wanted or n.endswith("." + wanted)]
        if not matches:
            top = sorted({n.split(".")[-1] for n, _ in model.named_modules() if n})
            raise ConfigError(f"no module named '{wanted}' in the backbone; module names include: {', '.join(top[:40])}")
        found.extend(matches)
    return found


class FullFineTune(Method):
    """Every backbone weight trains."""

    name = "full"
    trains_pretrained_weights = True

    def __init__(self) -> None:
        super().__init__()

    def apply(self, task, trainer: Optional[Trainer]) -> None:
        unfreeze(task.backbone)


class PartialFineTune(Method):
    """The head, the last ``last_n_blocks`` blocks and the named ``modules`` train."""

    name = "partial"
    trains_pretrained_weights = True

    def __init__(self, last_n_blocks: int = 1, modules: Optional[list[str]] = None) -> None:
        super().__init__()
        if last_n_blocks < 0:
            raise ConfigError(f"last_n_blocks must be >= 0, got {last_n_blocks}")
        self.last_n_blocks = last_n_blocks
        self.modules = list(modules or [])

    def apply(self, task, trainer: Optional[Trainer]) -> None:
        backbone = task.backbone
        freeze(backbone)
        _, blocks = find_blocks(backbone)
        if self.last_n_blocks > len(blocks):
            raise ConfigError(f"last_n_blocks={self.last_n_blocks} but the backbone has only {len(blocks)} blocks")
        for block in list(blocks)[len(blocks) - self.last_n_blocks:]:
            unfreeze(block)
        for module in named_submodules(backbone, self.modules):
            unfreeze(module)
        for module in named_submodules(backbone, task.probe_modules()):
            unfreeze(module)


class LinearProbe(PartialFineTune):
    """Only the task head trains."""

    name = "linear_probe"

    def __init__(self) -> None:
        super().__init__(last_n_blocks=0)
