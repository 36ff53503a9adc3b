"""Every YAML in configs/ parses and instantiates with the code that reads it (as LitGPT tests
its config hub): model, data, method and trainer, and trainer presets on top of a task config."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lit_peft.cli import LitPeftCLI, trainer_defaults
from lit_peft.methods import Method

ROOT = Path(__file__).resolve().parents[1]
TASK_CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
TRAINER_PRESETS = sorted((ROOT / "configs" / "trainer").glob("*.yaml"))


def instantiate(*configs: Path, extra: tuple[str, ...] = ()):
    from lightning.pytorch import LightningDataModule, LightningModule

    args = [a for c in configs for a in ("--config", str(c))] + list(extra)
    return LitPeftCLI(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                      auto_configure_optimizers=False, trainer_defaults=trainer_defaults(), run=False, args=args)


def test_every_method_has_an_sst2_config() -> None:
    names = {p.stem for p in TASK_CONFIGS}
    for method in ("full", "linear_probe", "partial", "lora", "dora", "rslora", "pissa", "olora", "eva", "adalora",
                   "ia3", "loha", "qlora", "qdora", "galore", "sift", "rosa", "houlsby", "loraplus"):
        assert f"{method}_sst2" in names
    for name in ("lora_gsm8k", "dora_gsm8k", "qlora_gsm8k", "qdora_gsm8k", "galore_gsm8k", "rosa_gsm8k", "sift_gsm8k",
                 "houlsby_gsm8k", "loraplus_gsm8k", "lora_news", "qlora_news", "pretrain_timesfm_small", "full_etth1",
                 "linear_probe_etth1", "lora_etth1", "dora_etth1", "lora_own_series", "lora_chat"):
        assert name in names


@pytest.mark.parametrize("config", TASK_CONFIGS, ids=lambda p: p.name)
def test_config_instantiates(config: Path) -> None:
    if "../shared/" in config.read_text() and not (ROOT.parent / "shared").is_dir():
        pytest.skip(f"{config.name} reads ../shared/data, which is absent in this checkout")
    cli = instantiate(config, extra=("--trainer.accelerator", "cpu"))
    methods = [c for c in cli.trainer.callbacks if isinstance(c, Method)]
    assert len(methods) == 1
    # pretrain_*.yaml trains every weight of a model built from a config
    assert config.stem.startswith("pretrain_" if methods[0].name == "full" and "from_config" in config.read_text()
                                  else methods[0].name)
    assert (cli.model.tokenizer is not None) is cli.model.uses_tokenizer and cli.datamodule is not None


@pytest.mark.parametrize("preset", TRAINER_PRESETS, ids=lambda p: p.name)
def test_trainer_preset_parses_on_top_of_a_task_config(preset: Path, capsys) -> None:
    """GPU presets cannot build a Trainer here; their parsed values must still be what they say."""
    from lit_peft.cli import main

    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", str(ROOT / "configs" / "lora_sst2.yaml"), "--config", str(preset), "--print_config"])
    assert done.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    expected = yaml.safe_load(preset.read_text())["trainer"]
    for key, value in expected.items():
        got = printed["trainer"][key]
        assert (got["class_path"].endswith(value["class_path"].rsplit(".", 1)[1]) if isinstance(value, dict) else got == value), key
    assert printed["method"]["class_path"] == "lit_peft.methods.LoRA"
