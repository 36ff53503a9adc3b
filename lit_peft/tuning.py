"""The tuning stage of ``lit-peft compare``: every run of a study gets the same number of Optuna trials
on the same budget before its seeds train with the values it chose. A study file says::

    tune:
      trials: 8                          # the same for every run
      metric: val_acc                    # on rows held out of the training split, never the reported split
      budget: {data.init_args.limit_train_rows: 2000}   # overrides for the trials only
      space:
        model.init_args.learning_rate: {low: 1.0e-5, high: 1.0e-2, log: true}
        method.init_args.r: [4, 8, 16]   # a list is a categorical choice
      holdout: 0.2                       # the share (or number) of training rows trials validate on
      report_every: 0.25                 # validations per epoch a trial reports (the pruner's checkpoints)
      enqueue: [{model.init_args.learning_rate: 1.0e-3}]   # points tried first (the config's own values)
      sampler: tpe                       # or grid: every combination of the listed choices, trials = their number

and a run may add to the space or replace it (``tune: {space: {...}, replace: true}``). Each run is an
Optuna study, named after it and a hash of what its trials depend on (so a changed config is tuned
anew), in ``<out>/tuning/journal.log`` (journal file storage: an interrupted study resumes, and the
trials of a ``--slurm`` study run as array tasks that share the file). Each trial is one
``lit-peft fit`` in ``<out>/tuning/<run>-<hash>/trial<NNN>/`` with the callbacks of ``lit_peft.trial``
(held-out validation rows; reports to the trial, median pruning). The sampler is TPE, seeded per run
(its first ten points are random ones), or, for the few trials a small budget affords, a grid.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from lit_peft import report
from lit_peft.errors import ConfigError

TUNE_KEYS = {"trials", "metric", "direction", "budget", "space", "holdout", "report_every", "enqueue", "pruner", "sampler"}
RANGE_KEYS = {"low", "high", "log", "step", "int"}


@dataclass
class Tune:
    trials: int
    metric: str
    direction: str
    budget: dict[str, Any]
    space: dict[str, Any]
    holdout: float | int = 0.2
    report_every: float | int = 0.25
    enqueue: list[dict[str, Any]] = field(default_factory=list)
    startup_trials: int = 2  # the median pruner's: trials that finish before any is pruned
    warmup_steps: int = 0  # and the steps a trial runs before it can be pruned
    sampler: str = "tpe"


def direction_of(metric: str) -> str:
    return "maximize" if report.higher_is_better(metric) else "minimize"


def check_space(space: Any, where: str) -> dict[str, Any]:
    """A search space: dotted keys to a list (categorical) or ``{low, high, log?, step?, int?}``."""
    if not isinstance(space, dict) or not space:
        raise ConfigError(f"{where}: space must be a mapping of dotted keys to a list of choices or {{low, high, log}}")
    for key, spec in space.items():
        if not isinstance(key, str) or "." not in key:
            raise ConfigError(f"{where}: space key '{key}' must be a dotted config key (model.init_args.learning_rate)")
        if isinstance(spec, list):
            if not spec:
                raise ConfigError(f"{where}: space '{key}' is an empty list of choices")
            continue
        if not isinstance(spec, dict):
            raise ConfigError(f"{where}: space '{key}' must be a list of choices or {{low, high, log}}, got {spec!r}")
        bad = sorted(set(spec) - RANGE_KEYS)
        if bad:
            raise ConfigError(f"{where}: space '{key}' has unknown key(s) {bad}; a range has {sorted(RANGE_KEYS)}")
        if "low" not in spec or "high" not in spec:
            raise ConfigError(f"{where}: space '{key}' needs low and high")
        low, high = spec["low"], spec["high"]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)) or not low < high:
            raise ConfigError(f"{where}: space '{key}' needs numbers low < high, got low={low!r} high={high!r}")
        if spec.get("log") and low <= 0:
            raise ConfigError(f"{where}: space '{key}' is log-scaled, so low must be above 0 (got {low})")
    return space


def load_tune(raw: Any, where: str, metric: str) -> Optional[Tune]:
    """The study's ``tune:`` block, checked; one line for each kind of mistake."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: tune must be a mapping (trials, metric, budget, space)")
    unknown = sorted(set(raw) - TUNE_KEYS)
    if unknown:
        raise ConfigError(f"{where}: tune has unknown key(s) {unknown}; it has {sorted(TUNE_KEYS)}")
    trials = raw.get("trials")
    if not isinstance(trials, int) or isinstance(trials, bool) or trials < 1:
        raise ConfigError(f"{where}: tune.trials must be a whole number of trials per run (8), got {trials!r}")
    tune_metric = raw.get("metric", metric)
    if not isinstance(tune_metric, str) or not tune_metric.startswith("val_"):
        raise ConfigError(f"{where}: tune.metric must be a validation metric (val_acc, val_loss): trials validate on "
                          f"rows held out of training, never on the reported split; got {tune_metric!r}")
    direction = raw.get("direction", direction_of(tune_metric))
    if direction not in ("maximize", "minimize"):
        raise ConfigError(f"{where}: tune.direction must be maximize or minimize, got {direction!r}")
    budget = raw.get("budget") or {}
    if not isinstance(budget, dict):
        raise ConfigError(f"{where}: tune.budget must be a mapping of dotted keys ({{data.init_args.limit_train_rows: 2000}})")
    holdout = raw.get("holdout", 0.2)
    if isinstance(holdout, bool) or not isinstance(holdout, (int, float)) or holdout <= 0 or (
            isinstance(holdout, float) and holdout >= 1):
        raise ConfigError(f"{where}: tune.holdout must be a fraction in (0, 1) or a number of rows, got {holdout!r}")
    report = raw.get("report_every", 0.25)
    if isinstance(report, bool) or not isinstance(report, (int, float)) or report <= 0:
        raise ConfigError(f"{where}: tune.report_every must be a fraction of an epoch (0.25) or a number of "
                          f"batches, got {report!r}")
    enqueue = raw.get("enqueue") or []
    if not isinstance(enqueue, list) or not all(isinstance(p, dict) for p in enqueue):
        raise ConfigError(f"{where}: tune.enqueue must be a list of {{dotted key: value}} points to try first")
    pruner = raw.get("pruner") or {}
    if not isinstance(pruner, dict) or set(pruner) - {"startup_trials", "warmup_steps"}:
        raise ConfigError(f"{where}: tune.pruner has startup_trials and warmup_steps (the median pruner's), got {pruner!r}")
    space = check_space(raw.get("space"), f"{where}: tune")
    sampler = raw.get("sampler", "tpe")
    if sampler not in ("tpe", "grid"):
        raise ConfigError(f"{where}: tune.sampler must be tpe or grid, got {sampler!r}")
    if sampler == "grid":
        check_grid(space, trials, f"{where}: tune")
    for point in enqueue:
        missing = sorted(set(point) - set(space))
        if missing:
            raise ConfigError(f"{where}: tune.enqueue names {missing}, which the space does not have")
    return Tune(trials=trials, metric=tune_metric, direction=direction, budget=budget, space=space, holdout=holdout,
                report_every=report, enqueue=enqueue, startup_trials=int(pruner.get("startup_trials", 2)),
                warmup_steps=int(pruner.get("warmup_steps", 0)), sampler=sampler)


