"""``lit-peft slurm``: an sbatch script for a config, from a template in ``slurm/``, submitted.

The templates are plain sbatch scripts (``sbatch slurm/single.sbatch --config ...`` works without
this command). Rendering sets their ``#SBATCH`` header from the options (nodes, tasks and GPUs a
node, CPUs, time, partition, account, array, extra lines) and writes the job's lit-peft arguments
into the script (``set -- ...`` at the ``# lit-peft slurm: arguments`` line), so the saved script is
the whole job and a requeue runs it again unchanged. An array job (``--array_configs`` or
``--array_methods``) runs one config or method per index. Lightning and ``lit_peft.slurm`` do the
rest inside the job: ranks, the run folder per job, requeue on SIGUSR1.

Written here because Lightning submits nothing (its SLURM support runs inside a job) and
submitit's pickled-function jobs do not fit a CLI whose jobs are a YAML file.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from lit_peft.errors import ConfigError

TEMPLATES = Path(__file__).resolve().parents[1] / "slurm"
ARGS_MARK = "# lit-peft slurm: arguments"


def method_class(name: str) -> str:
    """A method's class path from its short name (``lora``, ``dora``) or class path."""
    import lit_peft.methods as methods

    if "." in name:
        return name
    table = {getattr(getattr(methods, n), "name", None): f"lit_peft.methods.{n}" for n in methods.__all__}
    table.update({n.lower(): f"lit_peft.methods.{n}" for n in methods.__all__})
    if name.lower() not in table:
        known = sorted(k for k in table if k and k != "method")
        raise ConfigError(f"unknown method '{name}' in --array_methods; known: {', '.join(known)} (or a class path)")
    return table[name.lower()]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lit-peft slurm",
        description="Render an sbatch script from a template in slurm/ for lit-peft fit and submit it with sbatch. "
                    "Arguments after `--` go to `lit-peft fit` unchanged.")
    p.add_argument("--config", action="append", default=[], help="lit-peft config (repeatable; stacked in order)")
    p.add_argument("--template", help="single, multinode, array, or a path (default: from --nodes and the array)")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus_per_node", "--gpus-per-node", type=int, default=0, help="0: a CPU job")
    p.add_argument("--gpu_type", "--gpu-type", default=None, help="GRES type, e.g. A100: --gres=gpu:A100:N")
    p.add_argument("--tasks_per_node", "--tasks-per-node", type=int, default=None,
                   help="processes a node (default: one per GPU, or 1 on the CPU)")
    p.add_argument("--cpus_per_task", "--cpus-per-task", type=int, default=None)
    p.add_argument("--time", default=None, help="time limit, e.g. 04:00:00")
    p.add_argument("--signal_lead", "--signal-lead", type=int, default=None,
                   help="seconds before the time limit Slurm sends SIGUSR1, when the run saves an HPC checkpoint and "
                        "requeues (default: the template's, 300 in lit-peft's: a 7B full fine-tune's checkpoint, "
                        "written by every rank)")
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--job_name", "--job-name", default=None)
    p.add_argument("--array_configs", "--array-configs", nargs="+", default=None,
                   help="one more config per array index (after the shared --config files)")
    p.add_argument("--array_methods", "--array-methods", nargs="+", default=None,
                   help="one method per array index: short names (lora dora) or class paths")
    p.add_argument("--array_parallel", "--array-parallel", type=int, default=None, help="at most this many at once (%%N)")
    p.add_argument("--sbatch", action="append", default=[], help="extra #SBATCH line, e.g. --sbatch=--qos=high")
    p.add_argument("--env", default=None, help="environment to activate in the job (default: this one's, %s)" % sys.prefix)
    p.add_argument("--script_dir", "--script-dir", default="runs/slurm", help="where the rendered script is saved")
    p.add_argument("--dry_run", "--dry-run", action="store_true", help="print the script; submit nothing")
    return p


def set_option(header: list[str], key: str, value: Optional[str]) -> list[str]:
    """``header`` (the ``#SBATCH`` lines) with ``--key=value`` set, replaced, or (value None) kept."""
    if value is None:
        return header
    pattern = re.compile(rf"^#SBATCH\s+--{re.escape(key)}(=|\s|$)")
    line = f"#SBATCH --{key}" + ("" if value == "" else f"={value}")
    for i, old in enumerate(header):
        if pattern.match(old):
            return header[:i] + [line] + header[i + 1:]
    return header + [line]


def drop_option(header: list[str], key: str) -> list[str]:
    pattern = re.compile(rf"^#SBATCH\s+--{re.escape(key)}(=|\s|$)")
    return [line for line in header if not pattern.match(line)]


