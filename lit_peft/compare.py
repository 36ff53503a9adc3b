"""``lit-peft compare STUDY.yaml``: a comparison study in one command.

A study names a base config, its runs (a method config, overrides, or both), the seeds, the metric,
the reference method and its budget (overrides every run gets)::

    title: LoRA against DoRA on SST-2
    base: configs/lora_sst2.yaml
    metric: val_acc
    reference: lora
    seeds: [1, 2, 3]
    budget: {data.init_args.limit_train_rows: 2000, trainer.max_epochs: 1}   # ~1 min a run here
    runs:
      lora: {}
      dora: {config: configs/dora_sst2.yaml}
      lora_r16: {args: {method.init_args.r: 16}}

Each (run, seed) is one ``lit-peft fit`` in ``<out>/runs/<run>/seed<S>-<key>/``, where ``key`` hashes
the configs' contents, the overrides and the seed: a changed config is a new folder, never mixed
with the old one. Re-running the study skips finished runs (``summary.json`` from fit), resumes
interrupted ones from their newest checkpoint, and retries failed ones. A ``test_`` metric
(``test_exact_match``) runs ``lit-peft test`` on each fit's checkpoint into the same folder. ``--slurm`` submits the
runs as one array job through ``lit-peft slurm`` instead; ``--collect DIR...`` builds the tables
from finished run folders (the study's, or any lit-peft run folders). Tables and plots come from
``lit_peft.report``; a run that failed is in them with its error, and a study with no finished run
is an error.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from lit_peft import files, report
from lit_peft.errors import ConfigError

CURVE_KEYS = ("train_loss_step", "train_loss_epoch", "train_loss", "val_loss")
STUDY_KEYS = {"title", "base", "metric", "reference", "seeds", "budget", "runs", "notes", "wandb"}


@dataclass
class Run:
    name: str
    seed: int
    configs: list[str]
    args: list[str]
    key: str = ""
    folder: Path = Path()
    log: Path = Path()
    #: the metric is a test one (test_exact_match): the fit is followed by ``lit-peft test`` on its checkpoint
    test: bool = False


@dataclass
class Study:
    title: str
    base: list[str]
    metric: str
    reference: Optional[str]
    seeds: list[int]
    budget: list[str]
    runs: dict[str, dict[str, Any]]
    notes: str = ""
    wandb: Optional[dict[str, Any]] = None
    source: Path = Path()
    extra: list[str] = field(default_factory=list)


def as_args(overrides: Any, where: str) -> list[str]:
    """Overrides as ``lit-peft fit`` arguments: a mapping of dotted keys, or a list of arguments."""
    if overrides is None:
        return []
    if isinstance(overrides, list):
        return [str(a) for a in overrides]
    if isinstance(overrides, dict):
        out = []
        for key, value in overrides.items():
            text = value if isinstance(value, str) else json.dumps(value)
            out += [f"--{key}", text]
        return out
    raise ConfigError(f"{where} must be a mapping of dotted keys (trainer.max_epochs: 1) or a list of arguments")


def load_study(path: Path) -> Study:
    if not path.is_file():
        raise ConfigError(f"study file '{path}' does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"study file '{path}' is not valid YAML: {err}") from err
    unknown = sorted(set(raw) - STUDY_KEYS)
    if unknown:
        raise ConfigError(f"study '{path}' has unknown key(s) {unknown}; a study has {sorted(STUDY_KEYS)}")
    for key in ("base", "runs", "metric"):
        if key not in raw:
            raise ConfigError(f"study '{path}' needs '{key}'")
    base = raw["base"] if isinstance(raw["base"], list) else [raw["base"]]
    runs = raw["runs"]
    if not isinstance(runs, dict) or not runs:
        raise ConfigError(f"study '{path}': runs must be a mapping of run names to {{config, args}}")
    runs = {name: (spec if isinstance(spec, dict) else {"config": spec}) if spec is not None else {}
            for name, spec in runs.items()}
    for name, spec in runs.items():
        bad = sorted(set(spec) - {"config", "args"})
        if bad:
            raise ConfigError(f"study '{path}': run '{name}' has unknown key(s) {bad}; a run has config and args")
    reference = raw.get("reference")
    if reference is not None and reference not in runs:
        raise ConfigError(f"study '{path}': reference '{reference}' is not one of the runs {list(runs)}")
    seeds = raw.get("seeds", [42])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise ConfigError(f"study '{path}': seeds must be a list of integers")
    root = path.parent
    resolve = lambda p: str(p) if Path(p).is_absolute() or Path(p).exists() else str((root / p))  # noqa: E731
    study = Study(title=raw.get("title", path.stem), base=[resolve(b) for b in base], metric=raw["metric"],
                  reference=reference, seeds=seeds, budget=as_args(raw.get("budget"), "budget"), runs=runs,
                  notes=raw.get("notes", ""), wandb=raw.get("wandb"), source=path)
    for name, spec in runs.items():
        configs = spec.get("config") or []
        spec["config"] = [resolve(c) for c in (configs if isinstance(configs, list) else [configs])]
        spec["args"] = as_args(spec.get("args"), f"run '{name}' args")
    for config in study.base + [c for s in runs.values() for c in s["config"]]:
        if not Path(config).is_file():
            raise ConfigError(f"study '{path}': config file '{config}' does not exist")
    return study


def plan(study: Study, out: Path) -> list[Run]:
    runs = []
    for name, spec in study.runs.items():
        for seed in study.seeds:
            configs = study.base + spec["config"]
            args = study.budget + spec["args"] + study.extra
            digest = hashlib.sha1(json.dumps({"configs": [Path(c).read_text() for c in configs], "args": args,
                                              "seed": seed}).encode()).hexdigest()[:8]
            run = Run(name, seed, configs, args, key=digest, test=study.metric.startswith("test_"))
            run.folder = out / "runs" / name / f"seed{seed}-{digest}"
            run.log = out / "logs" / f"{name}-seed{seed}-{digest}.log"
            runs.append(run)
    return runs


def fit_args(run: Run) -> list[str]:
    logger = {"class_path": "lightning.pytorch.loggers.CSVLogger",
              "init_args": {"save_dir": str(run.folder.parent.parent), "name": run.name, "version": run.folder.name}}
    args = [a for c in run.configs for a in ("--config", c)] + run.args
    return args + ["--seed_everything", str(run.seed), "--trainer.logger", json.dumps(logger)]


def state(run: Run) -> str:
    summary = run.folder / "summary.json"
    stages = json.loads(summary.read_text()).get("stages", []) if summary.is_file() else []
    if "fit" in stages:
        return "finished" if "test" in stages or not run.test else "untested"
    if (run.folder / "failed.json").is_file():
        return "failed"
    return "interrupted" if list((run.folder / "checkpoints").glob("*.ckpt")) else "new"


def error_message(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("lit-peft: error:"):
            return line
    tail = [line for line in lines if not line.startswith((" ", "\t"))]
    return "\n".join(tail[-3:]) if tail else "the run exited without a message"


def run_locally(run: Run) -> tuple[bool, float]:
    """One ``lit-peft fit``, resumed from its newest checkpoint if it was interrupted; then, for a
    test metric, ``lit-peft test`` on the fit's checkpoint, into the same run folder."""
    start = time.time()
    ok = state(run) == "untested" or _fit(run)
    if ok and run.test:
        newest = max((run.folder / "checkpoints").glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
        ok = _call(run, "test", ["--config", str(run.folder / "config.yaml"), "--ckpt_path", str(newest)], "a")
    return ok, time.time() - start


def _fit(run: Run) -> bool:
    args = fit_args(run)
    if state(run) == "interrupted":
        newest = max((run.folder / "checkpoints").glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
        args += ["--ckpt_path", str(newest)]
    elif run.folder.exists():  # a failed attempt, or one stopped before its first checkpoint: kept aside
        run.folder.rename(run.folder.with_name(f"{run.folder.name}.attempt-{time.strftime('%Y%m%d-%H%M%S')}"))
    return _call(run, "fit", args, "w")


def _call(run: Run, command: str, args: list[str], mode: str) -> bool:
    """``lit-peft COMMAND ARGS`` with its output in the run's log; a failure leaves failed.json."""
    run.log.parent.mkdir(parents=True, exist_ok=True)
    with run.log.open(mode) as log:
        log.write(f"$ lit-peft {command} " + shlex.join(args) + "\n")
        log.flush()
        done = subprocess.run([sys.executable, "-m", "lit_peft.cli", command, *args], stdout=log,
                              stderr=subprocess.PIPE, text=True)
        log.write(done.stderr)
    if done.returncode != 0:
        run.folder.mkdir(parents=True, exist_ok=True)
        files.write_text(run.folder / "failed.json", json.dumps(
            {"returncode": done.returncode, "error": error_message(done.stderr), "log": str(run.log)}, indent=1) + "\n")
    return done.returncode == 0


def record(name: str, seed: int, folder: Path, metric: str) -> report.RunRecord:
    summary_path, failed = folder / "summary.json", folder / "failed.json"
    config = yaml.safe_load((folder / "config.yaml").read_text()) if (folder / "config.yaml").is_file() else {}
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        return report.RunRecord(name, seed, "finished", str(folder), summary,
                                report.read_curves(folder / "metrics.csv", CURVE_KEYS + (metric,)), config=config,
                                environment=summary.get("environment", {}))
    if failed.is_file():
        return report.RunRecord(name, seed, "failed", str(folder), error=json.loads(failed.read_text())["error"],
                                config=config)
    return report.RunRecord(name, seed, "pending", str(folder), config=config)


def collect(dirs: list[Path], metric: str) -> list[report.RunRecord]:
    """Records of every run folder (one holding summary.json or failed.json) under ``dirs``."""
    records = []
    for d in dirs:
        if not d.is_dir():
            raise ConfigError(f"--collect folder '{d}' does not exist")
        folders = sorted({p.parent for pattern in ("summary.json", "failed.json") for p in d.rglob(pattern)
                          if ".attempt-" not in p.parent.name})  # attempts set aside by a re-run
        for folder in folders:
            rec = record("", 0, folder, metric)  # name and seed from what the folder holds
            seed = rec.config.get("seed_everything")
            if seed is None and folder.name.startswith("seed"):
                seed = int(folder.name[4:].split("-")[0])
            rec.seed = int(seed if seed is not None else 0)
            rec.name = folder.parent.name if folder.name.startswith("seed") else rec.summary.get("method", folder.parent.name)
            records.append(rec)
    return records


def seconds(value: float) -> str:
    value = int(round(value))
    return f"{value // 3600}h{value % 3600 // 60:02d}m" if value >= 3600 else f"{value // 60}m{value % 60:02d}s"


def run_study(study: Study, out: Path) -> list[report.RunRecord]:
    runs = plan(study, out)
    todo = [r for r in runs if state(r) != "finished"]
    print(f"[lit-peft compare] {study.title}: {len(runs)} runs, {len(runs) - len(todo)} finished before, {len(todo)} to run")
    durations: list[float] = []
    for i, run in enumerate(todo, 1):
        eta = f", ETA {seconds(sum(durations) / len(durations) * (len(todo) - i + 1))}" if durations else ""
        how = {"interrupted": "resuming", "untested": "testing"}.get(state(run), "running")
        print(f"[lit-peft compare] {how} {i}/{len(todo)}: {run.name} seed {run.seed}{eta}", flush=True)
        ok, took = run_locally(run)
        durations.append(took)
        verdict = "done" if ok else f"FAILED: {json.loads((run.folder / 'failed.json').read_text())['error']}"
        print(f"[lit-peft compare]   {verdict} in {seconds(took)} (log: {run.log})", flush=True)
    return [record(r.name, r.seed, r.folder, study.metric) for r in runs]


def submit_study(study: Study, out: Path, slurm_args: list[str]) -> None:
    from lit_peft import submit

    runs = [r for r in plan(study, out) if state(r) != "finished"]
    if not runs:
        print("[lit-peft compare] every run is finished; nothing to submit")
        return
    cfg = submit.parser().parse_args(["--config", study.base[0], "--job_name", "lit-peft-compare", *slurm_args])
    script = submit.render(cfg, [], time.strftime("%Y%m%d-%H%M%S"), sweep=[fit_args(r) for r in runs], shared=[])
    if cfg.dry_run:
        print(script, end="")
        return
    job = submit.sbatch(script, cfg)
    print(f"[lit-peft compare] {len(runs)} runs as array job {job}; when they end: "
          f"lit-peft compare {study.source} --output_dir {out}")


def log_to_wandb(study: Study, rows: list[dict[str, Any]], plots: dict[str, Path], out: Path) -> None:
    import wandb

    options = dict(study.wandb or {})
    run = wandb.init(project=options.pop("project", "lit-peft"), name=options.pop("name", f"compare-{Path(out).name}"),
                     job_type="compare", dir=str(out), config={"study": str(study.source), "metric": study.metric},
                     **options)
    columns = list(rows[0])
    run.log({"results": wandb.Table(columns=columns, data=[[row.get(c) for c in columns] for row in rows]),
             **{name.removesuffix(".png"): wandb.Image(str(path)) for name, path in plots.items()}})
    run.finish()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lit-peft compare", description="Run a comparison study and write its tables and plots.")
    p.add_argument("study", nargs="?", help="study YAML (see lit_peft/compare.py; ready ones in studies/)")
    p.add_argument("--output_dir", "--output-dir", default=None, help="default: results/<study name>")
    p.add_argument("--collect", nargs="+", type=Path, default=None,
                   help="build the tables from finished run folders under these folders; run nothing")
    p.add_argument("--metric", default=None, help="with --collect and no study: the metric to compare (e.g. val_acc)")
    p.add_argument("--reference", default=None, help="with --collect and no study: the reference method")
    p.add_argument("--slurm", nargs=argparse.REMAINDER, default=None,
                   help="submit the runs as one array job; what follows goes to lit-peft slurm (e.g. --partition gpu)")
    p.add_argument("--only", nargs="+", default=None, help="run these runs of the study only")
    return p


def main(argv: list[str]) -> int:
    from lit_peft.submit import split_fit_args

    argv, extra = split_fit_args(argv)
    cfg = parser().parse_args(argv)
    study = load_study(Path(cfg.study)) if cfg.study else None
    if study is None and not cfg.collect:
        raise ConfigError("give a study file (lit-peft compare studies/sst2_all_methods.yaml) or --collect DIR")
    if study is not None:
        study.extra = extra
        if cfg.only:
            missing = sorted(set(cfg.only) - set(study.runs))
            if missing:
                raise ConfigError(f"--only: no run(s) {missing} in the study; it has {list(study.runs)}")
            study.runs = {k: v for k, v in study.runs.items() if k in cfg.only}
    out = Path(cfg.output_dir or f"results/{study.source.stem if study else 'collected'}")
    metric = cfg.metric or (study.metric if study else None)
    if metric is None:
        raise ConfigError("--collect without a study needs --metric (e.g. val_acc)")
    guard = files.lock(out, timeout=0)  # one compare at a time on a study: a second would restart its live runs
    try:
        guard.acquire()
    except files.Timeout:
        raise ConfigError(f"another `lit-peft compare` is running on {out} (it holds {guard.lock_file}); wait for it "
                          "to end, or give another --output_dir") from None
    try:
        return _compare(cfg, study, out, metric)
    finally:
        guard.release()


def _compare(cfg: argparse.Namespace, study: Optional[Study], out: Path, metric: str) -> int:
    if cfg.slurm is not None:
        submit_study(study, out, cfg.slurm)
        return 0
    records = collect(cfg.collect, metric) if cfg.collect else run_study(study, out)
    finished = [r for r in records if r.status == "finished"]
    if not finished:
        failed = [r for r in records if r.status == "failed"]
        raise ConfigError("the study has no finished run" + (f"; {len(failed)} failed, first: {failed[0].name} seed "
                                                              f"{failed[0].seed}: {failed[0].error}" if failed else ""))
    if not any(metric in r.summary for r in finished):
        known = sorted(k for k in finished[0].summary if k.startswith(("val_", "test_")))
        raise ConfigError(f"no finished run reports '{metric}'; they report {known}")
    reference = cfg.reference or (study.reference if study else None)
    title = study.title if study else f"runs under {', '.join(map(str, cfg.collect))}"
    notes = study.notes if study else ""
    rows = report.write_tables(records, out, metric, reference, title, notes)
    plots = report.write_plots(rows, records, out, metric)
    if study is not None and study.wandb is not None:
        log_to_wandb(study, rows, plots, out)
    failed = sum(r.status == "failed" for r in records)
    print(f"[lit-peft compare] {len(finished)}/{len(records)} runs finished"
          + (f", {failed} failed" if failed else "") + f": {out / 'results.md'}")
    return 0
