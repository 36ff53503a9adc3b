"""Run by ``test_patches.py`` under ``torchrun --nproc_per_node 2``: each rank seeds its random stream
differently (so LoRA's random initialisation differs between ranks), fits 2 steps under Lightning's DDP, and
rank 0 writes whether both ranks hold the same trained weights and whether DDP's init sync was off."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE)]

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from conftest import quiet_trainer  # noqa: E402
from lit_peft import methods  # noqa: E402
from lit_peft.data import SST2Data  # noqa: E402
from lit_peft.tasks import SequenceClassification  # noqa: E402


def main() -> None:
    tiny_bert, toy_data, out = sys.argv[1:]
    torch.manual_seed(100 + int(os.environ["RANK"]))  # rank-dependent: the adapters' initial values differ
    task = SequenceClassification(backbone=tiny_bert, learning_rate=1e-3)
    trainer = quiet_trainer(devices=2, strategy="ddp", max_steps=2, limit_val_batches=0, callbacks=[methods.LoRA(r=4)])
    trainer.fit(task, datamodule=SST2Data(data_dir=toy_data, batch_size=8, max_length=16))
    state = {n: p.detach().clone() for n, p in task.named_parameters() if p.requires_grad}
    states = [None, None]
    dist.all_gather_object(states, state)
    if dist.get_rank() == 0:
        worst = max((states[0][k] - states[1][k]).abs().max().item() for k in states[0])
        Path(out).write_text(json.dumps({"max_rank_difference": worst, "tensors": len(state),
                                         "init_sync": trainer.strategy._ddp_kwargs.get("init_sync")}))


if __name__ == "__main__":
    main()
