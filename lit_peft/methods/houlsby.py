"""Houlsby adapters (Houlsby et al. 2019, arXiv 1902.00751).

A bottleneck after the attention output projection and after the feed-forward output projection
of every block: h + up(act(down(h))), with ``bottleneck`` hidden units, applied before the block's
residual connection and layer norm. ``up`` starts at zero, so the adapted model starts as exactly
the pretrained one (the paper's near-identity initialisation, at its limit); ``down`` starts small
and random. As in the paper the layer norms train too (``train_layer_norms``), and the head trains.

peft has no sequential bottleneck adapter (its ``BOFT``/``OFT``/``LoRA`` are all in-layer), and the
``adapters`` package pins its own transformers version, so the adapter is written here: a small
module attached to the projection layer and applied by a forward hook, which leaves every
pretrained weight at its original name.

The bottleneck is non-linear, so it cannot fold into the backbone's weights: ``merge`` refuses and
``export`` saves the adapters (lit-peft's adapter format, ``lit_peft.export.load_adapter``).
"""

from __future__ import annotations

import re
from typing import Optional, Union

import torch
from lightning.pytorch import Trainer
from torch import nn

from lit_peft.errors import ConfigError
from lit_peft.methods.base import Method
from lit_peft.methods.freeze import freeze, named_submodules, unfreeze

#: where adapters go, per architecture: (attention output projection, feed-forward output projection)
PLACES = {
    "bert": (r"attention\.output\.dense$", r"layer\.\d+\.output\.dense$"),  # BERT, RoBERTa, MiniLM, ELECTRA
    "llama": (r"self_attn\.o_proj$", r"mlp\.down_proj$"),  # Llama, Mistral, Qwen, SmolLM, TimesFM
    "timesfm2_5": (r"self_attn\.o_proj$", r"mlp\.fc2$"),
    "distilbert": (r"attention\.out_lin$", r"ffn\.lin2$"),
    "gpt2": (r"attn\.c_proj$", r"mlp\.c_proj$"),
    "patchtst": (r"encoder\.layers\.\d+\.self_attn\.out_proj$", r"encoder\.layers\.\d+\.ff\.3$"),
}
ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh}
ADAPTER = "houlsby_adapter"


class BottleneckAdapter(nn.Module):
    """h + up(act(down(h)))."""

    def __init__(self, hidden: int, bottleneck: int, activation: str, init_std: float) -> None:
        super().__init__()
        self.down = nn.Linear(hidden, bottleneck)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(bottleneck, hidden)
        nn.init.normal_(self.down.weight, std=init_std)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(self.act(self.down(h.to(self.down.weight.dtype)))).to(h.dtype)


def _apply_adapter(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
    return getattr(module, ADAPTER)(output)


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith(("LayerNorm", "RMSNorm"))


class Houlsby(Method):
    """Bottleneck adapters after each block's attention and feed-forward output projections."""

    name = "houlsby"
    mergeable = False
    merge_note = ("its bottleneck adapters are non-linear (down-projection, activation, up-projection), so they "
                  "cannot fold into the backbone's weights; use `lit-peft export` to save the adapters")
    exportable = True

    def __init__(self, bottleneck: int = 64, activation: str = "gelu", init_std: float = 1e-2,
                 targets: Union[str, list[str]] = "auto", train_layer_norms: bool = True) -> None:
        """
        Args:
            bottleneck: hidden units of each adapter.
            activation: the non-linearity: gelu, relu, silu or tanh.
            init_std: standard deviation of the down-projection's initial weights.
            targets: ``auto`` (the attention and feed-forward output projections, found per
                architecture) or the names of the layers to follow with an adapter.
            train_layer_norms: train the backbone's layer norms too, as the paper does.
        """
        super().__init__()
        if bottleneck < 1:
            raise ConfigError(f"bottleneck must be a positive integer, got {bottleneck}")
        if activation not in ACTIVATIONS:
            raise ConfigError(f"unknown activation '{activation}'; use one of {sorted(ACTIVATIONS)}")
        self.bottleneck, self.activation, self.init_std = bottleneck, activation, init_std
        self.targets, self.train_layer_norms = targets, train_layer_norms

    def places(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        modules = list(model.named_modules())
        if self.targets != "auto":
            found = named_submodules(model, [self.targets] if isinstance(self.targets, str) else list(self.targets))
            return [(n, m) for n, m in modules if any(m is f for f in found)]
        # the architecture whose every place is found (Llama's o_proj alone must not pass for TimesFM 2.5's)
        for whole in (True, False):
            for patterns in PLACES.values():
                hits = [(n, m) for n, m in modules if any(re.search(p, n) for p in patterns)]
                if hits and (not whole or all(any(re.search(p, n) for n, _ in hits) for p in patterns)):
                    return hits
        raise ConfigError(f"no known attention/feed-forward output layers in {type(model).__name__}; "
                          "name the layers to follow with adapters in `targets`")

    def apply(self, task, trainer: Optional[Trainer]) -> None:
        backbone = task.backbone
        freeze(backbone)
        for name, layer in self.places(backbone):
            hidden = getattr(layer, "out_features", None) or getattr(layer, "nf", None)
            if hidden is None:
                raise ConfigError(f"'{name}' ({type(layer).__name__}) has no output size to build an adapter for")
            device = next(layer.parameters()).device
            layer.add_module(ADAPTER, BottleneckAdapter(hidden, self.bottleneck, self.activation, self.init_std).to(device))
            layer.register_forward_hook(_apply_adapter)
        if self.train_layer_norms:
            for module in backbone.modules():
                if is_norm(module):
                    unfreeze(module)
        for module in named_submodules(backbone, task.head_modules()):
            unfreeze(module)
        for module in backbone.modules():  # the adapters train (set after freezing the layers they sit in)
            if isinstance(module, BottleneckAdapter):
                unfreeze(module)

    def export(self, task, output_dir) -> None:
        self.save_trained_state(task, output_dir)
