"""Efficiency figures for every run, and the run's ``summary.json``.

``EfficiencyReport`` is on by default (the CLI adds it): trainable and total parameters, training
wall time, training samples and tokens per second (validation time excluded), the padding the
batches made the model compute (``padding_ratio``: tokens computed over real tokens), peak memory (CUDA max allocated
on a GPU, the process's peak resident set on a CPU), checkpoint and adapter size. At the end of fit
and of test it logs them and writes them, with every final metric by its logged name, to
``summary.json`` in the run folder (the logger's folder), and into a W&B run's summary and config. Lightning has no callback that reports
these together, so this one is written here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn

from lit_peft import files, patches


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit packed weights count as their unpacked size."""
    trainable = total = 0
    for p in module.parameters():
        n = p.numel() * (2 if getattr(p, "quant_state", None) is not None else 1)
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def _tensors_in(value, seen: set[int]):
    """Tensors reachable from an optimizer-state value (tensors, containers, objects such as GaLore's projector)."""
    if isinstance(value, torch.Tensor):
        if id(value) not in seen:
            seen.add(id(value))
            yield value
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _tensors_in(v, seen)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors_in(v, seen)
    elif hasattr(value, "__dict__") and not isinstance(value, type):
        yield from _tensors_in(vars(value), seen)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor an optimizer keeps per parameter (moments, projectors, quantization maps)."""
    seen: set[int] = set()
    return tensor_bytes(_tensors_in(list(optimizer.state.values()), seen))


def weight_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers, 4-bit weights with their quantization state."""
    total = 0
    for p in module.parameters():
        total += p.numel() * p.element_size()
        state = getattr(p, "quant_state", None)
        if state is not None:
            total += tensor_bytes(state.as_dict(packed=True).values())
    return total + tensor_bytes(module.buffers())


def environment() -> dict[str, Any]:
    """Package versions and hardware: what a comparison of runs from several machines needs."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    def v(name: str) -> Optional[str]:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    env: dict[str, Any] = {name: v(name) for name in ("lit-peft", "torch", "lightning", "transformers", "peft", "bitsandbytes")}
    env.update(python=platform.python_version(), platform=platform.platform(), cpu_count=os.cpu_count(),
               cpu=platform.processor() or platform.machine())
    if torch.cuda.is_available():
        env.update(gpu=torch.cuda.get_device_name(), gpus=torch.cuda.device_count(), cuda=torch.version.cuda)
    return env


def peak_memory_mb(device: torch.device) -> float:
    """CUDA max allocated on a GPU; the process's peak resident set size on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def run_dir(trainer: Trainer) -> Path:
    """The run folder: the first logger's versioned folder, else the trainer's root folder.

    Lightning's ``trainer.log_dir`` is that folder for CSV and TensorBoard loggers but only the
    shared ``save_dir`` for others (W&B), where runs would overwrite each other's files; for those
    it is ``save_dir/name/version``, the parent of the checkpoints folder Lightning picks. Every
    rank must call this (it broadcasts rank 0's answer)."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
    from lightning.pytorch.loggers.logger import DummyLogger

    loggers = [lg for lg in trainer.loggers if not isinstance(lg, DummyLogger)]
    if not loggers:
        return unlogged_run_dir(trainer)
    if loggers and not isinstance(loggers[0], (CSVLogger, TensorBoardLogger)):
        first = loggers[0]
        folder = Path(first.save_dir or trainer.default_root_dir) / str(first.name) / str(first.version)
        return Path(trainer.strategy.broadcast(str(folder)))
    return Path(trainer.log_dir or trainer.default_root_dir)


def unlogged_run_dir(trainer: Trainer) -> Path:
    """The run folder of a run with no logger (``logger: false``, ``fast_dev_run``):
    ``<default_root_dir>/lit-peft/version_<N>``, the first free N, chosen once by rank 0, so no run
    writes over another's files. The trainer's root becomes that folder, so checkpoints go there
    too. In a Slurm batch job the root is the job's own folder already (``slurm.key_run_folder``)."""
    from lit_peft import slurm

    folder = getattr(trainer, "_lit_peft_run_dir", None)
    if folder is None:
        root = Path(trainer.default_root_dir)
        if slurm.job_key() is not None:
            folder = root
        else:
            if trainer.is_global_zero:
                taken = {p.name for p in (root / "lit-peft").glob("version_*")}
                folder = root / "lit-peft" / f"version_{next(n for n in range(len(taken) + 1) if f'version_{n}' not in taken)}"
                folder.mkdir(parents=True)
            folder = Path(trainer.strategy.broadcast(str(folder)))
            trainer._default_root_dir = str(folder)
        trainer._lit_peft_run_dir = folder
    return folder


