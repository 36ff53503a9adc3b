"""Integration on real weights and real data: the packaged all-MiniLM-L6-v2 fine-tuned on the
shared SST-2 files (skipped with a reason where ../shared is absent)."""

from __future__ import annotations

import pytest
import torch

from conftest import needs_shared, quiet_trainer
from lit_peft import methods
from lit_peft.data import SST2Data
from lit_peft.export import export_checkpoint, load_checkpoint, merge_checkpoint
from lit_peft.tasks import SequenceClassification


@pytest.fixture(scope="module")
def dora_run(tmp_path_factory):
    folder = needs_shared("sst2")
    out = tmp_path_factory.mktemp("minilm-dora")
    from lightning.pytorch import seed_everything

    seed_everything(0)  # the head's and DoRA's initial weights: not whatever earlier tests left in the random stream
    task = SequenceClassification(backbone="minilm", learning_rate=1e-2, warmup_ratio=0.1)
    data = SST2Data(data_dir=str(folder), limit_train_rows=1024, limit_eval_rows=256, batch_size=32, max_length=48)
    method = methods.DoRA(r=8, alpha=16)
    trainer = quiet_trainer(max_epochs=1, callbacks=[method], enable_checkpointing=True, default_root_dir=str(out))
    trainer.fit(task, datamodule=data)
    metrics = trainer.validate(task, datamodule=data, verbose=False)[0]
    return task, data, trainer.checkpoint_callback.best_model_path or trainer.checkpoint_callback.last_model_path, metrics


def test_dora_learns_sst2_on_minilm(dora_run) -> None:
    task, data, ckpt, metrics = dora_run
    # 32 steps on 1,024 sentences: far above the 50% of chance on 256 dev sentences
    assert metrics["val_acc"] > 0.75, metrics
    trainable = sum(p.numel() for p in task.parameters() if p.requires_grad)
    total = sum(p.numel() for p in task.parameters())
    assert trainable / total < 0.01


def test_merged_minilm_matches_unmerged(dora_run, tmp_path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    task, data, ckpt, _ = dora_run
    batch = next(iter(data.val_dataloader()))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        expected = load_checkpoint(ckpt).backbone(**inputs).logits
        merge_checkpoint(ckpt, tmp_path / "merged")
        merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
        assert (merged(**inputs).logits - expected).abs().max() < 1e-4
        export_checkpoint(ckpt, tmp_path / "adapter")
        base = AutoModelForSequenceClassification.from_pretrained(task.backbone_source, num_labels=2)
        adapted = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
        assert (adapted(**inputs).logits - expected).abs().max() < 1e-4
