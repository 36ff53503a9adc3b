"""`lit-peft compare` on the tiny BERT: two methods, two seeds, and a run that fails. The tables hold
the runs' own summary.json numbers and correct statistics, a re-run skips what finished, a changed
budget is a new run, `--collect` rebuilds the same table, and the plots draw one series per method."""

from __future__ import annotations

import csv
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lit_peft import report
from test_cli import write_config


def compare(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lit_peft.cli", "compare", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=900)


def write_study(folder: Path, base: Path, budget: dict, runs: dict) -> Path:
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump({"title": "toy study", "base": str(base), "metric": "val_acc", "reference": "lora",
                                    "seeds": [1, 2], "budget": budget, "runs": runs}, sort_keys=False))
    return path


BUDGET = {"trainer.max_epochs": 1, "trainer.limit_train_batches": 4, "trainer.log_every_n_steps": 1}
RUNS = {"lora": {}, "ia3": {"args": {"method": {"class_path": "lit_peft.methods.IA3"}}},
        "broken": {"args": {"model.init_args.backbone": "/nonexistent/model"}}}


@pytest.fixture(scope="module")
def study(tiny_bert, toy_data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("compare")
    base = write_config(folder, tiny_bert, toy_data)
    path = write_study(folder, base, BUDGET, RUNS)
    done = compare(str(path), "--output_dir", str(folder / "out"), cwd=folder)
    assert done.returncode == 0, done.stderr[-3000:]
    return folder, path, done


def summaries(out: Path, name: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "runs" / name).glob("seed*/summary.json"))]


def test_tables_hold_the_runs_numbers(study) -> None:
    folder, _, done = study
    out = folder / "out"
    assert "running 6/6: broken seed 2" in done.stdout and "ETA" in done.stdout
    rows = list(__import__("csv").DictReader((out / "results.csv").open()))
    assert [(r["method"], r["seed"], r["status"]) for r in rows] == [
        ("lora", "1", "finished"), ("lora", "2", "finished"), ("ia3", "1", "finished"), ("ia3", "2", "finished"),
        ("broken", "1", "failed"), ("broken", "2", "failed")]
    for name in ("lora", "ia3"):
        accs = [s["val_acc"] for s in summaries(out, name)]
        assert sorted(float(r["val_acc"]) for r in rows if r["method"] == name) == pytest.approx(sorted(accs))
        method = next(m for m in json.loads((out / "results.json").read_text())["methods"] if m["method"] == name)
        assert method["val_acc_mean"] == pytest.approx(statistics.fmean(accs))
        assert method["val_acc_std"] == pytest.approx(statistics.stdev(accs))
        assert method["n"] == 2 and method["trainable_pct"] == pytest.approx(summaries(out, name)[0]["trainable_pct"])
        assert f"| {name} | {method['val_acc_mean']:.4f} ± {method['val_acc_std']:.4f} (n=2) |" in (out / "results.md").read_text()
    # the failed run is in the table with its error, not missing
    assert all("does not exist" in r["error"] or "nonexistent" in r["error"] for r in rows if r["method"] == "broken")
    md = (out / "results.md").read_text()
    assert "| broken | – ± – (n=0) |" in md and "broken seed 1:" in md
    record = json.loads((out / "results.json").read_text())["runs"][0]
    assert record["config"]["seed_everything"] == 1 and record["environment"]["torch"]
    assert record["environment"]["cpu_count"] >= 1


def test_collect_rebuilds_the_table(study, tmp_path) -> None:
    folder, _, _ = study
    done = compare("--collect", str(folder / "out" / "runs"), "--metric", "val_acc", "--reference", "lora",
                   "--output_dir", str(tmp_path), cwd=folder)
    assert done.returncode == 0, done.stderr[-2000:]
    original = {m["method"]: m for m in json.loads((folder / "out" / "results.json").read_text())["methods"]}
    rebuilt = {m["method"]: m for m in json.loads((tmp_path / "results.json").read_text())["methods"]}
    for name in ("lora", "ia3"):
        assert rebuilt[name]["val_acc_mean"] == pytest.approx(original[name]["val_acc_mean"])
        assert rebuilt[name]["n"] == 2 and rebuilt[name]["val_acc_std"] == pytest.approx(original[name]["val_acc_std"])


