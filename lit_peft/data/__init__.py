"""Data modules: one per data set family, plus loaders for the user's own files."""

from lit_peft.data.forecasting import ForecastingData
from lit_peft.data.gsm8k import GSM8KData
from lit_peft.data.instructions import InstructionData
from lit_peft.data.pretraining_corpus import PretrainingCorpusData
from lit_peft.data.prompts import PromptResponseData
from lit_peft.data.summarization import SummarizationData
from lit_peft.data.text_classification import RottenTomatoesData, SST2Data, TextClassificationData

__all__ = ["ForecastingData", "GSM8KData", "InstructionData", "PretrainingCorpusData", "PromptResponseData", "RottenTomatoesData", "SST2Data", "SummarizationData",
           "TextClassificationData"]
