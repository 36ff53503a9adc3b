"""Tasks: one LightningModule per task family, sharing ``PeftTask``."""

from lit_peft.tasks.base import PeftTask
from lit_peft.tasks.causal_lm import CausalLM
from lit_peft.tasks.classification import SequenceClassification
from lit_peft.tasks.forecasting import Forecasting

__all__ = ["CausalLM", "Forecasting", "PeftTask", "SequenceClassification"]