def test_plots_are_pngs_with_one_series_per_method(study) -> None:
    folder, _, _ = study
    out = folder / "out"
    for name in ("metric_vs_trainable.png", "costs.png", "curves.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((out / "results.json").read_text())
    records = [report.RunRecord(**r) for r in data["runs"]]
    rows = data["methods"]
    fig = report.plot_metric_vs_trainable(rows, "val_acc")
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert [lbl for lbl in labels if lbl != "Pareto front"] == ["lora", "ia3"]  # broken has no point
    points = {c.get_label(): c.lines[0].get_xydata()[0] for c in fig.axes[0].containers}
    assert points["lora"][1] == pytest.approx(next(m for m in rows if m["method"] == "lora")["val_acc_mean"])
    curves = report.plot_curves(records, "val_acc")
    assert [line.get_label() for line in curves.axes[0].lines] == ["lora", "ia3"]
    lora_curve = next(r for r in records if r.name == "lora" and r.status == "finished").curves["train_loss_step"]
    assert [tuple(p) for p in curves.axes[0].lines[0].get_xydata()] == [tuple(p) for p in lora_curve]
    assert len(lora_curve) == 4  # one point a training step
    assert [bar.get_height() for bar in report.plot_costs(rows).axes[0].patches][:2] == pytest.approx(
        [m["train_time_s"] for m in rows[:2]])


def test_rerun_skips_finished_runs_and_a_changed_budget_is_a_new_run(study, tmp_path) -> None:
    folder, path, _ = study
    out = folder / "out"
    stamps = {p: p.stat().st_mtime for p in out.glob("runs/*/seed*/summary.json")}
    again = compare(str(path), "--output_dir", str(out), "--only", "lora", "ia3", cwd=folder)
    assert again.returncode == 0 and "4 finished before, 0 to run" in again.stdout
    assert {p: p.stat().st_mtime for p in out.glob("runs/*/seed*/summary.json")} == stamps
    before = set((out / "runs" / "lora").glob("seed*"))
    changed = write_study(tmp_path, Path(yaml.safe_load(path.read_text())["base"]),
                          {**BUDGET, "trainer.limit_train_batches": 2}, {"lora": {}})
    done = compare(str(changed), "--output_dir", str(out), "--only", "lora", cwd=tmp_path)
    assert done.returncode == 0 and "0 finished before, 2 to run" in done.stdout
    new = sorted(set((out / "runs" / "lora").glob("seed*")) - before)
    assert len(new) == 2  # the old runs are kept, not overwritten
    # a run stopped before its first checkpoint (its folder, no checkpoint, no summary) starts again,
    # its leftovers moved aside rather than refused or overwritten
    stopped = new[0]
    (stopped / "summary.json").unlink()
    for ckpt in (stopped / "checkpoints").glob("*.ckpt"):
        ckpt.unlink()
    done = compare(str(changed), "--output_dir", str(out), "--only", "lora", cwd=tmp_path)
    assert done.returncode == 0 and "1 finished before, 1 to run" in done.stdout, done.stdout + done.stderr
    assert (stopped / "summary.json").is_file() and list(stopped.parent.glob(f"{stopped.name}.attempt-*"))
    # an interrupted run (a checkpoint, no summary) resumes from its checkpoint in its own folder
    interrupted = new[1]
    (interrupted / "summary.json").unlink()
    rows = (interrupted / "metrics.csv").read_text().splitlines()
    done = compare(str(changed), "--output_dir", str(out), "--only", "lora", cwd=tmp_path)
    assert done.returncode == 0 and "resuming 1/1: lora" in done.stdout, done.stdout + done.stderr
    assert (interrupted / "summary.json").is_file()
    assert (interrupted / "metrics.csv").read_text().splitlines()[1:len(rows)] == rows[1:]  # kept, appended to


def test_no_finished_run_is_an_error(tiny_bert, toy_data, tmp_path) -> None:
    base = write_config(tmp_path, tiny_bert, toy_data)
    path = write_study(tmp_path, base, BUDGET, {"lora": {"args": {"model.init_args.backbone": "/nonexistent/model"}}})
    done = compare(str(path), "--output_dir", str(tmp_path / "out"), cwd=tmp_path)
    assert done.returncode == 2 and "no finished run" in done.stderr and "Traceback" not in done.stderr


def test_statistics() -> None:
    assert report.mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0, 3)
    assert math.isnan(report.mean_std([1.0])[1])
    assert report.welch([0.80, 0.81, 0.79], [0.90, 0.91, 0.89]) < 0.01
    assert report.welch([0.80, 0.85, 0.75], [0.81, 0.86, 0.74]) > 0.5
    assert report.welch([0.8], [0.9, 0.91]) is None
    # no spread on either side: no p-value (it used to report p = 0, "beyond seed noise")
    assert report.welch([0.8, 0.8], [0.9, 0.9]) is None
    assert report.no_test_reason([0.8, 0.8], [0.9, 0.9]) == "no spread between seeds"
    front = report.pareto_front([(0.1, 0.80), (1.0, 0.85), (0.5, 0.79), (100.0, 0.86), (10.0, 0.84)], higher=True)
    assert front == [(0.1, 0.80), (1.0, 0.85), (100.0, 0.86)]
    assert report.pareto_front([(1.0, 0.5), (2.0, 0.4)], higher=False) == [(1.0, 0.5), (2.0, 0.4)]


