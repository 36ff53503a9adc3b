"""Sparse increments chosen by gradient: SIFT, and the sparse half of RoSA.

- ``SIFT`` (Song et al. 2023, arXiv 2312.11875): for each targeted weight W, the ``density``
  fraction of its entries with the largest accumulated gradient magnitude over the first
  ``selection_batches`` training batches is chosen; only those entries train, as a sparse delta
  S, so the model computes with W + S.

Neither peft nor another library on PyPI implements a sparse delta that trains on the CPU (the
reference implementations need CUDA kernels), so ``SparseDelta`` is written here. It keeps S as
a vector of ``k`` values and ``k`` flat indices: the gradients and the optimizer state exist only
for those ``k`` entries, so optimizer state and checkpoints shrink with the density. Activation
memory does not: without a sparse matmul kernel, each step builds W + S densely per layer (kept
from forward to backward) and a dense W-sized gradient during the backward pass.

The indices are chosen from data, so they are part of the trained state: checkpoints and exported
adapters hold them (``sparse_indices`` buffers) next to the values.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer
from torch import nn

from lit_peft.errors import ConfigError
from lit_peft.methods.base import Method
from lit_peft.methods.freeze import freeze, named_submodules, unfreeze
from lit_peft.methods.targets import Targets, resolve_targets

INDEX_BUFFER = "sparse_indices"


def is_conv1d(layer: nn.Module) -> bool:
    """transformers' GPT-2 ``Conv1D``: a linear layer whose weight is stored (in, out)."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(layer, Conv1D)


def features(layer: nn.Module) -> tuple[int, int]:
    """(out, in) of a linear layer: ``nn.Linear`` (and 4-bit ones) or GPT-2's ``Conv1D``."""
    if is_conv1d(layer):
        return layer.nf, layer.weight.shape[0]
    return layer.out_features, layer.in_features


def sparse_size(layer: nn.Module, density: float) -> int:
    """Entries of a layer's weight that train: ceil(density * out * in)."""
    out_features, in_features = features(layer)
    return max(1, math.ceil(density * out_features * in_features))


