"""Classification metrics: accuracy and F1 accumulate over a stage's batches and are logged once
at the epoch's end; they must equal the accuracy of the predictions made in that epoch, and start
afresh every epoch and every validation run."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback
from torch import nn

from conftest import quiet_trainer
from lit_peft.data import SST2Data
from lit_peft.tasks import SequenceClassification


class NoDropoutRecorder(Callback):
    """Turns dropout off (so a training batch's predictions do not depend on the random stream) and
    records, for every epoch, the model's (prediction, label) pairs before each training step, and
    the metrics logged after each validation."""

    def __init__(self) -> None:
        self.epochs: list[list[tuple[int, int]]] = []
        self.logged: list[dict[str, float]] = []

    def on_fit_start(self, trainer, pl_module) -> None:
        for module in pl_module.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.epochs.append([])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        with torch.no_grad():
            preds = pl_module(**pl_module._inputs(batch)).argmax(-1)
        self.epochs[-1] += zip(preds.tolist(), batch["labels"].tolist())

    def on_validation_end(self, trainer, pl_module) -> None:
        self.logged.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def dev_accuracy(task, data) -> float:
    task.eval()
    correct = total = 0
    with torch.no_grad():
        for batch in data.val_dataloader():
            correct += int((task(**task._inputs(batch)).argmax(-1) == batch["labels"]).sum())
            total += len(batch["labels"])
    return correct / total


def test_epoch_metrics_equal_the_epochs_own_predictions(tiny_bert, toy_data) -> None:
    task = SequenceClassification(backbone=tiny_bert, learning_rate=3e-3, warmup_ratio=0.0, lr_schedule="constant")
    data = SST2Data(data_dir=str(toy_data), batch_size=32, max_length=32)
    recorder = NoDropoutRecorder()
    trainer = quiet_trainer(max_epochs=2, callbacks=[recorder])
    trainer.fit(task, datamodule=data)

    # training accuracy of the last epoch: that epoch's predictions only (the first epoch's were reset)
    assert [len(pairs) for pairs in recorder.epochs] == [256, 256]
    correct = [sum(p == y for p, y in pairs) for pairs in recorder.epochs]
    assert correct[0] != correct[1]  # the model changed, so a mixed count would differ
    logged = trainer.callback_metrics
    assert float(logged["train_acc"]) == correct[1] / 256
    last = recorder.epochs[1]
    wrong = sum(p != y for p, y in last)
    # macro F1: the mean of each class's F1 (2 labels too), not the positive class's alone
    f1 = [2 * sum(p == c and y == c for p, y in last) / (2 * sum(p == c and y == c for p, y in last) + wrong)
          for c in (0, 1)]
    assert float(logged["train_f1"]) == pytest.approx(sum(f1) / 2, abs=1e-6)

    # validation after each epoch: the model as it then was, on the dev rows only
    assert len(recorder.logged) == 2 and recorder.logged[0]["val_acc"] != recorder.logged[1]["val_acc"]
    assert recorder.logged[1]["val_acc"] == dev_accuracy(task, data)

    # a separate validate() starts from zero as well
    again = trainer.validate(task, datamodule=data, verbose=False)[0]
    assert again["val_acc"] == dev_accuracy(task, data)