def test_the_table_and_plots_go_to_wandb(study, tmp_path, monkeypatch) -> None:
    """With `wandb:` in the study, the same table and plots are logged to a W&B run (offline here,
    read back from the file W&B writes)."""
    pytest.importorskip("wandb")
    from lit_peft import compare as comparing
    from wandb_records import records
    from wandb.proto import wandb_internal_pb2 as pb

    folder, path, _ = study
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    data = json.loads((folder / "out" / "results.json").read_text())
    rows = data["methods"]
    plots = {name: folder / "out" / name for name in ("metric_vs_trainable.png", "costs.png", "curves.png")}
    st = comparing.load_study(path)
    st.wandb = {"project": "toy"}
    comparing.log_to_wandb(st, rows, plots, tmp_path)
    (run_file,) = tmp_path.glob("wandb/offline-run-*/*.wandb")
    logged = {}
    for raw in records(run_file):
        record = pb.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            for item in record.history.item:  # a logged object arrives flattened: nested_key [name, field]
                keys = [item.key] if item.key else list(item.nested_key)
                node = logged
                for key in keys[:-1]:
                    node = node.setdefault(key, {})
                node[keys[-1]] = json.loads(item.value_json)
    assert logged["results"]["_type"] == "table-file" and logged["results"]["nrows"] == len(rows)
    assert {logged[k]["_type"] for k in ("metric_vs_trainable", "costs", "curves")} == {"image-file"}


def test_slurm_submits_the_unfinished_runs_as_one_array(tiny_bert, toy_data, tmp_path) -> None:
    base = write_config(tmp_path, tiny_bert, toy_data)
    path = write_study(tmp_path, base, BUDGET, {"lora": {}, "ia3": RUNS["ia3"]})
    done = compare(str(path), "--output_dir", str(tmp_path / "out"), "--slurm", "--partition", "cpu", "--dry_run",
                   cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    script = done.stdout
    assert "#SBATCH --array=0-3" in script and "#SBATCH --partition=cpu" in script
    cases = [line for line in script.splitlines() if line.strip()[:2] in ("0)", "1)", "2)", "3)")]
    assert len(cases) == 4 and all("--seed_everything" in c and "--trainer.logger" in c for c in cases)
    assert "lit_peft.methods.IA3" in cases[2] and "--seed_everything 2" in cases[3]


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "studies").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_ready_studies_load(path: Path, monkeypatch) -> None:
    """Every study in studies/ parses, names configs that exist, and plans one run per (run, seed)."""
    from lit_peft import compare as comparing

    monkeypatch.chdir(path.parents[1])  # studies name the shared data relative to the repository
    study = comparing.load_study(path)
    chosen = {name: {} for name in study.runs} if study.tune is not None else None  # as if tuning had chosen
    runs = comparing.plan(study, Path("/tmp/unused"), chosen)
    assert len(runs) == len(study.runs) * len(study.seeds)
    assert len({r.key for r in runs}) == len(runs)  # every (run, seed) its own folder


def test_a_test_metric_tests_each_fit_into_its_folder(tiny_bert, toy_data, tmp_path) -> None:
    base = write_config(tmp_path, tiny_bert, toy_data)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({"title": "scored on test", "base": str(base), "metric": "test_acc", "reference": "lora",
                                    "seeds": [1], "budget": BUDGET, "runs": {"lora": {}}}))
    done = compare(str(path), "--output_dir", str(tmp_path / "out"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    (summary,) = summaries(tmp_path / "out", "lora")
    assert summary["stages"] == ["fit", "test"] and "test_acc" in summary
    row = next(csv.DictReader((tmp_path / "out" / "results.csv").open()))
    assert float(row["test_acc"]) == pytest.approx(summary["test_acc"])
    (log,) = (tmp_path / "out" / "logs").glob("lora-seed1-*.log")
    assert "$ lit-peft test --config" in log.read_text()
    again = compare(str(path), "--output_dir", str(tmp_path / "out"), cwd=tmp_path)
    assert "1 finished before, 0 to run" in again.stdout  # fit and test both done: nothing runs again
