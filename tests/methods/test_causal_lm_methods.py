"""Every method on a causal LM: a tiny Llama (grouped-query attention, tied embeddings) built from
a config, trained on toy GSM8K rows. For each row: exact trainable count, a short fit lowers the
loss on the responses, resume from a mid-run checkpoint is exact, and ``merge`` loads with
``AutoModelForCausalLM`` (``export`` with ``PeftModel`` or ``load_adapter``) with the same logits."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from conftest import LAYERS, LLAMA_H, LLAMA_INTER, LLAMA_KV, quiet_trainer
from lit_peft import methods
from lit_peft.data import GSM8KData
from lit_peft.errors import ConfigError
from lit_peft.export import export_checkpoint, load_adapter, load_checkpoint, merge_checkpoint
from lit_peft.methods.qlora import exact_cpu_compute
from lit_peft.tasks import CausalLM

H, KV, INTER, R, B = LLAMA_H, LLAMA_KV, LLAMA_INTER, 4, 8
LORA = LAYERS * R * ((H + H) + (H + KV))  # q_proj (H->H) and v_proj (H->KV) per block
NORMS = (2 * LAYERS + 1) * H  # RMSNorm weights: two per block and the final one


def total(vocab: int) -> int:
    block = H * H + 2 * H * KV + H * H + 3 * H * INTER + 2 * H  # q, k, v, o, gate/up/down, two norms
    return vocab * H + LAYERS * block + H  # tied embeddings count once


@dataclass
class Case:
    id: str
    make: Callable[[], methods.Method]
    trainable: Callable[[int], int]
    lr: float = 3e-2
    mergeable: bool = True
    export: str = "peft"  # "peft", "lit-peft" or "none"
    min_drop: float = 0.05  # how far 20 steps must lower the validation loss


CASES = [
    Case("full", methods.FullFineTune, total, lr=1e-3, export="none"),
    Case("partial", lambda: methods.PartialFineTune(last_n_blocks=1), lambda v: (total(v) - v * H - H) // LAYERS,
         lr=1e-3, export="none"),
    Case("lora", lambda: methods.LoRA(r=R, alpha=8), lambda v: LORA),
    Case("rslora", lambda: methods.RsLoRA(r=R, alpha=8), lambda v: LORA),
    Case("pissa", lambda: methods.PiSSA(r=R, alpha=R), lambda v: LORA),
    Case("adalora", lambda: methods.AdaLoRA(init_r=R, target_r=2, alpha=8, tinit=4, tfinal=4, delta_t=2),
         lambda v: LORA + LAYERS * 2 * R, lr=1e-1),
    Case("loha", lambda: methods.PeftMethod("peft.LoHaConfig", {"r": R, "alpha": 8}), lambda v: 2 * LORA),
    Case("dora", lambda: methods.DoRA(r=R, alpha=8), lambda v: LORA + LAYERS * (H + KV)),
    Case("ia3", methods.IA3, lambda v: LAYERS * (KV + KV + INTER), lr=0.5),  # peft's Llama default: k, v, down_proj
    Case("olora", lambda: methods.OLoRA(r=R, alpha=8), lambda v: LORA),
    Case("qlora", lambda: methods.QLoRA(r=R, alpha=8), lambda v: LORA),
    Case("qdora", lambda: methods.QDoRA(r=R, alpha=8), lambda v: LORA + LAYERS * (H + KV)),
    Case("galore", lambda: methods.GaLore(rank=4, update_proj_gap=5, scale=1.0), total, lr=1e-2, export="none"),
    Case("sift", lambda: methods.SIFT(density=0.05, selection_batches=2),
         lambda v: LAYERS * (2 * math.ceil(0.05 * H * H) + 2 * math.ceil(0.05 * H * KV) + 3 * math.ceil(0.05 * H * INTER)),
         export="lit-peft"),
    Case("rosa", lambda: methods.RoSA(r=R, alpha=8, density=0.1, selection_batches=2),
         lambda v: LORA + LAYERS * (math.ceil(0.1 * H * H) + math.ceil(0.1 * H * KV)), export="lit-peft"),
    Case("prompt-tuning", lambda: methods.PeftMethod("peft.PromptTuningConfig", {"num_virtual_tokens": 4}),
         lambda v: 4 * H, lr=0.3, mergeable=False, min_drop=0.005),  # the generic method with a prompt-learning
    # config: 4 virtual tokens, whose only path to the logits of a random 2-layer model is attention (the loss
    # moves by about 0.01 at any learning rate)
    Case("houlsby", lambda: methods.Houlsby(bottleneck=B),
         lambda v: NORMS + 2 * LAYERS * (2 * H * B + B + H), mergeable=False, export="lit-peft"),
]


def make_task(tiny_llama: str, case: Case) -> CausalLM:
    return CausalLM(backbone=tiny_llama, learning_rate=case.lr, warmup_ratio=0.0, lr_schedule="linear", max_new_tokens=4)


def make_data(toy_gsm8k, tiny_llama) -> GSM8KData:
    return GSM8KData(data_dir=str(toy_gsm8k), val_size=16, max_length=96, max_response_length=48, batch_size=8,
                     tokenizer=tiny_llama)


_RUNS: dict = {}


def trained(case: Case, tiny_llama, toy_gsm8k, tmp_path_factory):
    """Two epochs of 10 steps, with a checkpoint at step 5 and at the end."""
    if case.id not in _RUNS:
        folder = tmp_path_factory.mktemp(f"lm-{case.id}")
        task, data, method = make_task(tiny_llama, case), make_data(toy_gsm8k, tiny_llama), case.make()
        method.attach(task)
        before = quiet_trainer().validate(task, datamodule=data, verbose=False)[0]["val_loss"]
        ckpts = [ModelCheckpoint(dirpath=folder, filename="{step}", every_n_train_steps=5, save_top_k=-1)]
        quiet_trainer(max_epochs=2, callbacks=[method, *ckpts], enable_checkpointing=True).fit(task, datamodule=data)
        after = quiet_trainer().validate(task, datamodule=data, verbose=False)[0]["val_loss"]
        _RUNS[case.id] = (task, data, folder, before, after)
    return _RUNS[case.id]


def logits(model, data: GSM8KData) -> torch.Tensor:
    batch = next(iter(data.val_dataloader()))
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_causal_lm_method_contract(case: Case, tiny_llama, toy_gsm8k, tmp_path, tmp_path_factory) -> None:
    from transformers import AutoModelForCausalLM

    task, data, folder, before, after = trained(case, tiny_llama, toy_gsm8k, tmp_path_factory)
    vocab = task.backbone.get_input_embeddings().weight.shape[0]
    assert sum(p.numel() for p in task.parameters() if p.requires_grad) == case.trainable(vocab)
    assert after < before - case.min_drop, (before, after)

    # resume from step 5 (mid-epoch) ends with the uninterrupted run's weights
    resumed, method = make_task(tiny_llama, case), case.make()
    quiet_trainer(max_epochs=2, callbacks=[method]).fit(resumed, datamodule=make_data(toy_gsm8k, tiny_llama),
                                                        ckpt_path=folder / "step=5.ckpt")
    expected = {k: v for k, v in task.state_dict().items() if k in task.trained_keys()}
    got = {k: v for k, v in resumed.state_dict().items() if k in resumed.trained_keys()}
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)

    last = folder / "step=20.ckpt"
    reference = logits(load_checkpoint(last).backbone, data)
    if case.mergeable:
        merge_checkpoint(last, tmp_path / "merged")
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
        assert (reference - logits(merged, data)).abs().max() < 1e-4
    if case.export == "peft":
        from peft import PeftModel

        export_checkpoint(last, tmp_path / "adapter")
        base = exact_cpu_compute(AutoModelForCausalLM.from_pretrained(tiny_llama, **case.make().backbone_kwargs()))
        loaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
        assert (reference - logits(loaded, data)).abs().max() < 1e-4
    elif case.export == "lit-peft":
        export_checkpoint(last, tmp_path / "adapter")
        assert (reference - logits(load_adapter(tmp_path / "adapter").backbone, data)).abs().max() < 1e-5


def test_linear_probing_a_causal_lm_is_refused_clearly(tiny_llama) -> None:
    from lit_peft.errors import ConfigError

    with pytest.raises(ConfigError, match="method 'linear_probe' left no parameter to train"):
        methods.LinearProbe().attach(CausalLM(backbone=tiny_llama))


def test_generation_is_batched_greedy_and_scored_by_exact_match(tiny_llama, toy_gsm8k) -> None:
    task, data = make_task(tiny_llama, CASES[1]), make_data(toy_gsm8k, tiny_llama)
    task.configure_backbone()
    data.setup("test")
    batch = next(iter(data.test_dataloader()))
    assert (batch["prompt_attention_mask"][:, -1] == 1).all()  # left padding: every prompt ends at the right edge
    generations = task.eval().generate(batch)
    # each generation equals the one of its prompt generated alone (padding does not leak into the result)
    for i in (0, 3):
        alone = {"prompt_input_ids": batch["prompt_input_ids"][i:i + 1, batch["prompt_attention_mask"][i].argmax():],
                 "prompt_attention_mask": batch["prompt_attention_mask"][i:i + 1, batch["prompt_attention_mask"][i].argmax():]}
        assert task.generate(alone) == generations[i:i + 1]
    metrics = quiet_trainer().test(task, datamodule=data, verbose=False)[0]
    assert 0.0 <= metrics["test_exact_match"] <= 1.0 and "test_loss" in metrics


@pytest.mark.parametrize("make", [
    lambda: methods.LoRA(r=R, alpha=8, dropout=0.0),
    lambda: methods.QLoRA(r=R, alpha=8, dropout=0.0),
    lambda: methods.IA3(),
    lambda: methods.Houlsby(bottleneck=B),
], ids=["lora", "qlora", "ia3", "houlsby"])
def test_gradient_checkpointing_gives_the_same_gradients(make, tiny_llama, toy_gsm8k) -> None:
    grads = []
    for checkpointing in (False, True):
        task = CausalLM(backbone=tiny_llama, gradient_checkpointing=checkpointing)
        torch.manual_seed(0)  # the same adapter initialisation both times
        make().attach(task)  # frozen embeddings, adapters inside checkpointed blocks
        if isinstance(task.method, methods.Houlsby):  # its up-projections start at 0: give every weight a gradient
            with torch.no_grad():
                for name, p in task.named_parameters():
                    if p.requires_grad and "up" in name:
                        p.normal_(0, 0.02)
        data = make_data(toy_gsm8k, tiny_llama)
        data.setup("fit")
        task.train().loss(next(iter(data.train_dataloader()))).backward()
        grads.append({n: p.grad.clone() for n, p in task.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and all(g is not None for g in grads[1].values())
    assert any(g.abs().sum() > 0 for g in grads[1].values())
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6, msg=name)


def test_eva_initializes_a_from_the_activations_of_training_batches(tiny_llama, toy_gsm8k) -> None:
    """EVA's A rows are the top right-singular vectors of each layer's inputs (orthonormal);
    LoRA's random A is not, so this tells the two apart."""
    def a_gram_errors(task: CausalLM) -> list[float]:
        errors = []
        for name, module in task.backbone.named_modules():
            if name.endswith("lora_A.default"):
                a = module.weight.detach()
                errors.append(float((a @ a.T - torch.eye(a.shape[0])).abs().max()))
        return errors

    for method, orthonormal in ((methods.EVA(r=R, alpha=8, rho=1.0), True), (methods.LoRA(r=R, alpha=8), False)):
        task = make_task(tiny_llama, CASES[0])
        quiet_trainer(max_steps=0, callbacks=[method]).fit(task, datamodule=make_data(toy_gsm8k, tiny_llama))
        errors = a_gram_errors(task)
        assert len(errors) == 2 * LAYERS
        assert (max(errors) < 1e-4) if orthonormal else (min(errors) > 1e-2), errors