class EfficiencyReport(Callback):
    """Measure a run's cost and write ``summary.json`` (see the module docstring)."""

    def __init__(self, enabled: bool = True, filename: str = "summary.json") -> None:
        self.enabled = enabled
        self.filename = filename
        self._result_lines: Optional[str] = None  # what report() made, printed in teardown
        self.samples = 0
        self.tokens = self.padded_tokens = 0  # real and computed (padded) training tokens, where batches have a mask
        self._tokens: Optional[torch.Tensor] = None  # this epoch's real tokens on the device, read once (no sync a step)
        self.train_seconds = 0.0  # time inside training epochs, validation excluded
        self.fit_seconds = 0.0
        self._t_fit = self._t_epoch = self._t_val = 0.0
        self._val_in_epoch = 0.0
        self._prior_fit = 0.0  # fit time before a resume, from the checkpoint
        self._rank = 0  # a checkpoint holds every rank's counts summed: rank zero alone carries them on
        self._counts_tokens = True  # False after resuming from a checkpoint that did not count tokens

    # ---- carried in checkpoints: a resumed run counts the time before it, a test run reports it ----
    def state_dict(self) -> dict[str, float]:
        now = time.perf_counter()
        epoch = now - self._t_epoch - self._val_in_epoch if self._t_epoch else 0.0
        self._read_tokens()
        return {"fit_seconds": self._prior_fit + (now - self._t_fit if self._t_fit else 0.0),
                "train_seconds": self.train_seconds + epoch, "samples": self.samples,
                "tokens": self.tokens, "padded_tokens": self.padded_tokens}

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        """Every rank saves (Lightning calls this on each), rank zero writes: the counts it writes are
        all ranks' together, so a resume under any number of processes goes on from the true totals."""
        saved = checkpoint.get("callbacks", {}).get(self.state_key)
        if saved is not None and trainer.world_size > 1:
            saved["samples"], saved["tokens"], saved["padded_tokens"] = self._summed(
                trainer, saved["samples"], saved["tokens"], saved["padded_tokens"])

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._rank = trainer.global_rank  # before a resume loads the state

    def load_state_dict(self, state: dict[str, float]) -> None:
        self._prior_fit = float(state.get("fit_seconds", 0.0))
        self.train_seconds = float(state.get("train_seconds", 0.0))
        self._counts_tokens = "tokens" in state  # an older checkpoint: the tokens before it are unknown
        if self._rank == 0:  # the saved counts are all ranks' together; the other ranks start from zero
            self.samples = int(state.get("samples", 0))
            self.tokens, self.padded_tokens = int(state.get("tokens", 0)), int(state.get("padded_tokens", 0))
        else:
            self.samples = self.tokens = self.padded_tokens = 0

    @staticmethod
    def _summed(trainer: Trainer, *counts: int) -> list[int]:
        """Counts summed over the ranks, exactly (int64: float32 is exact only up to 2**24 tokens)."""
        local = torch.tensor(counts, dtype=torch.int64, device=trainer.strategy.root_device)
        return [int(x) for x in trainer.strategy.reduce(local, reduce_op="sum").tolist()]

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        path = trainer.ckpt_path
        if not self.fit_seconds and path and os.path.isfile(path):  # testing a checkpoint: its training figures
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("callbacks", {})
            saved = state.get(self.state_key)
            if saved:
                self.load_state_dict(saved)
                self.fit_seconds = self._prior_fit

    # ---- timing -------------------------------------------------------------------------
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(trainer.strategy.root_device)
        self._t_fit = time.perf_counter()

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._t_epoch, self._val_in_epoch = time.perf_counter(), 0.0

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        if not self._t_epoch:  # a run resumed mid-epoch gets no on_train_epoch_start for that epoch
            self._t_epoch, self._val_in_epoch = time.perf_counter(), 0.0

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if isinstance(batch, Mapping):
            first = next(iter(batch.values()))
            self.samples += len(first)
            mask = batch.get("attention_mask")
            if isinstance(mask, torch.Tensor) and mask.dim() == 2:
                real = mask.sum(dtype=torch.int64)  # stays on the device: no sync a step
                self._tokens = real if self._tokens is None else self._tokens + real
                self.padded_tokens += mask.numel()  # the shape is known on the host
        elif isinstance(batch, (list, tuple)) and batch:
            self.samples += len(batch[0])

    def _read_tokens(self) -> None:
        if self._tokens is not None:
            self.tokens += int(self._tokens.item())
            self._tokens = None

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._t_val = time.perf_counter()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == "fit" and self._t_epoch:
            self._val_in_epoch += time.perf_counter() - self._t_val

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._t_epoch:
            return
        self.train_seconds += time.perf_counter() - self._t_epoch - self._val_in_epoch
        self._t_epoch = 0.0
        self._read_tokens()

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._t_epoch:  # stopped mid-epoch (max_steps)
            self.on_train_epoch_end(trainer, pl_module)
        self.fit_seconds = self._prior_fit + time.perf_counter() - self._t_fit
        self.report(trainer, pl_module, "fit")

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.report(trainer, pl_module, "test")

    # ---- the figures ----------------------------------------------------------------------
    def figures(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        trainable, total = count_parameters(pl_module)
        method = getattr(pl_module, "method", None)
        if hasattr(pl_module, "trained_keys"):  # what the adapter/checkpoint holds: SIFT's and RoSA's indices too
            keys = pl_module.trained_keys()
            trained = [t for k, t in pl_module.state_dict().items() if k in keys]
        else:
            trained = [p for p in pl_module.parameters() if p.requires_grad]
        figures: dict[str, Any] = {
            "method": getattr(pl_module, "method_name", type(method).__name__ if method else "none"),
            "task": getattr(pl_module, "task_name", type(pl_module).__name__),
            "data": type(trainer.datamodule).__name__ if trainer.datamodule is not None else None,
            "backbone": getattr(pl_module, "backbone_name", None),
            "trainable_params": trainable,
            "total_params": total,
            "trainable_pct": round(100.0 * trainable / max(total, 1), 4),
            "peak_memory_mb": round(peak_memory_mb(trainer.strategy.root_device), 1),
            "adapter_mb": round(tensor_bytes(trained) / 2**20, 3),
            "weights_mb": round(weight_bytes(pl_module) / 2**20, 3),
            "optimizer_state_mb": round(sum(optimizer_state_bytes(o) for o in trainer.optimizers) / 2**20, 3),
            "checkpoint_mb": self.checkpoint_mb(trainer),
            "device": trainer.strategy.root_device.type,
            "precision": str(trainer.precision),
        }
        figures.update(world_size=trainer.world_size, num_nodes=trainer.num_nodes, environment=environment())
        if getattr(pl_module, "generation_samples", None):  # a causal LM's first test generations, to read
            figures["generation_samples"] = pl_module.generation_samples
        if self.fit_seconds:
            self._read_tokens()
            samples, tokens, padded = self.samples, self.tokens, self.padded_tokens
            if trainer.world_size > 1:  # every rank's share of the batches (collective: every rank computes figures)
                samples, tokens, padded = self._summed(trainer, samples, tokens, padded)
            per_s = (lambda n: round(n / self.train_seconds, 2)) if self.train_seconds else (lambda n: None)
            figures.update(train_time_s=round(self.fit_seconds, 2), train_samples=samples, samples_per_s=per_s(samples))
            if padded and self._counts_tokens:
                figures.update(train_tokens=tokens, tokens_per_s=per_s(tokens), padded_tokens_per_s=per_s(padded),
                               padding_ratio=round(padded / max(tokens, 1), 4))
        return figures

    @staticmethod
    def checkpoint_mb(trainer: Trainer) -> Optional[float]:
        ckpt = trainer.checkpoint_callback
        path = getattr(ckpt, "best_model_path", "") or getattr(ckpt, "last_model_path", "") if ckpt else ""
        if trainer.state.fn != "fit" and trainer.ckpt_path:
            path = str(trainer.ckpt_path)  # the checkpoint being tested
        return round(os.path.getsize(path) / 2**20, 3) if path and os.path.isfile(path) else None

    def report(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not self.enabled or trainer.sanity_checking:
            return
        figures = self.figures(trainer, pl_module)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
        if trainer.logger is not None:
            trainer.logger.log_metrics({k: v for k, v in figures.items() if isinstance(v, (int, float))},
                                       step=trainer.global_step)
        path = run_dir(trainer) / self.filename  # on every rank: it broadcasts
        if not trainer.is_global_zero:
            return
        summary = read_summary(path)
        summary.update(figures)
        summary.update(metrics)
        summary.setdefault("stages", [])
        summary["stages"] = sorted(set(summary["stages"]) | {stage})
        files.write_text(path, json.dumps(summary, indent=2, sort_keys=True) + "\n")  # a kill mid-write keeps the old one
        to_wandb(trainer, summary)
        self._result_lines = format_summary(summary, path)  # printed in teardown, below the progress bar

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Print the result lines once the progress bar has drawn its last frame: Rich's bar is a live
        display that Lightning stops only in its own teardown, and lines printed before then came out
        above the bar's final render."""
        if not self._result_lines:
            return
        patches.stop_progress_bar(trainer)
        print(self._result_lines, flush=True)
        self._result_lines = None


def read_summary(path: Path) -> dict[str, Any]:
    """A run's ``summary.json`` (empty where there is none yet)."""
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:  # written whole since lit-peft wrote it atomically; an older or edited one
        from lit_peft.errors import ConfigError

        raise ConfigError(f"'{path}' is not valid JSON ({err.msg} at line {err.lineno}); move it aside and rerun") from err


#: the figures that describe a run rather than measure it: they go to the W&B run's config too
RUN_FIELDS = ("method", "task", "data", "backbone", "trainable_params", "total_params", "trainable_pct", "device", "precision",
              "world_size", "num_nodes", "environment")


def to_wandb(trainer: Trainer, summary: dict[str, Any]) -> None:
    """Every ``summary.json`` figure into each W&B logger's run summary, and what describes the run
    (method, trainable %) into its config, so W&B's run table compares runs as summary.json does."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            run = logger.experiment
            run.summary.update(summary)
            run.config.update({k: summary[k] for k in RUN_FIELDS if k in summary}, allow_val_change=True)


def format_summary(summary: dict[str, Any], path: Path) -> str:
    keys = [k for stage in ("val", "test") for k in (f"{stage}_acc", f"{stage}_exact_match", f"{stage}_rougeL", f"{stage}_mse", f"{stage}_mae",
                                                       f"{stage}_loss") if k in summary]
    parts = [f"{k}={summary[k]:.4f}" for k in keys]
    parts.append(f"trainable={summary['trainable_params']:,} ({summary['trainable_pct']:.2f}%)")
    if summary.get("train_time_s") is not None:
        parts.append(f"time={summary['train_time_s']:.1f}s")
    if summary.get("samples_per_s"):
        parts.append(f"samples/s={summary['samples_per_s']:.1f}")
    if summary.get("tokens_per_s"):
        parts.append(f"tokens/s={summary['tokens_per_s']:.0f} padding={summary['padding_ratio']:.2f}x")
    parts.append(f"peak_mem={summary['peak_memory_mb']:.0f}MB")
    return f"[lit-peft] {summary['method']} on {summary.get('data') or summary['task']}: " + " ".join(parts) + f"\n[lit-peft] summary: {path}"
