"""The shared method table: every method gets every check by adding one row.

For each row, on a tiny BERT built from a config and a toy sentiment task:
- applying the method trains exactly the expected parameters;
- a short fit lowers the validation loss;
- a checkpoint holds only what trained;
- resuming from a mid-epoch and from an end-of-epoch checkpoint ends with the same weights as the
  uninterrupted run;
- ``lit-peft merge`` output loads with ``AutoModelForSequenceClassification`` and gives the
  unmerged logits; ``lit-peft export`` output loads with ``PeftModel.from_pretrained``, likewise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from conftest import H, INTER, LAYERS, POSITIONS, quiet_trainer
from lit_peft import methods
from lit_peft.data import SST2Data
from lit_peft.methods.qlora import exact_cpu_compute
from lit_peft.export import export_checkpoint, load_checkpoint, merge_checkpoint
from lit_peft.tasks import SequenceClassification

VOCAB = 30522
HEAD = H * 2 + 2
LAYER = 4 * (H * H + H) + 2 * 2 * H + (H * INTER + INTER) + (INTER * H + H)
EMBEDDINGS = VOCAB * H + POSITIONS * H + 2 * H + 2 * H
POOLER = H * H + H
TOTAL = EMBEDDINGS + LAYERS * LAYER + POOLER + HEAD
R = 4
EPOCHS, MID, STEPS_PER_EPOCH = 3, 24, 16  # 256 rows in batches of 16; step 24 is mid-way through epoch 2
QV = 2 * LAYERS  # adapted modules with targets=qv
B = 8  # Houlsby bottleneck
NORMS = (2 * LAYERS + 1) * 2 * H  # every LayerNorm's weight and bias (two per block, one in the embeddings)


def k(out_features: int, in_features: int, density: float) -> int:
    """Entries of a weight a sparse increment trains."""
    return math.ceil(density * out_features * in_features)


# SIFT on all-linear at 5%: per block q, k, v, attention out (H x H), intermediate (INTER x H), output (H x INTER); the pooler
SIFT_K = LAYERS * (4 * k(H, H, 0.05) + 2 * k(INTER, H, 0.05)) + k(H, H, 0.05)
ROSA_K = QV * k(H, H, 0.1)


@dataclass
class Case:
    id: str
    make: Callable[[], methods.Method]
    trainable: int
    lr: float = 2e-2
    mergeable: bool = True
    exportable: bool = True
    #: "peft" (loads with PeftModel.from_pretrained) or "lit-peft" (lit_peft.export.load_adapter)
    export_format: str = "peft"
    extra: dict[str, Any] = field(default_factory=dict)


CASES = [
    Case("full", methods.FullFineTune, TOTAL, lr=3e-3, exportable=False),
    Case("linear_probe", methods.LinearProbe, HEAD, lr=5e-2, exportable=False),
    Case("partial", lambda: methods.PartialFineTune(last_n_blocks=1), HEAD + LAYER, exportable=False),
    Case("partial_embeddings", lambda: methods.PartialFineTune(last_n_blocks=0, modules=["embeddings"]),
         HEAD + EMBEDDINGS, exportable=False),
    Case("lora", lambda: methods.LoRA(r=R, alpha=8), HEAD + QV * 2 * R * H),
    Case("lora_qkv", lambda: methods.LoRA(r=R, alpha=8, targets="qkv"), HEAD + 3 * LAYERS * 2 * R * H),
    Case("lora_all_linear", lambda: methods.LoRA(r=R, alpha=8, targets="all-linear"),
         # q, k, v, attention out (H->H), intermediate (H->INTER), output (INTER->H) per layer, and the pooler
         HEAD + LAYERS * (4 * 2 * R * H + 2 * R * (H + INTER)) + 2 * R * H),
    Case("dora", lambda: methods.DoRA(r=R, alpha=8), HEAD + QV * (2 * R * H + H)),
    Case("rslora", lambda: methods.RsLoRA(r=R, alpha=8), HEAD + QV * 2 * R * H),
    Case("pissa", lambda: methods.PiSSA(r=R, alpha=R), HEAD + QV * 2 * R * H),
    Case("olora", lambda: methods.OLoRA(r=R, alpha=8), HEAD + QV * 2 * R * H),
    Case("eva", lambda: methods.EVA(r=R, alpha=8, rho=1.0), HEAD + QV * 2 * R * H),
    Case("adalora", lambda: methods.AdaLoRA(init_r=R, target_r=2, alpha=8, tinit=8, tfinal=8, delta_t=2),
         HEAD + QV * (2 * R * H + R)),
    # IA3 on peft's BERT defaults: key, value, and both "output.dense" layers (feed-forward: scaled on the input side)
    Case("ia3", methods.IA3, HEAD + LAYERS * (H + H + H + INTER), lr=5e-2),
    Case("loha", lambda: methods.PeftMethod("peft.LoHaConfig", {"r": R, "alpha": 8}), HEAD + QV * 4 * R * H),
    Case("qlora", lambda: methods.QLoRA(r=R, alpha=8), HEAD + QV * 2 * R * H),
    Case("qdora_fp4", lambda: methods.QDoRA(r=R, alpha=8, quant_type="fp4", double_quant=False),
         HEAD + QV * (2 * R * H + H)),
    Case("galore", lambda: methods.GaLore(rank=8, update_proj_gap=10, scale=1.0), TOTAL, lr=3e-3, exportable=False),
    Case("galore_adafactor_frozen_embeddings",
         lambda: methods.GaLore(rank=8, update_proj_gap=10, scale=1.0, optimizer="adafactor", freeze=["embeddings"]),
         TOTAL - EMBEDDINGS, lr=3e-3, exportable=False),
    Case("houlsby", lambda: methods.Houlsby(bottleneck=B), HEAD + NORMS + 2 * LAYERS * (2 * H * B + B + H),
         lr=1e-2, mergeable=False, export_format="lit-peft"),
    Case("sift", lambda: methods.SIFT(density=0.05, selection_batches=4), HEAD + SIFT_K, export_format="lit-peft"),
    Case("rosa", lambda: methods.RoSA(r=R, alpha=8, density=0.1, selection_batches=4),
         HEAD + QV * 2 * R * H + ROSA_K, export_format="lit-peft"),
    Case("rosa_nf4", lambda: methods.RoSA(r=R, alpha=8, density=0.1, selection_batches=4, quant_type="nf4"),
         HEAD + QV * 2 * R * H + ROSA_K, export_format="lit-peft"),
]


def make_task(tiny_bert: str, case: Case) -> SequenceClassification:
    return SequenceClassification(backbone=tiny_bert, num_labels=2, learning_rate=case.lr, warmup_ratio=0.0,
                                  lr_schedule="linear")


def make_data(toy_data: Path) -> SST2Data:
    return SST2Data(data_dir=str(toy_data), batch_size=16, max_length=16)


def trainable(task) -> int:
    return sum(p.numel() for p in task.parameters() if p.requires_grad)


def trained_state(task) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in task.state_dict().items() if k in task.trained_keys()}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_apply_trains_the_expected_parameters(case: Case, tiny_bert: str) -> None:
    task = make_task(tiny_bert, case)
    method = case.make()
    method.attach(task)
    assert trainable(task) == case.trainable
    method.attach(task)  # idempotent: a second setup (validate after fit) changes nothing
    assert trainable(task) == case.trainable


# ---- one trained run per method, shared by the checks below -------------------------------------
@dataclass
class Run:
    task: SequenceClassification
    data: SST2Data
    ckpts: dict[str, Path]
    loss_before: float
    loss_after: float


def val_loss(task, data) -> float:
    trainer = quiet_trainer()
    return trainer.validate(task, datamodule=data, verbose=False)[0]["val_loss"]


_RUNS: dict[str, Run] = {}


def trained(case: Case, tiny_bert: str, toy_data: Path, tmp_path_factory) -> Run:
    """Fit 3 epochs of 16 steps, keeping Lightning's end-of-epoch checkpoints, one mid-epoch
    (step 24, half-way through the second epoch) and one saved at the end of the first epoch's last
    batch (step 16: what a step-count checkpoint or a preemption there writes, before the epoch ends)."""
    if case.id not in _RUNS:
        folder = tmp_path_factory.mktemp(f"run-{case.id}")
        task, data = make_task(tiny_bert, case), make_data(toy_data)
        method = case.make()
        method.attach(task)
        before = val_loss(task, data)
        checkpoints = [ModelCheckpoint(dirpath=folder, filename="{step}", every_n_train_steps=MID, save_top_k=-1),
                       ModelCheckpoint(dirpath=folder, filename="last-batch-{step}", every_n_train_steps=STEPS_PER_EPOCH,
                                       save_top_k=-1),
                       ModelCheckpoint(dirpath=folder, filename="{epoch}", save_top_k=-1)]
        quiet_trainer(max_epochs=EPOCHS, callbacks=[method, *checkpoints], enable_checkpointing=True).fit(
            task, datamodule=data)
        after = val_loss(task, data)
        ckpts = {"mid_epoch": folder / f"step={MID}.ckpt", "end_of_epoch": folder / "epoch=0.ckpt",
                 "last_batch": folder / f"last-batch-step={STEPS_PER_EPOCH}.ckpt",
                 "last": folder / f"epoch={EPOCHS - 1}.ckpt"}
        _RUNS[case.id] = Run(task, data, ckpts, before, after)
    return _RUNS[case.id]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_a_short_fit_lowers_the_loss(case: Case, tiny_bert, toy_data, tmp_path_factory) -> None:
    run = trained(case, tiny_bert, toy_data, tmp_path_factory)
    assert run.loss_after < run.loss_before - 0.05, (run.loss_before, run.loss_after)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_checkpoint_holds_only_what_trained(case: Case, tiny_bert, toy_data, tmp_path_factory) -> None:
    run = trained(case, tiny_bert, toy_data, tmp_path_factory)
    ckpt = torch.load(run.ckpts["last"], map_location="cpu", weights_only=False)
    state = ckpt["state_dict"]
    # sparse methods keep their chosen entries' positions next to the values: part of the trained state
    indices = {k: v for k, v in state.items() if k.endswith("sparse_indices")}
    assert set(state) == run.task.trained_keys()
    assert sum(v.numel() for k, v in state.items() if k not in indices) == case.trainable
    for key, idx in indices.items():
        values = state[key.replace("sparse_indices", "sparse_values")]
        assert idx.shape == values.shape and idx.unique().numel() == idx.numel() and idx.dtype == torch.int32
    assert ckpt["lit_peft"]["method"]["class_path"].startswith("lit_peft.methods.")


@pytest.mark.parametrize("when", ["mid_epoch", "last_batch", "end_of_epoch"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_resume_is_exact(case: Case, when: str, tiny_bert, toy_data, tmp_path_factory) -> None:
    run = trained(case, tiny_bert, toy_data, tmp_path_factory)
    task, data, method = make_task(tiny_bert, case), make_data(toy_data), case.make()
    quiet_trainer(max_epochs=EPOCHS, callbacks=[method]).fit(task, datamodule=data, ckpt_path=run.ckpts[when])
    expected, got = trained_state(run.task), trained_state(task)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)


def logits(model, data: SST2Data) -> torch.Tensor:
    batch = next(iter(data.val_dataloader()))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("case", [c for c in CASES if c.mergeable], ids=lambda c: c.id)
def test_merge_gives_the_unmerged_logits(case: Case, tiny_bert, toy_data, tmp_path, tmp_path_factory) -> None:
    from transformers import AutoModelForSequenceClassification

    run = trained(case, tiny_bert, toy_data, tmp_path_factory)
    unmerged = load_checkpoint(run.ckpts["last"])
    expected = logits(unmerged.backbone, run.data)
    torch.testing.assert_close(expected, logits(run.task.backbone.eval(), run.data), rtol=0, atol=1e-6)
    merge_checkpoint(run.ckpts["last"], tmp_path / "merged")
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert (expected - logits(merged, run.data)).abs().max() < 1e-4


def test_a_4bit_merge_dequantizes_and_saves_the_chosen_dtype(tiny_bert, toy_data, tmp_path, tmp_path_factory, capsys) -> None:
    import json

    from transformers import AutoModelForSequenceClassification

    run = trained(next(c for c in CASES if c.id == "qlora"), tiny_bert, toy_data, tmp_path_factory)
    expected = logits(load_checkpoint(run.ckpts["last"]).backbone, run.data)
    merge_checkpoint(run.ckpts["last"], tmp_path / "merged", dtype="bfloat16")
    assert "dequantized" in capsys.readouterr().out  # it says so
    note = json.loads((tmp_path / "merged" / "lit_peft_merge.json").read_text())
    assert note["dtype"] == "bfloat16" and note["dequantized_from"] == "nf4"
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged", dtype="auto").eval()
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}
    assert not any("4bit" in type(m).__name__ for m in merged.modules())
    assert (expected - logits(merged, run.data).float()).abs().max() < 0.1  # bf16 rounding only


@pytest.mark.parametrize("case", [c for c in CASES if not c.mergeable], ids=lambda c: c.id)
def test_merge_refuses_what_cannot_fold(case: Case, tiny_bert, toy_data, tmp_path, tmp_path_factory) -> None:
    from lit_peft.errors import ConfigError

    run = trained(case, tiny_bert, toy_data, tmp_path_factory)
    with pytest.raises(ConfigError, match="cannot be merged.*lit-peft export"):
        merge_checkpoint(run.ckpts["last"], tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("case", [c for c in CASES if c.exportable and c.export_format == "lit-peft"], ids=lambda c: c.id)
def test_export_in_lit_peft_format_reloads(case: Case, tiny_bert, toy_data, tmp_path, tmp_path_factory) -> None:
    from safetensors.torch import load_file

    from lit_peft.export import load_adapter

    run = trained(case, tiny_bert, toy_data, tmp_path_factory)
    expected = logits(load_checkpoint(run.ckpts["last"]).backbone, run.data)
    export_checkpoint(run.ckpts["last"], tmp_path / "adapter")
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert set(saved) == run.task.trained_keys()  # the adapter, never the frozen backbone
    loaded = load_adapter(tmp_path / "adapter")
    assert (expected - logits(loaded.backbone, run.data)).abs().max() < 1e-5


@pytest.mark.parametrize("case", [c for c in CASES if c.exportable and c.export_format == "peft"], ids=lambda c: c.id)
def test_export_loads_with_peft(case: Case, tiny_bert, toy_data, tmp_path, tmp_path_factory) -> None:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    run = trained(case, tiny_bert, toy_data, tmp_path_factory)
    expected = logits(load_checkpoint(run.ckpts["last"]).backbone, run.data)
    export_checkpoint(run.ckpts["last"], tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    # the base as the method loads it (4-bit for QLoRA: its adapters were trained on quantized weights)
    base = exact_cpu_compute(AutoModelForSequenceClassification.from_pretrained(tiny_bert, **case.make().backbone_kwargs()))
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    assert (expected - logits(loaded, run.data)).abs().max() < 1e-4


@pytest.mark.parametrize("case", [c for c in CASES if not c.exportable], ids=lambda c: c.id)
def test_export_refuses_plain_weights(case: Case, tiny_bert, toy_data, tmp_path, tmp_path_factory) -> None:
    from lit_peft.errors import ConfigError

    run = trained(case, tiny_bert, toy_data, tmp_path_factory)
    with pytest.raises(ConfigError, match="lit-peft merge"):
        export_checkpoint(run.ckpts["last"], tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()