def test_packed_training_with_a_system_prompt_and_scored_validation(tiny_llama, toy_gsm8k) -> None:
    data = GSM8KData(data_dir=str(toy_gsm8k), val_size=8, max_length=384, max_response_length=48, batch_size=2,
                     pack=True, system_prompt="You are a careful calculator.", tokenizer=tiny_llama)
    data.setup("fit")
    blocks = data.datasets["train"]
    assert len(blocks) < len(data.records["train"]) / 2 and all(len(blocks[i]["input_ids"]) <= 384 for i in range(len(blocks)))
    assert "You are a careful calculator." in data.tokenizer.decode(data.datasets["val"][0]["prompt_ids"])
    task = CausalLM(backbone=tiny_llama, learning_rate=3e-2, warmup_ratio=0.0, max_new_tokens=4,
                    generate_in_validation=True)
    method = methods.LoRA(r=R, alpha=8)
    method.attach(task)
    before = quiet_trainer().validate(task, datamodule=data, verbose=False)[0]
    assert "val_exact_match" in before  # validation generates and scores when asked
    quiet_trainer(max_epochs=2, callbacks=[method], limit_val_batches=0).fit(task, datamodule=data)
    after = quiet_trainer().validate(task, datamodule=data, verbose=False)[0]
    assert after["val_loss"] < before["val_loss"] - 0.05, (before, after)


