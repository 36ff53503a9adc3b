"""From a lit-peft checkpoint to artefacts other tools load.

- ``merge_checkpoint``: the trained state folded into the backbone, saved as a transformers model
  folder (safetensors) with its tokenizer; loads with ``AutoModelFor*.from_pretrained``.
- ``export_checkpoint``: the adapter saved in PEFT's format; loads with
  ``peft.PeftModel.from_pretrained`` on the original backbone.

A checkpoint holds only what trained; the task and method are rebuilt from the class paths and
arguments it records, the pretrained backbone is loaded again, and the trained state goes on top.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from lit_peft import checkpoints, files
from lit_peft.backbones import torch_dtype
from lit_peft.errors import ConfigError
from lit_peft.tasks.base import PeftTask, build


def load_checkpoint(ckpt_path: str | Path) -> PeftTask:
    """Rebuild the task and method a checkpoint was trained with, and load its trained state."""
    ckpt = checkpoints.read(ckpt_path)
    meta = ckpt["lit_peft"]
    task: PeftTask = build(for_inference(meta["task"]))
    method = build(meta["method"]) if meta.get("method") else None
    if method is not None:
        method.attach(task)
    else:
        task.configure_backbone()
    task.on_load_checkpoint(ckpt)  # checks that every trained weight is there
    task.load_state_dict(ckpt["state_dict"], strict=False)
    if method is not None:
        state = ckpt.get("callbacks", {}).get(method.state_key)
        if state:
            method.load_state_dict(state)
    return task.eval()


#: task options that only the training run needs, and their values for merge and export: gradient checkpointing
#: (wraps blocks, turns off the KV cache), the run's attention kernel (flash attention may not be installed
#: where a checkpoint is merged), compile
TRAINING_ONLY = {"gradient_checkpointing": False, "attn_implementation": None, "compile": False}


def for_inference(task_spec: dict[str, Any]) -> dict[str, Any]:
    """The task's spec without what only training needs (``TRAINING_ONLY``)."""
    args = task_spec.get("init_args", {})
    return {**task_spec, "init_args": {**args, **{k: v for k, v in TRAINING_ONLY.items() if k in args}}}


def load_adapter(folder: str | Path) -> PeftTask:
    """Rebuild a task from a folder exported in lit-peft's own adapter format (Houlsby, SIFT,
    RoSA): the base backbone loads again, the method is applied, the adapter state goes on top."""
    from safetensors.torch import load_file

    folder = Path(folder)
    meta_path = folder / "lit_peft_adapter.json"
    if not meta_path.is_file():
        hint = " (it is a PEFT adapter: load it with peft.PeftModel.from_pretrained)" if (folder / "adapter_config.json").is_file() else ""
        raise ConfigError(f"'{folder}' holds no lit_peft_adapter.json, so it is not a lit-peft adapter folder{hint}")
    meta = json.loads(meta_path.read_text())
    task: PeftTask = build(for_inference(meta["task"]))
    build(meta["method"]).attach(task)
    state = load_file(str(folder / "adapter_model.safetensors"))
    task.on_load_checkpoint({"state_dict": state, "lit_peft": {"task": meta["task"], "method": meta["method"]}})
    task.load_state_dict(state, strict=False)
    return task.eval()


def _prepare(output_dir: Path) -> None:
    """Refuse an output folder that holds anything; the folder itself is written whole (``files.folder_in_place``),
    so a merge that fails leaves nothing that blocks its rerun."""
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise ConfigError(f"output folder '{output_dir}' is not empty; choose a new folder so nothing is overwritten")


def merge_checkpoint(ckpt_path: str | Path, output_dir: Path, dtype: str = "float32") -> Path:
    output_dir = Path(output_dir)
    task = load_checkpoint(ckpt_path)
    method = task.method
    if method is not None and not method.mergeable:
        raise ConfigError(f"method '{method.name}' cannot be merged into the backbone's weights: {method.merge_note}")
    _prepare(output_dir)
    merged = method.merge(task) if method is not None else task.backbone
    merged = merged.to(torch_dtype(dtype))
    if getattr(merged.config, "use_cache", None) is False:
        merged.config.use_cache = True  # off only for gradient checkpointing in training; generation wants the cache
    note: dict[str, Any] = {"merged_from": str(ckpt_path), "method": task.method_name, "dtype": dtype,
                            "backbone": task.backbone_name}
    if getattr(method, "quant_type", None):
        note["dequantized_from"] = method.quant_type  # the 4-bit base weights were dequantized, then merged
    if getattr(task, "pooling", "cls") == "mean":
        # transformers' class reads the CLS token through a pooler; this model was trained on the mean
        note["pooling"] = "mean"
        merged.config.lit_peft_pooling = "mean"
        print("[lit-peft] warning: the model was trained with pooling: mean; transformers' own class pools the CLS "
              "token, so load the merged folder as a lit-peft backbone (backbone: <folder>, pooling: mean) to "
              "predict as trained", file=sys.stderr)
    with files.folder_in_place(output_dir) as tmp:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        if task.tokenizer is not None:  # a forecaster has none
            task.tokenizer.save_pretrained(str(tmp))
        (tmp / "lit_peft_merge.json").write_text(json.dumps(note, indent=2) + "\n")
    print(f"[lit-peft] merged {task.method_name} into {task.backbone_name}; saved a {dtype} model to {output_dir}")
    return output_dir


def export_checkpoint(ckpt_path: str | Path, output_dir: Path) -> Path:
    output_dir = Path(output_dir)
    task = load_checkpoint(ckpt_path)
    if task.method is None or not task.method.exportable:
        raise ConfigError(
            f"method '{task.method_name}' trains the backbone's own weights, not an adapter, so there is nothing "
            "to export in PEFT's format; use `lit-peft merge` to save the fine-tuned model"
        )
    _prepare(output_dir)
    with files.folder_in_place(output_dir) as tmp:
        task.method.export(task, tmp)
    print(f"[lit-peft] exported the {task.method_name} adapter to {output_dir}")
    return output_dir
