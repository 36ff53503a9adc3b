"""Run folders inside a Slurm batch job (``lit_peft.slurm``): keyed by cluster and job, so jobs that
share a root never collide and a requeued job finds its own folder, logger version and metrics."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger

from lit_peft import slurm


def test_job_key_names_cluster_job_and_array_index() -> None:
    assert slurm.job_key({"SLURM_JOB_ID": "17", "SLURM_CLUSTER_NAME": "a100", "SLURM_JOB_NAME": "x"}) == "slurm-a100-17"
    array = {"SLURM_JOB_ID": "31", "SLURM_ARRAY_JOB_ID": "30", "SLURM_ARRAY_TASK_ID": "1", "SLURM_JOB_NAME": "x"}
    assert slurm.job_key(array) == "slurm-30_1"  # the array job's id and the index, as Slurm names it
    assert slurm.job_key({"SLURM_JOB_ID": "5", "SLURM_JOB_NAME": "bash"}) is None  # an interactive allocation
    assert slurm.job_key({}) is None


def test_key_run_folder_sets_version_and_root_for_each_logger_kind() -> None:
    cfg = {"logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs", "name": "lora"}}}
    assert slurm.key_run_folder(cfg, "slurm-c-9") == Path("runs/lora/slurm-c-9")
    assert cfg["logger"]["init_args"]["version"] == "slurm-c-9" and cfg["default_root_dir"] == "runs/lora/slurm-c-9"

    wandb = {"class_path": "lightning.pytorch.loggers.WandbLogger", "init_args": {"project": "p", "save_dir": "wb"}}
    cfg = {"logger": [wandb, {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs"}}]}
    assert slurm.key_run_folder(cfg, "slurm-c-9") == Path("wb/p/slurm-c-9")  # the first logger's folder
    assert [lg["init_args"]["version"] for lg in cfg["logger"]] == ["slurm-c-9"] * 2  # W&B resumes the same run id

    cfg = {"logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                      "init_args": {"save_dir": "runs", "name": "n", "version": "mine"}}}
    assert slurm.key_run_folder(cfg, "slurm-c-9") == Path("runs/n/mine")  # a version the config names is kept

    cfg = {"logger": False, "default_root_dir": "/scratch"}
    assert slurm.key_run_folder(cfg, "slurm-c-9") == Path("/scratch/slurm-c-9")


def test_outside_a_job_nothing_changes(monkeypatch) -> None:
    for key in ("SLURM_JOB_ID", "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)
    cfg = {"logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs"}}}
    assert slurm.key_run_folder(cfg) is None and "default_root_dir" not in cfg


@pytest.mark.parametrize("restarted", [False, True])
def test_a_requeued_job_appends_to_its_metrics(restarted, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1" if restarted else "0")
    first = CSVLogger(tmp_path, name="run", version="slurm-c-1")
    first.log_metrics({"train_loss": 1.0}, step=0)
    first.save()
    second = CSVLogger(tmp_path, name="run", version="slurm-c-1")
    slurm.continue_csv_metrics(Trainer(logger=second, accelerator="cpu", enable_progress_bar=False))
    second.log_metrics({"train_loss": 0.5, "val_loss": 0.7}, step=10)  # a new column after the resume
    second.save()
    rows = list(csv.DictReader((tmp_path / "run" / "slurm-c-1" / "metrics.csv").open()))
    # Lightning's writer alone deletes the first job's rows when the requeued one starts
    assert [r["step"] for r in rows] == (["0", "10"] if restarted else ["10"])
    assert rows[-1]["val_loss"] == "0.7"
