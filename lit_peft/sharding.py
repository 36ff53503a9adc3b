"""What lit-peft does for sharded and wrapped models: canonical parameter names, the task's own
class behind a wrapper, and FSDP2 sharding in ``configure_model``.

- Wrappers put their own names into parameter names: FSDP1 ``_fsdp_wrapped_module.``, activation
  checkpointing ``_checkpoint_wrapped_module.``, ``torch.compile`` ``_orig_mod.``, DDP ``module.``
  (only when a DDP module itself is asked). A checkpoint is decided on names without them
  (``canonical``), which are the names of the gathered state dict every strategy saves, so a
  checkpoint written under any strategy loads under any other.
- FSDP2's ``fully_shard`` swaps a module's class for a generated ``FSDP<Name>`` subclass; a task
  records ``task_class`` (its own class) in checkpoints, not the generated one.
- Under DDP the frozen weights are not broadcast again at wrap time (every rank loaded them from the same
  file; rewriting them copied the memory-mapped checkpoint into each rank): ``sync_trained`` sends rank
  0's trained weights and buffers instead (``lit_peft.patches.ddp_without_init_sync``).
- Lightning's ``ModelParallelStrategy`` asks the LightningModule to apply its parallelism in
  ``configure_model`` (Lightning does not shard for it). ``shard`` does that for every task:
  ``fully_shard`` on each transformer block (the backbone's ``_no_split_modules`` classes, which
  transformers keeps for exactly this purpose) and then on the backbone, over the strategy's data
  parallel mesh, with bf16 parameters when the run's precision is bf16. ``FSDPStrategy`` (FSDP1)
  wraps by itself in its ``setup``, from its ``auto_wrap_policy``.
"""

from __future__ import annotations

import re
from typing import Any, Optional

import torch
from torch import nn

#: wrapper segments in parameter names: FSDP1, activation checkpointing, torch.compile
WRAPPER_SEGMENTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")
_WRAPPER_RE = re.compile(r"(^|\.)(?:%s)(?=\.|$)" % "|".join(WRAPPER_SEGMENTS))


def canonical(name: str) -> str:
    """``name`` without wrapper segments: ``backbone._fsdp_wrapped_module.model.layers.0.\
_checkpoint_wrapped_module.self_attn.q_proj.lora_A.default.weight`` -> ``backbone.model.layers.0.self_attn...``."""
    return _WRAPPER_RE.sub("", name).lstrip(".")


def canonical_keys(module: nn.Module) -> set[str]:
    """Every parameter and buffer name of ``module``, canonical: what a gathered state dict names,
    read without gathering anything (FSDP's ``state_dict`` is a collective)."""
    names = {canonical(n) for n, _ in module.named_parameters()}
    return names | {canonical(n) for n, _ in module.named_buffers()}


def task_class(module: nn.Module) -> type:
    """The module's own class, not one a wrapper generated for it (FSDP2's ``FSDP<Name>``)."""
    for cls in type(module).__mro__:
        if not cls.__module__.startswith("torch.distributed"):
            return cls
    return type(module)


def is_ddp(strategy: Any) -> bool:
    from lightning.pytorch.strategies import DDPStrategy

    return isinstance(strategy, DDPStrategy)


def sync_trained(task: nn.Module) -> None:
    """Rank 0's values of what trains (a random adapter or head initialisation) and of every buffer, on every
    rank: what DDP's init sync would send, without rewriting the frozen weights every rank loaded alike."""
    with torch.no_grad():
        for tensor in [p for p in task.parameters() if p.requires_grad] + list(task.buffers()):
            torch.distributed.broadcast(tensor.data, src=0)


def is_fsdp1(strategy: Any) -> bool:
    from lightning.pytorch.strategies import FSDPStrategy

    return isinstance(strategy, FSDPStrategy)


def is_fsdp2(strategy: Any) -> bool:
    from lightning.pytorch.strategies import ModelParallelStrategy

    return isinstance(strategy, ModelParallelStrategy)


def is_sharded(strategy: Any) -> bool:
    """FSDP1 or FSDP2: a forward is a collective every rank must join."""
    return is_fsdp1(strategy) or is_fsdp2(strategy)


def block_classes(backbone: nn.Module) -> set[type]:
    """The transformer-block classes of a transformers model (``_no_split_modules``), found in it."""
    base = backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone
    names = set(getattr(base, "_no_split_modules", None) or [])
    return {type(m) for m in backbone.modules() if type(m).__name__ in names}


