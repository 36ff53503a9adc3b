"""What a run does differently inside a Slurm batch job: its own run folder, and continuing in it.

Lightning does the rest of Slurm (``SLURMEnvironment``: ranks, node list, the main address, and
auto-requeue on SIGUSR1 with an HPC checkpoint in ``trainer.default_root_dir``). What it leaves to
us is where a job writes: by default every job of a root folder shares ``default_root_dir`` (the HPC
checkpoints of two jobs would overwrite each other) and gets the next ``version_N`` (a requeued job
would start a new one). So in a batch job the logger's version is the job's key (``slurm-<cluster>-
<job id>``, with ``_<array index>`` in an array job) unless the config names one, and
``default_root_dir`` is that run folder: a requeued job finds its folder, its HPC checkpoint, its
``summary.json`` and its W&B run id (the version is W&B's run id) again.

Lightning's CSV logger deletes an existing ``metrics.csv`` when it starts; a requeued job keeps it
and appends (``continue_csv_metrics``).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any, Optional

from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger


def job_key(env: Optional[dict[str, str]] = None) -> Optional[str]:
    """``slurm-<cluster>-<job id>[_<array index>]`` inside a Slurm batch job, else ``None``.

    Interactive allocations (``salloc``, ``srun --pty bash``) are not batch jobs: Lightning's
    ``SLURMEnvironment.detect`` and ours agree on that through ``SLURM_JOB_NAME``."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    env = os.environ if env is None else env
    if "SLURM_JOB_ID" not in env or env.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return None
    if env is os.environ and not SLURMEnvironment.detect():
        return None
    job = (f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}" if env.get("SLURM_ARRAY_JOB_ID")
           else env["SLURM_JOB_ID"])
    cluster = env.get("SLURM_CLUSTER_NAME")
    return f"slurm-{cluster}-{job}" if cluster else f"slurm-{job}"


def requeued(env: Optional[dict[str, str]] = None) -> bool:
    """Whether this batch job is a requeued one (Slurm counts restarts in ``SLURM_RESTART_COUNT``)."""
    env = os.environ if env is None else env
    return int(env.get("SLURM_RESTART_COUNT", "0") or 0) > 0


def _get(spec: Any, key: str, default: Any = None) -> Any:
    if spec is None:
        return default
    value = spec.get(key, default) if hasattr(spec, "get") else getattr(spec, key, default)
    return default if value is None else value


def key_run_folder(trainer_cfg: Any, key: Optional[str] = None) -> Optional[Path]:
    """Point the trainer config (a jsonargparse Namespace or dict of ``Trainer`` arguments) at the
    job's run folder: the first logger's version becomes ``key`` where the config gives none, and
    ``default_root_dir`` becomes that folder. Returns the folder, or ``None`` outside a batch job."""
    key = key or job_key()
    if key is None:
        return None
    logger = _get(trainer_cfg, "logger")
    loggers = [lg for lg in (logger if isinstance(logger, (list, tuple)) else [logger])
               if hasattr(lg, "get") and lg.get("class_path")]
    folder = Path(_get(trainer_cfg, "default_root_dir") or ".") / key  # no logger, or Lightning's default one
    for i, spec in enumerate(loggers):  # every logger continues under the key: CSV's folder, W&B's run id
        args = spec.get("init_args")
        if args is None:
            spec["init_args"] = args = {}
        is_wandb = spec["class_path"].rsplit(".", 1)[-1] == "WandbLogger"
        version = _get(args, "version") or (_get(args, "id") if is_wandb else None)
        if version is None:
            args["version"] = version = key
        if i == 0:  # the run folder is the first logger's (metrics.run_dir)
            name = _get(args, "project", "lightning_logs") if is_wandb else _get(args, "name", "lightning_logs")
            save_dir = _get(args, "save_dir") or _get(args, "dir") or _get(trainer_cfg, "default_root_dir") or "."
            folder = Path(save_dir) / str(name) / str(version)
    trainer_cfg["default_root_dir"] = str(folder)
    return folder


