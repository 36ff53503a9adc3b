"""The ``lit-peft`` command.

``fit | validate | test | predict`` are LightningCLI's, in subclass mode for ``model`` and
``data`` (your own LightningModule / LightningDataModule plug in by ``class_path``), with two
top-level keys of our own, both Callbacks that join ``trainer.callbacks``:

- ``method``: the fine-tuning method (default: full fine-tuning),
- ``report``: the efficiency figures and ``summary.json`` (on by default),
- ``predictions``: where ``predict`` writes (JSONL, or CSV for forecasts; the run folder by default),
- ``harness``: lm-eval tasks that ``test`` runs on a causal LM after its own test loop (``lit_peft.harness``),
- ``matmul_precision``: ``torch.set_float32_matmul_precision`` (``high``: TF32 on GPUs; the GPU presets),
- ``optimizer`` / ``lr_scheduler``: LightningCLI's keys, any class by ``class_path``, handed to the task, which
  builds them over the method's parameter groups.

``merge`` and ``export`` turn a checkpoint into a merged transformers model folder or a PEFT
adapter folder; ``slurm`` renders an sbatch script from a template in ``slurm/`` and submits it;
``compare`` runs a study of methods and seeds and writes its tables and plots (``lit_peft.compare``).
Inside a Slurm batch job every run gets the job's own folder (``lit_peft.slurm``), and Lightning's
requeue on SIGUSR1 is taken at a step boundary (``lit_peft.preemption``). Bad input (``ConfigError``) prints one message and exits with status 2.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Literal, Optional

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.callbacks import ModelSummary
from lightning.pytorch.cli import (LightningArgumentParser, LightningCLI, LRSchedulerCallable, OptimizerCallable,
                                   SaveConfigCallback)

from lit_peft import __version__, checkpoints, files, quiet, slurm
from lit_peft.cli_errors import short_message
from lit_peft.errors import ConfigError
from lit_peft.metrics import EfficiencyReport, run_dir
from lit_peft.harness import Harness
from lit_peft.predictions import PredictionWriter
from lit_peft.methods.base import Method
from lit_peft.model_summary import PeftModelSummary
from lit_peft.preemption import RequeueAtStepEnd

EXTRA = {
    "merge": "Fold a checkpoint's trained state into the backbone; save a transformers model folder.",
    "export": "Save a checkpoint's adapter as a PEFT adapter folder (adapter_config.json + safetensors).",
    "slurm": "Render an sbatch script for a config (nodes, GPUs, array of configs or methods) and submit it.",
    "compare": "Run a comparison study (methods x seeds) and write its tables and plots; or collect finished runs.",
}


class SaveConfigToRunDir(SaveConfigCallback):
    """Lightning's config saving, into lit-peft's run folder (``metrics.run_dir``): per run even where
    the first logger is W&B's, whose ``log_dir`` is shared; an existing config is a clear error, except
    in a requeued Slurm job, which continues its own folder. The resolved config also goes to the
    W&B run's config."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.already_saved:
            return
        path = run_dir(trainer) / self.config_filename
        exists = trainer.strategy.broadcast(path.is_file() if trainer.is_global_zero else False)
        self.save_config(trainer, pl_module, stage)
        # trainer.ckpt_path is set only after setup; the parsed config has it already
        if exists and slurm.continues(self.config.get("ckpt_path"), path.parent):
            self.already_saved = True
            return
        if exists and not self.overwrite:
            raise ConfigError(f"{path} already exists: that run folder belongs to an earlier run and is left as it "
                              "is; choose another --trainer.logger.init_args.name or .version")
        if trainer.is_global_zero:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.parser.save(self.config, str(path), skip_none=False, overwrite=self.overwrite, multifile=self.multifile)
            self.already_saved = True
        self.already_saved = trainer.strategy.broadcast(self.already_saved)

    def save_config(self, trainer, pl_module, stage: str) -> None:
        from lightning.pytorch.loggers import WandbLogger

        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and trainer.is_global_zero:
                config = self.parser.dump(self.config, format="json", skip_none=False)
                logger.experiment.config.update({"lit_peft": json.loads(config)}, allow_val_change=True)


class LitPeftCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(Method, "method", subclass_mode=True, required=False)
        parser.set_defaults({"method": {"class_path": DEFAULT_METHOD}})
        parser.add_lightning_class_args(EfficiencyReport, "report")
        parser.add_lightning_class_args(PredictionWriter, "predictions")
        parser.add_lightning_class_args(Harness, "harness")
        parser.add_argument("--optimizer", type=Optional[OptimizerCallable], default=None,
                            help="any optimizer by class_path, built over the method's parameter groups (the task's "
                                 "`optimizer` argument; configs/optim/ has presets)")
        parser.add_argument("--lr_scheduler", type=Optional[LRSchedulerCallable], default=None,
                            help="any learning-rate scheduler by class_path, stepped every optimizer step (the task's "
                                 "`lr_scheduler` argument)")
        parser.add_argument("--matmul_precision", type=Optional[Literal["highest", "high", "medium"]], default=None,
                            help="torch.set_float32_matmul_precision before the run: high lets float32 matmuls use "
                                 "TF32 tensor cores on Ampere and later GPUs (the GPU presets); unset: torch's default")

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        from jsonargparse import ArgumentError

        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:
            argv = list(args if args is not None else sys.argv[1:])
            command = next((a for a in argv if a in self.subcommands()), "fit")
            sub = getattr(self, "_subcommand_parsers", {}).get(command)
            keys = [a.dest for a in sub._actions] if sub is not None else []
            raise ConfigError(short_message(str(err), keys, command, argv, EXTRA)) from err
        config = self.config[self.config["subcommand"]] if self.config.get("subcommand") else self.config
        ckpt_path = config.get("ckpt_path")
        if ckpt_path and str(ckpt_path) not in checkpoints.LIGHTNING_WORDS:
            # missing, truncated, foreign: one message before LightningCLI itself loads it
            ckpt = checkpoints.read(ckpt_path, "--ckpt_path")
            if Path(ckpt_path).is_dir() and not shards(config["trainer"].get("strategy")):
                raise ConfigError(f"--ckpt_path '{ckpt_path}' is a sharded checkpoint folder, which only a sharded "
                                  "strategy loads: run with the strategy that wrote it (configs/trainer/fsdp.yaml or "
                                  "fsdp2.yaml), or turn it into a model folder with `lit-peft merge` / `export`")
            method_as_trained(config, ckpt, ckpt_path)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.get("matmul_precision"):
            import torch

            torch.set_float32_matmul_precision(config["matmul_precision"])
        optimizer_into_model(config)
        runs_under_root(config["trainer"])
        if self.subcommand == "fit":  # in a Slurm batch job: the job's own run folder, resumed where it can be
            fit = self.config["fit"]
            ckpt_path, key, said = slurm.requeue_start(fit["trainer"], fit.get("ckpt_path"))
            slurm.key_run_folder(fit["trainer"], key)
            if ckpt_path != fit.get("ckpt_path"):
                fit["ckpt_path"] = ckpt_path
            if said:
                print(f"lit-peft: {said}", file=sys.stderr, flush=True)
        take_versions(config["trainer"])

    def before_fit(self) -> None:
        slurm.continue_csv_metrics(self.trainer, self.config_init["fit"].get("ckpt_path"))

    def instantiate_trainer(self, **kwargs):
        # as LightningCLI's, but `method: null` (a plain LightningModule of your own) adds no callback
        keys = self._parser(self.subcommand).callback_keys
        extra = [cb for cb in (self._get(self.config_init, k) for k in keys) if cb is not None]
        extra.append(RequeueAtStepEnd())
        trainer_cfg = self._get(self.config_init, "trainer", default={})
        if rich_available() and trainer_cfg.get("enable_model_summary", True) is not False and not any(
                isinstance(cb, ModelSummary) for cb in [*extra, *(trainer_cfg.get("callbacks") or [])]):
            extra.append(PeftModelSummary())  # Lightning's, without the FLOPs it cannot measure here
        return self._instantiate_trainer({**self._get(self.config_init, "trainer", default={}), **kwargs}, extra)