class SparseDelta(nn.Module):
    """A linear layer plus a trained sparse increment: y = base_layer(x) + x S^T. S is (out, in)
    whatever the layer's own layout (GPT-2's ``Conv1D`` stores its weight (in, out))."""

    def __init__(self, base_layer: nn.Module, k: int) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.out_features, self.in_features = features(base_layer)
        device = next(base_layer.parameters()).device
        self.sparse_values = nn.Parameter(torch.zeros(k, device=device))
        # int32 positions (half the bytes of the default int64) unless the weight has 2**31 entries or more
        dtype = torch.int32 if self.out_features * self.in_features < 2**31 else torch.long
        self.register_buffer(INDEX_BUFFER, torch.zeros(k, dtype=dtype, device=device))
        #: a dense zero increment whose gradient is the weight's gradient, only while the mask is chosen
        self.probe: Optional[nn.Parameter] = None

    @property
    def weight(self) -> torch.Tensor:  # peft and transformers read the wrapped layer's weight
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.base_layer.bias

    def delta(self) -> torch.Tensor:
        """S as a dense (out, in) matrix."""
        flat = self.sparse_values.new_zeros(self.out_features * self.in_features)
        return flat.index_put((self.sparse_indices.long(),), self.sparse_values).view(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        base = self.base_layer
        if self.probe is not None:
            return base(x, *args, **kwargs) + F.linear(x.to(self.probe.dtype), self.probe).to(x.dtype)
        if type(base) is nn.Linear:  # one matmul with W + S
            return F.linear(x, base.weight + self.delta().to(base.weight.dtype), base.bias)
        # quantized and other layers: their own forward, plus the increment in full precision
        out = base(x, *args, **kwargs)
        return out + F.linear(x.to(self.sparse_values.dtype), self.delta()).to(out.dtype)

    def fold(self) -> nn.Module:
        """The wrapped ``nn.Linear`` (or ``Conv1D``) with S added to its weight."""
        if is_conv1d(self.base_layer):
            with torch.no_grad():
                self.base_layer.weight.add_(self.delta().T.to(self.base_layer.weight.dtype))
            return self.base_layer
        if type(self.base_layer) is not nn.Linear:
            raise TypeError(f"can only fold a sparse increment into nn.Linear, not {type(self.base_layer).__name__}")
        with torch.no_grad():
            self.base_layer.weight.add_(self.delta().to(self.base_layer.weight.dtype))
        return self.base_layer


def wrap(model: nn.Module, names: list[str], density: float) -> dict[str, SparseDelta]:
    """Replace each named linear layer by a ``SparseDelta`` around it."""
    wrappers = {}
    for name in names:
        layer = model.get_submodule(name)
        if not (hasattr(layer, "out_features") or is_conv1d(layer)):
            raise ConfigError(f"sparse increments need linear layers, but '{name}' is a {type(layer).__name__}")
        wrapper = SparseDelta(layer, sparse_size(layer, density))
        model.set_submodule(name, wrapper)
        wrappers[name] = wrapper
    return wrappers


def fold_all(model: nn.Module) -> None:
    """Replace every ``SparseDelta`` in ``model`` by its folded linear layer."""
    for name, module in list(model.named_modules()):
        if isinstance(module, SparseDelta):
            model.set_submodule(name, module.fold())


def full_names(model: nn.Module, targets: Targets, exclude: tuple[str, ...]) -> list[str]:
    """Dotted names of the linear layers ``targets`` selects (presets or name suffixes)."""
    suffixes = resolve_targets(model, targets, exclude=exclude)
    matched = [(n, m) for n, m in model.named_modules() if any(n == s or n.endswith("." + s) for s in suffixes)
               and not any(n == e or n.startswith(e + ".") for e in exclude)]
    other = [f"{n} ({type(m).__name__})" for n, m in matched
             if not (isinstance(m, nn.Linear) or is_conv1d(m))]  # bnb 4-bit layers are nn.Linear
    if other:
        raise ConfigError(f"sparse increments wrap linear layers (torch.nn.Linear, GPT-2's Conv1D) only; target '{other[0]}' is not one. "
                          "Name linear layers in targets")
    return [n for n, _ in matched]


def choose_by_gradient(task, trainer: Trainer, wrappers: dict[str, SparseDelta], batches: int) -> None:
    """Set each wrapper's indices to the top-k entries of sum_b |dL_b/dW| over the first ``batches``
    training batches (model in eval mode: no dropout, so the choice is reproducible). Under DDP the
    sums add up every rank's batches, so every rank chooses the same entries."""
    loader = trainer.datamodule.train_dataloader()
    device = trainer.strategy.root_device
    task.to(device)
    grads = {p: p.requires_grad for p in task.parameters()}
    for p in grads:
        p.requires_grad_(False)
    scores = {}
    for name, w in wrappers.items():
        w.probe = nn.Parameter(torch.zeros(w.out_features, w.in_features, device=device))
        scores[name] = torch.zeros_like(w.probe)
    was_training = task.training
    task.eval()
    try:
        seen = 0
        for batch in loader:
            if seen >= batches:
                break
            task.loss({k: v.to(device) for k, v in batch.items()}).backward()
            for name, w in wrappers.items():
                scores[name] += w.probe.grad.abs()
                w.probe.grad = None
            seen += 1
    finally:
        for p, flag in grads.items():
            p.requires_grad_(flag)
        for w in wrappers.values():
            w.probe = None
        task.train(was_training)
    if seen == 0:
        raise ConfigError("choosing the sparse entries needs at least one training batch, but the train loader is empty")
    if torch.distributed.is_available() and torch.distributed.is_initialized() and trainer.world_size > 1:
        for score in scores.values():
            torch.distributed.all_reduce(score)
    for name, w in wrappers.items():
        k = w.sparse_values.numel()
        top = torch.topk(scores[name].flatten(), k).indices.sort().values
        getattr(w, INDEX_BUFFER).copy_(top)


class SparseMixin:
    """Mask choice, checkpoint and export rules shared by methods with ``SparseDelta`` layers.

    The layers are built with placeholder indices when the method is applied; the indices are
    chosen from gradients when a fresh fit starts (the model is on its device and the optimizer
    exists: its sparse values stay the same tensors). A resumed fit, ``merge`` and ``export`` take
    the indices from the checkpoint instead.
    """

    selection_batches: int
    _chosen = False

    def sparse_layers(self, task) -> dict[str, SparseDelta]:
        return {n: m for n, m in task.named_modules() if isinstance(m, SparseDelta)}

    def on_fit_start(self, trainer: Trainer, pl_module) -> None:
        if self._chosen or trainer.ckpt_path is not None:
            return
        if trainer.datamodule is None:
            raise ConfigError(f"method '{self.name}' chooses its sparse entries from training batches and needs a "
                              "datamodule (fit with `datamodule=`, as the CLI does)")
        choose_by_gradient(pl_module, trainer, self.sparse_layers(pl_module), self.selection_batches)
        self._chosen = True

    def checkpoint_keys(self, task) -> set[str]:
        keys = {name for name, p in task.named_parameters() if p.requires_grad}
        return keys | {name for name, _ in task.named_buffers() if name.endswith(INDEX_BUFFER)}


class SIFT(SparseMixin, Method):
    """Sparse increment fine-tuning: only the top ``density`` fraction of each targeted weight trains."""

    name = "sift"
    training_only = frozenset({"selection_batches"})  # the mask is saved with the weights
    exportable = True

    def __init__(self, density: float = 0.05, targets: Targets = "all-linear", selection_batches: int = 8) -> None:
        """
        Args:
            density: fraction of each targeted weight's entries that train (0.05 = 5%).
            targets: linear layers with sparse increments: a preset (``qv``, ``qkv``, ``all-linear``) or names.
            selection_batches: training batches whose gradients choose the entries.
        """
        super().__init__()
        if not 0.0 < density <= 1.0:
            raise ConfigError(f"density must be in (0, 1], got {density}")
        if selection_batches < 1:
            raise ConfigError(f"selection_batches must be at least 1, got {selection_batches}")
        self.density, self.targets, self.selection_batches = density, targets, selection_batches

    def apply(self, task, trainer: Optional[Trainer]) -> None:
        backbone = task.backbone
        heads = task.head_modules()
        freeze(backbone)
        for module in named_submodules(backbone, heads):
            unfreeze(module)
        wrap(backbone, full_names(backbone, self.targets, tuple(heads)), self.density)

    def merge(self, task) -> nn.Module:
        fold_all(task.backbone)
        return task.backbone

    def export(self, task, output_dir) -> None:
        self.save_trained_state(task, output_dir)
