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

A ``tune:`` block (``lit_peft.tuning``; docs/studies.md) adds a tuning stage before the seeds: every
run gets the same number of Optuna trials on the same budget, each a ``lit-peft fit`` that validates
on rows held out of its training split, and its seeds then train with the values it chose.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from lit_peft import files, report, tuning
from lit_peft.errors import ConfigError

CURVE_KEYS = ("train_loss_step", "train_loss_epoch", "train_loss", "val_loss")
STUDY_KEYS = {"title", "base", "metric", "reference", "seeds", "budget", "runs", "notes", "wandb", "tune"}


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
    #: the tuning stage (``lit_peft.tuning``): trials per run before the seeds train with the chosen values
    tune: Optional[tuning.Tune] = None


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
        bad = sorted(set(spec) - {"config", "args", "tune"})
        if bad:
            raise ConfigError(f"study '{path}': run '{name}' has unknown key(s) {bad}; a run has config, args and tune")
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
                  notes=raw.get("notes", ""), wandb=raw.get("wandb"), source=path,
                  tune=tuning.load_tune(raw.get("tune"), f"study '{path}'", raw["metric"]))
    for name, spec in runs.items():
        if study.tune is None and spec.get("tune") is not None:
            raise ConfigError(f"study '{path}': run '{name}' has tune but the study has no tune block (trials, metric, space)")
        if study.tune is not None:
            spec["space"] = tuning.run_space(study.tune, name, spec.pop("tune", None), f"study '{path}'")
    for name, spec in runs.items():
        configs = spec.get("config") or []
        spec["config"] = [resolve(c) for c in (configs if isinstance(configs, list) else [configs])]
        spec["args"] = as_args(spec.get("args"), f"run '{name}' args")
    for config in study.base + [c for s in runs.values() for c in s["config"]]:
        if not Path(config).is_file():
            raise ConfigError(f"study '{path}': config file '{config}' does not exist")
    return study


def plan(study: Study, out: Path, chosen: Optional[dict[str, dict[str, Any]]] = None) -> list[Run]:
    """The study's (run, seed) fits; in a tuned study, those of the runs whose tuning chose values (``chosen``),
    with those values."""
    runs = []
    for name, spec in study.runs.items():
        if study.tune is not None and (chosen or {}).get(name) is None:
            continue
        for seed in study.seeds:
            configs = study.base + spec["config"]
            tuned = as_args((chosen or {}).get(name), "chosen values")
            args = study.budget + spec["args"] + tuned + study.extra
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
        set_aside(run.folder)
    return _call(run, "fit", args, "w")


def set_aside(folder: Path) -> None:
    """Rename an earlier attempt's folder to ``<name>.attempt-<time>``: kept, never overwritten."""
    folder.rename(folder.with_name(f"{folder.name}.attempt-{time.strftime('%Y%m%d-%H%M%S')}"))


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