def test_predict_samples_when_asked_and_is_greedy_otherwise(tiny_llama, toy_gsm8k) -> None:
    from lightning.pytorch import seed_everything

    data = make_data(toy_gsm8k, tiny_llama)
    data.setup("test")
    batch = next(iter(data.test_dataloader()))
    outputs = {}
    for do_sample in (False, True):
        task = CausalLM(backbone=tiny_llama, max_new_tokens=8, do_sample=do_sample, temperature=1.5, top_p=1.0)
        task.configure_backbone()
        task.eval()
        runs = []
        for seed in (0, 1):
            seed_everything(seed)
            runs.append(task.predict_step(batch, 0)["generation"])
        outputs[do_sample] = runs
    assert outputs[False][0] == outputs[False][1] == task.generate(batch)  # greedy: seed-independent, as in test
    assert outputs[True][0] != outputs[True][1]  # sampling: different draws


def test_no_repeat_ngram_size_breaks_greedy_repetition_loops(tiny_llama, toy_gsm8k) -> None:
    """An untrained model's greedy continuation repeats itself; with no_repeat_ngram_size=2 no
    bigram of prompt + continuation occurs twice (transformers' guard, passed through)."""
    data = make_data(toy_gsm8k, tiny_llama)
    data.setup("test")
    batch = next(iter(data.test_dataloader()))

    def repeated_bigrams(task: CausalLM) -> int:
        torch.manual_seed(0)
        task.configure_backbone()
        new = task.eval().generate_ids(batch)
        count = 0
        for i in range(new.shape[0]):
            prompt = batch["prompt_input_ids"][i][batch["prompt_attention_mask"][i].bool()].tolist()
            generated = new[i].tolist()
            stop = {task.tokenizer.eos_token_id, task.tokenizer.pad_token_id}
            generated = generated[:next((j for j, t in enumerate(generated) if t in stop), len(generated))]
            ids = prompt + generated
            for j in range(len(prompt), len(ids)):  # each generated token: does it complete a bigram seen before?
                count += (ids[j - 1], ids[j]) in set(zip(ids[:j - 1], ids[1:j - 1]))
        return count

    assert repeated_bigrams(CausalLM(backbone=tiny_llama, max_new_tokens=24)) > 0
    assert repeated_bigrams(CausalLM(backbone=tiny_llama, max_new_tokens=24, no_repeat_ngram_size=2)) == 0
    with pytest.raises(ConfigError, match="no_repeat_ngram_size must be 0"):
        CausalLM(backbone=tiny_llama, no_repeat_ngram_size=-1)
    with pytest.raises(ConfigError, match="repetition_penalty must be positive"):
        CausalLM(backbone=tiny_llama, repetition_penalty=0.0)


