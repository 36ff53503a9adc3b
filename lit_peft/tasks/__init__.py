"""Tasks: one LightningModule per task family, sharing ``PeftTask``."""

from lit_peft.tasks.base import PeftTask
from lit_peft.tasks.causal_lm import CausalLM
from lit_peft.tasks.classification import SequenceClassification

__all__ = ["CausalLM", "PeftTask", "SequenceClassification"]
