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
