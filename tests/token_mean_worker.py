"""Run by ``test_token_mean.py`` under ``torchrun`` (gloo): one optimizer step of LoRA on 8 GSM8K-style
rows whose responses differ in length, with a given micro-batch size and ``accumulate_grad_batches``;
rank 0 saves the gradients the optimizer would apply and the logged training loss. Every layout of the
same 8 rows (8 at once, 4 x 2 accumulated, 2 processes x 4, 2 processes x 2 x 2) must give the same."""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import torch  # noqa: E402
from lightning.pytorch import Callback  # noqa: E402

from conftest import quiet_trainer, seed_model_builds  # noqa: E402

seed_model_builds()  # every layout starts from the same weights
from lit_peft import methods  # noqa: E402
from lit_peft.data import GSM8KData  # noqa: E402
from lit_peft.tasks import CausalLM  # noqa: E402


class KeepGradients(Callback):
    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.grads = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None}


def main(tiny_llama: str, data_dir: str, batch_size: str, accumulate: str, out: str) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.manual_seed(0)
    keep = KeepGradients()
    task = CausalLM(backbone=tiny_llama, weight_decay=0.0)
    data = GSM8KData(data_dir=data_dir, val_size=1, max_length=160, max_response_length=128,
                     batch_size=int(batch_size), tokenizer=tiny_llama)
    trainer = quiet_trainer(devices=world, strategy="ddp" if world > 1 else "auto", max_steps=1, limit_val_batches=0,
                            accumulate_grad_batches=int(accumulate),
                            callbacks=[methods.LoRA(r=4, alpha=8, dropout=0.0), keep])
    trainer.fit(task, datamodule=data)
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save({"grads": keep.grads, "train_loss": float(trainer.callback_metrics["train_loss_step"]),
                    "rows_seen": len(data.datasets["train"])}, out)


if __name__ == "__main__":
    main(*sys.argv[1:])
