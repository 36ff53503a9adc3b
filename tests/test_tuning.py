"""`lit-peft compare`'s tuning stage on the tiny BERT: two methods, two trials each on the same budget,
a trial the median pruner stops, a study interrupted and resumed, and selection that never sees the
reported split (its dev labels are flipped here: a study that chose on them would pick the worst
learning rate). Also what `tune:` refuses, in one line each, and the held-out split row by row."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from test_cli import write_config

LR = "model.init_args.learning_rate"


def compare(*args: str, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lit_peft.cli", "compare", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def flipped_dev(toy_data: Path, folder: Path) -> Path:
    """The toy data with every dev label flipped: a model that learned the training rows scores below chance there."""
    data = folder / "flipped"
    data.mkdir()
    (data / "train.tsv").write_text((toy_data / "train.tsv").read_text())
    lines = (toy_data / "dev.tsv").read_text().splitlines()
    flipped = [lines[0]] + [f"{text}\t{1 - int(label)}" for text, label in (line.rsplit("\t", 1) for line in lines[1:])]
    (data / "dev.tsv").write_text("\n".join(flipped) + "\n")
    return data


def tuned_study(folder: Path, base: Path, **tune) -> Path:
    block = {"trials": 2, "metric": "val_acc", "budget": {"data.init_args.batch_size": 16},
             "space": {LR: {"low": 1.0e-9, "high": 5.0e-2, "log": True}},
             # the first point learns, the second cannot (1e-9): a median pruner with one trial to go by stops it
             "enqueue": [{LR: 1.0e-2}, {LR: 1.0e-9}], "pruner": {"startup_trials": 1}, "holdout": 64,
             "report_every": 4}
    block.update(tune)
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump({
        "title": "tuned toy study", "base": str(base), "metric": "val_acc", "reference": "lora", "seeds": [1, 2],
        "budget": {"trainer.max_epochs": 4, "trainer.log_every_n_steps": 1, "model.init_args.pooling": "mean"},
        "tune": block,
        "runs": {"lora": {}, "dora": {"args": {"method": {"class_path": "lit_peft.methods.DoRA",
                                                          "init_args": {"r": 4, "alpha": 8}}}}}}, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def study(tiny_bert, toy_data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tuned")
    base = write_config(folder, tiny_bert, flipped_dev(toy_data, folder))
    path = tuned_study(folder, base)
    done = compare(str(path), "--output_dir", str(folder / "out"), cwd=folder)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return folder, path, done, json.loads((folder / "out" / "results.json").read_text())


def test_each_method_gets_the_same_trials_and_its_seeds_train_with_the_chosen_values(study) -> None:
    folder, _, done, results = study
    tuned = results["tuning"]
    assert list(tuned) == ["lora", "dora"]
    for name, what in tuned.items():
        assert what["trials"] == 2, what
        lrs = [t["params"][LR] for t in what["all"]]
        assert lrs == [1.0e-2, 1.0e-9]  # the enqueued points, in order, for every method alike
        assert what["chosen"] == {LR: 1.0e-2}
        assert what["seconds"] > 0
        # the final seeds ran with the chosen value, on the study's budget (batches of 32), not the trials' one
        for seed_folder in sorted((folder / "out" / "runs" / name).glob("seed*")):
            config = yaml.safe_load((seed_folder / "config.yaml").read_text())
            assert config["model"]["init_args"]["learning_rate"] == 1.0e-2
            assert config["data"]["init_args"]["batch_size"] == 32
            assert not any("HoldOutValidation" in json.dumps(c) for c in config["trainer"].get("callbacks") or [])
        for trial in what["all"]:  # each trial's fit ran on the tuning budget with the trial callbacks
            config = yaml.safe_load((Path(trial["folder"]) / "config.yaml").read_text())
            assert config["data"]["init_args"]["batch_size"] == 16
            assert config["model"]["init_args"]["learning_rate"] == trial["params"][LR]
            assert not (Path(trial["folder"]) / "checkpoints").exists()  # trials keep no checkpoints
    text = (folder / "out" / "results.md").read_text()
    assert "## Tuning" in text and "| lora | 0.01 |" in text
    assert (folder / "out" / "tuning.png").stat().st_size > 0
    from lit_peft import report

    fig = report.plot_trials(tuned)  # what tuning.png draws: each trial at its learning rate and value
    points = {c.get_label(): [tuple(p) for p in c.get_offsets()] for c in fig.axes[0].collections if c.get_label()}
    for name, what in tuned.items():
        first, second = what["all"]
        assert points[name] == [(1.0e-2, pytest.approx(first["value"]))]
        assert points[f"{name} (pruned)"] == [(1.0e-9, pytest.approx(list(second["intermediate"].values())[-1]))]
    assert fig.axes[0].get_xscale() == "log"


def test_a_trial_behind_the_median_is_pruned(study) -> None:
    _, _, done, results = study
    for name, what in results["tuning"].items():
        first, second = what["all"]
        assert first["state"] == "COMPLETE" and second["state"] == "PRUNED", (name, what["all"])
        assert what["pruned"] == 1
        # stopped early, at a report behind the first trial's value at the same step
        step, value = list(second["intermediate"].items())[-1]
        assert len(second["intermediate"]) < len(first["intermediate"]) and value < first["intermediate"][step]
        assert (Path(second["folder"]) / "pruned.json").is_file()
    assert "pruned" in done.stdout


def test_selection_never_sees_the_reported_split(study) -> None:
    """The dev labels are flipped: there the chosen (learning) point scores below chance, while its trial,
    validated on rows held out of training, scored above it. Trials that validated on dev would have seen
    the opposite, and a study choosing on it would have kept 1e-9."""
    folder, _, _, results = study
    for name, what in results["tuning"].items():
        assert what["best_value"] > 0.6, what
        finals = [r for r in results["runs"] if r["name"] == name]
        assert finals and all(r["summary"]["val_acc"] < 0.45 for r in finals), [r["summary"].get("val_acc") for r in finals]
    log = next((folder / "out" / "logs").glob("tuning-lora-*-trial000.log")).read_text()
    assert "validating on 64 rows held out of the training split; training on 192" in log


def test_an_interrupted_study_resumes_its_trials(tiny_bert, toy_data, tmp_path) -> None:
    base = write_config(tmp_path, tiny_bert, toy_data)
    path = tuned_study(tmp_path, base, trials=3, enqueue=[{LR: 3.0e-2}], pruner={"startup_trials": 5})
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "lit_peft.cli", "compare", str(path), "--output_dir", str(out),
                             "--only", "lora"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.time() + 600
    while not list((out / "tuning").glob("lora-*/trial001")):  # the first trial is done, the second started
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() is not None else "timeout"
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole study at once, as a lost node would stop it
    proc.wait()
    done = compare(str(path), "--output_dir", str(out), "--only", "lora", cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "1 trial(s) an earlier compare left unfinished will run again" in done.stdout
    assert "1/3 trials done, 2 to run" in done.stdout  # the finished trial is not run again
    what = json.loads((out / "results.json").read_text())["tuning"]["lora"]
    states = [(t["number"], t["state"], t["interrupted"]) for t in what["all"]]
    assert states[0] == (0, "COMPLETE", False) and states[1] == (1, "FAIL", True)
    assert [s for s in states[2:] if s[1] != "FAIL"] == [(2, "COMPLETE", False), (3, "COMPLETE", False)]
    interrupted = what["all"][1]
    assert what["all"][2]["params"] == interrupted["params"]  # the interrupted point is the next one tried
    assert what["trials"] == 3 and what["failed"] == 0
    # every trial in a folder of its own: the interrupted one's is kept as it was left, none written over
    (folder,) = (out / "tuning").glob("lora-*")
    assert sorted(p.name for p in folder.iterdir()) == ["trial000", "trial001", "trial002", "trial003"]


def test_a_slurm_study_runs_its_trials_as_array_tasks_then_submits_the_tuned_runs(tiny_bert, toy_data, tmp_path) -> None:
    """--slurm first submits one array task per trial (`compare STUDY --trial RUN`); the tasks share the
    journal (two run here at once, as array tasks would); then --slurm submits the seeds with the chosen values."""
    base = write_config(tmp_path, tiny_bert, toy_data)
    path = tuned_study(tmp_path, base, enqueue=[], pruner={"startup_trials": 5})
    out = tmp_path / "out"
    first = compare(str(path), "--output_dir", str(out), "--slurm", "--partition", "cpu", "--dry_run", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "#SBATCH --array=0-3" in first.stdout and "export LIT_PEFT_COMMAND=compare" in first.stdout
    cases = [line.split(") set -- ", 1)[1].removesuffix(" ;;") for line in first.stdout.splitlines()
             if line.strip()[:2] in ("0)", "1)", "2)", "3)")]
    assert [c.split("--trial ")[1].split()[0] for c in cases] == ["lora", "lora", "dora", "dora"]
    import shlex

    tasks = [subprocess.Popen([sys.executable, "-m", "lit_peft.cli", "compare", *shlex.split(c)], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for c in cases[:2]]
    for task in tasks:
        output = task.communicate(timeout=600)[0]
        assert task.returncode == 0, output[-2000:]
    for c in cases[2:]:
        done = subprocess.run([sys.executable, "-m", "lit_peft.cli", "compare", *shlex.split(c)], cwd=tmp_path,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
    extra = subprocess.run([sys.executable, "-m", "lit_peft.cli", "compare", *shlex.split(cases[0])], cwd=tmp_path,
                           capture_output=True, text=True, timeout=600)  # a task requeued after the trials were done
    assert extra.returncode == 0 and "trial" not in extra.stdout
    trials = sorted(p.name for p in (out / "tuning").glob("*/trial*"))
    assert trials == ["trial000", "trial000", "trial001", "trial001"]  # two a run: no run got a third
    second = compare(str(path), "--output_dir", str(out), "--slurm", "--partition", "cpu", "--dry_run", cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "#SBATCH --array=0-3" in second.stdout and "export LIT_PEFT_COMMAND" not in second.stdout
    finals = [line for line in second.stdout.splitlines() if line.strip()[:2] in ("0)", "1)", "2)", "3)")]
    assert all("--trainer.logger" in line and LR in line for line in finals)  # the seeds, with the chosen values


@pytest.mark.parametrize("tune, words", [
    ({"trials": 0, "space": {LR: [1e-3]}}, "tune.trials must be a whole number"),
    ({"trials": 2, "space": {LR: [1e-3]}, "metric": "test_acc"}, "tune.metric must be a validation metric"),
    ({"trials": 2, "space": {LR: {"low": 1e-2, "high": 1e-5}}}, "needs numbers low < high"),
    ({"trials": 2, "space": {LR: {"low": 0, "high": 1e-2, "log": True}}}, "log-scaled, so low must be above 0"),
    ({"trials": 2, "space": {"learning_rate": [1e-3]}}, "must be a dotted config key"),
    ({"trials": 2, "space": {LR: {"low": 1e-5, "hi": 1e-2}}}, "unknown key(s) ['hi']"),
    ({"trials": 2, "space": {LR: [1e-3]}, "holdout": 1.5}, "tune.holdout must be a fraction"),
    ({"trials": 2, "space": {LR: [1e-3]}, "pruners": {}}, "tune has unknown key(s) ['pruners']"),
    ({"trials": 2, "space": {LR: [1e-3]}, "enqueue": [{"method.init_args.r": 4}]}, "which the space does not have"),
    ({"trials": 2}, "space must be a mapping"),
    ({"trials": 2, "space": {LR: [1e-3, 1e-2]}, "sampler": "random"}, "tune.sampler must be tpe or grid"),
    ({"trials": 3, "space": {LR: [1e-3, 1e-2]}, "sampler": "grid"}, "the grid has 2 points, so trials must be 2"),
    ({"trials": 2, "space": {LR: {"low": 1e-3, "high": 1e-2}}, "sampler": "grid"}, "grid takes lists of choices"),
])
def test_a_bad_tune_block_is_named(tmp_path, tune, words) -> None:
    from lit_peft.compare import load_study
    from lit_peft.errors import ConfigError

    (tmp_path / "base.yaml").write_text("{}\n")
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({"base": "base.yaml", "metric": "val_acc", "tune": tune, "runs": {"lora": {}}}))
    with pytest.raises(ConfigError, match="tune") as caught:
        load_study(path)
    assert words in str(caught.value) and "\n" not in str(caught.value)


def test_a_bad_tune_block_is_one_line_and_runs_nothing(tmp_path) -> None:
    (tmp_path / "base.yaml").write_text("{}\n")
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({"base": "base.yaml", "metric": "val_acc", "runs": {"lora": {}},
                                    "tune": {"trials": 2, "space": {LR: {"low": 1e-2, "high": 1e-5}}}}))
    done = compare(str(path), "--output_dir", str(tmp_path / "out"), cwd=tmp_path, timeout=120)
    assert done.returncode != 0
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("lit-peft: error:") and "low < high" in lines[0], done.stderr
    assert not (tmp_path / "out").exists()


def test_a_changed_config_is_tuned_anew(tmp_path) -> None:
    from lit_peft.compare import load_study, tuning_name

    (tmp_path / "base.yaml").write_text("model: {init_args: {learning_rate: 1.0e-3}}\n")
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({"base": "base.yaml", "metric": "val_acc", "runs": {"lora": {}, "dora": {}},
                                    "tune": {"trials": 2, "space": {LR: [1e-3, 1e-2]}, "sampler": "grid"}}))
    study = load_study(path)
    names = {run: tuning_name(study, run, spec) for run, spec in study.runs.items()}
    assert names["lora"].startswith("lora-") and names["lora"] != names["dora"]
    assert tuning_name(load_study(path), "lora", load_study(path).runs["lora"]) == names["lora"]  # stable
    (tmp_path / "base.yaml").write_text("model: {init_args: {learning_rate: 2.0e-3}}\n")
    assert tuning_name(load_study(path), "lora", load_study(path).runs["lora"]) != names["lora"]


def test_a_run_adds_to_or_replaces_the_space(tmp_path) -> None:
    from lit_peft.compare import load_study

    (tmp_path / "base.yaml").write_text("{}\n")
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({"base": "base.yaml", "metric": "val_acc",
                                    "tune": {"trials": 2, "space": {LR: {"low": 1e-5, "high": 1e-2, "log": True}}},
                                    "runs": {"lora": {}, "wider": {"tune": {"space": {"method.init_args.r": [4, 8]}}},
                                             "own": {"tune": {"space": {"method.init_args.r": [4, 8]}, "replace": True}}}}))
    runs = load_study(path).runs
    assert list(runs["lora"]["space"]) == [LR]
    assert list(runs["wider"]["space"]) == [LR, "method.init_args.r"]
    assert list(runs["own"]["space"]) == ["method.init_args.r"]


def test_a_grid_tries_each_point_once_and_a_stopped_one_again(tmp_path) -> None:
    from lit_peft import tuning

    tune = tuning.load_tune({"trials": 3, "sampler": "grid", "space": {LR: [1e-4, 1e-3, 1e-2]}}, "study", "val_acc")
    study = tuning.open_study(tmp_path, "lora", tune)
    first = study.ask(tuning.distributions(tune.space))
    study.tell(first, 0.7)
    stopped = study.ask(tuning.distributions(tune.space))  # left running: its compare was killed
    study = tuning.open_study(tmp_path, "lora", tune)  # the next compare
    assert tuning.release_interrupted(study) == 1 and tuning.remaining(study, tune) == 2
    seen = []
    while tuning.remaining(study, tune):
        trial = study.ask(tuning.distributions(tune.space))
        seen.append(trial.params[LR])
        tuning.finish(study, trial, 0.5)
    assert seen[0] == stopped.params[LR]  # the stopped point first
    assert sorted([first.params[LR]] + seen) == [1e-4, 1e-3, 1e-2]  # and every point once


def test_hold_out_takes_training_rows_only_and_each_once(tiny_bert, toy_data) -> None:
    from lit_peft.data import SST2Data

    data = SST2Data(data_dir=str(toy_data), max_length=16, tokenizer=tiny_bert)
    data.setup("fit")
    text = lambda ds, i: tuple(ds[i]["input_ids"].tolist())  # noqa: E731
    train = [text(data.datasets["train"], i) for i in range(len(data.datasets["train"]))]
    dev = {text(data.datasets["val"], i) for i in range(len(data.datasets["val"]))}
    kept, held = data.hold_out(0.25, seed=3)
    assert (kept, held) == (192, 64)
    new_train = data.datasets["train"].indices
    new_val = data.datasets["val"].indices
    assert sorted(new_train + new_val) == list(range(256)) and not set(new_train) & set(new_val)
    assert {text(data.datasets["val"], i) for i in range(64)} <= set(train)
    assert not {text(data.datasets["val"], i) for i in range(64)} & (dev - set(train))
    # lengths and batches still come through the underlying columns
    assert data.datasets["train"].lengths().tolist() == [len(train[i]) for i in new_train]
    batch = data.collate(data.datasets["val"].__getitems__([0, 1]))
    assert batch["labels"].shape == (2,)


def test_hold_out_of_time_series_takes_the_latest_windows_and_drops_their_overlap() -> None:
    import numpy as np
    import torch

    from lit_peft.data.windows import SeriesWindows
    from lit_peft.data.base import SplitDataModule

    class Windows(SplitDataModule):
        pass

    module = Windows()
    starts = np.arange(10, 60, 2)  # 25 windows, horizon 6
    module.datasets = {"train": SeriesWindows(torch.zeros(1, 80), torch.arange(80)[None] * 3600, np.zeros(25, dtype=np.int64),
                                              starts, 8, 6, torch.zeros(1, dtype=torch.long), torch.zeros(1), torch.ones(1))}
    from lit_peft.data.forecasting import ForecastingData

    held, dropped = ForecastingData.held_out_rows(module, 25, 5, seed=0)
    assert [int(starts[i]) for i in held] == [50, 52, 54, 56, 58]  # the latest windows
    assert [int(starts[i]) for i in dropped] == [46, 48]  # training targets that reach into row 50 onwards
