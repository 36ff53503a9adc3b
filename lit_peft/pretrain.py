"""``SaveBackbone``: at the end of a fit, save the trained backbone as a transformers model folder,
by default to the cache folder of a backbone alias lit-peft pretrains itself (``timesfm-small``),
so later configs name it as their backbone. Lightning's checkpoints hold a run's trained state in
Lightning's format; this writes the plain ``from_pretrained`` folder, whole or not at all, with a
note of how it was made.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Optional

from lightning.pytorch import Callback, LightningModule, Trainer

from lit_peft import backbones
from lit_peft.errors import ConfigError


class SaveBackbone(Callback):
    def __init__(self, alias: Optional[str] = "timesfm-small", path: Optional[str] = None) -> None:
        """
        Args:
            alias: save to this packaged alias's cache folder (``$LIT_PEFT_CACHE/<alias>``).
            path: or to this folder instead.
        """
        super().__init__()
        if (alias is None) == (path is None):
            raise ConfigError("SaveBackbone needs exactly one of alias and path")
        self.alias, self.path = alias, path

    @property
    def folder(self) -> Path:
        return Path(self.path) if self.path is not None else backbones.cache_dir() / self.alias

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit" and (self.folder / "config.json").exists():  # checked before training, not after
            raise ConfigError(f"{self.folder} already holds a model; it is kept as it is. Move it away to pretrain "
                              "again, or give SaveBackbone another path")
        self._start = time.perf_counter()

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero or trainer.interrupted:
            return
        model = pl_module.backbone.get_base_model() if hasattr(pl_module.backbone, "get_base_model") else pl_module.backbone
        folder = self.folder
        tmp = folder.with_name(folder.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(str(tmp), safe_serialization=True)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
        note = {"made_by": "lit-peft fit (SaveBackbone)", "steps": trainer.global_step, "epochs": trainer.current_epoch,
                "seconds": round(time.perf_counter() - self._start, 1), "metrics": metrics,
                "data": type(trainer.datamodule).__name__ if trainer.datamodule is not None else None,
                "data_series": list(getattr(getattr(trainer.datamodule, "cfg", None), "series", []) or [])}
        (tmp / "lit_peft_pretraining.json").write_text(json.dumps(note, indent=2) + "\n")
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(folder)
        print(f"[lit-peft] saved the pretrained backbone to {folder}")