def newest_good_checkpoint(folder: Path) -> Optional[Path]:
    """The newest checkpoint in a run folder that reads whole: Lightning's HPC checkpoints
    (``hpc_ckpt_N.ckpt``) and the run's own (``checkpoints/*.ckpt``), the last written first.
    A save that did not finish (the job killed while writing) is passed over. Checked without loading
    anything (every rank of a job does this before the ranks can talk, and a full fine-tune's
    checkpoint is many GB): a file must be a zip archive whose every entry reads back with its CRC,
    a sharded folder must hold the metadata torch writes last."""
    found = []
    for path in [*folder.glob("hpc_ckpt_*.ckpt"), *folder.glob("checkpoints/*.ckpt")]:
        if whole_checkpoint(path):
            found.append((path.stat().st_mtime, path.name, path))
    return max(found)[2] if found else None


def whole_checkpoint(path: Path) -> bool:
    import zipfile

    if path.is_dir():
        return (path / ".metadata").is_file() and (path / "meta.pt").is_file()
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None
    except (zipfile.BadZipFile, OSError, EOFError):
        return False


def requeue_start(trainer_cfg: Any, ckpt_path: Optional[str]) -> tuple[Optional[str], Optional[str], Optional[str]]:
    """Where a requeued batch job starts: (checkpoint to resume from, the run folder's key, a line saying
    so). Lightning resumes a requeued job from its HPC checkpoint and, without one (a preemption with no
    signal, a save that did not finish), starts again from step 0 in the same folder, appending to its
    logs. Here it resumes from the newest checkpoint of the folder that reads whole; with none, the job
    takes a fresh folder (``<key>-restart<N>``) and says so. Outside a requeued job, or given a
    ``ckpt_path``: the job's own key, and nothing else changes."""
    key = job_key()
    if key is None or not requeued() or ckpt_path:
        return ckpt_path, key, None
    import copy

    folder = key_run_folder(copy.deepcopy(trainer_cfg), key)
    if folder is None or not folder.exists():
        return None, key, None
    found = newest_good_checkpoint(folder)
    if found is not None:
        return str(found), key, f"requeued job: resuming from {found}"
    restart = f"{key}-restart{os.environ.get('SLURM_RESTART_COUNT', '1')}"
    fresh = key_run_folder(copy.deepcopy(trainer_cfg), restart)
    return None, restart, (f"requeued job: no checkpoint in {folder} reads whole, so this run starts from step 0 "
                           f"in a fresh folder, {fresh}")


def resumes_in(ckpt_path: Optional[str], folder: Path) -> bool:
    """Whether a fit resumes from a checkpoint inside ``folder``: it continues that run (a requeued
    job, or an interrupted ``lit-peft compare`` run given its own folder again)."""
    if not ckpt_path or not os.path.isfile(str(ckpt_path)):
        return False
    return Path(folder).resolve() in Path(ckpt_path).resolve().parents


def continues(ckpt_path: Optional[str], folder: Path) -> bool:
    """Whether this fit continues the run in ``folder``: a requeued job, or a resume from there."""
    return requeued() or resumes_in(ckpt_path, folder)


def continue_csv_metrics(trainer: Trainer, ckpt_path: Optional[str] = None) -> None:
    """In a run that continues its folder (a requeued job, or a resume from a checkpoint inside the
    logger's folder), start each CSV logger's writer on its existing ``metrics.csv`` so the new rows
    are appended under the old header (Lightning's writer deletes the file when it starts)."""
    if not trainer.is_global_zero:  # other ranks' loggers write nothing
        return
    for logger in trainer.loggers:
        if not isinstance(logger, CSVLogger) or logger._experiment is not None:
            continue
        path = Path(logger.log_dir) / "metrics.csv"
        if not path.is_file() or not continues(ckpt_path, path.parent):
            continue
        aside = path.with_name("metrics.csv.requeued")
        path.rename(aside)
        try:
            writer = logger.experiment
        finally:
            aside.rename(path)
        with path.open(newline="") as f:
            writer.metrics_keys = sorted(next(csv.reader(f), []))
