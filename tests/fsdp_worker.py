"""Run by ``test_fsdp.py`` under ``torchrun --nproc_per_node N`` (gloo, the CPU): a tiny Llama ``CausalLM``
fine-tuned with LoRA and with Houlsby adapters under sharded strategies, through Lightning's Trainer.

Which parts are Lightning's: the Trainer, its ``FSDPStrategy`` (FSDP1: it wraps the model by decoder
layer with ``use_orig_params=True``, gathers the full state dict on rank 0, or saves a sharded
distributed checkpoint) and ``ModelParallelStrategy`` (FSDP2: Lightning builds the device mesh, saves and
loads; lit-peft's ``configure_model`` applies ``fully_shard``). Lightning refuses ``FSDPStrategy`` with a
CPU accelerator (``accelerator_connector``: "requires a GPU accelerator", a check on the strategy's exact
type); ``CPUFSDPStrategy`` below is the same class under another name, so that check passes and every
line that runs is Lightning's own FSDP1 code on a gloo process group. ``ModelParallelStrategy`` runs on
the CPU as it is.

For each case, every rank runs: a fit of 8 steps with checkpoints at steps 4 and 8, then a fit resumed
from step 4. Rank 0 writes what the test checks to a JSON file."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE / "methods")]

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy  # noqa: E402
from torch.distributed.fsdp import FSDPModule  # noqa: E402

from conftest import quiet_trainer  # noqa: E402
from lit_peft import methods  # noqa: E402
from lit_peft.data import GSM8KData  # noqa: E402
from lit_peft.errors import ConfigError  # noqa: E402
from lit_peft.tasks import CausalLM  # noqa: E402

STEPS, MID = 8, 4


@contextlib.contextmanager
def full_state_dict_on_cpu(module, world_size: int, rank0_only: bool = True):
    """Lightning's ``_get_full_state_dict_context`` with ``offload_to_cpu=False``: Lightning always offloads
    the gathered weights to the CPU, which on a CPU device is no copy at all, and torch 2.13's FSDP then
    clones views of a freed buffer (a segfault, CPU only). On a GPU Lightning's own context is used."""
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.state_dict_type(module=module, state_dict_type=StateDictType.FULL_STATE_DICT,
                              state_dict_config=FullStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
                              optim_state_dict_config=FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only)):
        yield


def on_cpu_only() -> None:
    import lightning.fabric.strategies.fsdp as fabric_fsdp
    import lightning.pytorch.strategies.fsdp as pytorch_fsdp

    fabric_fsdp._get_full_state_dict_context = pytorch_fsdp._get_full_state_dict_context = full_state_dict_on_cpu


class CPUFSDPStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy, with two CPU refusals stepped around: its name differs, so that Lightning's
    accelerator check (``type(strategy) is FSDPStrategy`` with a CPU accelerator is refused) lets it run on
    gloo; and FSDP gets ``device_id=cpu`` where Lightning passes ``root_device.index`` (None on a CPU, which
    torch's FSDP refuses: "FSDP needs a non-CPU accelerator device"). Wrapping, state dicts, saving and
    loading are Lightning's code."""

    def _setup_model(self, model):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        init = FSDP.__init__

        def on_cpu(fsdp, *args, device_id=None, **kwargs):
            init(fsdp, *args, device_id=torch.device("cpu") if device_id is None else device_id, **kwargs)

        FSDP.__init__ = on_cpu
        try:
            return super()._setup_model(model)
        finally:
            FSDP.__init__ = init


def strategy(kind: str, world: int):
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    if kind == "fsdp1-sync":  # rank 0 loads, the other ranks build empty and receive its weights
        return CPUFSDPStrategy(auto_wrap_policy={LlamaDecoderLayer}, state_dict_type="full", sync_module_states=True,
                               process_group_backend="gloo")
    if kind.startswith("fsdp1"):
        return CPUFSDPStrategy(auto_wrap_policy={LlamaDecoderLayer}, state_dict_type=kind.split("-")[1],
                               process_group_backend="gloo")
    return ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1,
                                 save_distributed_checkpoint=kind == "fsdp2-sharded", process_group_backend="gloo")


METHODS = {"lora": lambda: methods.LoRA(r=4, alpha=8, dropout=0.0), "houlsby": lambda: methods.Houlsby(bottleneck=8),
           "full": methods.FullFineTune}


