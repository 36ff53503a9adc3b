"""Data modules: the user's own files in every format, bad rows named by file and line, SST-2 from a
GLUE folder, the Rotten Tomatoes snippets, batching and limits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import needs_shared
from lit_peft.backbones import load_tokenizer
from lit_peft.data import RottenTomatoesData, SST2Data, TextClassificationData
from lit_peft.data.text_classification import EpochShuffle
from lit_peft.errors import ConfigError


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("minilm")


def setup(data, tokenizer):
    data.cfg.tokenizer = None
    data._tokenizer = lambda: tokenizer  # the task's tokenizer, without a trainer
    data.setup("fit")
    return data


ROWS = [{"review": f"text number {i} is {'good' if i % 3 else 'bad'}", "stars": "pos" if i % 3 else "neg"} for i in range(30)]


def write(path: Path, rows: list[dict]) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        sep = "\t" if path.suffix == ".tsv" else ","
        path.write_text("\n".join([sep.join(rows[0])] + [sep.join(str(v) for v in r.values()) for r in rows]) + "\n")
    return path


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl"])
def test_own_files_with_named_columns_and_label_names(suffix, tmp_path, tokenizer) -> None:
    train = write(tmp_path / f"train{suffix}", ROWS)
    data = setup(TextClassificationData(train_file=str(train), text_column="review", label_column="stars",
                                        labels=["neg", "pos"], val_fraction=0.2, batch_size=4), tokenizer)
    assert len(data.splits["train"]) == 24 and len(data.splits["val"]) == 6
    assert data.splits["test"] == data.splits["val"]  # no test file: test on the validation split
    for e in data.splits["train"] + data.splits["val"]:
        assert e.label == ("good" in e.text)
    batch = next(iter(data.train_dataloader()))
    assert batch["input_ids"].shape[0] == 4 and set(batch["labels"].tolist()) <= {0, 1}
    # dynamic padding: the batch is as long as its longest row, not max_length
    assert batch["input_ids"].shape[1] == int(batch["attention_mask"].sum(1).max())
    assert data.num_labels == 2


def test_missing_column_is_named(tmp_path, tokenizer) -> None:
    train = write(tmp_path / "train.csv", ROWS)
    with pytest.raises(ConfigError, match="has no column 'text'; its columns are: review, stars"):
        setup(TextClassificationData(train_file=str(train)), tokenizer)


def test_bad_label_names_file_and_line(tmp_path, tokenizer) -> None:
    rows = [dict(r) for r in ROWS]
    rows[7]["stars"] = "meh"
    train = write(tmp_path / "train.csv", rows)
    with pytest.raises(ConfigError, match=r"train.csv:9: label 'meh' is not one of the labels \['neg', 'pos'\]"):
        setup(TextClassificationData(train_file=str(train), text_column="review", label_column="stars",
                                     labels=["neg", "pos"]), tokenizer)


def test_label_out_of_range_is_caught_before_training(tmp_path, tokenizer) -> None:
    rows = [{"text": r["review"], "label": 1 if r["stars"] == "pos" else 0} for r in ROWS]
    rows[3]["label"] = 4
    data = setup(TextClassificationData(train_file=str(write(tmp_path / "t.jsonl", rows))), tokenizer)
    assert data.num_labels == 5
    with pytest.raises(ConfigError, match=r"t.jsonl:4: label 4 is outside the model's num_labels=2"):
        data.check_labels(2)
    data.check_labels(5)


def test_missing_file_and_unknown_format(tmp_path, tokenizer) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        setup(TextClassificationData(train_file=str(tmp_path / "nope.csv")), tokenizer)
    (tmp_path / "x.xlsx").write_text("")
    with pytest.raises(ConfigError, match="unknown format"):
        setup(TextClassificationData(train_file=str(tmp_path / "x.xlsx")), tokenizer)
    (tmp_path / "x.parquet").write_text("")
    with pytest.raises(ConfigError, match="could not read '.*x.parquet' as parquet"):
        setup(TextClassificationData(train_file=str(tmp_path / "x.parquet")), tokenizer)


def test_row_limits_and_truncation(toy_data, tokenizer) -> None:
    data = setup(SST2Data(data_dir=str(toy_data), limit_train_rows=40, limit_eval_rows=10, max_length=5), tokenizer)
    assert len(data.splits["train"]) == 40 and len(data.splits["val"]) == 10
    assert max(len(x["input_ids"]) for x in data.datasets["train"]) == 5


def test_epoch_order_depends_on_seed_and_epoch_only() -> None:
    a, b = EpochShuffle(50, seed=1), EpochShuffle(50, seed=1)
    first = list(a)
    assert sorted(first) == list(range(50))
    a.set_epoch(1)
    assert list(a) != first
    b.set_epoch(1)
    assert list(b) == list(a)


def test_sst2_from_the_shared_glue_folder(tokenizer) -> None:
    folder = needs_shared("sst2")
    data = setup(SST2Data(data_dir=str(folder), limit_train_rows=1000), tokenizer)
    assert len(data.splits["val"]) == 872 and data.splits["test"] == data.splits["val"]
    assert {e.label for e in data.splits["val"]} == {0, 1}
    assert len(data.splits["train"]) == 1000


def test_rotten_tomatoes_snippets(tokenizer) -> None:
    data = setup(RottenTomatoesData(), tokenizer)
    sizes = {k: len(v) for k, v in data.splits.items()}
    total = sum(sizes.values())
    assert 10_000 < total < 10_605  # neutral (0.0) ratings dropped
    assert sizes["val"] == sizes["test"] == pytest.approx(total * 0.1, abs=2)
    positive = sum(e.label for rows in data.splits.values() for e in rows) / total
    assert 0.4 < positive < 0.6
    rows = {k: {e.where for e in v} for k, v in data.splits.items()}
    assert not rows["train"] & rows["val"] and not rows["train"] & rows["test"] and not rows["val"] & rows["test"]


def test_no_validation_split_is_refused_before_training(tmp_path) -> None:
    from lit_peft.data import TextClassificationData
    from lit_peft.errors import ConfigError

    (tmp_path / "train.csv").write_text("text,label\ngood,1\nbad,0\n")
    with pytest.raises(ConfigError, match="val_fraction=0 without val_file leaves nothing to validate on"):
        TextClassificationData(train_file=str(tmp_path / "train.csv"), val_fraction=0.0)


@pytest.mark.parametrize("side, pad", [("right", "[PAD]"), ("left", "[MASK]")])
def test_batches_equal_transformers_padding(side, pad, tmp_path, tokenizer) -> None:
    """Our PadCollator gives the batches transformers' DataCollatorWithPadding gives (text pairs, so
    token_type_ids vary; a pad id other than 0 and left padding in the second case)."""
    import copy

    import torch
    from transformers import DataCollatorWithPadding

    tok = copy.deepcopy(tokenizer)
    tok.padding_side, tok.pad_token = side, pad
    rows = [{"a": "short " * (1 + i % 7), "b": "pair text " * (i % 4 + 1), "label": i % 2} for i in range(20)]
    train = write(tmp_path / "train.jsonl", rows)
    data = setup(TextClassificationData(train_file=str(train), text_column="a", text_pair_column="b",
                                        val_file=str(train), batch_size=8), tok)
    reference = DataCollatorWithPadding(tok, return_tensors="pt")
    dataset = data.datasets["train"]
    rows = [dataset[i] for i in range(len(dataset))]
    # the loader's batches (gathered from the columns, in a shuffled order) and a list of row dicts
    loader_batches = list(data.train_dataloader())
    order = list(data.train_dataloader().sampler)
    assert len(loader_batches) == 3
    for b, batch in enumerate(loader_batches):
        batch_rows = [rows[i] for i in order[8 * b:8 * b + 8]]
        theirs = reference([{k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in r.items()}
                            for r in batch_rows])
        for ours in (batch, data.collate(batch_rows)):
            assert ours.keys() == theirs.keys() == {"input_ids", "token_type_ids", "attention_mask", "labels"}
            for key in ours:
                assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), key
        assert len({len(r["input_ids"]) for r in batch_rows}) > 1  # the batch really needed padding
        edge = batch["input_ids"][:, 0 if side == "left" else -1]
        assert (edge == tok.convert_tokens_to_ids(pad)).any()


def test_token_columns_give_back_each_row() -> None:
    import torch

    from lit_peft.data.base import TokenColumns

    enc = {"input_ids": [[5, 6, 7], [8], [9, 10]], "attention_mask": [[1, 1, 1], [1], [1, 1]]}
    ds = TokenColumns(enc, {"labels": [1, 0, 1]})
    assert len(ds) == 3 and ds.columns["input_ids"].dtype == torch.int32
    rows = list(ds)  # iteration stops at the end (IndexError)
    assert [r["input_ids"].tolist() for r in rows] == enc["input_ids"] and [r["labels"] for r in rows] == [1, 0, 1]
    assert rows[0]["input_ids"].dtype == torch.long  # what embeddings take
    assert ds[-1]["input_ids"].tolist() == [9, 10]
    with pytest.raises(IndexError):
        ds[3]
    with pytest.raises(ValueError, match="'attention_mask' has rows of other lengths"):
        TokenColumns({"input_ids": [[1, 2]], "attention_mask": [[1]]})


def test_a_fetched_batch_is_a_sequence_of_rows_for_any_collate() -> None:
    """What the loader fetches (``__getitems__``) pads by gather in PadCollator, reads as rows for
    any other collate function, and takes negative indices as rows from the end, tokens and labels
    together; a one-row batch needs no padding."""
    import torch
    from torch.utils.data import DataLoader, default_collate

    from lit_peft.data.base import PadCollator, TokenColumns

    ds = TokenColumns({"input_ids": [[5, 6, 7], [8], [9, 10]]}, {"labels": [0, 1, 2]})
    selection = ds.__getitems__([2, -3, -2])
    assert [r["labels"] for r in selection] == [2, 0, 1]
    assert [r["input_ids"].tolist() for r in selection[1:]] == [[5, 6, 7], [8]]
    collate = PadCollator({"input_ids": 0}, "left")
    batch = collate(selection)
    assert batch["input_ids"].tolist() == [[0, 9, 10], [5, 6, 7], [0, 0, 8]] and batch["labels"].tolist() == [2, 0, 1]
    one = collate(ds.__getitems__([1]))
    assert one["input_ids"].tolist() == [[8]] and one["labels"].tolist() == [1]
    with pytest.raises(IndexError):
        ds.__getitems__([3])
    # a collate function of the user's own gets rows, as it would without __getitems__
    loader = DataLoader(ds, batch_size=3, collate_fn=lambda rows: [r["input_ids"].sum().item() for r in rows])
    assert next(iter(loader)) == [18, 8, 19]
    same_length = TokenColumns({"input_ids": [[1, 2], [3, 4]]}, {"labels": [0, 1]})
    stacked = default_collate(same_length.__getitems__([0, 1]))
    assert torch.equal(stacked["input_ids"], torch.tensor([[1, 2], [3, 4]]))


def test_a_tokenizer_without_a_pad_token_is_named(tmp_path, tokenizer) -> None:
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.pad_token = None
    train = write(tmp_path / "train.jsonl", ROWS)
    with pytest.raises(ConfigError, match="has no padding token"):
        setup(TextClassificationData(train_file=str(train), text_column="review", label_column="stars",
                                     labels=["neg", "pos"]), tok)
