"""Target presets resolve per architecture; bad targets and settings get clear errors; AdaLoRA's
rank budget really shrinks to target_r on the trainer's steps; schedules have their shape."""

from __future__ import annotations

import pytest

from conftest import quiet_trainer
from lit_peft import methods
from lit_peft.data import SST2Data
from lit_peft.errors import ConfigError
from lit_peft.methods.targets import resolve_targets
from lit_peft.schedules import warmup_then
from lit_peft.tasks import SequenceClassification


def tiny(kind: str):
    from transformers import (BertConfig, BertForSequenceClassification, DistilBertConfig,
                              DistilBertForSequenceClassification, LlamaConfig, LlamaForSequenceClassification)

    if kind == "bert":
        return BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=2,
                                                        num_attention_heads=2, intermediate_size=32))
    if kind == "llama":
        return LlamaForSequenceClassification(LlamaConfig(vocab_size=100, hidden_size=16, num_hidden_layers=2,
                                                          num_attention_heads=2, num_key_value_heads=2,
                                                          intermediate_size=32, pad_token_id=0))
    return DistilBertForSequenceClassification(DistilBertConfig(vocab_size=100, dim=16, n_layers=2, n_heads=2,
                                                                hidden_dim=32))


@pytest.mark.parametrize("kind, qv, qkv", [
    ("bert", ["query", "value"], ["key", "query", "value"]),
    ("llama", ["q_proj", "v_proj"], ["k_proj", "q_proj", "v_proj"]),
    ("distilbert", ["q_lin", "v_lin"], ["k_lin", "q_lin", "v_lin"]),
])
def test_presets_resolve_per_architecture(kind, qv, qkv) -> None:
    model = tiny(kind)
    assert resolve_targets(model, "qv") == qv
    assert resolve_targets(model, "qkv") == qkv
    heads = ("classifier", "score", "pre_classifier")
    every = resolve_targets(model, "all-linear", exclude=heads)
    assert every and not any(n.split(".")[0] in heads for n in every)


def test_explicit_and_unknown_targets() -> None:
    model = tiny("bert")
    assert resolve_targets(model, ["query", "attention.output.dense"]) == ["query", "attention.output.dense"]
    with pytest.raises(ConfigError, match="unknown target module 'quer'.*Linear layers are named: classifier, dense, key, query, value"):
        resolve_targets(model, ["quer"])
    with pytest.raises(ConfigError, match="unknown target preset 'qk'"):
        resolve_targets(model, "qk")


def test_bad_method_settings() -> None:
    with pytest.raises(ConfigError, match="rank r must be a positive"):
        methods.LoRA(r=0)
    with pytest.raises(ConfigError, match="target_r <= init_r"):
        methods.AdaLoRA(init_r=4, target_r=8)
    with pytest.raises(ConfigError, match="cannot import 'peft.NoSuchConfig'"):
        methods.PeftMethod("peft.NoSuchConfig")


def test_partial_errors_name_the_module(tiny_bert) -> None:
    task = SequenceClassification(backbone=tiny_bert)
    with pytest.raises(ConfigError, match="no module named 'embedings'"):
        methods.PartialFineTune(last_n_blocks=0, modules=["embedings"]).attach(task)
    task = SequenceClassification(backbone=tiny_bert)
    with pytest.raises(ConfigError, match="only 2 blocks"):
        methods.PartialFineTune(last_n_blocks=3).attach(task)


def test_adalora_prunes_to_the_target_budget(tiny_bert, toy_data) -> None:
    """init_r=4 on 4 modules (16 singular values) is pruned to target_r=2 on average: 8 kept."""
    task = SequenceClassification(backbone=tiny_bert, learning_rate=2e-2, warmup_ratio=0.0)
    method = methods.AdaLoRA(init_r=4, target_r=2, alpha=8, tinit=4, tfinal=8, delta_t=2)
    quiet_trainer(max_epochs=2, callbacks=[method]).fit(task, datamodule=SST2Data(data_dir=str(toy_data), batch_size=16))
    config = task.backbone.peft_config["default"]
    assert config.total_step == 32  # read from the trainer: 2 epochs of 16 steps
    kept = sum(int((p != 0).sum()) for n, p in task.backbone.named_parameters() if "lora_E" in n)
    assert kept == 2 * 4
    assert sum(sum(bool(x) for x in m) for m in config.rank_pattern.values()) == 8


