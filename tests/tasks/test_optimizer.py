"""The optimizer and scheduler are configurable by class path (LightningCLI's ``OptimizerCallable`` and
``LRSchedulerCallable``) and are built over the method's parameter groups; GaLore keeps its own and refuses
another; the presets in configs/optim/ parse and train."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from lit_peft import methods
from lit_peft.errors import ConfigError
from lit_peft.tasks import SequenceClassification

ROOT = Path(__file__).resolve().parents[2]


def test_an_optimizer_by_class_path_gets_the_methods_groups(tiny_bert) -> None:
    task = SequenceClassification(backbone=tiny_bert, learning_rate=1e-3, weight_decay=0.1, lr_multipliers={"lora_B": 16},
                                  optimizer=functools.partial(torch.optim.SGD, lr=0.5, momentum=0.9))
    methods.LoRA(r=4).attach(task)
    optimizer = task.configure_optimizers()["optimizer"]
    assert type(optimizer) is torch.optim.SGD and optimizer.defaults["momentum"] == 0.9
    ids = {id(p): n for n, p in task.named_parameters()}
    for group in optimizer.param_groups:  # the groups' own rates win over the class's lr=0.5
        for p in group["params"]:
            assert group["initial_lr"] == pytest.approx(1e-3 * (16 if "lora_B" in ids[id(p)] else 1))
    assert {ids[id(p)] for g in optimizer.param_groups for p in g["params"]} == \
        {n for n, p in task.named_parameters() if p.requires_grad}
    assert "optimizer" not in task.hparams  # the run's choice, not what rebuilds the model


def test_a_scheduler_by_class_path_replaces_the_warmup_schedule(tiny_bert) -> None:
    task = SequenceClassification(backbone=tiny_bert, learning_rate=1e-3,
                                  lr_scheduler=functools.partial(torch.optim.lr_scheduler.StepLR, step_size=2, gamma=0.5))
    methods.LoRA(r=4).attach(task)
    config = task.configure_optimizers()
    scheduler = config["lr_scheduler"]["scheduler"]
    assert type(scheduler) is torch.optim.lr_scheduler.StepLR and config["lr_scheduler"]["interval"] == "step"
    for _ in range(2):
        config["optimizer"].step()
        scheduler.step()
    assert config["optimizer"].param_groups[0]["lr"] == pytest.approx(5e-4)


def test_galore_with_another_optimizer_is_one_clear_error(tiny_bert) -> None:
    task = SequenceClassification(backbone=tiny_bert, optimizer=torch.optim.AdamW)
    methods.GaLore(rank=4).attach(task)
    with pytest.raises(ConfigError, match="method 'galore' brings its own optimizer.*remove it"):
        task.configure_optimizers()


@pytest.mark.parametrize("preset,cls", [("adamw-fused", "AdamW"), ("adamw-8bit", "AdamW8bit"), ("paged-adamw-8bit", "PagedAdamW8bit")])
def test_optimizer_presets_train_through_the_cli(preset, cls, tiny_bert, toy_data, tmp_path) -> None:
    """A 3-step `lit-peft fit` with the preset stacked on a task config: the run's optimizer is the preset's,
    and the adapters moved."""
    from lit_peft.cli import LitPeftCLI, trainer_defaults
    from lightning.pytorch import LightningDataModule, LightningModule

    args = ["fit", "--config", str(ROOT / "configs" / "lora_sst2.yaml"), "--config", str(ROOT / "configs" / "optim" / f"{preset}.yaml"),
            "--model.init_args.backbone", tiny_bert, "--data.init_args.data_dir", str(toy_data),
            "--data.init_args.tokenizer", tiny_bert, "--trainer.max_steps", "3", "--trainer.limit_val_batches", "0",
            "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false"]
    cli = LitPeftCLI(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                     auto_configure_optimizers=False, trainer_defaults=trainer_defaults(), args=args)
    optimizer = cli.trainer.optimizers[0]
    assert type(optimizer).__name__ == cls
    if preset == "adamw-fused":
        assert optimizer.defaults["fused"] is True
    assert cli.trainer.global_step == 3
    assert all(p.abs().sum() > 0 for n, p in cli.model.named_parameters() if "lora_B" in n)


def test_matmul_precision_key_sets_torchs(tiny_bert, monkeypatch) -> None:
    from lit_peft.cli import main

    seen = []
    monkeypatch.setattr(torch, "set_float32_matmul_precision", seen.append)
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(ROOT / "configs" / "lora_sst2.yaml"), "--config", str(ROOT / "configs" / "trainer" / "gpu.yaml"),
              "--print_config"])
    # --print_config exits before instantiation; a parse that instantiates applies the key
    from lit_peft.cli import LitPeftCLI, trainer_defaults
    from lightning.pytorch import LightningDataModule, LightningModule

    LitPeftCLI(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
               auto_configure_optimizers=False, trainer_defaults=trainer_defaults(), run=False,
               args=["--config", str(ROOT / "configs" / "lora_sst2.yaml"), "--model.init_args.backbone", tiny_bert,
                     "--matmul_precision", "high", "--trainer.accelerator", "cpu"])
    assert seen == ["high"]


def test_a_fused_optimizer_with_clipping_under_mixed_precision_is_one_clear_error(tiny_bert) -> None:
    from types import SimpleNamespace

    from lightning.pytorch.plugins.precision import MixedPrecision

    task = SequenceClassification(backbone=tiny_bert, optimizer=functools.partial(torch.optim.AdamW, fused=True))
    methods.LoRA(r=4).attach(task)
    task._trainer = SimpleNamespace(precision_plugin=MixedPrecision("bf16-mixed", "cpu"), gradient_clip_val=1.0)
    with pytest.raises(ConfigError, match="set fused: false"):
        task.configure_optimizers()
    task._trainer = SimpleNamespace(precision_plugin=MixedPrecision("bf16-mixed", "cpu"), gradient_clip_val=None)
    assert task.configure_optimizers()["optimizer"].defaults["fused"] is True


def test_lightningclis_top_level_optimizer_key_goes_to_the_task(tiny_bert, toy_data, tmp_path, capsys) -> None:
    """`optimizer:` / `lr_scheduler:` at the top of a config (LightningCLI's keys) are the task's, built over the
    method's groups; given twice, or to a model that takes none, they are one clear line."""
    from lit_peft.cli import main

    base = ["fit", "--config", str(ROOT / "configs" / "lora_sst2.yaml"), "--model.init_args.backbone", tiny_bert,
            "--data.init_args.data_dir", str(toy_data), "--data.init_args.tokenizer", tiny_bert, "--trainer.max_steps", "2",
            "--trainer.limit_val_batches", "0", "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(tmp_path),
            "--trainer.enable_progress_bar", "false"]
    from lit_peft.cli import LitPeftCLI, trainer_defaults
    from lightning.pytorch import LightningDataModule, LightningModule

    cli = LitPeftCLI(LightningModule, LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                     auto_configure_optimizers=False, trainer_defaults=trainer_defaults(),
                     args=base + ["--optimizer", "torch.optim.SGD", "--optimizer.momentum", "0.9",
                                  "--lr_scheduler", "torch.optim.lr_scheduler.ConstantLR", "--lr_scheduler.factor", "0.5"])
    optimizer = cli.trainer.optimizers[0]
    assert type(optimizer) is torch.optim.SGD and optimizer.defaults["momentum"] == 0.9
    assert type(cli.trainer.lr_scheduler_configs[0].scheduler).__name__ == "ConstantLR"
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == \
        {id(p) for p in cli.model.parameters() if p.requires_grad}
    with pytest.raises(SystemExit) as done:
        main(base + ["--optimizer", "torch.optim.SGD", "--model.init_args.optimizer", "torch.optim.Adam",
                     "--trainer.default_root_dir", str(tmp_path / "twice")])
    assert done.value.code == 2 and "optimizer is given twice" in capsys.readouterr().err