def check_grid(space: dict[str, Any], trials: int, where: str) -> None:
    """A grid is lists alone, and the trials are its size: each point once."""
    ranges = [k for k, v in space.items() if not isinstance(v, list)]
    if ranges:
        raise ConfigError(f"{where}: sampler grid takes lists of choices; {ranges} are ranges")
    size = 1
    for choices in space.values():
        size *= len(choices)
    if size != trials:
        raise ConfigError(f"{where}: the grid has {size} points, so trials must be {size} (got {trials})")


def run_space(tune: Tune, run: str, raw: Any, where: str) -> dict[str, Any]:
    """The space of one run: the study's, with the run's ``tune: {space, replace}`` added or put instead."""
    if raw is None:
        return dict(tune.space)
    if not isinstance(raw, dict) or set(raw) - {"space", "replace"} or "space" not in raw:
        raise ConfigError(f"{where}: run '{run}' tune must be {{space: {{...}}}} (to add to the study's) or "
                          "{space: {...}, replace: true} (instead of it)")
    own = check_space(raw["space"], f"{where}: run '{run}' tune")
    space = dict(own) if raw.get("replace") else {**tune.space, **own}
    if tune.sampler == "grid":  # every run gets the same number of trials
        check_grid(space, tune.trials, f"{where}: run '{run}' tune")
    return space


