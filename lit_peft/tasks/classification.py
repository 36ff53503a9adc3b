"""Sequence classification: a transformers ``AutoModelForSequenceClassification`` backbone,
cross-entropy loss, accuracy and F1 (torchmetrics) per stage, class predictions from ``predict``.

``pooling: mean`` feeds the head the mean of the last hidden states over the real tokens instead of
the model's own pooler (BERT's: a dense + tanh layer on the CLS token). Sentence encoders such as
all-MiniLM-L6-v2 were trained to be read that way, and their pooler was never trained for the CLS
token: read through it, a frozen encoder gives a linear probe nearly nothing to separate (SST-2: 0.52).
transformers has no switch for it, so ``MeanPooler`` takes the pooler's place in the model.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn

from lit_peft import backbones
from lit_peft.errors import ConfigError
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from lit_peft.tasks.base import PeftTask


class MeanPooler(nn.Module):
    """Stands where a BERT-family model keeps its pooler: the mean of the hidden states over the tokens
    the attention mask keeps. The model calls its pooler with the hidden states alone, so a forward
    pre-hook on the encoder (``attach``) hands it each call's mask."""

    def __init__(self) -> None:
        super().__init__()
        self.mask: Optional[torch.Tensor] = None

    def attach(self, encoder: nn.Module) -> None:
        def keep_mask(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self.mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        encoder.register_forward_pre_hook(keep_mask, with_kwargs=True)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        mask = self.mask
        if mask is None or mask.dim() != 2:
            return hidden_states.mean(dim=1)
        weights = mask.to(hidden_states.dtype).unsqueeze(-1)
        return (hidden_states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def use_mean_pooling(model: nn.Module) -> None:
    """Put a ``MeanPooler`` where ``model``'s encoder keeps its pooler; one line where it has none."""
    encoder = model.base_model
    if getattr(encoder, "pooler", None) is None:
        raise ConfigError(f"pooling: mean needs a BERT-family encoder with a pooler; {type(model).__name__} pools by "
                          "its own rule (the last token, or a head on the first): use pooling: cls")
    pooler = MeanPooler()
    pooler.attach(encoder)
    encoder.pooler = pooler


class SequenceClassification(PeftTask):
    """Classify a text (or a text pair) into ``num_labels`` classes."""

    task_name = "classification"
    peft_task_type = "SEQ_CLS"

    def __init__(
        self,
        backbone: str = "minilm",
        num_labels: int = 2,
        pooling: Literal["cls", "mean"] = "cls",
        dtype: str = "default",
        learning_rate: float = 1e-4,
        weight_decay: float = 0.01,
        lr_schedule: Literal["linear", "cosine", "constant"] = "linear",
        warmup_ratio: float = 0.06,
        lr_multipliers: Optional[dict[str, float]] = None,
        weight_decay_multipliers: Optional[dict[str, float]] = None,
        compile: bool = False,
        attn_implementation: Optional[str] = None,
        revision: Optional[str] = None,
        trust_remote_code: bool = False,
        gradient_checkpointing: bool = False,
        optimizer: Optional[OptimizerCallable] = None,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
    ) -> None:
        """
        Args:
            num_labels: number of classes; labels in the data must lie in [0, num_labels).
            pooling: what the head reads: ``cls``, the model's own (BERT's pooler on the CLS token, GPT-2's
                last token), or ``mean``, the mean of the last hidden states over the real tokens (what
                sentence encoders such as MiniLM were trained for; BERT-family models).
        """
        super().__init__(backbone=backbone, dtype=dtype, learning_rate=learning_rate, weight_decay=weight_decay,
                         lr_schedule=lr_schedule, warmup_ratio=warmup_ratio, lr_multipliers=lr_multipliers,
                         weight_decay_multipliers=weight_decay_multipliers, compile=compile, attn_implementation=attn_implementation, revision=revision,
                         trust_remote_code=trust_remote_code, gradient_checkpointing=gradient_checkpointing,
                         optimizer=optimizer, lr_scheduler=lr_scheduler)
        if num_labels < 2:
            raise ConfigError(f"num_labels must be at least 2, got {num_labels}")
        self.num_labels = num_labels
        self.pooling = pooling
        # f1 is macro F1 (the mean of each class's F1) for any number of labels, two included: torchmetrics'
        # binary F1 is the positive class's alone, which scores 0 a model that always says "negative"
        metrics = lambda: torchmetrics.MetricCollection({  # noqa: E731
            "acc": torchmetrics.Accuracy(task="multiclass", num_classes=num_labels),
            "f1": torchmetrics.F1Score(task="multiclass", num_classes=num_labels, average="macro"),
        })
        self.train_metrics, self.val_metrics, self.test_metrics = metrics(), metrics(), metrics()

    def load_backbone(self, **kwargs: Any) -> nn.Module:
        from transformers import AutoModelForSequenceClassification

        model = backbones.load_model(self.backbone_name, AutoModelForSequenceClassification, dtype=self.loading_dtype(),
                                     num_labels=self.num_labels, **self.hub_kwargs(), **kwargs)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = self.tokenizer.pad_token_id
        if self.pooling == "mean":
            use_mean_pooling(model)
        return model

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None and hasattr(datamodule, "check_labels"):
            datamodule.check_labels(self.num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **inputs: torch.Tensor) -> torch.Tensor:
        """Class logits."""
        return self.backbone(input_ids=input_ids, attention_mask=attention_mask, **inputs).logits

    def _inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v for k, v in batch.items() if k != "labels"}

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(self(**self._inputs(batch)).float(), batch["labels"])

    def step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        logits = self(**self._inputs(batch))
        loss = F.cross_entropy(logits.float(), batch["labels"])
        preds = logits.argmax(dim=-1)
        getattr(self, f"{stage}_metrics").update(preds, batch["labels"])
        size = batch["labels"].shape[0]
        self.log_mean(f"{stage}_loss", loss, size, on_step=stage == "train", prog_bar=True)
        return loss

    def _log_epoch_metrics(self, stage: str) -> None:
        self.log_accumulated(getattr(self, f"{stage}_metrics"), lambda values: {f"{stage}_{k}": v for k, v in values.items()},
                             prog_bar=stage != "train")

    def on_train_epoch_end(self) -> None:
        self._log_epoch_metrics("train")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch_metrics("test")

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        probs = self(**self._inputs(batch)).float().softmax(dim=-1)
        return {"pred": probs.argmax(dim=-1).tolist(), "probs": probs.tolist()}
