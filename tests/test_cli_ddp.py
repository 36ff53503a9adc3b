"""`lit-peft` with two DDP processes on the CPU (Lightning starts the second one): one run folder,
one summary.json counting both ranks' samples, one config; `predict` writes one file, in the
dataset's order, with the predictions a single process makes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_cli import lit_peft, write_config

DDP = ("--trainer.devices", "2", "--trainer.strategy", "ddp")


@pytest.fixture(scope="module")
def ddp_fit(tiny_bert, toy_data, tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("cli-ddp")
    config = write_config(folder, tiny_bert, toy_data, max_epochs=1)
    done = lit_peft("fit", "--config", str(config), *DDP, cwd=folder)
    assert done.returncode == 0, done.stderr[-3000:]
    return config, folder


def test_fit_over_two_processes_writes_one_run(ddp_fit) -> None:
    config, folder = ddp_fit
    runs = list((folder / "runs" / "toy").iterdir())
    assert [p.name for p in runs] == ["version_0"]
    summary = json.loads((runs[0] / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["num_nodes"] == 1
    assert summary["train_samples"] == 256  # 256 rows, each rank half of them once
    assert len(list((runs[0] / "checkpoints").glob("*.ckpt"))) == 1


def test_predict_over_two_processes_writes_one_ordered_file(ddp_fit, toy_data, tmp_path) -> None:
    config, folder = ddp_fit
    ckpt = next((folder / "runs" / "toy" / "version_0" / "checkpoints").glob("*.ckpt"))
    texts = [line.split("\t")[0] for line in (toy_data / "dev.tsv").read_text().splitlines()[1:]][:45]  # odd: uneven shares
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    common = ("predict", "--config", str(config), "--ckpt_path", str(ckpt), "--data", "lit_peft.data.TextClassificationData",
              "--data.init_args.predict_file", str(tmp_path / "in.jsonl"), "--data.init_args.batch_size", "4",
              "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"))
    for name, extra in (("one.jsonl", ()), ("two.jsonl", DDP)):
        done = lit_peft(*common, "--predictions.path", str(tmp_path / name), *extra, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
    one = [json.loads(line) for line in (tmp_path / "one.jsonl").read_text().splitlines()]
    two = [json.loads(line) for line in (tmp_path / "two.jsonl").read_text().splitlines()]
    assert len(two) == len(texts)
    assert [r["pred"] for r in two] == [r["pred"] for r in one]
    assert all(abs(a - b) < 1e-5 for r, s in zip(one, two) for a, b in zip(r["probs"], s["probs"]))
    assert not list(tmp_path.glob(".*.part"))  # the ranks' parts are gone


def test_test_metrics_are_synced_over_ranks(ddp_fit, tmp_path) -> None:
    """Each rank scores half of the dev rows; the logged accuracy and loss are the whole set's."""
    config, folder = ddp_fit
    ckpt = next((folder / "runs" / "toy" / "version_0" / "checkpoints").glob("*.ckpt"))
    scores = {}
    for name, extra in (("one", ()), ("two", DDP)):
        done = lit_peft("test", "--config", str(config), "--ckpt_path", str(ckpt), "--trainer.logger.init_args.save_dir",
                        str(tmp_path / name), *extra, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        scores[name] = json.loads((tmp_path / name / "toy" / "version_0" / "summary.json").read_text())
    assert scores["two"]["world_size"] == 2
    assert scores["two"]["test_acc"] == pytest.approx(scores["one"]["test_acc"], abs=1e-6)
    assert scores["two"]["test_loss"] == pytest.approx(scores["one"]["test_loss"], rel=1e-5)


def test_a_resumed_run_counts_every_ranks_tokens_once(ddp_fit, tiny_bert, toy_data, tmp_path) -> None:
    """The checkpoint carries both ranks' counts summed, and rank zero alone carries them on: a
    second epoch resumed over two processes, or over one, reports the two epochs' tokens exactly
    (each epoch sees every row once), not rank zero's share counted on every rank."""
    from lit_peft.backbones import load_tokenizer
    from lit_peft.data import SST2Data

    config, folder = ddp_fit
    ckpt = next((folder / "runs" / "toy" / "version_0" / "checkpoints").glob("*.ckpt"))
    data = SST2Data(data_dir=str(toy_data), batch_size=32, max_length=16)
    data._tokenizer = lambda: load_tokenizer(tiny_bert)
    data.setup("fit")
    tokens = int(data.datasets["train"].lengths().sum())
    first = json.loads((folder / "runs" / "toy" / "version_0" / "summary.json").read_text())
    assert first["train_tokens"] == tokens
    for name, extra in (("two", DDP), ("one", ())):
        done = lit_peft("fit", "--config", str(config), "--ckpt_path", str(ckpt), "--trainer.max_epochs", "2",
                        "--trainer.logger.init_args.save_dir", str(tmp_path / name), *extra, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        summary = json.loads((tmp_path / name / "toy" / "version_0" / "summary.json").read_text())
        assert summary["train_samples"] == 2 * 256, name
        assert summary["train_tokens"] == 2 * tokens, name
        assert 1.0 <= summary["padding_ratio"] < first["padding_ratio"] * 1.5, name