DEFAULT_METHOD = "lit_peft.methods.FullFineTune"
ROOT = "{default_root_dir}"  # a logger's save_dir that stands for trainer.default_root_dir


def optimizer_into_model(config) -> None:
    """LightningCLI's top-level ``optimizer:`` / ``lr_scheduler:`` keys become the task's arguments of the same
    names, which build them over the method's parameter groups (LightningCLI's own would ignore the groups)."""
    for key in ("optimizer", "lr_scheduler"):
        value = config.get(key)
        if value is None:
            continue
        model = config.get("model")
        init = model.get("init_args") if hasattr(model, "get") else None
        if init is None or key not in init:
            raise ConfigError(f"{key}: the model ({getattr(model, 'class_path', model)}) takes no `{key}` argument; "
                              "a lit-peft task does (subclass one, or build the optimizer in configure_optimizers)")
        if init[key] is not None:
            raise ConfigError(f"{key} is given twice (top-level `{key}:` and model.init_args.{key}); give it once")
        init[key], config[key] = value, None


def method_as_trained(config, ckpt: dict, ckpt_path) -> None:
    """Validate, test, predict and resume with the method as the checkpoint recorded it. A run that names
    no method (the default, full fine-tuning) uses the checkpoint's, and a line says so; one whose method
    differs in anything that changes the model (its class, rank, alpha, targets; not dropout) is refused
    in one line naming each argument with both values: a LoRA trained at alpha 64 and evaluated at 16
    would load and score another model."""
    from jsonargparse import Namespace

    saved = (ckpt.get("lit_peft") or {}).get("method")
    given = checkpoints.plain(config.get("method"))
    problems = checkpoints.method_mismatch(saved, given) if saved and given else []
    if not problems:
        return
    if given.get("class_path") == DEFAULT_METHOD:
        config["method"] = Namespace(class_path=saved["class_path"], init_args=Namespace(**saved.get("init_args", {})))
        print(f"lit-peft: no method given, so the checkpoint's is used: {checkpoints.plain(saved)}", file=sys.stderr, flush=True)
        return
    raise ConfigError(f"the checkpoint does not belong to this run: it was trained with {', '.join(problems)}. Load it "
                      "with the config it was trained with (its run folder's config.yaml), or leave `method` out to "
                      "use the checkpoint's")


def shards(strategy) -> bool:
    """Whether a trainer.strategy setting is FSDP1 or FSDP2 (the strategies that load a sharded folder)."""
    name = strategy if isinstance(strategy, str) else (getattr(strategy, "class_path", None) or
                                                       (strategy.get("class_path") if hasattr(strategy, "get") else None)
                                                       or type(strategy).__name__)
    return any(word in str(name).lower() for word in ("fsdp", "modelparallel"))


def runs_under_root(trainer_cfg) -> None:
    """Loggers whose ``save_dir`` is ``{default_root_dir}`` (the default; the configs leave
    ``save_dir`` out) write under ``trainer.default_root_dir`` (``runs`` unless set), so
    ``--trainer.default_root_dir DIR`` moves the run."""
    loggers = trainer_cfg.get("logger")
    for spec in loggers if isinstance(loggers, (list, tuple)) else [loggers]:
        args = spec.get("init_args") if hasattr(spec, "get") else None
        if args is not None and args.get("save_dir") == ROOT:
            args["save_dir"] = trainer_cfg.get("default_root_dir") or "."


def rich_available() -> bool:
    """Whether Rich is installed (Lightning's default summary and bar then use it; lit-peft's summary is Rich's)."""
    import importlib.util

    return importlib.util.find_spec("rich") is not None


