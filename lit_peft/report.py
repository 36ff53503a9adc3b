"""Tables and plots that compare runs: what ``lit-peft compare`` writes.

The input is one record per run (``RunRecord``: the run's name, seed, status, ``summary.json``
figures, curves from ``metrics.csv``, resolved config, versions, hardware). Out come

- ``results.csv``: one row per run (failed runs with their error);
- ``results.json``: the records, and per method the statistics;
- ``results.md``: one row per method: mean ± std over seeds with n, and the difference from the
  reference method with Welch's t-test over the seeds (``noise``: whether the difference exceeds the
  seeds' spread at p < 0.05; with one seed a side there is no spread to compare, and it says so);
- plots (matplotlib, PNG): the task metric against trainable % (log scale, Pareto front marked),
  training time, peak memory and adapter size per method, and every method's training loss and
  validation metric against the step on one figure;
- for a tuned study (``tuned``: per run, what ``lit_peft.tuning.summary`` says), a table of the values
  each method chose, its trials run, pruned and failed, and the tuning time (in ``results.md`` and
  ``tuning.md``), every trial in ``results.json``, and ``tuning.png``: each method's trials, the
  held-out metric against the learning rate (or the first numeric value tuned).

Each plot function returns its matplotlib Figure, so tests read the data it drew. Written here:
no library turns run folders into this table (PEFT keeps scripts and an app of its own for it).
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from lit_peft import files

#: columns of the per-method table: (summary key, heading, format)
FIGURES = [
    ("trainable_pct", "trainable %", "{:.3f}"),
    ("train_time_s", "train time (s)", "{:.1f}"),
    ("peak_memory_mb", "peak memory (MB)", "{:.0f}"),
    ("adapter_mb", "adapter (MB)", "{:.3f}"),
    ("checkpoint_mb", "checkpoint (MB)", "{:.3f}"),
    ("weights_mb", "weights in memory (MB)", "{:.1f}"),
]
#: shown where a run reports it: a causal LM's loss on general text after fine-tuning minus before (lit_peft.forgetting)
FORGETTING = ("forgetting", "forgetting (Δ loss)", "{:+.4f}")
#: forecasting scores shown beside a study's metric where its runs report them (lit_peft.tasks.forecast_metrics)
FORECAST_SCORES = ("mae", "mase", "crps", "wql")
#: words of a metric name that mean lower is better (the Pareto front; the direction tuning optimises)
LOWER_IS_BETTER = ("loss", "mse", "mae", "perplexity", "crps", "mase", "wql", "error")
MARKERS = ("o", "s", "^", "D")


@dataclass
class RunRecord:
    name: str  # the method / run name in the study
    seed: int
    status: str  # finished | failed | pending
    folder: str = ""
    summary: dict[str, Any] = field(default_factory=dict)
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    error: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)


def higher_is_better(metric: str) -> bool:
    return not any(word in metric for word in LOWER_IS_BETTER)


def read_curves(metrics_csv: Path, keys: tuple[str, ...]) -> dict[str, list[tuple[int, float]]]:
    """(step, value) pairs per key from a Lightning ``metrics.csv``."""
    curves: dict[str, list[tuple[int, float]]] = {k: [] for k in keys}
    if not metrics_csv.is_file():
        return curves
    with metrics_csv.open(newline="") as f:
        for row in csv.DictReader(f):
            for key in keys:
                if row.get(key) not in (None, ""):
                    curves[key].append((int(float(row["step"])), float(row[key])))
    return curves


def mean_std(values: list[float]) -> tuple[float, float, int]:
    n = len(values)
    return (statistics.fmean(values) if n else math.nan, statistics.stdev(values) if n > 1 else math.nan, n)


def welch(a: list[float], b: list[float]) -> Optional[float]:
    """Welch's two-sided t-test p-value, or ``None`` where it is undefined: either side has fewer than
    two values, or neither side has any spread (identical seeds; a p-value of 0 there would claim a
    certainty two constant columns cannot give). ``no_test_reason`` says which."""
    if no_test_reason(a, b):
        return None
    from scipy.stats import ttest_ind

    return float(ttest_ind(a, b, equal_var=False).pvalue)


def no_test_reason(a: list[float], b: list[float]) -> Optional[str]:
    """Why Welch's test has no p-value for these two samples, in a table's words; ``None`` where it has one."""
    if len(a) < 2 or len(b) < 2:
        return "needs ≥2 seeds a side"
    if statistics.pvariance(a) == 0 and statistics.pvariance(b) == 0:
        return "no spread between seeds"
    return None


def figures_of(records: list[RunRecord], metric: str = "") -> list[tuple[str, str, str]]:
    """The figure columns of these runs: ``FIGURES``; forgetting where any run measured it; beside a
    forecasting metric, the forecasting scores of its stage (MASE, CRPS, WQL) where runs report them."""
    stage = metric.split("_")[0] if metric.startswith(("val_", "test_")) else None
    scores = [(f"{stage}_{name}", f"{stage}_{name}", "{:.4f}") for name in FORECAST_SCORES
              if stage and f"{stage}_{name}" != metric and any(f"{stage}_{name}" in r.summary for r in records)]
    return FIGURES + ([FORGETTING] if any(FORGETTING[0] in r.summary for r in records) else []) + scores


def method_table(records: list[RunRecord], metric: str, reference: Optional[str]) -> list[dict[str, Any]]:
    """One row per method (in the study's order): statistics of the finished runs, counts of the rest."""
    order = list(dict.fromkeys(r.name for r in records))
    finished = {n: [r for r in records if r.name == n and r.status == "finished"] for n in order}
    values = {n: [float(r.summary[metric]) for r in finished[n] if metric in r.summary] for n in order}
    rows = []
    for name in order:
        row: dict[str, Any] = {"method": name, "runs": sum(r.name == name for r in records),
                               "finished": len(finished[name]),
                               "failed": sum(r.name == name and r.status == "failed" for r in records)}
        m, s, n = mean_std(values[name])
        row.update({f"{metric}_mean": m, f"{metric}_std": s, "n": n})
        for key, _, _ in figures_of(records, metric):
            row[key] = mean_std([float(r.summary[key]) for r in finished[name] if r.summary.get(key) is not None])[0]
        if reference and name != reference and reference in values:
            ref = values[reference]
            row["difference"] = m - mean_std(ref)[0] if values[name] and ref else math.nan
            p = welch(values[name], ref)
            row["p_value"] = p
            row["exceeds_noise"] = None if p is None else bool(p < 0.05)
            row["no_test"] = no_test_reason(values[name], ref)
        rows.append(row)
    return rows


def fmt(value: Any, pattern: str = "{:.4f}") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return pattern.format(value)


def markdown(rows: list[dict[str, Any]], records: list[RunRecord], metric: str, reference: Optional[str],
             title: str, notes: str = "") -> str:
    lines = [f"# {title}", ""]
    if notes:
        lines += [notes.strip(), ""]
    head = ["method", f"{metric} (mean ± std, n)"] + ([f"Δ vs {reference}", "beyond seed noise?"] if reference else []) \
        + [h for _, h, _ in figures_of(records, metric)] + ["runs"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        score = f"{fmt(row[f'{metric}_mean'])} ± {fmt(row[f'{metric}_std'])} (n={row['n']})"
        cells = [row["method"], score]
        if reference:
            if row["method"] == reference:
                cells += ["reference", "–"]
            else:
                verdict = {True: f"yes (p={fmt(row.get('p_value'), '{:.3f}')})",
                           False: f"no (p={fmt(row.get('p_value'), '{:.3f}')})",
                           None: f"n/a: {row.get('no_test') or 'needs ≥2 seeds a side'}"}[row.get("exceeds_noise")]
                cells += [fmt(row.get("difference"), "{:+.4f}"), verdict]
        cells += [fmt(row[key], pattern) for key, _, pattern in figures_of(records, metric)]
        cells.append(f"{row['finished']}/{row['runs']}" + (f" ({row['failed']} failed)" if row["failed"] else ""))
        lines.append("| " + " | ".join(cells) + " |")
    failed = [r for r in records if r.status == "failed"]
    if failed:
        lines += ["", "Failed runs:", ""]
        lines += [f"- {r.name} seed {r.seed}: {r.error.strip().splitlines()[-1] if r.error.strip() else 'no message'}"
                  for r in failed]
    pending = [r for r in records if r.status == "pending"]
    if pending:
        lines += ["", "Not finished yet: " + ", ".join(f"{r.name} seed {r.seed}" for r in pending)]
    return "\n".join(lines) + "\n"


def run_rows(records: list[RunRecord], metric: str) -> tuple[list[str], list[dict[str, Any]]]:
    keys = [metric] + [k for k, _, _ in figures_of(records, metric)] + ["samples_per_s", "world_size", "device"]
    extra = sorted({k for r in records for k, v in r.summary.items()
                    if k.startswith(("val_", "test_")) and isinstance(v, (int, float)) and k not in keys})
    header = ["method", "seed", "status"] + keys + extra + ["folder", "error"]
    rows = []
    for r in records:
        row = {"method": r.name, "seed": r.seed, "status": r.status, "folder": r.folder,
               "error": r.error.strip().splitlines()[-1] if r.error.strip() else ""}
        row.update({k: r.summary.get(k, "") for k in keys + extra})
        rows.append(row)
    return header, rows


def short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else json.dumps(value) if isinstance(value, (dict, list)) else str(value)


def tuning_markdown(tuned: dict[str, dict[str, Any]], metric: str) -> str:
    """Per method: the values tuning chose, its best held-out metric, trials run / pruned / failed, time."""
    keys = list(dict.fromkeys(k for what in tuned.values() for t in what["all"] for k in t["params"]))
    head = ["method"] + [k.split(".")[-1] for k in keys] + [f"best held-out {metric}", "trials", "pruned", "failed",
                                                            "tuning time (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, what in tuned.items():
        chosen = what["chosen"] or {}
        cells = [name] + [short(chosen[k]) if k in chosen else "–" for k in keys]
        cells += [fmt(what["best_value"]), str(what["trials"]), str(what["pruned"]), str(what["failed"]),
                  fmt(what["seconds"], "{:.0f}")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_tables(records: list[RunRecord], out: Path, metric: str, reference: Optional[str], title: str,
                 notes: str = "", tuned: Optional[dict[str, dict[str, Any]]] = None) -> list[dict[str, Any]]:
    """``results.csv``, ``results.json`` and ``results.md`` in ``out``; returns the method rows."""
    out.mkdir(parents=True, exist_ok=True)
    rows = method_table(records, metric, reference)
    header, per_run = run_rows(records, metric)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=header)
    writer.writeheader()
    writer.writerows(per_run)
    files.write_text(out / "results.csv", buffer.getvalue())  # each whole or not at all
    files.write_text(out / "results.json", json.dumps(
        {"title": title, "metric": metric, "reference": reference, "methods": rows,
         "runs": [asdict(r) for r in records], **({"tuning": tuned} if tuned else {})}, indent=1, default=str) + "\n")
    text = markdown(rows, records, metric, reference, title, notes)
    if tuned:
        tune_metric = next((t["metric"] for t in tuned.values() if t.get("metric")), "metric")
        table = tuning_markdown(tuned, tune_metric)
        files.write_text(out / "tuning.md", table)
        text += ("\n## Tuning\n\nEach method's values were chosen by the same number of trials on rows held out of "
                 f"the training split (never the reported split); the table above is its seeds trained with them.\n\n{table}")
    files.write_text(out / "results.md", text)
    return rows


# ---- plots --------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def pareto_front(points: list[tuple[float, float]], higher: bool) -> list[tuple[float, float]]:
    """The points no other point beats on both fewer trainable % and a better metric, by x."""
    front, best = [], -math.inf
    for x, y in sorted(points, key=lambda p: (p[0], -p[1] if higher else p[1])):
        score = y if higher else -y
        if score > best:
            front.append((x, y))
            best = score
    return front


def plot_metric_vs_trainable(rows: list[dict[str, Any]], metric: str):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    points = []
    for i, row in enumerate(rows):
        x, y, s = row.get("trainable_pct"), row[f"{metric}_mean"], row[f"{metric}_std"]
        if x is None or math.isnan(x) or math.isnan(y):
            continue
        # ten colours, then the next marker: sixteen methods stay apart; each point is named too
        ax.errorbar([x], [y], yerr=[0 if math.isnan(s) else s], fmt=MARKERS[i // 10 % len(MARKERS)], color=f"C{i % 10}",
                    capsize=3, label=row["method"])
        ax.annotate(row["method"], (x, y), textcoords="offset points", xytext=(4, 3), fontsize=6)
        points.append((x, y))
    front = pareto_front(points, higher_is_better(metric))
    if front:
        ax.plot([p[0] for p in front], [p[1] for p in front], "k--", linewidth=1, label="Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (%)")
    ax.set_ylabel(metric)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_costs(rows: list[dict[str, Any]]):
    plt = _pyplot()
    costs = [("train_time_s", "training time (s)"), ("peak_memory_mb", "peak memory (MB)"),
             ("adapter_mb", "adapter size (MB)"), ("checkpoint_mb", "checkpoint size (MB)")]
    fig, axes = plt.subplots(1, len(costs), figsize=(4 * len(costs), 4))
    names = [r["method"] for r in rows]
    for ax, (key, label) in zip(axes, costs):
        values = [0.0 if r.get(key) is None or math.isnan(r[key]) else r[key] for r in rows]
        ax.bar(names, values, color=[f"C{i % 10}" for i in range(len(names))])
        ax.set_title(label)
        ax.tick_params(axis="x", rotation=60, labelsize=7)
    fig.tight_layout()
    return fig


def plot_curves(records: list[RunRecord], metric: str):
    """Training loss and the validation metric against the step, one line per method (each method's
    first finished seed; the table has the spread)."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    shown = set()
    for i, r in enumerate(rec for rec in records if rec.status == "finished"):
        if r.name in shown:
            continue
        shown.add(r.name)
        color, style = f"C{(len(shown) - 1) % 10}", ("-", "--", ":", "-.")[(len(shown) - 1) // 10 % 4]
        train = r.curves.get("train_loss_step") or r.curves.get("train_loss_epoch") or r.curves.get("train_loss") or []
        if train:
            left.plot(*zip(*train), style, color=color, label=r.name, linewidth=1)
        val = r.curves.get(metric) or []
        if val:
            right.plot(*zip(*val), style, marker="o", color=color, label=r.name, linewidth=1, markersize=3)
    left.set_title("training loss")
    right.set_title(metric)
    for ax in (left, right):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def plot_trials(tuned: dict[str, dict[str, Any]]):
    """Each method's trials: the held-out metric against the learning rate (log scale; else the first numeric
    value tuned). Complete trials filled, pruned ones hollow at their last reported value, the chosen one ringed."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    keys = list(dict.fromkeys(k for what in tuned.values() for t in what["all"] for k in t["params"]
                              if isinstance(t["params"][k], (int, float)) and not isinstance(t["params"][k], bool)))
    key = next((k for k in keys if k.endswith("learning_rate")), keys[0] if keys else None)
    for i, (name, what) in enumerate(tuned.items()):
        color = f"C{i % 10}"
        for state, face in (("COMPLETE", color), ("PRUNED", "none")):
            points = [(t["params"][key], t["value"] if state == "COMPLETE" else list(t["intermediate"].values())[-1])
                      for t in what["all"] if t["state"] == state and key in t["params"]
                      and (t["value"] is not None or t["intermediate"])]
            if points:
                ax.scatter(*zip(*points), marker=MARKERS[i // 10 % len(MARKERS)], facecolors=face, edgecolors=color,
                           label=name if state == "COMPLETE" else f"{name} (pruned)")
        if what["chosen"] and key in what["chosen"] and what["best_value"] is not None:
            ax.scatter([what["chosen"][key]], [what["best_value"]], s=160, facecolors="none", edgecolors="k", linewidths=1)
    if key is not None and key.endswith("learning_rate"):
        ax.set_xscale("log")
    ax.set_xlabel(key or "trial")
    ax.set_ylabel("held-out metric")
    ax.set_title("tuning trials (ringed: chosen)")
    ax.grid(alpha=0.3)
    if ax.collections:
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def write_plots(rows: list[dict[str, Any]], records: list[RunRecord], out: Path, metric: str,
                tuned: Optional[dict[str, dict[str, Any]]] = None) -> dict[str, Path]:
    figures = {"metric_vs_trainable.png": plot_metric_vs_trainable(rows, metric),
               "costs.png": plot_costs(rows),
               "curves.png": plot_curves(records, metric)}
    if tuned:
        figures["tuning.png"] = plot_trials(tuned)
    paths = {}
    for name, fig in figures.items():
        fig.savefig(out / name, dpi=110)
        _pyplot().close(fig)
        paths[name] = out / name
    return paths