@pytest.mark.parametrize("max_epochs, tinit, tfinal", [(1, 1, 4), (2, 3, 9)])  # 16 and 32 steps
def test_adalora_schedule_as_fractions_fits_the_runs_length(tiny_bert, toy_data, max_epochs, tinit, tfinal) -> None:
    """The shipped config gives tinit / tfinal as fractions of the run (0.1, 0.3), so a run of any length
    prunes on schedule (in steps, 200 + 500 refused every run under 700 steps)."""
    task = SequenceClassification(backbone=tiny_bert, learning_rate=2e-2, warmup_ratio=0.0)
    method = methods.AdaLoRA(init_r=4, target_r=2, alpha=8, tinit=0.1, tfinal=0.3, delta_t=2)
    quiet_trainer(max_epochs=max_epochs, callbacks=[method]).fit(
        task, datamodule=SST2Data(data_dir=str(toy_data), batch_size=16))
    config = task.backbone.peft_config["default"]
    assert (config.total_step, config.tinit, config.tfinal) == (16 * max_epochs, tinit, tfinal)
    kept = sum(int((p != 0).sum()) for n, p in task.backbone.named_parameters() if "lora_E" in n)
    assert kept == 2 * 4  # pruned to the target budget by the end


@pytest.mark.parametrize("tinit, tfinal, says", [(0.6, 0.5, "sum must be below 1"), (1.5, 0.1, "fractions"),
                                                 (-1, 2, "integers >= 0")])
def test_a_bad_adalora_schedule_is_one_line(tinit, tfinal, says) -> None:
    from lit_peft.errors import ConfigError

    with pytest.raises(ConfigError, match=says):
        methods.AdaLoRA(tinit=tinit, tfinal=tfinal)


@pytest.mark.parametrize("max_epochs", [1, 2])
def test_galore_projection_gap_as_a_fraction_fits_the_runs_length(tiny_bert, toy_data, max_epochs) -> None:
    """update_proj_gap: 0.25 refreshes each projection four times over the run, whatever its length (200
    steps never refreshed a 125-step run after the first projection)."""
    task = SequenceClassification(backbone=tiny_bert, learning_rate=1e-3, warmup_ratio=0.0)
    method = methods.GaLore(rank=4, update_proj_gap=0.25, scale=1.0)
    svds = []
    from galore_torch.galore_projector import GaLoreProjector

    original = GaLoreProjector.get_orthogonal_matrix

    def counted(self, *args, **kwargs):
        svds.append(self.update_proj_gap)
        return original(self, *args, **kwargs)

    GaLoreProjector.get_orthogonal_matrix = counted
    try:
        quiet_trainer(max_epochs=max_epochs, callbacks=[method]).fit(
            task, datamodule=SST2Data(data_dir=str(toy_data), batch_size=16))
    finally:
        GaLoreProjector.get_orthogonal_matrix = original
    steps = 16 * max_epochs
    projected = len(method.projected)
    assert set(svds) == {steps // 4}
    assert len(svds) == 4 * projected  # at steps 0, 1/4, 2/4 and 3/4 of the run, for every projected matrix


@pytest.mark.parametrize("gap", [0, 1.5, -0.5])
def test_a_bad_galore_gap_is_one_line(gap) -> None:
    from lit_peft.errors import ConfigError

    with pytest.raises(ConfigError, match="update_proj_gap must be a number of steps"):
        methods.GaLore(update_proj_gap=gap)


def test_adalora_orthogonality_regularizer(tiny_bert) -> None:
    task = SequenceClassification(backbone=tiny_bert)
    method = methods.AdaLoRA(init_r=4, target_r=2, orth_reg_weight=0.5)
    method.attach(task)
    reg = method.regularization(task)
    assert reg is not None and reg.requires_grad and float(reg) > 0
    reg.backward()
    grads = [p.grad for n, p in task.named_parameters() if "lora_A" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("shape", ["linear", "cosine", "constant"])
def test_schedule_shapes(shape) -> None:
    factor = warmup_then(shape, warmup_ratio=0.1, total_steps=lambda: 100)
    values = [factor(s) for s in range(101)]
    assert values[0] == 0.0 and values[5] == pytest.approx(0.5) and values[10] == pytest.approx(1.0)
    assert values[100] == pytest.approx({"linear": 0.0, "cosine": 0.0, "constant": 1.0}[shape])
    assert values[55] == pytest.approx({"linear": 0.5, "cosine": 0.5, "constant": 1.0}[shape])


def test_a_warmup_of_zero_steps_does_not_spend_the_first_step_at_learning_rate_zero() -> None:
    """0.03 of 20 steps is 0 warm-up steps: once the length is known, the first step takes the full rate
    (before, the step-0 factor was fixed at 0 whenever the ratio was above 0)."""
    import torch

    from lit_peft.schedules import lazy_schedule, settle

    for ratio, total, first in ((0.03, 20, 1.0), (0.1, 100, 0.0)):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
        scheduler = lazy_schedule(optimizer, "linear", ratio, lambda: total)
        settle(scheduler)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * first)
        assert scheduler.get_last_lr() == [optimizer.param_groups[0]["lr"]]
