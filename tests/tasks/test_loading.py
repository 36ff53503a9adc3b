"""How a backbone loads: the dtype (``default`` follows the run's device and precision, ``auto`` is the
checkpoint's own), the attention kernel, weights that train kept in float32 under mixed precision, QLoRA's
compute dtype following the precision, and gradient checkpointing on every task (same gradients)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from conftest import quiet_trainer
from lit_peft import methods
from lit_peft.errors import ConfigError
from lit_peft.tasks import CausalLM, Forecasting, SequenceClassification


def fake_trainer(device: str, precision: str):
    return SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device)),
                           precision_plugin=SimpleNamespace(precision=precision))


@pytest.mark.parametrize("device,precision,bf16_ok,expected", [
    ("cpu", "bf16-mixed", True, "float32"),      # the CPU keeps float32 unless asked
    ("cuda", "bf16-mixed", True, "bfloat16"),    # the GPU presets
    ("cuda", "bf16-true", True, "bfloat16"),
    ("cuda", "bf16-mixed", False, "float32"),    # a GPU without bf16 (V100): float32
    ("cuda", "16-mixed", False, "float16"),
    ("cuda", "32-true", True, "float32"),
])
def test_default_dtype_follows_the_device_and_precision(tiny_bert, monkeypatch, device, precision, bf16_ok, expected) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_ok)
    task = SequenceClassification(backbone=tiny_bert)
    task._trainer = fake_trainer(device, precision)
    assert task.loading_dtype() == expected
    assert SequenceClassification(backbone=tiny_bert, dtype="float16").loading_dtype() == "float16"  # asked: kept


def test_auto_dtype_is_the_checkpoints_own(tiny_bert, tmp_path) -> None:
    from transformers import AutoModelForSequenceClassification

    AutoModelForSequenceClassification.from_pretrained(tiny_bert, dtype=torch.bfloat16).save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_bytes((__import__("pathlib").Path(tiny_bert) / "tokenizer.json").read_bytes())
    for name in ("tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        source = __import__("pathlib").Path(tiny_bert) / name
        if source.exists():
            (tmp_path / name).write_bytes(source.read_bytes())
    assert SequenceClassification(backbone=str(tmp_path), dtype="auto").configure_backbone().dtype == torch.bfloat16
    assert SequenceClassification(backbone=str(tmp_path)).configure_backbone().dtype == torch.float32  # CPU default


def test_bad_loading_options_are_one_line(tiny_bert) -> None:
    with pytest.raises(ConfigError, match="unknown dtype 'bf16'.*auto, default"):
        SequenceClassification(backbone=tiny_bert, dtype="bf16")
    with pytest.raises(ConfigError, match="unknown attn_implementation 'spda'"):
        SequenceClassification(backbone=tiny_bert, attn_implementation="spda")
    with pytest.raises(ConfigError, match="flash_attention_2' needs the flash_attn package"):
        SequenceClassification(backbone=tiny_bert, attn_implementation="flash_attention_2")


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_attention_kernel_is_the_one_asked_for(tiny_bert, attn) -> None:
    task = SequenceClassification(backbone=tiny_bert, attn_implementation=attn)
    assert task.configure_backbone().config._attn_implementation == attn


def test_bf16_mixed_keeps_frozen_weights_in_bf16_and_trains_float32(tiny_bert, toy_data) -> None:
    """On the CPU too when asked: bf16 weights, bf16 autocast; LoRA and the head train in float32."""
    from lit_peft.data import SST2Data

    task = SequenceClassification(backbone=tiny_bert, dtype="bfloat16", learning_rate=1e-2, warmup_ratio=0.0)
    method = methods.LoRA(r=4, alpha=8)
    quiet_trainer(max_steps=4, precision="bf16-mixed", callbacks=[method]).fit(
        task, datamodule=SST2Data(data_dir=str(toy_data), batch_size=16, max_length=16))
    trained = {n: p.dtype for n, p in task.named_parameters() if p.requires_grad}
    frozen = {p.dtype for p in task.parameters() if not p.requires_grad}
    assert trained and set(trained.values()) == {torch.float32}, trained
    assert frozen == {torch.bfloat16}
    assert any("lora_B" in n for n in trained)
    assert all(p.abs().sum() > 0 for n, p in task.named_parameters() if "lora_B" in n)  # they moved from 0


@pytest.mark.parametrize("precision,compute", [("32-true", torch.float32), ("bf16-mixed", torch.bfloat16),
                                               ("16-mixed", torch.float16)])
def test_qlora_computes_in_the_runs_precision_unless_set(precision, compute) -> None:
    trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu")),
                              precision_plugin=SimpleNamespace(precision=precision))
    config = methods.QLoRA().backbone_kwargs(trainer)["quantization_config"]
    assert config.bnb_4bit_compute_dtype == compute
    assert methods.QLoRA(compute_dtype="float32").backbone_kwargs(trainer)["quantization_config"].bnb_4bit_compute_dtype == torch.float32


def _grads(task, batch_loss) -> dict[str, torch.Tensor]:
    task.zero_grad()
    batch_loss().backward()
    from lit_peft.sharding import canonical

    return {canonical(n): p.grad.clone() for n, p in task.named_parameters() if p.requires_grad and p.grad is not None}


def _same_gradients(make, loss) -> None:
    plain, checkpointed = make(False), make(True)
    checkpointed.load_state_dict(plain.state_dict())
    torch.manual_seed(0)
    expected = _grads(plain, lambda: loss(plain))
    torch.manual_seed(0)
    got = _grads(checkpointed, lambda: loss(checkpointed))
    assert expected.keys() == got.keys() and expected
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_gradient_checkpointing_on_classification(tiny_bert) -> None:
    def make(on: bool):
        task = SequenceClassification(backbone=tiny_bert, gradient_checkpointing=on)
        methods.LoRA(r=4, dropout=0.0).attach(task)
        base = task.backbone.get_base_model()
        assert getattr(base, "is_activation_checkpointing", None) is on or base.is_gradient_checkpointing is on
        return task.eval()

    batch = {"input_ids": torch.randint(5, 1000, (4, 12)), "attention_mask": torch.ones(4, 12, dtype=torch.long),
             "labels": torch.tensor([0, 1, 0, 1])}
    _same_gradients(make, lambda task: task.loss(batch))


def test_gradient_checkpointing_on_forecasting_wraps_blocks_and_saves_canonical_names(tiny_timesfm) -> None:
    """TimesFM has no transformers gradient checkpointing: torch's checkpoint_wrapper goes around each block."""
    def make(on: bool):
        task = Forecasting(backbone=tiny_timesfm, gradient_checkpointing=on)
        methods.LoRA(r=4, dropout=0.0).attach(task)
        return task.eval()

    task = make(True)
    assert any("_checkpoint_wrapped_module" in n for n, _ in task.named_parameters())
    assert not any("_checkpoint_wrapped_module" in k for k in task.trained_keys())
    assert task.trained_keys() == make(False).trained_keys()
    batch = {"past_values": torch.randn(3, 64), "future_values": torch.randn(3, 32), "freq": torch.zeros(3, dtype=torch.long)}
    _same_gradients(make, lambda t: t.loss(batch))


def test_gradient_checkpointing_on_a_causal_lm_keeps_the_checkpoint_portable(tiny_llama, tmp_path) -> None:
    task = CausalLM(backbone=tiny_llama, gradient_checkpointing=True)
    methods.LoRA(r=4).attach(task)
    assert task.backbone.config.use_cache is False
    plain = CausalLM(backbone=tiny_llama)
    methods.LoRA(r=4).attach(plain)
    assert task.trained_keys() == plain.trained_keys()
