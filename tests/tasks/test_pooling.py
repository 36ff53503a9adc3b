"""pooling: mean on SequenceClassification: the head reads the mean of the last hidden states over the
real tokens (what sentence encoders such as MiniLM were trained for) instead of BERT's pooler on CLS.
Checked against the encoder's own outputs, against padding, through a LoRA fit, a checkpoint and a
merge; an architecture without a pooler slot is one line."""

from __future__ import annotations

import pytest
import torch

from conftest import quiet_trainer
from lit_peft.errors import ConfigError
from lit_peft.tasks import SequenceClassification


def batch(tokenizer, texts, pad_to=None):
    return tokenizer(texts, padding="max_length" if pad_to else True, max_length=pad_to, return_tensors="pt")


def test_the_head_reads_the_masked_mean_of_the_last_hidden_states(tiny_bert) -> None:
    task = SequenceClassification(backbone=tiny_bert, pooling="mean")
    task.configure_model()
    task.eval()
    enc = batch(task.tokenizer, ["a fine film", "a long and rather dull evening at the cinema"])
    with torch.no_grad():
        logits = task(enc["input_ids"], enc["attention_mask"])
        hidden = task.backbone.bert(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        expected = task.backbone.classifier((hidden * mask).sum(1) / mask.sum(1))
    assert torch.allclose(logits, expected, atol=1e-5)
    # padding does not move a row's logits (the mean is over real tokens only)
    with torch.no_grad():
        padded = batch(task.tokenizer, ["a fine film"], pad_to=24)
        alone = task(padded["input_ids"], padded["attention_mask"])
    assert torch.allclose(alone[0], logits[0], atol=1e-5)
    # and it differs from what the CLS pooler gives the same weights
    cls = SequenceClassification(backbone=tiny_bert)
    cls.configure_model()
    cls.eval()
    with torch.no_grad():
        assert not torch.allclose(cls(enc["input_ids"], enc["attention_mask"]), logits, atol=1e-3)


def test_mean_pooling_trains_saves_and_merges(tiny_bert, toy_data, tmp_path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lit_peft.data import SST2Data
    from lit_peft.export import load_checkpoint, merge_checkpoint
    from lit_peft.methods import LoRA

    task = SequenceClassification(backbone=tiny_bert, pooling="mean", learning_rate=1e-2)
    trainer = quiet_trainer(max_steps=6, enable_checkpointing=True, default_root_dir=str(tmp_path),
                            callbacks=[LoRA(r=4, alpha=8), ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)])
    trainer.fit(task, datamodule=SST2Data(data_dir=str(toy_data), batch_size=16, max_length=16))
    enc = batch(task.tokenizer, ["a fine film", "dull and slow"])
    task.eval()
    with torch.no_grad():
        trained = task(enc["input_ids"], enc["attention_mask"])
    loaded = load_checkpoint(tmp_path / "ckpt" / "last.ckpt")  # rebuilt from its hparams: mean pooling again
    assert loaded.pooling == "mean"
    loaded.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(enc["input_ids"], enc["attention_mask"]), trained, atol=1e-5)
    out = merge_checkpoint(tmp_path / "ckpt" / "last.ckpt", tmp_path / "merged")
    import json

    assert json.loads((out / "lit_peft_merge.json").read_text())["pooling"] == "mean"
    merged = SequenceClassification(backbone=str(out), pooling="mean")  # the merged folder as a backbone
    merged.configure_model()
    merged.eval()
    with torch.no_grad():
        assert torch.allclose(merged(enc["input_ids"], enc["attention_mask"]), trained, atol=1e-4)


def test_an_architecture_without_a_pooler_is_one_line(tmp_path) -> None:
    from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification

    from lit_peft.backbones import resolve

    tokenizer = AutoTokenizer.from_pretrained(resolve("minilm"))
    GPT2ForSequenceClassification(GPT2Config(vocab_size=tokenizer.vocab_size, n_embd=16, n_layer=1, n_head=2,
                                             n_positions=32, num_labels=2, pad_token_id=0)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    task = SequenceClassification(backbone=str(tmp_path), pooling="mean")
    with pytest.raises(ConfigError, match="pooling: mean needs a BERT-family encoder with a pooler; "
                                          "GPT2ForSequenceClassification pools by its own rule"):
        task.configure_model()