def shard(task: nn.Module, strategy: Any) -> None:
    """FSDP2 under ``ModelParallelStrategy``: ``fully_shard`` each block, then the backbone, over the
    data-parallel mesh. Under FSDP1 (which wraps by itself) the partial sharded load is installed
    (``lit_peft.patches``); under DDP what trains is broadcast instead of DDP's sync of every weight."""
    if is_fsdp1(strategy):
        from lit_peft.errors import ConfigError
        from lit_peft.patches import gather_only_what_trains, partial_sharded_load

        if strategy.world_size == 1 and any(not p.requires_grad for p in task.parameters()):
            # FSDP1 on one process is NO_SHARD, where torch's use_orig_params path asserts on frozen parameters
            # at the second step ("as_params=True type(prim_param)=Tensor", reproduced with torch alone)
            raise ConfigError("FSDPStrategy (FSDP1) on one process cannot train a partly frozen model (torch's FSDP1 "
                              "fails at its second step there); on one device drop the strategy, or use FSDP2: "
                              "--config configs/trainer/fsdp2.yaml")
        partial_sharded_load()
        gather_only_what_trains(strategy)
        if task.built_empty and strategy.kwargs.get("param_init_fn") is None:
            # FSDP materialises meta modules with reset_parameters(), which norms and rotary embeddings lack;
            # empty storage is enough, since sync_module_states then sends rank 0's values
            strategy.kwargs["param_init_fn"] = EmptyOn(strategy.root_device)
    if is_ddp(strategy) and strategy.world_size > 1 and torch.distributed.is_initialized():
        from lit_peft.patches import ddp_without_init_sync

        if ddp_without_init_sync(strategy):
            sync_trained(task)
    if not is_fsdp2(strategy) or getattr(task, "_lit_peft_sharded", False):
        return
    from lit_peft.patches import gather_only_what_trains, partial_sharded_load

    partial_sharded_load()  # a resume from save_distributed_checkpoint: true loads what the checkpoint holds
    gather_only_what_trains(strategy)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from lit_peft.errors import ConfigError

    names = strategy.device_mesh.mesh_dim_names or ()
    if "tensor_parallel" in names and strategy.device_mesh["tensor_parallel"].size() > 1:
        raise ConfigError(
            f"ModelParallelStrategy has tensor_parallel_size {strategy.device_mesh['tensor_parallel'].size()}; lit-peft "
            "shards with FSDP2 over the data-parallel dimension only: set tensor_parallel_size: 1 and "
            "data_parallel_size to the number of processes (configs/trainer/fsdp2.yaml)")
    mesh = strategy.device_mesh["data_parallel"] if "data_parallel" in names else strategy.device_mesh
    precision = str(getattr(strategy.precision_plugin, "precision", ""))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if precision.startswith("bf16-mixed") else MixedPrecisionPolicy()
    rank0_weights = rank0_state(task, strategy)
    blocks = block_classes(task.backbone)
    for module in list(task.backbone.modules()):
        if type(module) in blocks:
            fully_shard(module, mesh=mesh, mp_policy=policy)
    fully_shard(task.backbone, mesh=mesh, mp_policy=policy)
    if rank0_weights is not None:
        fill_from_rank0(task.backbone, rank0_weights, strategy)
    task._lit_peft_sharded = True


class EmptyOn:
    """FSDP1's ``param_init_fn``: a module's own meta tensors become empty storage on ``device``."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __call__(self, module: nn.Module) -> None:
        own = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        if any(t.is_meta for t in own):
            module.to_empty(device=self.device, recurse=False)


def rank0_state(task: nn.Module, strategy: Any) -> Optional[dict[str, torch.Tensor]]:
    """Where some rank built its backbone empty, rank 0's whole state (state dict and the non-persistent
    buffers a state dict leaves out, such as rotary frequencies), taken before sharding; ``None`` where
    every rank loaded the weights."""
    empty = [False] * strategy.world_size
    torch.distributed.all_gather_object(empty, bool(task.built_empty))
    if not any(empty):
        return None
    if strategy.global_rank != 0:
        return {}
    backbone = task.backbone
    state = dict(backbone.state_dict())
    state.update({f"buffer:{name}": b for name, b in backbone.named_buffers() if name not in state})
    return state


def fill_from_rank0(backbone: nn.Module, state: dict[str, torch.Tensor], strategy: Any) -> None:
    """After ``fully_shard``: every rank's shards get rank 0's values (torch's ``set_model_state_dict`` with
    ``broadcast_from_rank0``, one tensor at a time), ranks that built empty materialised first; the
    non-persistent buffers are broadcast whole."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    device = strategy.root_device
    if any(p.is_meta for p in backbone.parameters()) or any(b.is_meta for b in backbone.buffers()):
        backbone.to_empty(device=device)
    weights = {k: v for k, v in state.items() if not k.startswith("buffer:")}
    set_model_state_dict(backbone, weights, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True,
                                                                     strict=False))
    persistent = set(backbone.state_dict())
    with torch.no_grad():
        for name, buffer in backbone.named_buffers():
            if name in persistent:
                continue
            value = state.get(f"buffer:{name}") if strategy.global_rank == 0 else None
            carrier = value.to(device=buffer.device, dtype=buffer.dtype) if value is not None else torch.empty_like(buffer)
            torch.distributed.broadcast(carrier, src=0)
            buffer.copy_(carrier)


def strategy_name(strategy: Optional[Any]) -> str:
    return type(strategy).__name__ if strategy is not None else "none"
