"""The validation and test loss of a causal LM is the mean cross-entropy over every response token
of the split, so it does not change with the eval batch size. Lightning averages a logged value
over the epoch weighted by the ``batch_size`` it is given; weighting by rows would give a mean of
batch means, which moves with how rows fall into batches when responses differ in length."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import quiet_trainer
from lit_peft.data import GSM8KData
from lit_peft.tasks import CausalLM


@pytest.fixture(scope="module")
def uneven_gsm8k(tmp_path_factory):
    """Test responses from one to twelve sentences long, so rows carry very different token counts."""
    folder = tmp_path_factory.mktemp("uneven-gsm8k")
    rows = []
    for i in range(10):
        steps = " ".join(f"Step {j}: add {j} apples." for j in range(1 + (i * 5) % 12))
        rows.append(json.dumps({"question": f"Tom has {i} apples. How many now?", "answer": f"{steps}\n#### {i}"}))
    for name in ("train.jsonl", "test.jsonl"):
        (folder / name).write_text("\n".join(rows) + "\n")
    return folder


def logged_test_loss(tiny_llama, uneven_gsm8k, eval_batch_size: int) -> float:
    data = GSM8KData(data_dir=str(uneven_gsm8k), val_size=2, max_length=256, max_response_length=200, batch_size=4,
                     eval_batch_size=eval_batch_size, tokenizer=tiny_llama)
    task = CausalLM(backbone=tiny_llama, max_new_tokens=2)
    return quiet_trainer().test(task, datamodule=data, verbose=False)[0]["test_loss"]


def test_the_test_loss_is_the_token_mean_whatever_the_eval_batch_size(tiny_llama, uneven_gsm8k) -> None:
    data = GSM8KData(data_dir=str(uneven_gsm8k), val_size=2, max_length=256, max_response_length=200, batch_size=4,
                     eval_batch_size=1, tokenizer=tiny_llama)
    data.setup("test")
    task = CausalLM(backbone=tiny_llama)
    task.configure_backbone()
    task.eval()
    sums, counts = [], []
    with torch.no_grad():
        for batch in data.test_dataloader():  # one row at a time: its mean loss times its response tokens
            tokens = int(batch["labels"][:, 1:].ne(-100).sum())
            sums.append(float(task.loss(batch)) * tokens)
            counts.append(tokens)
    assert len(counts) == 10 and max(counts) > 4 * min(counts)  # the rows are uneven
    token_mean = sum(sums) / sum(counts)
    row_mean = sum(s / c for s, c in zip(sums, counts)) / len(counts)
    assert abs(token_mean - row_mean) > 1e-3  # 20 times the tolerance below: it can tell the two means apart
    for size in (1, 3, 10):
        assert logged_test_loss(tiny_llama, uneven_gsm8k, size) == pytest.approx(token_mean, rel=1e-5), size
