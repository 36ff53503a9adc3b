"""EVA with rank redistribution (rho > 1): the ranks EVA chooses from the training activations
differ per layer, so every checkpoint records them and everything that rebuilds the model
(resume, test from a checkpoint with the plain config, merge, export) gets the trained shapes."""

from __future__ import annotations

import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from conftest import quiet_trainer
from lit_peft import methods
from lit_peft.data import SST2Data
from lit_peft.export import export_checkpoint, load_checkpoint, merge_checkpoint
from lit_peft.tasks import SequenceClassification

R = 4


def ranks(task) -> dict[str, int]:
    return {name: module.weight.shape[0] for name, module in task.backbone.named_modules()
            if name.endswith("lora_A.default")}


def test_eva_ranks_survive_checkpoint_test_merge_and_export(tiny_bert, toy_data, tmp_path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    def task():
        return SequenceClassification(backbone=tiny_bert, num_labels=2, learning_rate=2e-2, warmup_ratio=0.0)

    data = SST2Data(data_dir=str(toy_data), batch_size=16, max_length=16)
    trained, method = task(), methods.EVA(r=R, alpha=8, rho=4.0, tau=0.99, targets=["query", "value", "output.dense"])
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="last")
    quiet_trainer(max_epochs=1, callbacks=[method, checkpoint], enable_checkpointing=True).fit(trained, datamodule=data)
    chosen = ranks(trained)
    assert len(set(chosen.values())) > 1, chosen  # EVA moved rank between layers
    assert method.layout["rank_pattern"]
    ckpt = tmp_path / "last.ckpt"
    batch = next(iter(data.val_dataloader()))
    with torch.no_grad():
        expected = trained.eval().backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    def logits(model):
        with torch.no_grad():
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    rebuilt = load_checkpoint(ckpt)
    assert ranks(rebuilt) == chosen and (logits(rebuilt.backbone) - expected).abs().max() < 1e-6

    # the YAML's EVA (no layout) testing the checkpoint: reshaped to the saved ranks, no new initialization
    tested = task()
    metrics = quiet_trainer(callbacks=[methods.EVA(r=R, alpha=8, rho=4.0, tau=0.99, targets=["query", "value", "output.dense"])]).test(
        tested, datamodule=data, ckpt_path=str(ckpt), verbose=False)[0]
    assert ranks(tested) == chosen and "test_acc" in metrics
    assert (logits(tested.eval().backbone) - expected).abs().max() < 1e-6

    merge_checkpoint(ckpt, tmp_path / "merged")
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert (logits(merged) - expected).abs().max() < 1e-4
    export_checkpoint(ckpt, tmp_path / "adapter")
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert)
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    assert (logits(loaded) - expected).abs().max() < 1e-4
