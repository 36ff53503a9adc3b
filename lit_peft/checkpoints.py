"""Reading a lit-peft checkpoint, and telling whether it belongs to the run that loads it.

``read`` turns every way a file can fail to be a lit-peft checkpoint (missing, a folder, truncated,
another format, a plain Lightning or PyTorch file) into one ``ConfigError`` that names the file.
``mismatch`` compares what a checkpoint records (task class, backbone, method class) with the run
about to load it: a LoRA checkpoint loaded into an RsLoRA run has the same keys and would load
silently with the wrong scale.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any, Optional

import torch

from lit_peft.errors import ConfigError

#: the ckpt_path words Lightning resolves itself
LIGHTNING_WORDS = ("last", "best", "hpc", "registry")


def read(path: str | Path, what: str = "checkpoint") -> dict[str, Any]:
    """The checkpoint at ``path``, loaded on the CPU (memory-mapped: cheap to read twice)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{what} '{path}' does not exist; give the .ckpt file that `lit-peft fit` wrote "
                          "(in <run folder>/checkpoints/)")
    if path.is_dir() and (path / "meta.pt").is_file():  # a sharded (distributed) checkpoint: FSDP1 or FSDP2
        ckpt = read_sharded(path, what)
    elif path.is_dir():
        found = sorted(path.glob("**/*.ckpt"))
        hint = f" (it holds {found[-1]})" if found else ""
        raise ConfigError(f"{what} '{path}' is a folder; give the .ckpt file itself{hint}")
    else:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=zipfile.is_zipfile(path))
        except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError) as err:
            reason = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
            raise ConfigError(f"{what} '{path}' cannot be read: it is truncated or not a PyTorch checkpoint "
                              f"({type(err).__name__}: {reason}); use another checkpoint of the run") from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ConfigError(f"{what} '{path}' is not a Lightning checkpoint (no state_dict); give a .ckpt "
                          "written by `lit-peft fit`")
    if "lit_peft" not in ckpt:
        raise ConfigError(not_lit_peft(f"{what} '{path}'"))
    return ckpt


def read_sharded(path: Path, what: str) -> dict[str, Any]:
    """A distributed checkpoint folder (FSDP ``state_dict_type: sharded``, FSDP2 ``save_distributed_checkpoint``)
    read whole on the CPU by Lightning's own consolidation; a lit-peft one holds only what trained, so it is small."""
    from lightning.fabric.utilities.load import _load_distributed_checkpoint

    try:
        ckpt = _load_distributed_checkpoint(path)
    except Exception as err:  # noqa: BLE001 - torch's reader raises many kinds for a damaged folder
        raise ConfigError(f"{what} '{path}' is a distributed checkpoint folder that cannot be read "
                          f"({type(err).__name__}: {str(err)[:120]}); use another checkpoint of the run") from err
    if "model" in ckpt and "state_dict" not in ckpt:  # FSDP1 names the weights "model"
        ckpt["state_dict"] = ckpt.pop("model")
    return ckpt


def not_lit_peft(which: str) -> str:
    return f"{which} was not written by lit-peft (it has no 'lit_peft' entry); give a .ckpt written by `lit-peft fit`"


def check_belongs(checkpoint: dict[str, Any], task_spec: dict[str, Any], method_spec: Optional[dict[str, Any]]) -> None:
    """A ``ConfigError`` unless ``checkpoint`` is lit-peft's and was trained with this task, backbone and method."""
    if "lit_peft" not in checkpoint:
        raise ConfigError(not_lit_peft("the checkpoint"))
    problem = mismatch(checkpoint["lit_peft"], task_spec, method_spec)
    if problem:
        raise ConfigError(f"the checkpoint does not belong to this run: {problem}. Load it with the config it "
                          "was trained with (its run folder's config.yaml)")


def mismatch(meta: dict[str, Any], task_spec: dict[str, Any], method_spec: Optional[dict[str, Any]]) -> Optional[str]:
    """What differs between a checkpoint's record (``ckpt["lit_peft"]``) and a run's task and
    method specs, in words; ``None`` when they agree."""
    saved_task, saved_method = meta.get("task") or {}, meta.get("method") or {}
    problems = []

    def short(spec: dict[str, Any]) -> str:
        return str(spec.get("class_path", "none")).rpartition(".")[2]

    if saved_task.get("class_path") and saved_task.get("class_path") != task_spec.get("class_path"):
        problems.append(f"task {short(saved_task)} (this run: {short(task_spec)})")
    saved_backbone = (saved_task.get("init_args") or {}).get("backbone")
    backbone = (task_spec.get("init_args") or {}).get("backbone")
    if saved_backbone and backbone and not _same_backbone(str(saved_backbone), str(backbone)):
        problems.append(f"backbone {saved_backbone} (this run: {backbone})")
    if (saved_method.get("class_path") or None) != ((method_spec or {}).get("class_path") or None):
        problems.append(f"method {short(saved_method)} (this run: {short(method_spec or {})})")
    if not problems:
        return None
    return "it was trained with " + ", ".join(problems)


def _same_backbone(a: str, b: str) -> bool:
    from lit_peft.backbones import resolve

    try:
        return a == b or str(resolve(a)) == str(resolve(b))
    except ConfigError:
        return False