@pytest.mark.parametrize("make, sliced", [
    (lambda: methods.LoRA(r=R, alpha=8, dropout=0.0), True),
    (lambda: methods.FullFineTune(), True),
    (lambda: methods.AdaLoRA(init_r=R, target_r=2, alpha=8, dropout=0.0), True),
    (lambda: methods.PeftMethod("peft.PromptTuningConfig", {"num_virtual_tokens": 3}), False),
], ids=["lora", "full", "adalora", "prompt-tuning"])
def test_loss_projects_only_response_positions_and_equals_the_full_logits_loss(make, sliced, tiny_llama,
                                                                                toy_gsm8k) -> None:
    """The LM head sees one row per response token (not batch x length), and loss and gradients
    equal the shifted cross-entropy of the full logits. Prompt tuning lengthens the sequence, so it
    projects every position. No model-side extra: AdaLoRA's orthogonality term is the callback's."""
    task = CausalLM(backbone=tiny_llama)
    torch.manual_seed(0)
    make().attach(task)
    with torch.no_grad():  # LoRA's B starts at 0: give the adapter a say in the logits
        for name, p in task.named_parameters():
            if "lora_B" in name or "lora_E" in name:
                p.normal_(0, 0.1)
    data = make_data(toy_gsm8k, tiny_llama)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    labels = batch["labels"]
    head_rows = []
    hook = task.backbone.get_output_embeddings().register_forward_hook(
        lambda m, args, out: head_rows.append(args[0].reshape(-1, args[0].shape[-1]).shape[0]))

    def full_logits_loss() -> torch.Tensor:
        logits = task(batch["input_ids"], batch["attention_mask"]).logits[:, -labels.shape[1]:]
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())

    task.train()
    assert task.response_logits_only() is sliced
    losses, grads = [], []
    for compute in (lambda: task.loss(batch), full_logits_loss):
        task.zero_grad(set_to_none=True)
        loss = compute()
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in task.named_parameters() if p.requires_grad and p.grad is not None})
    hook.remove()
    responses = int(labels[:, 1:].ne(-100).sum())
    assert 0 < responses < labels.numel() // 2  # prompts and padding are most of a toy batch
    assert head_rows[1] >= labels.numel()
    assert head_rows[0] == (responses if sliced else head_rows[1])
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6, msg=name)
    if not isinstance(task.method, methods.AdaLoRA):  # the same loss as transformers' / peft's own labels= path,
        # also where a packed block starts inside a response (prompt tuning: the last virtual token predicts it)
        with torch.no_grad():
            for first in (labels[:, 0], batch["input_ids"][:, 0]):
                batch["labels"] = torch.cat([first[:, None], labels[:, 1:]], dim=1)
                expected = task(batch["input_ids"], batch["attention_mask"], labels=batch["labels"]).loss
                torch.testing.assert_close(task.loss(batch), expected)


def test_peft_method_takes_prompt_learning_configs_and_refuses_cpt() -> None:
    assert methods.PeftMethod("peft.PromptTuningConfig").mergeable is False
    assert methods.PeftMethod("peft.PrefixTuningConfig").mergeable is False
    assert methods.PeftMethod("peft.LoHaConfig").mergeable is True
    with pytest.raises(ConfigError, match="CPTConfig computes its own loss"):
        methods.PeftMethod("peft.CPTConfig")


def test_packing_with_a_prompt_learning_method_is_refused(tiny_llama, toy_gsm8k) -> None:
    """peft's prompt tuning drops position_ids: packed examples would silently attend to each other."""
    data = GSM8KData(data_dir=str(toy_gsm8k), val_size=8, max_length=256, batch_size=4, pack=True, tokenizer=tiny_llama)
    task = CausalLM(backbone=tiny_llama)
    method = methods.PeftMethod("peft.PromptTuningConfig", {"num_virtual_tokens": 3})
    method.attach(task)
    with pytest.raises(ConfigError, match="pack: true keeps packed examples apart through position_ids"):
        quiet_trainer(max_steps=1, callbacks=[method], limit_val_batches=0).fit(task, datamodule=data)