def run(kind: str, method_id: str, world: int, tiny_llama: str, toy_gsm8k: str, folder: Path, resume: bool) -> dict:
    task = CausalLM(backbone=tiny_llama, learning_rate=1e-2, warmup_ratio=0.0, lr_schedule="linear", max_new_tokens=4)
    data = GSM8KData(data_dir=toy_gsm8k, val_size=16, max_length=96, max_response_length=48, batch_size=4,
                     tokenizer=tiny_llama)
    ckpt = ModelCheckpoint(dirpath=folder, filename="{step}", every_n_train_steps=MID, save_top_k=-1)
    method = METHODS[method_id]()
    if kind.endswith("-prebuilt"):  # the model built before the run (method.attach), as a script may do
        method.attach(task)
    trainer = quiet_trainer(devices=world, strategy=strategy(kind, world), max_steps=STEPS, limit_val_batches=0,
                            callbacks=[method, ckpt], enable_checkpointing=True, default_root_dir=str(folder))
    trainer.fit(task, datamodule=data, ckpt_path=str(folder / f"step={MID}.ckpt") if resume else None)
    built_empty = [None] * world
    dist.all_gather_object(built_empty, task.built_empty)
    return {"task_class": type(task).__name__, "trained_keys": sorted(task.trained_keys()),
            "named_parameters_sample": next((n for n, p in task.named_parameters() if p.requires_grad and
                                             "_fsdp_wrapped_module" in n), "no trained name with a wrapper segment"),
            "built_empty": built_empty, "frozen_vs_pretrained": frozen_difference(trainer, task, tiny_llama),
            "fully_sharded": isinstance(task.backbone, FSDPModule), "gathered": gathered_for_a_save(trainer, task)}


def gathered_for_a_save(trainer, task):
    """What the strategy gathers on rank 0 for a checkpoint (before lit-peft keeps what trained): the names of
    the parameters among them, and how many of those are frozen."""
    if getattr(trainer.strategy, "_state_dict_type", "full") == "sharded" or \
            getattr(trainer.strategy, "_save_distributed_checkpoint", False):
        return None
    gathered = trainer.strategy.lightning_module_state_dict()
    params = {n for n, _ in task.named_parameters()}
    from lit_peft.sharding import canonical

    names = {canonical(n): p.requires_grad for n, p in task.named_parameters()}
    keys = [k for k in gathered if k in names]
    return {"parameters": len(keys), "frozen": sum(not names[k] for k in keys), "all_parameters": len(params)}


def frozen_difference(trainer, task, tiny_llama: str):
    """Largest difference between the frozen weights the sharded model holds (gathered on rank 0) and the
    pretrained file's: 0 when every rank's shard holds the pretrained weights, a built-empty rank's included."""
    from transformers import AutoModelForCausalLM

    if getattr(trainer.strategy, "_state_dict_type", "full") == "sharded" or \
            getattr(trainer.strategy, "_save_distributed_checkpoint", False):
        return None  # each rank holds ShardedTensors: the full and FSDP2 cases check the gathered weights
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # every weight, gathered (a collective: every rank calls it); not the strategy's save, which gathers
    # only what trains
    gathered = get_model_state_dict(trainer.strategy.model, options=StateDictOptions(full_state_dict=True))
    if trainer.global_rank != 0:
        return None
    pretrained = AutoModelForCausalLM.from_pretrained(tiny_llama).state_dict()
    trained, worst, compared = task.trained_keys(), 0.0, 0
    for key, value in gathered.items():
        name = key.removeprefix("backbone.").removeprefix("base_model.model.").replace(".base_layer", "")
        if key not in trained and name in pretrained:
            worst = max(worst, (value.float() - pretrained[name].float()).abs().max().item())
            compared += 1
    return {"max": worst, "compared": compared}


def main() -> None:
    tiny_llama, toy_gsm8k, out, *cases = sys.argv[1:]
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    on_cpu_only()
    results = {}
    for case in cases:
        kind, method_id = case.split(":")
        base = Path(out).parent / f"{kind}-{method_id}-w{world}"
        try:
            try:
                first = run(kind, method_id, world, tiny_llama, toy_gsm8k, base / "run", resume=False)
            except ConfigError as err:  # a refusal the test expects (FSDP1 on one process)
                results[case] = {"refused": str(err), "world": world}
                if rank == 0:
                    Path(out).write_text(json.dumps(results, indent=1))
                continue
            # the resumed run writes into its own folder, from the first run's step-4 checkpoint
            resumed_dir = base / "resumed"
            resumed_dir.mkdir(parents=True, exist_ok=True)
            src = base / "run" / f"step={MID}.ckpt"
            link = resumed_dir / f"step={MID}.ckpt"
            if rank == 0 and not link.exists():
                link.symlink_to(src.resolve(), target_is_directory=src.is_dir())
            dist.barrier()
            second = run(kind, method_id, world, tiny_llama, toy_gsm8k, resumed_dir, resume=True)
            results[case] = {"first": first, "second": second, "world": world,
                             "run": str(base / "run"), "resumed": str(resumed_dir)}
        except Exception:
            Path(f"{out}.{case.replace(':', '-')}.rank{rank}.error").write_text(
                f"{case}\n{traceback.format_exc()[-4000:]}")
            raise
        if rank == 0:
            Path(out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
