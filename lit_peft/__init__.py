"""lit-peft: parameter-efficient fine-tuning as PyTorch Lightning modules.

A run is a task (LightningModule) + data (LightningDataModule) + method (Callback), wired by
``lit-peft fit --config X.yaml``.
"""

__version__ = "0.1.0"
