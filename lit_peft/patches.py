"""The one place lit-peft changes a private Lightning function, each patch with its reason and test.

- ``partial_sharded_load``: Lightning's ``FSDPStrategy`` (FSDP1, ``state_dict_type: sharded``) resumes by
  asking torch's distributed checkpoint to fill the model's *whole* sharded state dict from the
  checkpoint folder (``lightning.pytorch.strategies.fsdp._distributed_checkpoint_load``, which calls
  ``torch.distributed.checkpoint.load`` with the default planner). A lit-peft checkpoint holds only what
  trained, so that load stops at the first frozen weight ("Missing key in checkpoint state_dict:
  model.backbone...embed_tokens.weight"). The patched function loads the keys the checkpoint holds
  and leaves the rest (the frozen pretrained weights the model already has) as they are.
  Upstream: Lightning has no partial-load option for sharded FSDP checkpoints (its ``strict_loading``
  reaches ``load_state_dict`` but not the distributed load before it); torch's planner has
  ``allow_partial_load``. Test: ``tests/test_fsdp.py`` (sharded FSDP1 resume, 1 and 2 processes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

_installed = False


def _partial_distributed_checkpoint_load(module_state: dict[str, Any], path: Path) -> None:
    from torch.distributed.checkpoint import FileSystemReader, load

    saved = set(FileSystemReader(path).read_metadata().state_dict_metadata)
    present = {key: {name: value for name, value in part.items() if f"{key}.{name}" in saved}
               if isinstance(part, dict) else part for key, part in module_state.items()}
    load(present, checkpoint_id=path)
    for key, part in present.items():  # the loaded entries back into the caller's dict
        if isinstance(part, dict):
            module_state[key].update(part)


def partial_sharded_load() -> None:
    """Install the patch (idempotent); called when a task is built under ``FSDPStrategy``."""
    global _installed
    if _installed:
        return
    import lightning.pytorch.strategies.fsdp as pytorch_fsdp

    pytorch_fsdp._distributed_checkpoint_load = _partial_distributed_checkpoint_load
    _installed = True
