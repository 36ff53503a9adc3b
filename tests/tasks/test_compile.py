"""``compile: true``: the backbone runs through ``torch.compile`` once the method has rewritten
it, for a peft-based method (LoRA) and one lit-peft implements itself (Houlsby adapters). The
compiled fit trains the same weights as an eager one (up to the compiled kernels' rounding), its
checkpoint holds the same keys, and a compiled run resumed from a mid-run checkpoint ends where
the uninterrupted compiled run does.

Inductor draws dropout masks with its own generator unless ``fallback_random`` is set; the test
sets it so that the compiled and eager runs see the same masks and can be compared weight by weight."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from lit_peft import methods
from lit_peft.data import SST2Data
from lit_peft.tasks import SequenceClassification
from tests.conftest import quiet_trainer

STEPS, MID = 6, 3
METHODS = {"lora": lambda: methods.LoRA(r=4, alpha=8), "houlsby": lambda: methods.Houlsby(bottleneck=8)}


def fit(tiny_bert: str, toy_data: Path, method: str, compiled: bool, folder: Path, ckpt: Path | None = None):
    seed_everything(0)  # the adapters' initial weights
    task = SequenceClassification(backbone=tiny_bert, learning_rate=1e-2, warmup_ratio=0.0, compile=compiled)
    data = SST2Data(data_dir=str(toy_data), batch_size=16, max_length=16)
    saver = ModelCheckpoint(dirpath=folder, filename="{step}", every_n_train_steps=MID, save_top_k=-1)
    quiet_trainer(max_steps=STEPS, callbacks=[METHODS[method](), saver], enable_checkpointing=True,
                  limit_val_batches=0).fit(task, datamodule=data, ckpt_path=ckpt)
    state = {k: v.detach().clone() for k, v in task.state_dict().items() if k in task.trained_keys()}
    return task, state




@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_compiled_fit_trains_what_an_eager_one_does_and_resumes_exactly(method, tiny_bert, toy_data, tmp_path) -> None:
    torch._dynamo.reset()
    eager_task, eager = fit(tiny_bert, toy_data, method, False, tmp_path / "eager")
    with torch._inductor.config.patch(fallback_random=True):
        task, compiled = fit(tiny_bert, toy_data, method, True, tmp_path / "compiled")
    assert getattr(task.backbone, "_compiled_call_impl", None) is not None  # it did run compiled
    assert compiled.keys() == eager.keys()
    for key in eager:
        torch.testing.assert_close(compiled[key], eager[key], rtol=1e-3, atol=1e-4, msg=key)
    saved = torch.load(tmp_path / "compiled" / f"step={STEPS}.ckpt", map_location="cpu", weights_only=False)
    assert set(saved["state_dict"]) == set(eager) and not any("_orig_mod" in k for k in saved["state_dict"])
    with torch._inductor.config.patch(fallback_random=True):
        _, resumed = fit(tiny_bert, toy_data, method, True, tmp_path / "resumed", ckpt=tmp_path / "compiled" / f"step={MID}.ckpt")
    for key in compiled:
        torch.testing.assert_close(resumed[key], compiled[key], rtol=0, atol=1e-6, msg=key)