def render(cfg: argparse.Namespace, fit_args: list[str], tag: Optional[str] = None,
           sweep: Optional[list[list[str]]] = None, shared: Optional[list[str]] = None, command: str = "fit") -> str:
    """The sbatch script for these options. ``sweep`` (one argument list per array index) and
    ``shared`` (the arguments before them; by default the ``--config`` files) serve callers such as
    ``lit-peft compare``, whose runs differ in more than one config or method; ``command`` is the lit-peft
    command each task runs (``compare`` for a tuned study's trials: ``compare STUDY --trial RUN -- ...``)."""
    if not cfg.config:
        raise ConfigError("give the run's config: lit-peft slurm --config configs/lora_sst2.yaml [...]")
    for path in cfg.config + (cfg.array_configs or []):
        if not Path(path).is_file():
            raise ConfigError(f"config file '{path}' does not exist")
    if cfg.array_configs and cfg.array_methods:
        raise ConfigError("give --array_configs or --array_methods, not both (one sweep dimension per array job)")
    if cfg.nodes < 1 or cfg.gpus_per_node < 0:
        raise ConfigError("--nodes must be at least 1 and --gpus_per_node at least 0")
    if sweep is None:
        sweep = ([["--config", c] for c in cfg.array_configs] if cfg.array_configs else
                 [["--method", method_class(m)] for m in cfg.array_methods] if cfg.array_methods else None)
    name = cfg.template or ("array" if sweep else "multinode" if cfg.nodes > 1 else "single")
    path = Path(name) if name.endswith(".sbatch") or os.sep in name else TEMPLATES / f"{name}.sbatch"
    if not path.is_file():
        raise ConfigError(f"no sbatch template '{name}' ({path}); the templates are single, multinode and array in "
                          f"{TEMPLATES}, or give --template PATH")
    text = path.read_text()
    if ARGS_MARK not in text:
        raise ConfigError(f"template {path} has no '{ARGS_MARK}' line, where the job's arguments go")
    lines = text.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("#SBATCH"))
    last = max(i for i, line in enumerate(lines) if line.startswith("#SBATCH"))
    header = lines[first:last + 1]

    tasks = cfg.tasks_per_node or max(cfg.gpus_per_node, 1)
    header = set_option(header, "nodes", str(cfg.nodes))
    header = set_option(drop_option(header, "ntasks"), "ntasks-per-node", str(tasks))
    if cfg.gpus_per_node:
        gres = f"gpu:{cfg.gpu_type}:{cfg.gpus_per_node}" if cfg.gpu_type else f"gpu:{cfg.gpus_per_node}"
        header = set_option(drop_option(header, "gpus-per-node"), "gres", gres)
    else:
        header = drop_option(drop_option(header, "gres"), "gpus-per-node")
    if cfg.signal_lead is not None:
        if cfg.signal_lead < 1:
            raise ConfigError(f"--signal_lead must be a positive number of seconds, got {cfg.signal_lead}")
        header = set_option(header, "signal", f"SIGUSR1@{cfg.signal_lead}")
    for key, value in (("cpus-per-task", cfg.cpus_per_task), ("time", cfg.time), ("partition", cfg.partition),
                       ("account", cfg.account), ("job-name", cfg.job_name)):
        header = set_option(header, key, None if value is None else str(value))
    if sweep:
        header = set_option(header, "array", f"0-{len(sweep) - 1}" + (f"%{cfg.array_parallel}" if cfg.array_parallel else ""))
        header = set_option(header, "output", "slurm-%A_%a.out")
    for extra in cfg.sbatch:
        key, _, value = extra.lstrip("-").partition("=")
        header = set_option(header, key, value)

    if shared is None:
        shared = [a for c in cfg.config for a in ("--config", c)]
    shared = list(shared) + list(fit_args)
    env = cfg.env or sys.prefix
    block = [f"# rendered by lit-peft slurm{f' at {tag}' if tag else ''} from {path}",
             f"cd {shlex.quote(os.getcwd())}",
             f"export LIT_PEFT_ENV={shlex.quote(env)}"]
    if command != "fit":
        block.append(f"export LIT_PEFT_COMMAND={shlex.quote(command)}")
    if sweep:
        block.append("export LIT_PEFT_RENDERED=1")
        block.append('case "$SLURM_ARRAY_TASK_ID" in')
        for i, extra in enumerate(sweep):
            block.append(f"  {i}) set -- {shlex.join(shared + extra)} ;;")
        block.append('  *) echo "no run for array index $SLURM_ARRAY_TASK_ID" >&2; exit 2 ;;')
        block.append("esac")
    else:
        block.append(f"set -- {shlex.join(shared)}")
    body = lines[last + 1:]
    at = body.index(ARGS_MARK)
    return "\n".join(lines[:first] + header + body[:at] + block + body[at + 1:]) + "\n"


def split_fit_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """(this command's arguments, the ``lit-peft fit`` arguments after ``--``)."""
    if "--" not in argv:
        return list(argv), []
    at = argv.index("--")
    return argv[:at], argv[at + 1:]


def main(argv: list[str]) -> int:
    argv, fit_args = split_fit_args(argv)
    cfg = parser().parse_args(argv)
    tag = time.strftime("%Y%m%d-%H%M%S")
    script = render(cfg, fit_args, tag)
    if cfg.dry_run:
        print(script, end="")
        return 0
    sbatch(script, cfg, tag)
    return 0


def sbatch(script: str, cfg: argparse.Namespace, tag: Optional[str] = None) -> str:
    """Save ``script`` under ``cfg.script_dir`` and submit it; returns the job id."""
    tag = tag or time.strftime("%Y%m%d-%H%M%S")
    if not shutil.which("sbatch"):
        raise ConfigError("sbatch is not on PATH: run this on a Slurm login node, or use --dry_run to see the script")
    folder = Path(cfg.script_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{cfg.job_name or 'lit-peft'}-{tag}.sbatch"
    n = 1
    while path.exists():  # two submissions in one second keep both scripts
        path, n = folder / f"{cfg.job_name or 'lit-peft'}-{tag}-{n}.sbatch", n + 1
    path.write_text(script)
    done = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        raise ConfigError(f"sbatch refused {path}: {done.stderr.strip() or done.stdout.strip()}")
    job = done.stdout.strip().split(";")[0]
    print(f"[lit-peft] submitted job {job}: {path}")
    return job
