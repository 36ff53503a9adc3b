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
    task.use_method(methods.LoRA(r=4))
    assert task.loading_dtype() == expected
    assert SequenceClassification(backbone=tiny_bert, dtype="float16").loading_dtype() == "float16"  # asked: kept
    for trains_the_weights in (methods.FullFineTune(), methods.GaLore(rank=4), None):  # None: full fine-tuning
        full = SequenceClassification(backbone=tiny_bert)
        full._trainer = fake_trainer(device, precision)
        if trains_the_weights is not None:
            full.use_method(trains_the_weights)
        assert full.loading_dtype() == "float32"  # from the checkpoint's values, not bf16-rounded ones


def test_default_dtype_is_float32_under_fsdp1(tiny_bert, monkeypatch) -> None:
    """FSDP1's flat buffers hold one dtype; its mixed precision computes in bf16 from float32 storage."""
    from lightning.pytorch.strategies import FSDPStrategy

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(FSDPStrategy, "root_device", property(lambda self: torch.device("cuda", 0)))
    task = SequenceClassification(backbone=tiny_bert)
    task._trainer = SimpleNamespace(strategy=FSDPStrategy(), precision_plugin=SimpleNamespace(precision="bf16-mixed"))
    task.use_method(methods.LoRA(r=4))
    assert task.loading_dtype() == "float32"


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


@pytest.mark.parametrize("attn", [None, "sdpa", "eager"])
def test_attention_kernel_is_the_one_asked_for(tiny_bert, attn) -> None:
    """Unset, transformers chooses (sdpa where the architecture has it; eager for those that do not, which a
    forced sdpa would refuse to load)."""
    task = SequenceClassification(backbone=tiny_bert, attn_implementation=attn)
    assert task.configure_backbone().config._attn_implementation == (attn or "sdpa")


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


def test_a_forecaster_builds_empty_on_the_meta_device(tiny_timesfm) -> None:
    """What a rank other than 0 builds under FSDP: the forecasting task passes a model class, not an Auto class."""
    from transformers import TimesFmModelForPrediction

    from lit_peft import backbones

    model = backbones.load_model(tiny_timesfm, TimesFmModelForPrediction, dtype="float32", meta=True)
    real = TimesFmModelForPrediction.from_pretrained(tiny_timesfm)
    assert all(p.is_meta for p in model.parameters())
    assert {n: p.shape for n, p in model.named_parameters()} == {n: p.shape for n, p in real.named_parameters()}


def test_merge_and_export_rebuild_without_the_runs_training_options(tiny_llama) -> None:
    """A run with flash attention (not installed where the checkpoint is merged), gradient checkpointing and
    compile rebuilds for merge/export without them."""
    from lit_peft.export import for_inference
    from lit_peft.tasks.base import build

    spec = CausalLM(backbone=tiny_llama).spec()
    spec["init_args"].update(attn_implementation="flash_attention_2", gradient_checkpointing=True, compile=True)
    with pytest.raises(ConfigError, match="flash_attn"):
        build(spec)
    task = build(for_inference(spec))
    assert task.loading.attn_implementation is None and not task.gradient_checkpointing and not task.compile_backbone


def test_a_subclass_that_builds_its_own_model_without_super_is_told(tiny_bert, toy_data) -> None:
    from lit_peft.data import SST2Data

    class Mine(SequenceClassification):
        def configure_model(self) -> None:  # forgets super().configure_model(): the method would never apply
            if self.backbone is None:
                self.backbone = self.load_backbone()

    with pytest.raises(ConfigError, match="must call super\\(\\).configure_model\\(\\)"):
        quiet_trainer(max_steps=1, callbacks=[methods.LoRA(r=4)]).fit(
            Mine(backbone=tiny_bert), datamodule=SST2Data(data_dir=str(toy_data), batch_size=8, max_length=16))


def test_eva_reads_its_batches_on_the_cpu_whatever_the_default_device(tiny_bert, toy_data) -> None:
    """EVA runs in configure_model, under Lightning's root device as torch's default device (a GPU there); the
    samplers draw with CPU generators, which fail under another default device. The meta device stands in for
    the GPU here: the batches still come, on the CPU."""
    from lit_peft.data import SST2Data
    from lit_peft.methods.lora import _Unlabelled

    data = SST2Data(data_dir=str(toy_data), batch_size=8, max_length=16, tokenizer=tiny_bert)
    data.setup("fit")
    with torch.device("meta"):
        with pytest.raises(RuntimeError):  # the failure EVA met: a CPU generator under another default device
            next(iter(data.train_dataloader()))
        batches = list(_Unlabelled(data.train_dataloader))
    assert len(batches) == len(data.train_dataloader()) and batches[0]["input_ids"].device.type == "cpu"
    assert "labels" not in batches[0]