def distributions(space: dict[str, Any]) -> dict[str, Any]:
    import optuna.distributions as d

    out = {}
    for key, spec in space.items():
        if isinstance(spec, list):
            out[key] = d.CategoricalDistribution([json.dumps(v) if isinstance(v, (dict, list)) else v for v in spec])
        elif spec.get("int") or (isinstance(spec["low"], int) and isinstance(spec["high"], int) and not spec.get("log")
                                  and isinstance(spec.get("step", 1), int)):
            out[key] = d.IntDistribution(int(spec["low"]), int(spec["high"]), log=bool(spec.get("log")),
                                         step=int(spec.get("step", 1)))
        else:
            out[key] = d.FloatDistribution(float(spec["low"]), float(spec["high"]), log=bool(spec.get("log")),
                                           step=spec.get("step"))
    return out


def journal(path: Path) -> Any:
    """Optuna's journal file storage at ``path``, locked by opening a lock file (safe on NFS, where a
    ``--slurm`` study's array tasks share it)."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path))))


def storage_path(out: Path) -> Path:
    return out / "tuning" / "journal.log"


def open_study(out: Path, run: str, tune: Tune, space: Optional[dict[str, Any]] = None) -> Any:
    """The Optuna study named ``run`` (a run's name and a hash of what its trials depend on), created on
    first use with the enqueued points; ``space`` is the run's (a grid sampler needs it)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    seed = int(hashlib.sha1(run.encode()).hexdigest()[:8], 16)
    if tune.sampler == "grid":
        grid = {k: [json.dumps(v) if isinstance(v, (dict, list)) else v for v in choices]
                for k, choices in (space or tune.space).items()}
        sampler = optuna.samplers.GridSampler(grid, seed=seed)
    else:
        sampler = optuna.samplers.TPESampler(seed=seed)
    study = optuna.create_study(study_name=run, storage=journal(storage_path(out)), direction=tune.direction,
                                sampler=sampler, load_if_exists=True,
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=tune.startup_trials,
                                                                   n_warmup_steps=tune.warmup_steps))
    if not study.trials:
        for point in tune.enqueue:
            study.enqueue_trial(point)
    return study


def finish(study: Any, trial: Any, *args: Any, **kwargs: Any) -> None:
    """``study.tell`` outside ``study.optimize``: the grid sampler asks the study to stop once its last point
    is told, which Optuna refuses outside ``optimize`` (after storing the trial); here there is nothing to stop."""
    try:
        study.tell(trial, *args, **kwargs)
    except RuntimeError as err:
        if "Study.stop" not in str(err):
            raise


def counted(trial: Any) -> bool:
    """Whether a trial counts towards the run's number: finished, pruned, or failed by itself (not one a
    stopped study left behind, whose point is tried again)."""
    from optuna.trial import TrialState

    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING):
        return True
    return trial.state == TrialState.FAIL and not trial.user_attrs.get("interrupted")


