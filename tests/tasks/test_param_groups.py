"""Optimizer groups: LoRA+ ratios and per-module multipliers from the config, no decay on biases
and norms, typos in patterns caught."""

from __future__ import annotations

import pytest

from lit_peft import methods
from lit_peft.errors import ConfigError
from lit_peft.tasks import SequenceClassification


def groups_by_param(task) -> dict[str, tuple[float, float]]:
    optimizer = task.configure_optimizers()["optimizer"]
    ids = {id(p): n for n, p in task.named_parameters()}
    return {ids[id(p)]: (g["initial_lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}


def test_loraplus_and_value_multiplier(tiny_bert) -> None:
    task = SequenceClassification(backbone=tiny_bert, learning_rate=1e-3, weight_decay=0.1,
                                  lr_multipliers={"lora_B": 16, r"\.value\.": 4})
    methods.LoRA(r=4).attach(task)
    lrs = groups_by_param(task)
    assert set(lrs) == {n for n, p in task.named_parameters() if p.requires_grad}
    for name, (lr, wd) in lrs.items():
        expected = 1e-3 * (16 if "lora_B" in name else 1) * (4 if ".value." in name else 1)
        assert lr == pytest.approx(expected), name
        assert wd == (0.0 if name.endswith("bias") else 0.1), name
    assert sorted({round(lr, 6) for lr, _ in lrs.values()}) == [0.001, 0.004, 0.016, 0.064]


def test_a_pattern_that_matches_nothing_is_an_error(tiny_bert) -> None:
    task = SequenceClassification(backbone=tiny_bert, lr_multipliers={"lora_b": 16})
    methods.LoRA(r=4).attach(task)
    with pytest.raises(ConfigError, match=r"\['lora_b'\] match no trainable parameter"):
        task.configure_optimizers()


def test_dora_with_a_value_multiplier(tiny_bert) -> None:
    task = SequenceClassification(backbone=tiny_bert, learning_rate=1e-3, lr_multipliers={r"\.value\.": 2})
    methods.DoRA(r=4).attach(task)
    lrs = groups_by_param(task)
    magnitudes = {n: lr for n, (lr, _) in lrs.items() if "magnitude" in n}
    assert magnitudes and all(lr == pytest.approx(2e-3 if ".value." in n else 1e-3) for n, lr in magnitudes.items())


def test_weight_decay_multipliers_make_groups_from_the_config(tiny_bert) -> None:
    task = SequenceClassification(backbone=tiny_bert, learning_rate=1e-3, weight_decay=0.1,
                                  weight_decay_multipliers={"classifier": 0, "lora_A": 2})
    methods.LoRA(r=4).attach(task)
    decays = {name: wd for name, (_, wd) in groups_by_param(task).items()}
    for name, wd in decays.items():
        expected = 0.0 if name.endswith("bias") or "classifier" in name else 0.2 if "lora_A" in name else 0.1
        assert wd == pytest.approx(expected), name
    assert {round(wd, 6) for wd in decays.values()} == {0.0, 0.1, 0.2}
    typo = SequenceClassification(backbone=tiny_bert, weight_decay_multipliers={"clasifier": 0})
    methods.LoRA(r=4).attach(typo)
    with pytest.raises(ConfigError, match=r"weight_decay_multipliers pattern\(s\) \['clasifier'\] match no trainable"):
        typo.configure_optimizers()


def test_adamw_is_fused_and_gives_torchs_update(tiny_bert) -> None:
    """The task's AdamW is the fused kernel (as transformers' Trainer uses by default) and updates the
    weights as torch's per-tensor AdamW does with the same groups, to rounding."""
    import torch

    task = SequenceClassification(backbone=tiny_bert, learning_rate=1e-2, weight_decay=0.1, lr_schedule="constant",
                                  warmup_ratio=0.0)
    methods.LoRA(r=4).attach(task)
    optimizer = task.configure_optimizers()["optimizer"]
    assert all(g["fused"] for g in optimizer.param_groups)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    start = [p.detach().clone() for p in params]
    reference_params = [torch.nn.Parameter(p.clone()) for p in start]
    by_id = dict(zip(map(id, params), reference_params))
    reference = torch.optim.AdamW([{**{k: v for k, v in g.items() if k not in ("params", "fused", "initial_lr")},
                                    "params": [by_id[id(p)] for p in g["params"]]} for g in optimizer.param_groups],
                                  foreach=False)
    torch.manual_seed(0)
    for _ in range(3):
        for p, q in zip(params, reference_params):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        optimizer.step()
        reference.step()
    for p, q, s in zip(params, reference_params, start):
        assert not torch.equal(p, s)
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("precision, clip, fused", [("32-true", 1.0, True), ("bf16-mixed", None, True),
                                                    ("bf16-mixed", 1.0, False)])
def test_no_fused_adamw_where_lightning_refuses_to_clip_it(precision, clip, fused, tiny_bert, toy_data) -> None:
    """Lightning refuses gradient clipping under AMP with a fused optimizer; there the task falls
    back to torch's default AdamW, and the run trains."""
    from conftest import quiet_trainer
    from lit_peft.data import SST2Data

    task = SequenceClassification(backbone=tiny_bert, learning_rate=1e-3)
    trainer = quiet_trainer(max_steps=2, limit_val_batches=0, precision=precision, gradient_clip_val=clip,
                            callbacks=[methods.LoRA(r=4)])
    trainer.fit(task, datamodule=SST2Data(data_dir=str(toy_data), batch_size=8, limit_train_rows=16))
    assert trainer.global_step == 2
    assert all(bool(g["fused"]) == fused for g in trainer.optimizers[0].param_groups)


@pytest.mark.parametrize("saved_fused, now_fused", [(None, True), (True, False)])
def test_resuming_keeps_the_kind_of_adamw_built(saved_fused, now_fused, tiny_bert) -> None:
    """A checkpoint's optimizer state from the other kind of AdamW (a run saved before fused AdamW,
    or under AMP with clipping) loads into the kind this run built, and its next step is AdamW's."""
    import torch

    from lit_peft.tasks.base import adamw

    task = SequenceClassification(backbone=tiny_bert)
    methods.LoRA(r=4).attach(task)
    start = [p.detach().clone() for p in task.parameters() if p.requires_grad]
    torch.manual_seed(0)
    grads = [[torch.randn_like(p) for p in start] for _ in range(2)]

    def run(steps, kinds):
        """Two AdamW steps from ``start``; the optimizer is rebuilt (state dict round trip) between them."""
        params = [torch.nn.Parameter(p.clone()) for p in start]
        optimizer = None
        for grad, kind in zip(grads[:steps], kinds):
            rebuilt = kind(params)
            if optimizer is not None:
                rebuilt.load_state_dict(optimizer.state_dict())
            optimizer = rebuilt
            for p, g in zip(params, grad):
                p.grad = g.clone()
            optimizer.step()
        return params, optimizer

    def saved_kind(params):
        return torch.optim.AdamW([{"params": params, "weight_decay": 0.1}], lr=1e-2, fused=saved_fused)

    def our_kind(params):
        return adamw([{"params": params, "weight_decay": 0.1}], lr=1e-2, fused=bool(now_fused))

    reference, _ = run(2, [saved_kind, saved_kind])
    resumed, optimizer = run(2, [saved_kind, our_kind])
    assert [g["fused"] for g in optimizer.param_groups] == [True if now_fused else None]
    assert getattr(optimizer, "_step_supports_amp_scaling", False) == bool(now_fused)
    for p, r, s in zip(resumed, reference, start):
        assert not torch.equal(p, s)
        torch.testing.assert_close(p.detach(), r.detach(), rtol=1e-5, atol=1e-6)
