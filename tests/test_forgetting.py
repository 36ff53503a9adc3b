"""Forgetting (lit_peft.forgetting): a causal LM's loss on a general corpus before and after
fine-tuning, in summary.json and as a column of compare's tables. The "before" value is the
pretrained model's token-mean loss (checked against transformers computing it row by row, so
padding cannot bend it), a resumed run keeps it, and a bad corpus is one line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import quiet_trainer
from lit_peft import report
from lit_peft.errors import ConfigError
from lit_peft.forgetting import Forgetting, corpus_texts

TEXTS = ["The committee met on Tuesday to discuss the new budget for the city's parks.",
         "Rain is expected across the north later in the week.",
         "She said the museum would reopen in spring after a long renovation of its east wing and the cafe.",
         "Shares fell sharply.", "A local team won the cup for the first time in forty years."]


def row_by_row_loss(model_dir: str, texts: list[str]) -> float:
    """Token-mean next-token loss of the pretrained model, one row at a time (no padding at all)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
            n = ids.shape[1] - 1
            total += float(model(ids, labels=ids).loss) * n
            count += n
    return total / count


def fit(tiny_llama: str, toy_gsm8k: Path, corpus: Path, root: Path, max_steps: int, ckpt_path=None):
    from lit_peft.data import GSM8KData
    from lit_peft.methods import LoRA
    from lit_peft.tasks import CausalLM
    from lightning.pytorch.callbacks import ModelCheckpoint

    task = CausalLM(backbone=tiny_llama, learning_rate=5e-2, warmup_ratio=0.0, max_new_tokens=2)
    data = GSM8KData(data_dir=str(toy_gsm8k), val_size=8, max_length=96, max_response_length=48, batch_size=4,
                     tokenizer=tiny_llama)
    forgetting = Forgetting(corpus=str(corpus), rows=5, batch_size=2)  # rows of unequal length share batches
    trainer = quiet_trainer(max_steps=max_steps, default_root_dir=str(root), limit_val_batches=0, enable_checkpointing=True,
                            callbacks=[LoRA(r=4, alpha=8), forgetting, ModelCheckpoint(dirpath=root / "ckpt", save_last=True)])
    trainer.fit(task, datamodule=data, ckpt_path=ckpt_path)
    return trainer, forgetting


def test_before_is_the_pretrained_loss_and_after_the_trained_one(tiny_llama, toy_gsm8k, tmp_path) -> None:
    corpus = tmp_path / "general.txt"
    corpus.write_text("\n".join(TEXTS) + "\n")
    trainer, forgetting = fit(tiny_llama, toy_gsm8k, corpus, tmp_path, max_steps=6)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("forget")}
    expected = row_by_row_loss(tiny_llama, TEXTS)
    assert math.isclose(metrics["forget_loss_before"], expected, rel_tol=1e-4), (metrics, expected)
    assert metrics["forget_loss_after"] != pytest.approx(metrics["forget_loss_before"], rel=1e-4)  # six steps at 5e-2 moved it
    assert metrics["forgetting"] == pytest.approx(metrics["forget_loss_after"] - metrics["forget_loss_before"], abs=1e-5)
    # resumed for two more steps: "before" is still the pretrained model's, not the resumed one's
    _, resumed = fit(tiny_llama, toy_gsm8k, corpus, tmp_path / "again", max_steps=8,
                     ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert resumed.before == pytest.approx(expected, rel=1e-4)


def test_packaged_corpora_load_and_a_bad_one_is_one_line(tmp_path) -> None:
    xsum = corpus_texts("xsum", 3)
    assert len(xsum) == 3 and all(len(t) > 200 for t in xsum)  # whole BBC articles
    reviews = corpus_texts("movie_reviews", 4)
    assert len(reviews) == 4 and all(t.strip() for t in reviews)
    with pytest.raises(ConfigError, match="neither xsum, movie_reviews nor a file"):
        Forgetting(corpus=str(tmp_path / "missing.txt"))


def test_the_column_appears_where_runs_measured_it() -> None:
    def run(name: str, seed: int, value=None) -> report.RunRecord:
        summary = {"val_loss": 1.0 + seed / 10, "trainable_pct": 1.0}
        if value is not None:
            summary["forgetting"] = value
        return report.RunRecord(name, seed, "finished", summary=summary)

    plain = [run("lora", 1), run("lora", 2)]
    assert "forgetting" not in report.markdown(report.method_table(plain, "val_loss", None), plain, "val_loss", None, "t")
    measured = [run("lora", 1, 0.25), run("lora", 2, 0.35), run("full", 1, 1.0), run("full", 2, 1.2)]
    rows = report.method_table(measured, "val_loss", "lora")
    assert [round(r["forgetting"], 4) for r in rows] == [0.3, 1.1]
    text = report.markdown(rows, measured, "val_loss", "lora", "t")
    assert "forgetting (Δ loss)" in text and "+1.1000" in text
