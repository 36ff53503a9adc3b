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
- ``ddp_without_init_sync``: DDP broadcasts every parameter from rank 0 when it wraps the model
  (``init_sync``). Every rank loaded the same frozen weights from the same file, and writing them again
  makes each rank copy the memory-mapped checkpoint: a 2-process fit of SmolLM2 peaked at 2.0x the
  weights above idle on each rank (``benchmarks/load_memory.py``). lit-peft turns the init sync off through
  Lightning's private ``DDPStrategy._ddp_kwargs`` (Lightning passes its constructor's kwargs there; there is
  no public setter once the strategy exists) and broadcasts what trains and the buffers itself
  (``lit_peft.sharding.sync_trained``). A user's explicit ``init_sync`` is kept. Test: ``tests/methods/
  test_ddp_methods.py`` (every method's trained state equal on both ranks) and ``tests/test_patches.py``.
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


def ddp_without_init_sync(strategy) -> bool:
    """Turn off DDP's broadcast of every parameter at wrap time, unless the run set ``init_sync`` itself;
    True where the caller must broadcast what trains."""
    kwargs = strategy._ddp_kwargs
    kwargs.setdefault("init_sync", False)
    return not kwargs["init_sync"]
