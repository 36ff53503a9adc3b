"""QLoRA (Dettmers et al. 2023, arXiv 2305.14314) and QDoRA: LoRA or DoRA on a backbone whose
linear layers are stored in 4 bits (NF4 or FP4, bitsandbytes), optionally with the quantization
constants quantized again (double quantization), computing in ``compute_dtype`` (by default the run's
precision: bf16 under the GPU presets' bf16-mixed, float32 under 32-true).

The backbone is quantized while it loads (transformers' ``BitsAndBytesConfig``), so the full
precision model is never materialised; the task head stays in full precision and trains. bitsandbytes
runs this on the CPU as well as on CUDA.

``merge`` dequantizes each 4-bit weight to full precision, then folds the adapter in: the merged
model reproduces the adapted quantized model (it carries the quantization error the adapters were
trained against) and is saved in the dtype asked for.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from lightning.pytorch import Trainer
from torch import nn

from lit_peft.backbones import torch_dtype
from lit_peft.errors import ConfigError
from lit_peft.methods.lora import LoRA
from lit_peft.methods.targets import Targets

#: modules never quantized: task heads and language-model heads
KEEP_FULL_PRECISION = ["classifier", "score", "pre_classifier", "qa_outputs", "lm_head"]


def exact_cpu_compute(model: nn.Module) -> nn.Module:
    """Keep bitsandbytes' CPU path on dequantize-then-matmul in the compute dtype.

    On CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights for a bf16 kernel the first time
    a layer runs in eval mode without gradients: evaluation would then compute differently from
    training (and layers narrower than a quantization block fail to repack). Turned off here.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


def dequantize_linear4bit(module: nn.Module) -> nn.Linear:
    """A plain ``nn.Linear`` holding the dequantized weight of a bitsandbytes ``Linear4bit``."""
    from peft.utils.integrations import dequantize_bnb_weight

    weight = dequantize_bnb_weight(module.weight, state=module.weight.quant_state).float()
    linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device=weight.device)
    linear.weight.data.copy_(weight)
    if module.bias is not None:
        linear.bias.data.copy_(module.bias.data.float())
    return linear


def check_quant_type(quant_type: str, compute_dtype: Optional[str]) -> None:
    if quant_type not in ("nf4", "fp4"):
        raise ConfigError(f"quant_type must be 'nf4' or 'fp4', got '{quant_type}'")
    if compute_dtype is not None:
        torch_dtype(compute_dtype)


def follow_precision(trainer: Optional[Trainer], compute_dtype: Optional[str]) -> str:
    """The 4-bit layers' compute dtype: as set, else the run's precision (bf16 under bf16-mixed or
    bf16-true, as on a GPU preset; float16 under 16-*; float32 otherwise, the CPU's default)."""
    if compute_dtype is not None:
        return compute_dtype
    precision = str(getattr(trainer.precision_plugin, "precision", "")) if trainer is not None else ""
    return "bfloat16" if precision.startswith("bf16") else "float16" if precision.startswith("16") else "float32"


def quantization_kwargs(trainer: Optional[Trainer], quant_type: str, double_quant: bool,
                        compute_dtype: Optional[str]) -> dict[str, Any]:
    """``from_pretrained`` arguments that quantize the linear layers to 4 bits while loading, on
    the trainer's device; task and language-model heads stay in full precision."""
    from transformers import BitsAndBytesConfig

    device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                bnb_4bit_use_double_quant=double_quant,
                                bnb_4bit_compute_dtype=torch_dtype(follow_precision(trainer, compute_dtype)),
                                llm_int8_skip_modules=KEEP_FULL_PRECISION)
    return {"quantization_config": config, "device_map": {"": device}}


def prepare_quantized(task) -> None:
    """peft's k-bit preparation (frozen base, full-precision norms and head), exact CPU compute."""
    from peft import prepare_model_for_kbit_training

    task.backbone = exact_cpu_compute(prepare_model_for_kbit_training(task.backbone, use_gradient_checkpointing=False))


def dequantized_twin(task, method):
    """A new full-precision task with ``method`` applied, the dequantized 4-bit weights of ``task``
    copied in at the same module names, and ``task``'s trained state loaded on top."""
    import bitsandbytes as bnb

    from lit_peft.tasks.base import build

    twin = build(task.spec())
    method.attach(twin)
    quantized = dict(task.backbone.named_modules())
    with torch.no_grad():
        for name, module in twin.backbone.named_modules():
            if isinstance(quantized.get(name), bnb.nn.Linear4bit):
                weight = dequantize_linear4bit(quantized[name]).weight  # (out, in)
                # GPT-2's Conv1D (quantized into a Linear4bit on load) stores its weight (in, out)
                module.weight.copy_(weight.T if type(module).__name__ == "Conv1D" else weight)
    twin.load_state_dict({k: v for k, v in task.state_dict().items() if k in task.trained_keys()}, strict=False)
    return twin


class QLoRA(LoRA):
    """LoRA on a 4-bit quantized backbone."""

    name = "qlora"
    training_only = frozenset({"dropout", "compute_dtype"})  # the dtype the 4-bit weights are computed in
    initializes_from_weights = True  # quantized while it loads
    merge_note = "the 4-bit base weights are dequantized before the adapter is merged"

    def __init__(self, r: int = 8, alpha: float = 16, dropout: float = 0.1, targets: Targets = "qv",
                 bias: str = "none", use_dora: bool = False, quant_type: str = "nf4", double_quant: bool = True,
                 compute_dtype: Optional[str] = None) -> None:
        super().__init__(r=r, alpha=alpha, dropout=dropout, targets=targets, bias=bias, use_dora=use_dora)
        check_quant_type(quant_type, compute_dtype)
        self.quant_type, self.double_quant, self.compute_dtype = quant_type, double_quant, compute_dtype

    def backbone_kwargs(self, trainer: Optional[Trainer] = None) -> dict[str, Any]:
        return quantization_kwargs(trainer, self.quant_type, self.double_quant, self.compute_dtype)

    def apply(self, task, trainer: Optional[Trainer]) -> None:
        prepare_quantized(task)
        super().apply(task, trainer)

    def merge(self, task) -> nn.Module:
        """A full-precision twin (same backbone, plain LoRA/DoRA) gets the dequantized base weights
        and the trained state, then peft merges it as usual."""
        twin = dequantized_twin(task, LoRA(r=self.r, alpha=self.alpha, dropout=self.dropout, targets=self.targets,
                                           bias=self.bias, use_dora=self.use_dora))
        print(f"[lit-peft] {self.name} merge: dequantized the {self.quant_type} 4-bit base weights before merging")
        return twin.backbone.merge_and_unload()


class QDoRA(QLoRA):
    """DoRA on a 4-bit quantized backbone."""

    name = "qdora"

    def __init__(self, r: int = 8, alpha: float = 16, dropout: float = 0.1, targets: Targets = "qv",
                 bias: str = "none", quant_type: str = "nf4", double_quant: bool = True,
                 compute_dtype: Optional[str] = None) -> None:
        super().__init__(r=r, alpha=alpha, dropout=dropout, targets=targets, bias=bias, use_dora=True,
                         quant_type=quant_type, double_quant=double_quant, compute_dtype=compute_dtype)
