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
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
        except pickle.UnpicklingError as err:
            if "Unsupported global" not in str(err):  # not an object refused: a damaged or foreign file
                raise ConfigError(f"{what} '{path}' cannot be read: it is truncated or not a PyTorch checkpoint "
                                  f"(UnpicklingError: {str(err)[:120]}); use another checkpoint of the run") from err
            raise ConfigError(f"{what} '{path}' holds Python objects other than tensors and plain data, which lit-peft "
                              "does not unpickle (torch.load(weights_only=True): loading them could run code); give "
                              "a checkpoint written by `lit-peft fit`") from err
        except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as err:
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

    if saved_task.get("class_path") and saved_task.get("class_path") != task_spec.get("class_path"):
        problems.append(f"task {_short(saved_task)} (this run: {_short(task_spec)})")
    saved_backbone = (saved_task.get("init_args") or {}).get("backbone")
    backbone = (task_spec.get("init_args") or {}).get("backbone")
    if saved_backbone and backbone and not _same_backbone(str(saved_backbone), str(backbone)):
        problems.append(f"backbone {saved_backbone} (this run: {backbone})")
    problems += method_mismatch(saved_method, method_spec)
    if not problems:
        return None
    return "it was trained with " + ", ".join(problems)


def method_mismatch(saved: Optional[dict[str, Any]], given: Optional[dict[str, Any]]) -> list[str]:
    """How a run's method differs from a checkpoint's record, in words: its class, or each init argument
    that changes the trained model, with both values."""
    saved, given = saved or {}, given or {}

    if not same_class(saved.get("class_path"), given.get("class_path")):
        return [f"method {_short(saved)} (this run: {_short(given)})"]
    return [f"method.init_args.{name}={show(theirs)} (this run: {show(ours)})" for name, theirs, ours in method_differences(saved, given)]


def show(value: Any) -> str:
    """A config value as a user would write it (8.0 as 8)."""
    return f"{value:g}" if isinstance(value, float) else repr(value)


def method_differences(saved: Optional[dict[str, Any]], given: Optional[dict[str, Any]]) -> list[tuple[str, Any, Any]]:
    """(argument, checkpoint's value, this run's value) for each init argument of the same method class on
    which a checkpoint's record and a run disagree, leaving out those the class marks ``training_only``
    (dropout, an optimizer's settings): a LoRA trained at alpha 64 and evaluated at 16 is another model."""
    saved, given = saved or {}, given or {}
    path = saved.get("class_path")
    if not path or not same_class(path, given.get("class_path")):
        return []
    ignored = getattr(_class(path), "training_only", frozenset({"dropout"}))
    theirs, ours = _as_built(path, saved.get("init_args") or {}), _as_built(path, given.get("init_args") or {})
    defaults = _as_built(path, {})
    if None in (theirs, ours, defaults):  # one side does not build here: compare both as given
        theirs, ours, defaults = plain(saved.get("init_args") or {}), plain(given.get("init_args") or {}), _signature(path)
    out = []
    for name in sorted(set(theirs) | set(ours)):
        a, b = theirs.get(name, defaults.get(name)), ours.get(name, defaults.get(name))
        if name not in ignored and a != b:
            out.append((name, a, b))
    return out


def same_class(a: Optional[str], b: Optional[str]) -> bool:
    """Whether two class paths name one class (``lit_peft.methods.LoRA`` is ``lit_peft.methods.lora.LoRA``)."""
    if (a or None) == (b or None):
        return True
    return bool(a and b) and _class(a) is not None and _class(a) is _class(b)


def plain(value: Any) -> Any:
    """A config value as plain data (namespaces as dicts, tuples as lists), so records compare by value."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items() if not str(k).startswith("__")}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def _class(path: str) -> Any:
    import importlib

    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def _as_built(path: str, args: dict[str, Any]) -> dict[str, Any]:
    """A method's init arguments as the method keeps them (its ``spec``: ``modules: null`` is ``[]``), so a
    checkpoint's record and a config compare by what they build; ``None`` where the class cannot be
    built from them here."""
    import inspect

    cls = _class(path)
    if cls is None:
        return None
    known = {k: v for k, v in plain(args).items() if k in inspect.signature(cls.__init__).parameters}
    try:
        return plain(cls(**known).spec()["init_args"])
    except Exception:  # noqa: BLE001 - an argument this class refuses here
        return None


def _signature(path: str) -> dict[str, Any]:
    import inspect

    cls = _class(path)
    if cls is None:
        return {}
    return {p.name: plain(p.default) for p in inspect.signature(cls.__init__).parameters.values()
            if p.default is not inspect.Parameter.empty}


def _short(spec: dict[str, Any]) -> str:
    """A spec's class name without its module."""
    return str(spec.get("class_path", "none")).rpartition(".")[2]


def _same_backbone(a: str, b: str) -> bool:
    from lit_peft.backbones import resolve

    try:
        return a == b or str(resolve(a)) == str(resolve(b))
    except ConfigError:
        return False
