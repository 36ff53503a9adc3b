"""Which modules an adapter targets: presets resolved per architecture, or an explicit list.

Presets name the attention projections by role, so one YAML works on BERT (``query``/``key``/
``value``), Llama (``q_proj``/``k_proj``/``v_proj``), DistilBERT (``q_lin``...), T5 (``q``...) and
GPT-2, whose one ``Conv1D`` ``c_attn`` computes query, key and value together (so ``qv`` and ``qkv``
both adapt it; W_q and W_v alone cannot be told apart there):

- ``qv``: query and value projections (the LoRA paper's choice)
- ``qkv``: query, key and value projections
- ``all-linear``: every linear layer except the task head and a language model's output layer

An explicit list names modules by their last name component or a dotted suffix
(``[query, value]``, ``[attention.output.dense]``); a name that matches nothing is an error.
"""

from __future__ import annotations

from typing import Union

from torch import nn

from lit_peft.errors import ConfigError

ROLES = {
    "q": {"query", "q_proj", "q", "q_lin", "Wq", "c_attn"},
    "k": {"key", "k_proj", "k", "k_lin", "Wk", "c_attn"},
    "v": {"value", "v_proj", "v", "v_lin", "Wv", "c_attn"},
}
PRESETS = {"qv": ("q", "v"), "qkv": ("q", "k", "v"), "all-linear": ()}

Targets = Union[str, list[str]]
#: language models' output projections (vocabulary-sized), never adapted by the all-linear preset
OUTPUT_LAYERS = {"lm_head", "embed_out", "output_projection"}


def linear_module_names(model: nn.Module) -> list[str]:
    """Dotted names of the linear layers (including transformers' GPT-2 ``Conv1D``)."""
    from transformers.pytorch_utils import Conv1D

    return [name for name, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))]


def name_matches(name: str, target: str) -> bool:
    """Whether dotted module name ``name`` is ``target`` or ends with ``.target`` (peft's rule)."""
    return name == target or name.endswith("." + target)


def resolve_targets(model: nn.Module, targets: Targets, exclude: tuple[str, ...] = ()) -> list[str]:
    """Module names (suffixes) to hand to a PEFT config's ``target_modules``.

    ``exclude`` lists top-level modules (the task head) that adapters never target.
    """
    linear = [n for n in linear_module_names(model) if not any(n == e or n.startswith(e + ".") for e in exclude)]
    if isinstance(targets, str):
        if targets not in PRESETS:
            raise ConfigError(f"unknown target preset '{targets}'; use one of {sorted(PRESETS)} or a list of module names")
        if targets == "all-linear":  # as peft's own preset: never the LM's output projection
            found = [n for n in linear if n.split(".")[-1] not in OUTPUT_LAYERS]
        else:
            wanted = set().union(*(ROLES[role] for role in PRESETS[targets]))
            found = sorted({n.split(".")[-1] for n in linear if n.split(".")[-1] in wanted})
        if not found:
            raise ConfigError(
                f"target preset '{targets}' matches no linear layer of {type(model).__name__}; "
                f"give module names instead, e.g. from: {', '.join(sorted({n.split('.')[-1] for n in linear}))}"
            )
        return found
    all_names = [n for n, _ in model.named_modules()]
    for target in targets:
        if not any(name_matches(n, target) for n in all_names):
            raise ConfigError(
                f"unknown target module '{target}': no module of {type(model).__name__} is named so. "
                f"Linear layers are named: {', '.join(sorted({n.split('.')[-1] for n in linear}))}"
            )
    return list(targets)
