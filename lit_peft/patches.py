"""The one place lit-peft touches private Lightning functions and attributes, each with its reason and test.

- ``partial_sharded_load``: Lightning's ``FSDPStrategy`` (FSDP1, ``state_dict_type: sharded``) resumes by
  asking torch's distributed checkpoint to fill the model's *whole* sharded state dict from the
  checkpoint folder (``lightning.pytorch.strategies.fsdp._distributed_checkpoint_load``, which calls
  ``torch.distributed.checkpoint.load`` with the default planner). A lit-peft checkpoint holds only what
  trained, so that load stops at the first frozen weight ("Missing key in checkpoint state_dict:
  model.backbone...embed_tokens.weight"); so does FSDP2's resume from ``save_distributed_checkpoint: true``
  (``lightning.fabric.strategies.model_parallel._distributed_checkpoint_load``). The patched function loads
  with torch's planner set to ``allow_partial_load``: the keys the checkpoint holds (weights and optimizer
  state) load, the rest (the frozen pretrained weights the model already has) stay as they are.
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
- ``gather_only_what_trains``: with a full (gathered) checkpoint, Lightning's FSDP1 and FSDP2 strategies
  gather every weight of the model on rank 0 at each save (``lightning_module_state_dict``), frozen
  backbone included, only for lit-peft to keep what trained: a 70B model would need its whole bf16 copy
  (140 GB) in rank 0's host memory at every checkpoint. The strategy's method is replaced, on the
  instance, by torch's ``get_model_state_dict`` with ``ignore_frozen_params``: only what trains is
  gathered, plus the buffers. Sharded checkpoints gather nothing and keep Lightning's method. Test:
  ``tests/test_fsdp.py`` (what a full save gathers, checkpoint contents, exact resume).
- ``closes_window``: whether the current micro-batch ends an accumulation window (the optimizer steps
  after it), by Lightning's own rule (``_TrainingEpochLoop._should_accumulate``: every
  ``accumulate_grad_batches``-th batch, and the epoch's last). Public API has no such question, and
  computing it again would drift from Lightning's at an epoch's short last window. Used by the
  token-weighted loss (``tasks/token_mean.py``) and the requeue check (``preemption.py``). Tests:
  ``tests/test_token_mean.py``, ``tests/test_preemption.py`` (a signal inside a window).
- ``stop_progress_bar``: Rich's progress bar is a live display that Lightning stops in the bar's own
  ``teardown`` (``RichProgressBar._stop_progress``); lit-peft's result lines printed before then came
  out above the bar's final frame. ``EfficiencyReport`` stops it (idempotently) before printing. Test:
  ``tests/test_front_door.py`` (result lines after the bar).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

_installed = False


def _partial_distributed_checkpoint_load(module_state: dict[str, Any], path: Path) -> None:
    from torch.distributed.checkpoint import load
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    load(module_state, checkpoint_id=path, planner=DefaultLoadPlanner(allow_partial_load=True))


def partial_sharded_load() -> None:
    """Install the patch (idempotent) where Lightning calls the function: its FSDP1 strategy and FSDP2's
    (``ModelParallelStrategy`` loads through fabric's ``model_parallel._load_checkpoint``)."""
    global _installed
    if _installed:
        return
    import lightning.fabric.strategies.model_parallel as fabric_model_parallel
    import lightning.pytorch.strategies.fsdp as pytorch_fsdp

    pytorch_fsdp._distributed_checkpoint_load = _partial_distributed_checkpoint_load
    fabric_model_parallel._distributed_checkpoint_load = _partial_distributed_checkpoint_load
    _installed = True


def ddp_without_init_sync(strategy) -> bool:
    """Turn off DDP's broadcast of every parameter at wrap time, unless the run set ``init_sync`` itself;
    True where the caller must broadcast what trains."""
    kwargs = strategy._ddp_kwargs
    kwargs.setdefault("init_sync", False)
    return not kwargs["init_sync"]


def gather_only_what_trains(strategy) -> None:
    """Replace ``strategy.lightning_module_state_dict`` (FSDP1 with ``state_dict_type: full``, FSDP2 with
    ``save_distributed_checkpoint: false``) by a gather of the trainable parameters and the buffers; the
    full state dict lands on rank 0 only (offloaded to its host), except on a CPU, where there is nothing
    to offload (and torch 2.13's FSDP1 offload path crashes), so every rank gets it (it is small)."""
    if getattr(strategy, "_lit_peft_trained_only", False):
        return
    original = strategy.lightning_module_state_dict

    def trained_only():
        full = getattr(strategy, "_state_dict_type", None) == "full" or \
            getattr(strategy, "_save_distributed_checkpoint", True) is False
        if not full:
            return original()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        offload = strategy.root_device.type != "cpu"
        options = StateDictOptions(full_state_dict=True, cpu_offload=offload, ignore_frozen_params=True)
        return get_model_state_dict(strategy.model, options=options)

    strategy.lightning_module_state_dict = trained_only
    strategy._lit_peft_trained_only = True


def closes_window(trainer: Any) -> bool:
    """Whether the micro-batch being trained ends an accumulation window (the optimizer steps after it)."""
    return not trainer.fit_loop.epoch_loop._should_accumulate()


def stop_progress_bar(trainer: Any) -> None:
    """Stop a Rich progress bar's live display now (a no-op for another bar, or one already stopped)."""
    stop = getattr(trainer.progress_bar_callback, "_stop_progress", None)
    if callable(stop):
        stop()
