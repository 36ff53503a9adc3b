"""lit-peft under a real Slurm (``cluster.py``: munged, slurmctld, two slurmd in network namespaces):
a DDP LoRA job over two nodes submitted with ``lit-peft slurm``, its preemption and requeue, and an
array job of two methods. The jobs run the tiny BERT on the toy sentiment rows, on the CPU (gloo)."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from cluster import ClusterUnavailable, SlurmCluster

# installing slurm-wlm and munge with apt-get may take its own 25 minutes before the first job
pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]

MAX_STEPS = 60


@pytest.fixture(scope="module")
def slurm_cluster():
    """The cluster these tests submit to, started once; skipped with the reason where this machine
    cannot run one (not root, packages not installable). Here rather than in a conftest.py of this
    folder: the tests import ``conftest`` by name, and a second one would shadow tests/conftest.py."""
    cluster = SlurmCluster(nodes=2)
    try:
        cluster.start()
    except ClusterUnavailable as reason:
        cluster.stop()
        pytest.skip(f"no Slurm cluster here: {reason}")
    except BaseException:
        cluster.stop()
        raise
    yield cluster
    cluster.stop()


def write_config(folder: Path, tiny_bert: str, toy_data: Path, name: str, max_steps: int = MAX_STEPS,
                 wandb: bool = False) -> Path:
    loggers = [{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(folder / "runs"), "name": name}}]
    if wandb:
        loggers.append({"class_path": "lightning.pytorch.loggers.WandbLogger",
                        "init_args": {"save_dir": str(folder / "wandb"), "project": name, "offline": True}})
    config = {
        "seed_everything": 7,
        "model": {"class_path": "lit_peft.tasks.SequenceClassification",
                  "init_args": {"backbone": tiny_bert, "num_labels": 2, "learning_rate": 3e-3, "warmup_ratio": 0.0}},
        "data": {"class_path": "lit_peft.data.SST2Data",
                 "init_args": {"data_dir": str(toy_data), "max_length": 32, "batch_size": 8}},
        "method": {"class_path": "lit_peft.methods.LoRA", "init_args": {"r": 4, "alpha": 8, "dropout": 0.1}},
        "trainer": {"accelerator": "cpu", "strategy": "ddp", "max_steps": max_steps, "val_check_interval": 20, "check_val_every_n_epoch": None,
                    "log_every_n_steps": 5, "enable_progress_bar": False, "enable_model_summary": False,
                    "logger": loggers,
                    "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                   "init_args": {"every_n_train_steps": 5, "save_last": True, "save_top_k": -1}}]},
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def submit(cluster, folder: Path, *args: str) -> str:
    # the ranks agree on a requeue about every second (30 s by default): this run's steps take a fraction of one
    env = {**os.environ, **cluster.env, "LIT_PEFT_REQUEUE_CHECK_SECONDS": "1"}
    done = subprocess.run([sys.executable, "-m", "lit_peft.cli", "slurm", "--script_dir", str(folder / "scripts"), *args],
                          cwd=folder, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    return re.search(r"submitted job (\d+)", done.stdout).group(1)


def layout(cluster) -> list[str]:
    """Two DDP processes: one on each node where the cluster has two, else two on the one node."""
    return ["--nodes", "2", "--tasks_per_node", "1"] if cluster.nodes == 2 else ["--nodes", "1", "--tasks_per_node", "2"]


def job_log(cluster, folder: Path, job: str) -> str:
    return "".join(p.read_text(errors="replace")[-4000:] for p in folder.glob(f"slurm-{job}*.out"))


def finished(cluster, folder: Path, job: str, timeout: float = 900) -> dict:
    info = cluster.wait(job, timeout=timeout)
    assert info["JobState"] == "COMPLETED", (f"job {job} {info['JobState']} (reason {info.get('Reason')}, exit "
                                             f"{info.get('ExitCode')}, restarts {info.get('Restarts')}):\n"
                                             f"{job_log(cluster, folder, job)}\n{cluster.daemon_logs()}")
    return info


def adapter(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]


@pytest.fixture(scope="module")
def ddp_run(slurm_cluster, tiny_bert, toy_data, tmp_path_factory):
    """An uninterrupted two-process DDP LoRA job: (folder, job id, run folder)."""
    folder = tmp_path_factory.mktemp("slurm-ddp")
    config = write_config(folder, tiny_bert, toy_data, "lora")
    job = submit(slurm_cluster, folder, "--config", str(config), "--cpus_per_task", "1", *layout(slurm_cluster))
    info = finished(slurm_cluster, folder, job)
    return folder, job, info


def run_folder(folder: Path, name: str, job: str) -> Path:
    found = sorted((folder / "runs" / name).glob(f"slurm-*{job}"))
    assert len(found) == 1, f"expected one run folder for job {job}, found {found}"
    return found[0]


def test_ddp_lora_job_over_two_processes(ddp_run, slurm_cluster) -> None:
    folder, job, info = ddp_run
    run = run_folder(folder, "lora", job)
    assert run.name == f"slurm-litpeft-{job}"  # keyed by cluster and job id, not version_N
    summary = json.loads((run / "summary.json").read_text())
    assert summary["method"] == "lora" and summary["stages"] == ["fit"]
    assert summary["world_size"] == 2 and summary["num_nodes"] == slurm_cluster.nodes
    assert summary["train_samples"] == MAX_STEPS * 8 * 2  # both ranks' batches of 8
    assert 0.0 <= summary["val_acc"] <= 1.0
    # LoRA r=4 on query and value of 2 layers (A: 4x32, B: 32x4) plus BERT's classifier (32 -> 2)
    assert summary["trainable_params"] == 2 * 2 * (4 * 32 + 32 * 4) + (32 * 2 + 2)
    if slurm_cluster.nodes == 2:
        assert info["NodeList"] == "lpnode[1-2]"
    # written once, by rank zero: one summary, one config, one metrics file
    assert sorted(p.name for p in run.iterdir() if p.is_file()) == ["config.yaml", "hparams.yaml", "metrics.csv", "summary.json"]
    # the checkpoint holds only what trained
    state = adapter(run / "checkpoints" / "last.ckpt")
    assert all("lora_" in k or "classifier" in k or "pre_classifier" in k for k in state), sorted(state)[:5]


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise TimeoutError(what)


def test_preempted_job_requeues_and_resumes_exactly(ddp_run, slurm_cluster, tiny_bert, toy_data) -> None:
    folder, reference_job, _ = ddp_run
    config = write_config(folder, tiny_bert, toy_data, "lora_preempted", wandb=True)
    job = submit(slurm_cluster, folder, "--config", str(config), "--cpus_per_task", "1", *layout(slurm_cluster))
    ckpts = folder / "runs" / "lora_preempted"
    # signal once the run has trained a few steps (its first step checkpoint is there) and before it ends
    wait_for(lambda: any(ckpts.glob("*/checkpoints/*step=10.ckpt")), 600, f"job {job} wrote no checkpoint:\n"
             + job_log(slurm_cluster, folder, job))
    slurm_cluster.sh("scancel", "--signal=USR1", "--batch", job)
    wait_for(lambda: int(slurm_cluster.job(job).get("Restarts", 0)) >= 1, 120,
             f"job {job} was not requeued:\n{job_log(slurm_cluster, folder, job)}")
    # Slurm holds a requeued job back for the credential lifetime (cred_expire=10 here), then starts it
    info = finished(slurm_cluster, folder, job)
    assert info["Restarts"] == "1"

    run = run_folder(folder, "lora_preempted", job)
    assert [p.name for p in ckpts.iterdir()] == [run.name]  # the requeued job continued in its folder
    hpc = sorted(run.glob("hpc_ckpt_*.ckpt"))
    assert [p.name for p in hpc] == ["hpc_ckpt_1.ckpt"]
    saved = torch.load(hpc[0], map_location="cpu", weights_only=False)
    resume_step = saved["global_step"]
    assert 10 <= resume_step < MAX_STEPS
    # the HPC checkpoint, like every lit-peft checkpoint, holds what trained and not the backbone
    assert set(saved["state_dict"]) == set(adapter(run / "checkpoints" / "last.ckpt"))
    print(f"resume step {resume_step}; HPC checkpoint {hpc[0].stat().st_size / 2**10:.1f} KiB")

    # the requeued job ends where the uninterrupted one did: bit for bit
    want = adapter(run_folder(folder, "lora", reference_job) / "checkpoints" / "last.ckpt")
    got = adapter(run / "checkpoints" / "last.ckpt")
    assert set(got) == set(want)
    diff = max((got[k] - want[k]).abs().max().item() for k in want)
    print(f"max weight difference interrupted vs uninterrupted: {diff}")
    assert diff == 0.0

    # metrics appended in the one metrics.csv: rows before and after the resume step
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    steps = sorted({int(r["step"]) for r in rows})
    assert steps[0] < resume_step < steps[-1]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stages"] == ["fit"] and summary["world_size"] == 2

    # the requeued job logged to the same W&B run (offline: one run folder per start, one id)
    runs = sorted((folder / "wandb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2, runs
    assert {p.name.split("-", 3)[-1] for p in runs} == {run.name}  # offline-run-<time>-<id>


def test_array_job_runs_one_method_per_index(slurm_cluster, tiny_bert, toy_data, tmp_path_factory) -> None:
    folder = tmp_path_factory.mktemp("slurm-array")
    config = write_config(folder, tiny_bert, toy_data, "sweep", max_steps=10)
    job = submit(slurm_cluster, folder, "--config", str(config), "--array_methods", "lora", "ia3",
                 "--cpus_per_task", "1", "--", "--trainer.strategy", "auto")
    for index in (0, 1):
        finished(slurm_cluster, folder, f"{job}_{index}")
    runs = sorted((folder / "runs" / "sweep").iterdir())
    assert [p.name for p in runs] == [f"slurm-litpeft-{job}_0", f"slurm-litpeft-{job}_1"]
    methods = [json.loads((p / "summary.json").read_text())["method"] for p in runs]
    assert methods == ["lora", "ia3"]