# ---- the tuning stage (lit_peft.tuning) --------------------------------------------------------
def tuning_name(study: Study, name: str, spec: dict[str, Any]) -> str:
    """The Optuna study (and folder) of run ``name``'s tuning: the run's name and a hash of all that its
    trials depend on (configs' contents, overrides, the tune block, the space), so a changed config or
    budget is tuned anew and never takes the old trials' choice."""
    tune = study.tune
    digest = hashlib.sha1(json.dumps({
        "configs": [Path(c).read_text() for c in study.base + spec["config"]],
        "args": study.budget + spec["args"] + study.extra, "seed": study.seeds[0], "space": spec["space"],
        "tune": {k: getattr(tune, k) for k in ("metric", "direction", "budget", "holdout", "report_every", "enqueue",
                                               "startup_trials", "warmup_steps", "sampler")},
    }, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{name}-{digest}"


def tune_runs(study: Study, out: Path, worker: Optional[str] = None) -> dict[str, dict[str, Any]]:
    """Run the trials each run still needs (a ``--trial`` worker: one trial of its run) and return, per run,
    what tuning did (``tuning.summary``)."""
    tune = study.tune
    done: dict[str, dict[str, Any]] = {}
    for name, spec in study.runs.items():
        if worker is not None and name != worker:
            continue
        optuna_study = tuning.open_study(out, tuning_name(study, name, spec), tune, spec["space"])
        if worker is None:
            stale = tuning.release_interrupted(optuna_study)  # we hold the study's lock: nothing else runs its trials
            if stale:
                print(f"[lit-peft compare] {name}: {stale} trial(s) an earlier compare left unfinished will run again")
        todo = tuning.remaining(optuna_study, tune)
        if todo:
            print(f"[lit-peft compare] tuning {name}: {tune.trials - todo}/{tune.trials} trials done, "
                  f"{1 if worker else todo} to run", flush=True)
        for _ in range(1 if worker else todo):
            if not run_trial(study, out, name, spec, optuna_study):
                break
        done[name] = tuning.summary(optuna_study, tune)
    return done


def run_trial(study: Study, out: Path, name: str, spec: dict[str, Any], optuna_study: Any) -> bool:
    """One trial of run ``name``: ``lit-peft fit`` on the tuning budget with the sampled values, validating on
    rows held out of training; its outcome told to the study. False when none was left to run."""
    tune = study.tune
    with files.lock(out / "tuning" / "ask"):  # counting and asking as one step: array tasks ask at once
        if not tuning.remaining(optuna_study, tune):
            return False
        trial = optuna_study.ask(tuning.distributions(spec["space"]))
    params = {key: tuning.as_value(value) for key, value in trial.params.items()}
    seed = study.seeds[0]
    # named as its Optuna study: the logger puts the fit in <out>/tuning/<that name>/trialNNN
    run = Run(optuna_study.study_name, seed, study.base + spec["config"], study.budget + spec["args"] + as_args(tune.budget, "tune.budget")
              + as_args(params, "sampled values") + study.extra)
    run.folder = out / "tuning" / optuna_study.study_name / f"trial{trial.number:03d}"
    run.log = out / "logs" / f"tuning-{optuna_study.study_name}-trial{trial.number:03d}.log"
    if run.folder.exists():  # a trial number is never reused; a leftover folder is set aside, not overwritten
        set_aside(run.folder)
    args = fit_args(run)
    for callback in tuning.trial_callbacks(out, optuna_study.study_name, trial, tune, run.folder, seed):
        args += ["--trainer.callbacks+", json.dumps(callback)]
    if "trainer.val_check_interval" not in tune.budget:
        args += ["--trainer.val_check_interval", str(tune.report_every)]
    print(f"[lit-peft compare]   trial {trial.number} of {name}: " + ", ".join(f"{k.split('.')[-1]}={v}" for k, v in params.items()),
          flush=True)
    start = time.time()
    ok = _call(run, "fit", args, "w")
    error = "" if ok else json.loads((run.folder / "failed.json").read_text())["error"]
    verdict = tuning.tell(optuna_study, trial, run.folder, ok, time.time() - start, tune.metric, error)
    # a trial is never resumed: its checkpoints (a full fine-tune's are the whole model) would only fill the disk
    shutil.rmtree(run.folder / "checkpoints", ignore_errors=True)
    print(f"[lit-peft compare]   trial {trial.number} of {name}: {verdict} in {seconds(time.time() - start)}", flush=True)
    return True


def run_study(study: Study, out: Path, chosen: Optional[dict[str, dict[str, Any]]] = None) -> list[report.RunRecord]:
    runs = plan(study, out, chosen)
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

    cfg = submit.parser().parse_args(["--config", study.base[0], "--job_name", "lit-peft-compare", *slurm_args])
    chosen: dict[str, Any] = {}
    if study.tune is not None:
        trials = []  # one array task per trial still to run: `lit-peft compare STUDY --trial RUN`
        for name in study.runs:
            optuna_study = tuning.open_study(out, tuning_name(study, name, study.runs[name]), study.tune,
                                             study.runs[name]["space"])
            chosen[name] = tuning.chosen(optuna_study)
            trials += [name] * tuning.remaining(optuna_study, study.tune)
        if trials:
            head = [str(study.source.resolve()), "--output_dir", str(out.resolve())]
            script = submit.render(cfg, [], time.strftime("%Y%m%d-%H%M%S"), command="compare",
                                   sweep=[head + ["--trial", name, "--"] + study.extra for name in trials], shared=[])
            what = f"{len(trials)} tuning trials"
    if study.tune is None or not trials:
        runs = [r for r in plan(study, out, chosen) if state(r) != "finished"]
        if not runs:
            print("[lit-peft compare] every run is finished; nothing to submit")
            return
        script = submit.render(cfg, [], time.strftime("%Y%m%d-%H%M%S"), sweep=[fit_args(r) for r in runs], shared=[])
        what = f"{len(runs)} runs"
    if cfg.dry_run:
        print(script, end="")
        return
    job = submit.sbatch(script, cfg)
    after = "submit the tuned runs" if study.tune is not None and trials else "build the tables"
    print(f"[lit-peft compare] {what} as array job {job}; when they end, to {after}: "
          f"lit-peft compare {study.source} --output_dir {out}" + (" --slurm ..." if after.startswith("submit") else ""))


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
    p.add_argument("--trial", default=None, metavar="RUN",
                   help="run one tuning trial of RUN and exit (what the array tasks of a tuned --slurm study run)")
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
    if cfg.trial is not None:
        if study is None or study.tune is None or cfg.trial not in study.runs:
            raise ConfigError(f"--trial {cfg.trial}: needs a study with a tune block and a run of that name")
        tune_runs(study, out, worker=cfg.trial)  # no study lock: array tasks run trials side by side
        return 0
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
    tuned: dict[str, dict[str, Any]] = {}
    if study is not None and study.tune is not None and not cfg.collect:
        tuned = tune_runs(study, out)
    records = collect(cfg.collect, metric) if cfg.collect else run_study(study, out, {k: v["chosen"] for k, v in tuned.items()})
    for name, what in tuned.items():
        if what["chosen"] is None:  # every trial failed: the run is in the tables with the first error
            first = next((t["error"] for t in what["all"] if t["error"]), "no trial completed")
            records += [report.RunRecord(name, seed, "failed", str(out / "tuning" / name),
                                         error=f"tuning chose nothing: {first}") for seed in study.seeds]
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
    rows = report.write_tables(records, out, metric, reference, title, notes, tuned)
    plots = report.write_plots(rows, records, out, metric, tuned)
    if study is not None and study.wandb is not None:
        log_to_wandb(study, rows, plots, out)
    failed = sum(r.status == "failed" for r in records)
    print(f"[lit-peft compare] {len(finished)}/{len(records)} runs finished"
          + (f", {failed} failed" if failed else "") + f": {out / 'results.md'}")
    return 0
