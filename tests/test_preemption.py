"""Preemption without a cluster: a Slurm batch job's environment, a fake ``scontrol`` that records
what it was asked, and SIGUSR1 sent mid-run. The run stops at the end of that step with an HPC
checkpoint, asks for a requeue, and the requeued run resumes from it and ends with the weights of
an uninterrupted run. (``tests/slurm/`` does the same under a real Slurm, with two processes.)"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, seed_everything
from lightning.pytorch.utilities.exceptions import SIGTERMException

from conftest import quiet_trainer
from lit_peft.data import SST2Data
from lit_peft.preemption import RequeueAtStepEnd
from lit_peft.tasks import SequenceClassification

sys.path.insert(0, str(Path(__file__).parent / "methods"))
from test_methods import CASES  # noqa: E402

STEPS = 24
# the method's own state must survive the HPC checkpoint too: AdaLoRA's budget and rank masks,
# SIFT's chosen entries, GaLore's projectors; LoRA with dropout for the random streams
PREEMPTED = [c for c in CASES if c.id in ("lora", "adalora", "sift", "galore")]
# signalled mid-epoch (step 7 of 16), and in the epoch's last step (15), whose checkpoint holds an
# exhausted train iterator (the resumed run used to repeat epoch 0's order in epoch 1)
WHEN = [(case, 7) for case in PREEMPTED] + [(PREEMPTED[0], 15)]


class SignalAt(Callback):
    """Sends this process SIGUSR1 during training step ``step`` (before its optimizer step)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGUSR1)


class SignalAtBatch(Callback):
    """Sends this process SIGUSR1 before micro-batch ``batch_idx`` of the first epoch (mid-window when the
    window is several micro-batches)."""

    def __init__(self, batch_idx: int) -> None:
        self.batch_idx = batch_idx

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.current_epoch == 0 and batch_idx == self.batch_idx:
            os.kill(os.getpid(), signal.SIGUSR1)


def fit(case, tiny_bert: str, toy_data: Path, root: Path, *callbacks, accumulate: int = 1) -> SequenceClassification:
    seed_everything(7)  # the same head and adapter initialisation in every run
    task = SequenceClassification(backbone=tiny_bert, num_labels=2, learning_rate=case.lr, warmup_ratio=0.0)
    data = SST2Data(data_dir=str(toy_data), batch_size=16, max_length=16)
    method = case.make()
    if hasattr(method, "dropout"):
        method.dropout = 0.1
    trainer = quiet_trainer(max_steps=STEPS, callbacks=[method, *callbacks], default_root_dir=str(root),
                            accumulate_grad_batches=accumulate)
    trainer.fit(task, datamodule=data)
    return task


def trained(task) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in task.state_dict().items() if k in task.trained_keys()}