def release_interrupted(study: Any) -> int:
    """Trials left running by a stopped study (its lock is ours now, so none is live) are marked failed
    as interrupted, and their points queued again; returns how many."""
    from optuna.trial import TrialState

    stale = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.RUNNING]
    for trial in stale:
        study._storage.set_trial_user_attr(trial._trial_id, "interrupted", True)
        finish(study, trial.number, state=TrialState.FAIL)
        study.enqueue_trial(trial.params, skip_if_exists=False)
    return len(stale)


def remaining(study: Any, tune: Tune) -> int:
    return max(tune.trials - sum(counted(t) for t in study.get_trials(deepcopy=False)), 0)


def as_value(value: Any) -> Any:
    """A sampled value as the config takes it (a categorical dict or list was stored as JSON)."""
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def trial_callbacks(out: Path, run: str, trial: Any, tune: Tune, folder: Path, seed: int) -> list[dict[str, Any]]:
    """The ``trainer.callbacks`` a trial's fit adds (``lit_peft.trial``)."""
    return [{"class_path": "lit_peft.trial.HoldOutValidation", "init_args": {"rows": tune.holdout, "seed": seed}},
            {"class_path": "lit_peft.trial.ReportToTrial",
             "init_args": {"storage": str(storage_path(out).resolve()), "study": run, "trial_id": trial._trial_id,
                           "monitor": tune.metric, "n_startup_trials": tune.startup_trials,
                           "n_warmup_steps": tune.warmup_steps, "folder": str(folder.resolve())}}]


def tell(study: Any, trial: Any, folder: Path, ok: bool, seconds: float, metric: str, error: str = "") -> str:
    """Record how a trial's fit ended: pruned (``pruned.json``), complete (its metric), or failed."""
    from optuna.trial import TrialState

    storage = study._storage
    storage.set_trial_user_attr(trial._trial_id, "seconds", round(seconds, 1))
    storage.set_trial_user_attr(trial._trial_id, "folder", str(folder))
    summary = folder / "summary.json"
    value = json.loads(summary.read_text()).get(metric) if ok and summary.is_file() else None
    if ok and (folder / "pruned.json").is_file():
        finish(study, trial, state=TrialState.PRUNED)
        return "pruned"
    if ok and value is not None:
        finish(study, trial, float(value))
        return f"{metric}={float(value):.4f}"
    storage.set_trial_user_attr(trial._trial_id, "error", error or f"the fit reported no {metric}")
    finish(study, trial, state=TrialState.FAIL)
    return f"FAILED: {error or f'no {metric}'}"


def chosen(study: Any) -> Optional[dict[str, Any]]:
    """The best complete trial's values (dotted key -> value), or None before one completed."""
    from optuna.trial import TrialState

    if not any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
        return None
    return {k: as_value(v) for k, v in study.best_trial.params.items()}


def summary(study: Any, tune: Tune) -> dict[str, Any]:
    """What tuning a run did and cost: chosen values, trial counts, seconds, and every trial."""
    from optuna.trial import TrialState

    trials = [t for t in study.get_trials(deepcopy=False) if counted(t) or t.state == TrialState.FAIL]
    state = lambda s: sum(t.state == s and not t.user_attrs.get("interrupted") for t in trials)  # noqa: E731
    best = study.best_trial if state(TrialState.COMPLETE) else None
    return {
        "metric": tune.metric, "chosen": chosen(study), "best_value": best.value if best else None,
        "trials": sum(counted(t) for t in trials), "complete": state(TrialState.COMPLETE),
        "pruned": state(TrialState.PRUNED), "failed": state(TrialState.FAIL),
        "seconds": round(sum(t.user_attrs.get("seconds", 0.0) for t in trials), 1),
        "all": [{"number": t.number, "state": t.state.name, "value": t.value,
                 "params": {k: as_value(v) for k, v in t.params.items()},
                 "intermediate": {str(k): v for k, v in sorted(t.intermediate_values.items())},
                 "interrupted": bool(t.user_attrs.get("interrupted")), "seconds": t.user_attrs.get("seconds"),
                 "error": t.user_attrs.get("error"), "folder": t.user_attrs.get("folder")} for t in trials],
    }


