"""Validation and test count every row exactly once on any number of processes: the same metrics
from 1 and from 2 DDP processes (gloo, ``torchrun``, ``eval_shard_worker.py``) on row counts 2 does
not divide, for classification (accuracy, F1, loss), GSM8K exact match, ROUGE and forecasting MSE.
``EvalShard`` itself: each row on one rank, equal batch counts, the repeated row marked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import torchrun, toy_rows
from lit_peft.data.samplers import EvalShard

HERE = Path(__file__).resolve().parent


@pytest.mark.parametrize("size, world", [(101, 2), (1319, 8), (3, 4), (16, 2)])
def test_eval_shard_scores_each_row_once_with_equal_batch_counts(size, world) -> None:
    order = list(reversed(range(size)))
    shards = [EvalShard(order, world, rank) for rank in range(world)]
    own = [i for s in shards for b in range(0, len(s), 5) for i in list(s)[b:b + s.real_rows(b // 5, 5, len(list(s)[b:b + 5]))]]
    assert sorted(own) == list(range(size))  # every row once
    assert len({len(list(s)) for s in shards}) == 1  # every rank runs as many batches
    assert all(list(s)[: len(s.mine)] == order[r::world] for r, s in enumerate(shards))


def run_worker(nproc: int, args: list[str], out: Path) -> dict:
    done = torchrun(HERE / "eval_shard_worker.py", nproc, *args, out)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def one_and_two(tiny_bert, tiny_llama, toy_gsm8k, tiny_patchtst, toy_series, tmp_path_factory) -> tuple[dict, dict]:
    folder = tmp_path_factory.mktemp("eval-shards")
    sst2 = folder / "sst2"
    sst2.mkdir()
    for name, n, seed in (("train.tsv", 8, 1), ("dev.tsv", 101, 2)):  # 101 dev rows: 51 + 50 on two ranks
        (sst2 / name).write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in toy_rows(n, seed)))
    one_row = folder / "sst2-one-row"  # one dev row: the second rank has none at all
    one_row.mkdir()
    for name, n, seed in (("train.tsv", 8, 1), ("dev.tsv", 1, 3)):
        (one_row / name).write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in toy_rows(n, seed)))
    gsm = folder / "gsm8k"
    gsm.mkdir()
    lines = (toy_gsm8k / "test.jsonl").read_text().splitlines()
    (gsm / "train.jsonl").write_text((toy_gsm8k / "train.jsonl").read_text())
    (gsm / "test.jsonl").write_text("\n".join(lines[:15]) + "\n")  # 15 problems
    words = "the council said on monday that new rules for river water would start next spring after a long review".split()
    summaries = folder / "summaries.jsonl"
    summaries.write_text("".join(json.dumps({"document": " ".join(words * 2), "summary": " ".join(words[i % 7: 5 + i % 11])}) + "\n"
                                 for i in range(11)))  # 11 rows, summaries of 5 to 15 words
    args = [tiny_bert, str(sst2), str(one_row), tiny_llama, str(gsm), str(summaries), tiny_patchtst, str(toy_series)]
    return run_worker(1, args, folder / "one.json"), run_worker(2, args, folder / "two.json")


@pytest.mark.parametrize("task, metrics", [
    ("classification", ["val_acc", "val_f1", "val_loss"]),
    ("one_row", ["val_acc", "val_loss"]),
    ("gsm8k", ["test_exact_match", "test_loss"]),
    ("summaries", ["test_rouge1", "test_rouge2", "test_rougeL", "test_loss"]),
    ("forecasting", ["val_mse", "val_mae", "val_loss"]),
])
def test_one_and_two_processes_give_the_same_metrics(one_and_two, task, metrics) -> None:
    one, two = one_and_two
    for name in metrics:
        assert name in one[task], sorted(one[task])
        assert two[task][name] == pytest.approx(one[task][name], rel=1e-5, abs=1e-6), name
    if task == "forecasting":
        assert one[task]["rows"] % 2 == 1  # the windows split unevenly over two ranks


def test_generation_scores_are_not_constant(one_and_two) -> None:
    """The rows score differently, so a row counted twice would move the figure."""
    one, _ = one_and_two
    assert 0.0 < one["gsm8k"]["test_exact_match"] < 1.0
    assert 0.0 < one["summaries"]["test_rouge2"] < 1.0