@pytest.fixture
def slurm_job(monkeypatch, tmp_path) -> Path:
    """This process as task 0 of Slurm batch job 4242, with a ``scontrol`` that logs its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "scontrol.log"
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    for key, value in {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "lit-peft", "SLURM_NTASKS": "1",
                       "SLURM_NTASKS_PER_NODE": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
                       "SLURM_NODELIST": "localhost", "SLURM_CLUSTER_NAME": "test"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    return log


@pytest.mark.parametrize(("case", "signal_at"), WHEN, ids=[f"{c.id}-step{at}" for c, at in WHEN])
def test_requeue_signal_stops_at_a_step_boundary_and_resumes_exactly(case, signal_at, slurm_job, monkeypatch, tiny_bert,
                                                                     toy_data, tmp_path) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "1")  # the reference: a batch job nobody signals
    want = trained(fit(case, tiny_bert, toy_data, tmp_path / "uninterrupted", RequeueAtStepEnd()))
    monkeypatch.setenv("SLURM_JOB_ID", "4242")

    root = tmp_path / "job"
    with pytest.raises(SIGTERMException):
        fit(case, tiny_bert, toy_data, root, RequeueAtStepEnd(), SignalAt(signal_at))
    (hpc,) = root.glob("hpc_ckpt_*.ckpt")
    saved = torch.load(hpc, map_location="cpu", weights_only=False)
    assert saved["global_step"] == signal_at + 1  # the signalled step finished, and nothing after it
    assert slurm_job.read_text().split() == ["requeue", "4242"]

    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # the requeued job: Lightning resumes from the HPC checkpoint
    resumed = fit(case, tiny_bert, toy_data, root, RequeueAtStepEnd())
    got = trained(resumed)
    # the HPC checkpoint held only what trained (the method's own state rides in callbacks and optimizer state)
    assert set(saved["state_dict"]) == resumed.trained_keys()
    assert set(got) == set(want)
    assert max((got[k] - want[k]).abs().max().item() for k in want) == 0.0


def test_a_signal_inside_an_accumulation_window_waits_for_its_optimizer_step(slurm_job, monkeypatch, tiny_bert,
                                                                            toy_data, tmp_path) -> None:
    """Two micro-batches a step: the signal lands before the first micro-batch of step 4 (batch 6); the
    HPC checkpoint is taken after that window's optimizer step, and the resumed run ends exactly as an
    uninterrupted one (a checkpoint between the micro-batches would lose the first one's gradients)."""
    case = PREEMPTED[0]
    monkeypatch.setenv("SLURM_JOB_ID", "1")
    want = trained(fit(case, tiny_bert, toy_data, tmp_path / "uninterrupted", RequeueAtStepEnd(), accumulate=2))
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    root = tmp_path / "job"
    with pytest.raises(SIGTERMException):
        fit(case, tiny_bert, toy_data, root, RequeueAtStepEnd(), SignalAtBatch(6), accumulate=2)
    (hpc,) = root.glob("hpc_ckpt_*.ckpt")
    saved = torch.load(hpc, map_location="cpu", weights_only=False)
    assert saved["global_step"] == 4  # micro-batches 6 and 7 stepped together, nothing after
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    got = trained(fit(case, tiny_bert, toy_data, root, RequeueAtStepEnd(), accumulate=2))
    assert max((got[k] - want[k]).abs().max().item() for k in want) == 0.0


def test_outside_slurm_the_signal_is_left_alone(monkeypatch, tiny_bert, toy_data, tmp_path) -> None:
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    callback = RequeueAtStepEnd()
    fit(PREEMPTED[0], tiny_bert, toy_data, tmp_path, callback)
    assert callback.signum is None and callback.deferred is None


def test_a_requeued_job_without_an_hpc_checkpoint_resumes_from_the_newest_good_one(slurm_job, monkeypatch, capsys,
                                                                                   tiny_bert, toy_data, tmp_path) -> None:
    """Requeued with no HPC checkpoint (preempted without the signal) and a truncated one (killed while
    saving): the job resumes from the newest checkpoint that reads whole, and says so."""
    import yaml

    from lit_peft.cli import main
    from test_front_door import tiny_config

    config = tiny_config(tmp_path, tiny_bert, toy_data, max_epochs=1)
    main(["fit", "--config", str(config)])  # job 4242's first run: its folder and its checkpoint
    folder = tmp_path / "runs" / "lit-peft" / "slurm-test-4242"
    (good,) = folder.glob("checkpoints/*.ckpt")
    (folder / "hpc_ckpt_1.ckpt").write_bytes(good.read_bytes()[:1000])  # a save cut short
    raw = yaml.safe_load(config.read_text())
    raw["trainer"]["max_epochs"] = 2
    config.write_text(yaml.safe_dump(raw))
    capsys.readouterr()
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    main(["fit", "--config", str(config)])
    err = capsys.readouterr().err
    assert f"requeued job: resuming from {good}" in err
    ckpts = {p.name for p in folder.glob("checkpoints/*.ckpt")}
    assert any("epoch=1" in name for name in ckpts), ckpts  # it went on from epoch 1 in the same folder
    assert not (folder.parent / "slurm-test-4242-restart1").exists()


def test_a_requeued_job_with_no_checkpoint_starts_a_fresh_folder_and_says_so(slurm_job, monkeypatch, capsys, tiny_bert,
                                                                             toy_data, tmp_path) -> None:
    from lit_peft.cli import main
    from test_front_door import tiny_config

    config = tiny_config(tmp_path, tiny_bert, toy_data, max_epochs=1)
    old = tmp_path / "runs" / "lit-peft" / "slurm-test-4242"
    old.mkdir(parents=True)
    (old / "metrics.csv").write_text("epoch,step,train_loss\n0,3,0.7\n")  # the killed run's log, and nothing saved
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    capsys.readouterr()
    main(["fit", "--config", str(config)])
    err = capsys.readouterr().err
    fresh = old.parent / "slurm-test-4242-restart2"
    assert f"no checkpoint in {old} reads whole" in err and str(fresh) in err
    assert (old / "metrics.csv").read_text() == "epoch,step,train_loss\n0,3,0.7\n"  # the old folder untouched
    assert list(fresh.glob("checkpoints/*.ckpt")) and (fresh / "summary.json").is_file()


def test_a_checkpoint_is_whole_only_if_every_entry_reads_back(tmp_path) -> None:
    from lit_peft.slurm import newest_good_checkpoint, whole_checkpoint

    torch.save({"state_dict": {"w": torch.ones(1000)}, "global_step": 3}, tmp_path / "hpc_ckpt_1.ckpt")
    good = tmp_path / "hpc_ckpt_1.ckpt"
    cut = tmp_path / "hpc_ckpt_2.ckpt"
    cut.write_bytes(good.read_bytes()[:-200])  # newer, and cut short
    assert whole_checkpoint(good) and not whole_checkpoint(cut)
    assert newest_good_checkpoint(tmp_path) == good
