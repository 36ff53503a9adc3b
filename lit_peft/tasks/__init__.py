"""Tasks: one LightningModule per task family, sharing ``PeftTask``."""

from lit_peft.tasks.base import PeftTask
from lit_peft.tasks.classification import SequenceClassification

__all__ = ["PeftTask", "SequenceClassification"]
