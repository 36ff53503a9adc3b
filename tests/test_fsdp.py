"""Sharded training on the CPU (gloo): a tiny Llama ``CausalLM`` with LoRA and with Houlsby adapters under
Lightning's FSDP1 (``FSDPStrategy``: full and sharded state dicts) and FSDP2 (``ModelParallelStrategy``, which
lit-peft's ``configure_model`` shards with ``fully_shard``), in one and two processes (``fsdp_worker.py``
under ``torchrun``; it says which parts are Lightning's and the two CPU refusals it steps around).

Each run: 8 steps with checkpoints at 4 and 8, then a run resumed from step 4. Under FSDP2 the ranks but 0
build the backbone empty and receive rank 0's weights. Checked here: the checkpoint
holds exactly the trained tensors under canonical names (before lit-peft filtered on canonical names an
FSDP1 checkpoint kept 0 of LoRA's 8) and the task's own class (FSDP2 renames it ``FSDPCausalLM``); the
resumed run ends with the uninterrupted run's weights, bit for bit; the final checkpoint, written by a
sharded run, loads into a plain one-process task, merges (``AutoModelForCausalLM``) and exports (PEFT's
``PeftModel`` / lit-peft's ``load_adapter``) with the same logits."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent

LORA_TENSORS = 2 * 2 * 2  # 2 layers x (q_proj, v_proj) x (A, B)
HOULSBY_KEYS = ("adapter", "norm")  # Houlsby trains its adapters and the layer norms

CASES = {
    1: ["fsdp1-full:lora", "fsdp1-full:full", "fsdp2:lora", "fsdp2:houlsby"],
    2: ["fsdp1-full:lora", "fsdp1-sharded:lora", "fsdp2:lora", "fsdp2-sharded:lora", "fsdp2-prebuilt:lora",
        "fsdp1-full:houlsby", "fsdp2:houlsby"],
}
PARAMS = [(world, case) for world, cases in CASES.items() for case in cases]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def fsdp_runs(tiny_llama, toy_gsm8k, tmp_path_factory) -> dict:
    runs = {}
    for world, cases in CASES.items():
        out = tmp_path_factory.mktemp(f"fsdp-w{world}") / "results.json"
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
                               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
                               str(HERE / "fsdp_worker.py"), tiny_llama, str(toy_gsm8k), str(out), *cases],
                              capture_output=True, text=True, timeout=900)
        errors = {p.name: p.read_text()[-2000:] for p in out.parent.glob("*.error")}
        results = json.loads(out.read_text()) if out.exists() else {}
        runs[world] = {"results": results, "errors": errors, "returncode": done.returncode, "tail": done.stderr[-3000:]}
    return runs


def _result(fsdp_runs, world: int, case: str) -> dict:
    got = fsdp_runs[world]["results"].get(case)
    if got is None:
        run = fsdp_runs[world]
        pytest.fail(f"no result for {case} on {world} process(es) (exit {run['returncode']}): {run['errors'] or run['tail']}")
    return got


def _final(folder: str) -> Path:
    return Path(folder) / "step=8.ckpt"


@pytest.mark.parametrize("world,case", PARAMS, ids=[f"{c}-{w}proc" for w, c in PARAMS])
def test_sharded_run_saves_what_trained_and_resumes_exactly(world, case, fsdp_runs) -> None:
    from lit_peft.checkpoints import read

    got = _result(fsdp_runs, world, case)
    kind, method = case.split(":")
    if world == 1 and kind.startswith("fsdp1") and method != "full":
        # FSDP1 in one process is NO_SHARD, where torch's FSDP fails on frozen parameters at step two: refused
        # (full fine-tuning freezes nothing, and runs below)
        assert "FSDP1" in got["refused"] and "fsdp2.yaml" in got["refused"]
        return
    assert got["first"]["task_class"] == "CausalLM"
    if kind.startswith("fsdp1"):  # the names the model itself has carry FSDP1's wrapper segment
        assert "_fsdp_wrapped_module" in got["first"]["named_parameters_sample"]
    first, resumed, mid = read(_final(got["run"])), read(_final(got["resumed"])), read(Path(got["run"]) / "step=4.ckpt")
    if kind.endswith("-sharded"):
        assert _final(got["run"]).is_dir()  # a distributed checkpoint folder, read whole by checkpoints.read
    keys = set(first["state_dict"])
    assert keys == set(got["first"]["trained_keys"]) == set(resumed["state_dict"])
    assert not any("_fsdp_wrapped_module" in k or "_checkpoint_wrapped_module" in k for k in keys)
    if method == "lora":
        assert len(keys) == LORA_TENSORS and all("lora_" in k for k in keys)
    elif method == "full":
        assert len(keys) == got["first"]["gathered"]["all_parameters"]  # every weight (lm_head is embed_tokens, tied)
    else:
        assert keys and all(any(part in k for part in HOULSBY_KEYS) for k in keys)
    assert first["lit_peft"]["task"]["class_path"] == "lit_peft.tasks.causal_lm.CausalLM"
    # under FSDP2 every rank but 0 builds the backbone empty (no weights read) and gets rank 0's into its
    # shards; the gathered frozen weights are then the pretrained file's, exactly, before and after a resume
    # (a model built before the run, by method.attach, loaded on every rank and is sharded all the same)
    assert got["first"]["built_empty"] == [False] + [kind in ("fsdp2", "fsdp2-sharded")] * (world - 1)
    assert got["first"]["fully_sharded"] is kind.startswith("fsdp2")
    if not kind.endswith("-sharded"):  # a full save gathers what trains, not the frozen backbone
        gathered = got["first"]["gathered"]
        assert gathered["frozen"] == 0 and 0 < gathered["parameters"] <= gathered["all_parameters"]
        assert (gathered["parameters"] < gathered["all_parameters"]) is (method != "full")
    for run in ("first", "second") if not kind.endswith("-sharded") and method != "full" else ():
        assert got[run]["frozen_vs_pretrained"]["compared"] >= 16
        assert got[run]["frozen_vs_pretrained"]["max"] == 0.0
    moved = [k for k in keys if not torch.equal(first["state_dict"][k], mid["state_dict"][k])]
    assert len(moved) >= len(keys) // 2  # training moved the weights (LoRA's A may stay put while B is 0)
    for key in keys:  # and the resumed run lands on the same ones exactly
        torch.testing.assert_close(resumed["state_dict"][key], first["state_dict"][key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("world,case", [(2, "fsdp1-full:lora"), (2, "fsdp1-sharded:lora"), (2, "fsdp2:lora"),
                                        (2, "fsdp2-sharded:lora"), (1, "fsdp2:lora"), (2, "fsdp2:houlsby"),
                                        (1, "fsdp1-full:full")],
                         ids=["fsdp1-full", "fsdp1-sharded", "fsdp2", "fsdp2-sharded", "fsdp2-1proc", "fsdp2-houlsby",
                              "fsdp1-1proc-full"])
def test_sharded_checkpoint_merges_and_exports_in_one_process(world, case, fsdp_runs, toy_gsm8k, tiny_llama, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    from lit_peft.data import GSM8KData
    from lit_peft.export import export_checkpoint, load_adapter, load_checkpoint, merge_checkpoint

    got = _result(fsdp_runs, world, case)
    ckpt = _final(got["run"])
    data = GSM8KData(data_dir=str(toy_gsm8k), val_size=16, max_length=96, max_response_length=48, batch_size=8,
                     tokenizer=tiny_llama)
    data.setup("validate")
    batch = next(iter(data.val_dataloader()))

    def logits(model):
        with torch.no_grad():
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    task = load_checkpoint(ckpt)  # a plain task, no strategy: the sharded run's weights on top
    reference = logits(task.backbone)
    untrained = logits(AutoModelForCausalLM.from_pretrained(tiny_llama).eval())
    assert not torch.allclose(reference, untrained, atol=1e-4)  # the checkpoint's training is in there
    if case.endswith("lora"):
        merge_checkpoint(ckpt, tmp_path / "merged")
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
        torch.testing.assert_close(logits(merged), reference, rtol=1e-4, atol=1e-4)
        from peft import PeftModel

        export_checkpoint(ckpt, tmp_path / "adapter")
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), tmp_path / "adapter").eval()
        torch.testing.assert_close(logits(peft_model), reference, rtol=1e-4, atol=1e-4)
    elif case.endswith("full"):  # the backbone's own weights: merge is the model itself
        merge_checkpoint(ckpt, tmp_path / "merged")
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
        torch.testing.assert_close(logits(merged), reference, rtol=1e-5, atol=1e-5)
    else:
        export_checkpoint(ckpt, tmp_path / "adapter")
        torch.testing.assert_close(logits(load_adapter(tmp_path / "adapter").backbone), reference, rtol=1e-5, atol=1e-5)


def test_canonical_names_drop_every_wrapper_segment() -> None:
    from lit_peft.sharding import canonical

    name = "backbone._fsdp_wrapped_module.model.layers.0._checkpoint_wrapped_module.self_attn.q_proj.lora_A.default.weight"
    assert canonical(name) == "backbone.model.layers.0.self_attn.q_proj.lora_A.default.weight"
    assert canonical("_orig_mod.backbone.x") == "backbone.x"
    assert canonical("backbone.my_orig_mod_layer.weight") == "backbone.my_orig_mod_layer.weight"  # whole segments only


def test_task_class_is_the_tasks_own_under_a_generated_wrapper_class() -> None:
    from lit_peft.sharding import task_class
    from lit_peft.tasks import CausalLM

    # what fully_shard does: a class generated in torch.distributed with the task's class as a base
    fsdp_module = type("FSDPModule", (), {"__module__": "torch.distributed.fsdp._fully_shard._fully_shard"})
    generated = type("FSDPCausalLM", (fsdp_module, CausalLM), {"__module__": "torch.distributed.fsdp._fully_shard._fully_shard"})
    assert generated.__name__ == "FSDPCausalLM"
    assert task_class(object.__new__(generated)) is CausalLM


def test_fsdp1_with_sync_module_states_builds_empty_on_other_ranks(tiny_llama) -> None:
    """FSDP1's own broadcast (``sync_module_states``) refuses CPU tensors, so it runs on GPUs only; what lit-peft
    adds is checked here in one process: on a rank other than 0 the backbone is built on the meta device with
    the method applied (the real model's names and shapes, no weights read), and the strategy gets a
    ``param_init_fn`` that materialises the modules transformers gives no ``reset_parameters`` (norms)."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy

    from lit_peft import methods
    from lit_peft.tasks import CausalLM

    class SecondOfTwo(FSDPStrategy):  # what the strategy says on rank 1 of 2 once processes are set up
        world_size = property(lambda self: 2)
        global_rank = property(lambda self: 1)

    strategy = SecondOfTwo(sync_module_states=True)
    strategy.parallel_devices = [torch.device("cpu")] * 2
    trainer = SimpleNamespace(strategy=strategy, global_rank=1, world_size=2,
                              precision_plugin=SimpleNamespace(precision="32-true"))
    empty = CausalLM(backbone=tiny_llama)
    empty._trainer = trainer
    empty.use_method(methods.LoRA(r=4))
    assert empty.builds_empty()
    empty.configure_model()
    real = CausalLM(backbone=tiny_llama)
    methods.LoRA(r=4).attach(real)
    assert all(p.is_meta for p in empty.parameters())
    assert {n: p.shape for n, p in empty.named_parameters()} == {n: p.shape for n, p in real.named_parameters()}
    assert empty.trained_keys() == real.trained_keys()
    init = strategy.kwargs["param_init_fn"]
    for module in empty.modules():
        init(module)
    assert not any(p.is_meta for p in empty.parameters()) and not any(b.is_meta for b in empty.buffers())
    # rank 0, and a method that reads the weights to apply itself, load them
    assert not CausalLM(backbone=tiny_llama).builds_empty()
    pissa = CausalLM(backbone=tiny_llama)
    pissa._trainer = trainer
    pissa.use_method(methods.PiSSA(r=4))
    assert not pissa.builds_empty()


def test_a_sharded_folder_under_a_strategy_that_cannot_load_it_is_one_line(fsdp_runs, capsys) -> None:
    from lit_peft.cli import main

    folder = _final(_result(fsdp_runs, 2, "fsdp1-sharded:lora")["run"])
    root = Path(__file__).resolve().parents[1]
    with pytest.raises(SystemExit) as done:
        main(["validate", "--config", str(root / "configs" / "lora_gsm8k.yaml"), "--ckpt_path", str(folder)])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert "is a sharded checkpoint folder" in err and "lit-peft merge" in err and len(err.strip().splitlines()) == 1
