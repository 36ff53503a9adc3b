"""The method table on GPT-2 (a tiny config built here): transformers' ``Conv1D`` layers, whose
weight is stored (in, out), and one fused ``c_attn`` for query, key and value (the ``qv`` and ``qkv``
presets both adapt it). For each method: the exact trainable count from GPT-2's shapes, a short fit
lowers the validation loss, the checkpoint holds only what trained, and ``lit-peft merge`` output
loads with ``AutoModelForSequenceClassification`` and gives the unmerged logits."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from conftest import quiet_trainer
from lit_peft import methods
from lit_peft.export import load_checkpoint, merge_checkpoint
from test_methods import Case, logits, make_data, make_task, trainable, val_loss

H, LAYERS, INNER, R = 32, 2, 128, 4
HEAD = H * 2  # GPT-2's score layer has no bias
C_ATTN, ATTN_PROJ, C_FC, MLP_PROJ = (H, 3 * H), (H, H), (H, INNER), (INNER, H)  # (in, out)
LINEAR = [C_ATTN, ATTN_PROJ, C_FC, MLP_PROJ]
BLOCK = 2 * 2 * H + sum(i * o + o for i, o in LINEAR)  # two LayerNorms and the four Conv1D layers
LORA = LAYERS * (R * H + 3 * H * R)  # A: r x in, B: out x r on each c_attn
NORMS = (2 * LAYERS + 1) * 2 * H  # ln_1, ln_2 per block and ln_f


def k(shape, density: float) -> int:
    return math.ceil(density * shape[0] * shape[1])


CASES = [
    Case("full", methods.FullFineTune, -1, lr=3e-3, exportable=False),
    Case("linear_probe", methods.LinearProbe, HEAD, lr=5e-2, exportable=False),
    Case("partial", lambda: methods.PartialFineTune(last_n_blocks=1), HEAD + BLOCK, exportable=False),
    Case("lora", lambda: methods.LoRA(r=R, alpha=8), HEAD + LORA),
    Case("lora_all_linear", lambda: methods.LoRA(r=R, alpha=8, targets="all-linear"),
         HEAD + LAYERS * sum(R * i + o * R for i, o in LINEAR)),
    Case("dora", lambda: methods.DoRA(r=R, alpha=8), HEAD + LORA + LAYERS * 3 * H),
    Case("rslora", lambda: methods.RsLoRA(r=R, alpha=8), HEAD + LORA),
    Case("pissa", lambda: methods.PiSSA(r=R, alpha=R), HEAD + LORA),
    Case("olora", lambda: methods.OLoRA(r=R, alpha=8), HEAD + LORA),
    Case("eva", lambda: methods.EVA(r=R, alpha=8, rho=1.0), HEAD + LORA),
    Case("adalora", lambda: methods.AdaLoRA(init_r=R, target_r=2, alpha=8, tinit=8, tfinal=8, delta_t=2),
         HEAD + LORA + LAYERS * R),
    # peft's IA3 defaults for GPT-2: c_attn scaled on its output, the feed-forward c_proj on its input
    Case("ia3", methods.IA3, HEAD + LAYERS * (3 * H + INNER), lr=5e-2),
    Case("qlora", lambda: methods.QLoRA(r=R, alpha=8), HEAD + LORA),
    Case("galore", lambda: methods.GaLore(rank=8, update_proj_gap=10, scale=1.0), -1, lr=3e-3, exportable=False),
    Case("houlsby", lambda: methods.Houlsby(bottleneck=8), HEAD + NORMS + 2 * LAYERS * (2 * H * 8 + 8 + H),
         lr=1e-2, mergeable=False),
    Case("sift", lambda: methods.SIFT(density=0.05, selection_batches=4),
         HEAD + LAYERS * sum(k(s, 0.05) for s in LINEAR)),
    Case("rosa", lambda: methods.RoSA(r=R, alpha=8, density=0.1, selection_batches=4), HEAD + LORA + LAYERS * k(C_ATTN, 0.1)),
]


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory) -> str:
    """A randomly initialised 2-layer GPT-2 (width 32) for classification, with MiniLM's tokenizer
    (GPT-2's own needs the hub); padding reads the tokenizer's pad id."""
    from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification

    from lit_peft.backbones import resolve

    folder = tmp_path_factory.mktemp("tiny-gpt2")
    tokenizer = AutoTokenizer.from_pretrained(resolve("minilm"))
    config = GPT2Config(vocab_size=tokenizer.vocab_size, n_embd=H, n_layer=LAYERS, n_head=4, n_positions=64,
                        num_labels=2, pad_token_id=tokenizer.pad_token_id, initializer_range=0.2)
    torch.manual_seed(0)
    GPT2ForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_method_on_gpt2(case: Case, tiny_gpt2, toy_data, tmp_path) -> None:
    from transformers import AutoModelForSequenceClassification

    task, data, method = make_task(tiny_gpt2, case), make_data(toy_data), case.make()
    method.attach(task)
    total = sum(p.numel() for p in task.parameters())
    assert trainable(task) == (total if case.trainable == -1 else case.trainable)
    before = val_loss(task, data)
    quiet_trainer(max_epochs=3, callbacks=[method, ModelCheckpoint(dirpath=tmp_path, filename="last")],
                  enable_checkpointing=True).fit(task, datamodule=data)
    after = val_loss(task, data)
    assert after < before - 0.02, (before, after)
    ckpt = tmp_path / "last.ckpt"
    assert set(torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]) == task.trained_keys()
    if case.mergeable:
        expected = logits(load_checkpoint(ckpt).backbone, data)
        merge_checkpoint(ckpt, tmp_path / "merged")
        merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
        assert (expected - logits(merged, data)).abs().max() < 1e-4


def test_olora_on_conv1d_starts_from_the_qr_of_the_out_in_weight(tiny_gpt2, toy_data) -> None:
    from transformers.pytorch_utils import Conv1D

    from lit_peft.data import SST2Data

    task, data = make_task(tiny_gpt2, CASES[0]), SST2Data(data_dir=str(toy_data), max_length=16, tokenizer=tiny_gpt2)
    task.configure_backbone()
    data.setup("fit")
    stored = {n: m.weight.detach().clone() for n, m in task.backbone.named_modules()
              if isinstance(m, Conv1D) and n.endswith("c_attn")}
    before = logits(task.backbone.eval(), data)
    methods.OLoRA(r=R, alpha=8).attach(task)
    layers = {n.removeprefix("base_model.model."): m for n, m in task.backbone.named_modules()
              if hasattr(m, "lora_A") and "default" in m.lora_A}
    assert set(layers) == set(stored)
    for name, layer in layers.items():
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        assert a.shape == (R, H) and b.shape == (3 * H, R)  # peft's own init would give R x 3H here
        torch.testing.assert_close(b.T @ b, torch.eye(R), atol=1e-5, rtol=0)  # Q's columns
        torch.testing.assert_close(a, a.triu(), atol=0, rtol=0)  # R's rows
        q, r_mat = torch.linalg.qr(stored[name].T)  # the (out, in) weight
        torch.testing.assert_close(b.abs(), q[:, :R].abs(), atol=1e-5, rtol=0)
        # the base keeps W - scale B A, so the adapted layer starts as the original one
        torch.testing.assert_close(layer.get_base_layer().weight.T + layer.scaling["default"] * b @ a, stored[name].T,
                                   atol=1e-5, rtol=0)
    assert (before - logits(task.backbone.eval(), data)).abs().max() < 1e-4


def test_olora_on_gpt2_exports_a_lora_for_the_original_weights(tiny_gpt2, toy_data, tmp_path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from lit_peft.export import export_checkpoint

    case = next(c for c in CASES if c.id == "olora")
    task, data, method = make_task(tiny_gpt2, case), make_data(toy_data), case.make()
    quiet_trainer(max_epochs=1, callbacks=[method, ModelCheckpoint(dirpath=tmp_path, filename="last")],
                  enable_checkpointing=True).fit(task, datamodule=data)
    expected = logits(load_checkpoint(tmp_path / "last.ckpt").backbone, data)
    export_checkpoint(tmp_path / "last.ckpt", tmp_path / "adapter")
    base = AutoModelForSequenceClassification.from_pretrained(tiny_gpt2)
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    assert (expected - logits(loaded, data)).abs().max() < 1e-4
