"""What each logger receives: W&B (offline, read back from the run file it writes) gets the resolved
config, the method and trainable %, and every summary.json figure; CSV and TensorBoard side by side
still write their own files, and summary.json lands in the first one's folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from test_cli import write_config
from wandb_records import read_run

ROOT = Path(__file__).resolve().parents[1]


def lit_peft(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "lit_peft.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "WANDB_SILENT": "true"})
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_wandb_offline_preset_gets_config_and_every_summary_figure(tiny_bert, toy_data, tmp_path) -> None:
    pytest.importorskip("wandb")
    config = write_config(tmp_path, tiny_bert, toy_data, max_epochs=1, limit_train_batches=4)
    lit_peft("fit", "--config", str(config), "--config", str(ROOT / "configs" / "trainer" / "wandb-offline.yaml"),
             "--trainer.logger.init_args.save_dir", str(tmp_path / "wb"), "--trainer.logger.init_args.project", "toy",
             cwd=tmp_path)
    (folder,) = (tmp_path / "wb" / "wandb").glob("offline-run-*")
    run = read_run(folder)
    deadline = time.time() + 60
    while (run["id"] is None or "stages" not in run["summary"]) and time.time() < deadline:
        time.sleep(1)  # wandb's service process may still be writing the file after the run's process ended
        run = read_run(folder)
    (summary_path,) = (tmp_path / "wb" / "toy").glob("*/summary.json")
    assert summary_path.parent.name == run["id"]  # the run folder is named by the W&B run id
    summary = json.loads(summary_path.read_text())
    for key, value in summary.items():
        assert run["summary"][key] == pytest.approx(value) if isinstance(value, float) else run["summary"][key] == value, key
    assert run["config"]["method"] == "lora" and run["config"]["trainable_pct"] == summary["trainable_pct"]
    resolved = run["config"]["lit_peft"]  # the whole resolved config, as config.yaml has it
    assert resolved == json.loads(json.dumps(yaml.safe_load((summary_path.parent / "config.yaml").read_text())))
    assert resolved["method"]["init_args"]["r"] == 4


def test_csv_and_tensorboard_together(tiny_bert, toy_data, tmp_path) -> None:
    pytest.importorskip("tensorboardX")
    config = write_config(tmp_path, tiny_bert, toy_data, max_epochs=1, limit_train_batches=4)
    loggers = [{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path / "runs"), "name": "csv"}},
               {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": str(tmp_path / "tb"), "name": "tb"}}]
    lit_peft("fit", "--config", str(config), "--trainer.logger", json.dumps(loggers), cwd=tmp_path)
    run = tmp_path / "runs" / "csv" / "version_0"
    assert {"metrics.csv", "summary.json", "config.yaml"} <= {p.name for p in run.iterdir()}
    assert list((tmp_path / "tb" / "tb" / "version_0").glob("events.out.tfevents.*"))
    assert json.loads((run / "summary.json").read_text())["method"] == "lora"
