"""``compile: true``: the backbone runs through ``torch.compile`` once the method has rewritten
it, for each kind of rewrite: peft's adapters (LoRA; DoRA's weight-norm magnitude), lit-peft's own
modules (Houlsby adapters; SIFT's sparse deltas; RoSA's sparse deltas beside peft's LoRA) and an
optimizer that projects full gradients (GaLore). The
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
# Inductor's code generation takes most of a compiled fit's time on 2 cores; what this test checks (the
# rewritten modules trace, train the same weights, checkpoint under plain names and resume exactly) does
# not depend on the backend, so one method runs on Inductor and the rest on aot_eager (Dynamo's graphs and
# AOTAutograd's backward, run eagerly)
INDUCTOR = {"lora"}
METHODS = {
    "lora": lambda: methods.LoRA(r=4, alpha=8),
    "dora": lambda: methods.DoRA(r=4, alpha=8),
    "houlsby": lambda: methods.Houlsby(bottleneck=8),
    "sift": lambda: methods.SIFT(density=0.05, selection_batches=4),
    "rosa": lambda: methods.RoSA(r=4, alpha=8, density=0.1, selection_batches=4),
    "galore": lambda: methods.GaLore(rank=8, update_proj_gap=10, scale=1.0),
}
LR = {"galore": 3e-3}  # every weight trains: a smaller step, as in tests/methods
# An attention key's bias has a gradient that is zero but for rounding (softmax ignores a shift that
# every key shares), and Adam turns that rounding into steps of the learning rate's size, which any
# two sets of kernels take differently: where a method trains it (GaLore), it is not compared.
ROUNDING_ONLY = "attention.self.key.bias"


def fit(tiny_bert: str, toy_data: Path, method: str, compiled: bool, folder: Path, ckpt: Path | None = None):
    seed_everything(0)  # the adapters' initial weights
    task = SequenceClassification(backbone=tiny_bert, learning_rate=LR.get(method, 1e-2), warmup_ratio=0.0,
                                  compile=compiled)
    data = SST2Data(data_dir=str(toy_data), batch_size=16, max_length=16)
    saver = ModelCheckpoint(dirpath=folder, filename="{step}", every_n_train_steps=MID, save_top_k=-1)
    quiet_trainer(max_steps=STEPS, callbacks=[METHODS[method](), saver], enable_checkpointing=True,
                  limit_val_batches=0).fit(task, datamodule=data, ckpt_path=ckpt)
    state = {k: v.detach().clone() for k, v in task.state_dict().items() if k in task.trained_keys()}
    return task, state




@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_compiled_fit_trains_what_an_eager_one_does_and_resumes_exactly(method, tiny_bert, toy_data, tmp_path,
                                                                          monkeypatch) -> None:
    torch._dynamo.reset()
    if method not in INDUCTOR:
        compile_module = torch.nn.Module.compile
        monkeypatch.setattr(torch.nn.Module, "compile",
                            lambda self, *args, **kwargs: compile_module(self, *args, **{"backend": "aot_eager", **kwargs}))
    eager_task, eager = fit(tiny_bert, toy_data, method, False, tmp_path / "eager")
    with torch._inductor.config.patch(fallback_random=True):
        task, compiled = fit(tiny_bert, toy_data, method, True, tmp_path / "compiled")
    assert getattr(task.backbone, "_compiled_call_impl", None) is not None  # it did run compiled
    assert compiled.keys() == eager.keys()
    for key in (k for k in eager if ROUNDING_ONLY not in k):
        # Adam divides each coordinate's step by its gradient's size, so where a gradient is near zero
        # the compiled kernels' rounding moves a weight by up to ~1e-4 in 6 steps (seen on LoRA's
        # layer-0 query B); training different weights would move them by ~lr x steps = 6e-2
        torch.testing.assert_close(compiled[key], eager[key], rtol=1e-3, atol=5e-4, msg=key)
    saved = torch.load(tmp_path / "compiled" / f"step={STEPS}.ckpt", map_location="cpu", weights_only=False)
    assert set(saved["state_dict"]) == set(eager) and not any("_orig_mod" in k for k in saved["state_dict"])
    with torch._inductor.config.patch(fallback_random=True):
        _, resumed = fit(tiny_bert, toy_data, method, True, tmp_path / "resumed", ckpt=tmp_path / "compiled" / f"step={MID}.ckpt")
    for key in compiled:
        torch.testing.assert_close(resumed[key], compiled[key], rtol=0, atol=1e-6, msg=key)


def test_generation_runs_the_eager_forward_of_a_compiled_backbone(tiny_llama, toy_gsm8k) -> None:
    """Each decoding step grows the KV cache, so a compiled forward would recompile at every step:
    ``generate_ids`` runs the backbone eagerly (the same tokens as an uncompiled task) and leaves it
    compiled for training afterwards."""
    from lit_peft.data import GSM8KData
    from lit_peft.tasks import CausalLM

    data = GSM8KData(data_dir=str(toy_gsm8k), val_size=16, max_length=96, max_response_length=48, batch_size=4,
                     tokenizer=tiny_llama)
    data.setup("test")
    batch = next(iter(data.test_dataloader()))
    eager_task = CausalLM(backbone=tiny_llama, max_new_tokens=6)
    eager_task.configure_model()
    task = CausalLM(backbone=tiny_llama, max_new_tokens=6, compile=True)
    task.configure_model()
    compiled_calls = []

    def spy(*args, **kwargs):
        compiled_calls.append(1)
        return task.backbone._call_impl(*args, **kwargs)

    assert task.backbone._compiled_call_impl is not None  # compile: true compiled the backbone
    task.backbone._compiled_call_impl = spy
    task.backbone(input_ids=batch["prompt_input_ids"][:, :4])
    assert compiled_calls == [1]  # a plain call does go through the compiled forward
    generated = task.eval().generate_ids(batch)
    assert compiled_calls == [1]  # generation never did
    assert task.backbone._compiled_call_impl is spy  # and training stays compiled
    torch.testing.assert_close(generated, eager_task.eval().generate_ids(batch), rtol=0, atol=0)
