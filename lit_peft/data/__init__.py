"""Data modules: one per data set family, plus loaders for the user's own files."""

from lit_peft.data.text_classification import RottenTomatoesData, SST2Data, TextClassificationData

__all__ = ["RottenTomatoesData", "SST2Data", "TextClassificationData"]
