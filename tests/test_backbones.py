"""Backbones load from a folder, a packaged alias or a hub id, in the dtype asked for."""

from __future__ import annotations

import pytest
import torch

from lit_peft import backbones
from lit_peft.errors import ConfigError
from lit_peft.tasks import SequenceClassification


def test_packaged_alias_resolves_to_a_model_folder() -> None:
    from pathlib import Path

    folder = Path(backbones.resolve("minilm"))
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert backbones.resolve("bert-base-uncased") == "bert-base-uncased"  # a hub id is left to transformers


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dtype_option(tiny_bert, dtype) -> None:
    task = SequenceClassification(backbone=tiny_bert, dtype=dtype)
    task.configure_backbone()
    assert {p.dtype for p in task.backbone.parameters()} == {backbones.DTYPES[dtype]}


def test_bad_backbones_are_named(tmp_path) -> None:
    with pytest.raises(ConfigError, match="unknown dtype 'fp8'"):
        SequenceClassification(backbone="minilm", dtype="fp8")
    with pytest.raises(ConfigError, match="has no config.json"):
        backbones.resolve(str(tmp_path))
    with pytest.raises(ConfigError, match="'./missing' does not exist"):
        backbones.resolve("./missing")


def test_minilm_loads_offline_with_pretrained_weights() -> None:
    task = SequenceClassification(backbone="minilm")
    model = task.configure_backbone()
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(22.7e6, rel=0.01)
    assert model.training  # dropout is on for fine-tuning
    enc = task.tokenizer(["a fine film", "a dull film"], return_tensors="pt", padding=True)
    with torch.no_grad():
        hidden = model.bert(**enc).last_hidden_state
    assert torch.isfinite(hidden).all() and hidden.shape[-1] == 384


def ship(folder, shipped_root) -> None:
    """A copy of ``folder`` as the package would ship it: the files and their SHA256SUMS."""
    import hashlib
    import shutil

    target = shipped_root / "timesfm-small"
    shutil.copytree(folder, target)
    names = sorted(p.name for p in target.iterdir())
    (target / "SHA256SUMS").write_text("".join(f"{hashlib.sha256((target / n).read_bytes()).hexdigest()}  {n}\n" for n in names))


def test_a_shipped_backbone_is_used_checked_and_yields_to_the_users_own(tiny_timesfm, tmp_path, monkeypatch) -> None:
    from pathlib import Path

    monkeypatch.setattr(backbones, "SHIPPED", tmp_path / "weights")
    monkeypatch.setattr(backbones, "_verified", set())
    monkeypatch.setenv("LIT_PEFT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match="neither shipped in .* nor in .*: reinstall lit-peft, or run `lit-peft fit "
                                          r"--config configs/pretrain_timesfm_small.yaml` once"):
        backbones.resolve("timesfm-small")
    ship(tiny_timesfm, tmp_path / "weights")
    assert backbones.resolve("timesfm-small") == str(tmp_path / "weights" / "timesfm-small")
    # the user's own re-pretrained copy in the cache comes first
    own = tmp_path / "cache" / "timesfm-small"
    own.mkdir(parents=True)
    (own / "config.json").write_text((Path(tiny_timesfm) / "config.json").read_text())
    assert backbones.resolve("timesfm-small") == str(own)
    # a changed shipped file is refused before any weight is read
    (own / "config.json").unlink()
    monkeypatch.setattr(backbones, "_verified", set())
    weights = tmp_path / "weights" / "timesfm-small" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(ConfigError, match="model.safetensors does not match its checksum .* reinstall lit-peft"):
        backbones.resolve("timesfm-small")


def test_the_shipped_timesfm_small_is_checked_and_a_fresh_clone_fine_tunes_on_it(tmp_path, monkeypatch) -> None:
    """No pretraining step: with an empty cache, `backbone: timesfm-small` is the package's copy (its
    checksums hold, it is the 4.5M-parameter model the pretraining config describes) and the ETTh1 LoRA
    config trains on it."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    from conftest import needs_shared

    monkeypatch.setattr(backbones, "_verified", set())
    monkeypatch.setenv("LIT_PEFT_CACHE", str(tmp_path / "empty-cache"))
    folder = Path(backbones.resolve("timesfm-small"))
    assert folder == backbones.SHIPPED / "timesfm-small"
    assert backbones.SHIPPED.parent == Path(backbones.__file__).resolve().parent  # inside the package
    listed = {line.split()[1] for line in (folder / "SHA256SUMS").read_text().splitlines() if line.strip()}
    assert {"config.json", "model.safetensors"} <= listed
    config = json.loads((folder / "config.json").read_text())
    recipe = yaml.safe_load(Path("configs/pretrain_timesfm_small.yaml").read_text())["model"]["init_args"]["from_config"]
    assert {k: config[k] for k in recipe if k != "model_type"} == {k: v for k, v in recipe.items() if k != "model_type"}
    ett = needs_shared("ett")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "LIT_PEFT_CACHE": str(tmp_path / "empty-cache")}
    done = subprocess.run([sys.executable, "-m", "lit_peft.cli", "fit", "--config", "configs/lora_etth1.yaml",
                           "--data.init_args.data_dir", str(ett), "--trainer.max_steps", "3", "--trainer.limit_val_batches", "2", "--trainer.val_check_interval", "3",
                           "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(tmp_path / "runs")],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(next((tmp_path / "runs").rglob("summary.json")).read_text())
    assert summary["backbone"] == "timesfm-small" and summary["total_params"] == 4_460_672 + 172_032, summary  # the model and LoRA
    assert summary["val_mse"] > 0 and summary["trainable_params"] == 172_032
    assert not (tmp_path / "empty-cache" / "timesfm-small").exists()  # nothing was pretrained or copied