def take_versions(trainer_cfg) -> None:
    """Give each CSV / TensorBoard logger that names no version the next ``version_N`` of its folder, taken
    by creating it (``files.new_version``): two runs started at once under one root would otherwise both
    pick the same number and write into one folder. Only the launching process, or global rank 0, takes
    one; the other ranks' loggers write nothing, and Lightning hands them rank 0's folder."""
    if os.environ.get("LOCAL_RANK", "0") != "0" or os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) != "0":
        return
    if trainer_cfg.get("fast_dev_run"):  # Lightning swaps the loggers for a dummy: no folder to take
        return
    loggers = trainer_cfg.get("logger")
    taken: dict[Path, int] = {}
    for spec in loggers if isinstance(loggers, (list, tuple)) else [loggers]:
        path = spec.get("class_path") if hasattr(spec, "get") else None
        args = spec.get("init_args") if hasattr(spec, "get") else None
        if args is None or str(path).rpartition(".")[2] not in ("CSVLogger", "TensorBoardLogger") or args.get("version") is not None:
            continue
        parent = Path(args.get("save_dir") or ".") / str(args.get("name") or "")
        if parent not in taken:
            taken[parent] = files.new_version(parent)
        args["version"] = taken[parent]


def trainer_defaults() -> dict:
    return {
        # every logger's save_dir, unless the config gives one, is default_root_dir (runs_under_root)
        "default_root_dir": "runs",
        "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": ROOT, "name": "lit-peft"}},
        "deterministic": "warn",
    }


def run_lightning(args: Optional[list[str]] = None) -> None:
    from jsonargparse import set_parsing_settings

    set_parsing_settings(add_print_completion_argument=True)  # --print_completion {bash,zsh,tcsh} (shtab)
    LitPeftCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_callback=SaveConfigToRunDir,
        seed_everything_default=42,
        trainer_defaults=trainer_defaults(),
        parser_kwargs={"exit_on_error": False, "description": "Parameter-efficient fine-tuning with PyTorch Lightning. Also: "
                                      + "; ".join(f"`lit-peft {k}`: {v}" for k, v in EXTRA.items())},
        args=args,
    )


def run_extra(command: str, args: list[str]) -> Optional[int]:
    from jsonargparse import ArgumentParser

    from lit_peft import export as exporting

    if command == "slurm":
        from lit_peft.submit import main as submit

        return submit(args)
    if command == "compare":
        from lit_peft.compare import main as compare

        return compare(args)

    parser = ArgumentParser(prog=f"lit-peft {command}", description=EXTRA[command])
    parser.add_argument("--ckpt_path", required=True, help="checkpoint written by `lit-peft fit`")
    parser.add_argument("--output_dir", required=True, help="folder to write (must not exist or be empty)")
    if command == "merge":
        parser.add_argument("--dtype", default="float32", help="dtype of the saved weights: float32, bfloat16, float16")
    cfg = parser.parse_args(args)
    if command == "merge":
        exporting.merge_checkpoint(cfg.ckpt_path, Path(cfg.output_dir), dtype=cfg.dtype)
    else:
        exporting.export_checkpoint(cfg.ckpt_path, Path(cfg.output_dir))


def main(args: Optional[list[str]] = None) -> None:
    """``lit-peft``: from the shell (``args`` None: LightningCLI reads ``sys.argv``) or from Python.
    ``--debug`` or ``LIT_PEFT_DEBUG=1`` shows the full traceback of an input error."""
    quiet.install()
    from_shell = args is None
    argv = list(sys.argv[1:] if from_shell else args)
    debug = "--debug" in argv or os.environ.get("LIT_PEFT_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    if from_shell:
        sys.argv[1:] = argv
    if argv[:1] in (["--version"], ["-V"]):
        print(f"lit-peft {__version__}")
        return
    try:
        if argv and argv[0] in EXTRA:
            run_extra(argv[0], argv[1:])
        else:
            run_lightning(None if from_shell else argv)
            end_distributed()
    except Exception as err:  # noqa: BLE001 - bad input may arrive wrapped by jsonargparse or Lightning
        cause = config_error(err)
        if cause is None or debug:
            raise
        print(f"lit-peft: error: {cause}", file=sys.stderr)
        sys.exit(2)


def end_distributed() -> None:
    """Destroy the process group a finished DDP run leaves (Lightning does not). Left to interpreter
    exit, gloo's threads are torn down in no set order, and a rank can abort after its run is done
    ("terminate called without an active exception", exit 134: seen once in the two-node Slurm test)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def config_error(err: BaseException) -> Optional[ConfigError]:
    """The ConfigError behind ``err``, following the chain of causes."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, ConfigError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


if __name__ == "__main__":
    main()
