"""InstructionData: messages / ShareGPT / Alpaca records from files, the hub or chatterbot-corpus."""

from __future__ import annotations

import csv
import importlib.util
import json

import pytest

from lit_peft.data import InstructionData
from lit_peft.errors import ConfigError

CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name a colour."},
                     {"role": "assistant", "content": "Blue."}]}
SHAREGPT = {"system": "Be brief.", "conversations": [{"from": "human", "value": "Hi there"}, {"from": "gpt", "value": "Hello!"},
                                                     {"from": "human", "value": "Name a colour."},
                                                     {"from": "gpt", "value": "Blue."}]}
ALPACA = {"instruction": "Translate to French.", "input": "cat", "output": "chat"}


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def data(tiny_llama, train_file, **kw) -> InstructionData:
    module = InstructionData(train_file=train_file, tokenizer=tiny_llama, **{"val_size": 1, "max_length": 256, **kw})
    module.setup("fit")
    return module


def test_the_three_forms_are_detected_and_become_the_same_conversation(tmp_path, tiny_llama) -> None:
    path = write_jsonl(tmp_path / "mixed.jsonl", [CHAT, SHAREGPT, ALPACA, CHAT])
    module = data(tiny_llama, path)
    chat, sharegpt, alpaca = module.records["train"]
    assert chat.messages == sharegpt.messages == CHAT["messages"]
    assert alpaca.messages == [{"role": "user", "content": "Translate to French.\n\ncat"},
                               {"role": "assistant", "content": "chat"}]
    assert (chat.prompt, chat.reference, chat.source) == ("Name a colour.", "Blue.", f"{path}:1")
    # both assistant turns are learned, each ending with <|im_end|>; the user turns are not
    tok = module.tokenizer
    example = module.datasets["train"][0]
    learned = tok.decode([t for t in example["labels"] if t != -100])
    assert learned == "Hello!<|im_end|>Blue.<|im_end|>"
    # the generation prompt of the last answer is exactly the ids training saw before it
    assert example["input_ids"][:len(example["prompt_ids"])] == example["prompt_ids"]
    assert tok.decode(example["prompt_ids"]).endswith("Name a colour.<|im_end|>\n<|im_start|>assistant\n")


def test_train_on_last_and_a_system_prompt_for_conversations_without_one(tmp_path, tiny_llama) -> None:
    path = write_jsonl(tmp_path / "chats.jsonl", [CHAT, ALPACA, ALPACA])
    module = data(tiny_llama, path, train_on="last", system_prompt="You translate.")
    tok = module.tokenizer
    first, second = (module.datasets["train"][i] for i in range(2))
    assert tok.decode([t for t in first["labels"] if t != -100]) == "Blue.<|im_end|>"
    assert "Be brief." in tok.decode(first["input_ids"]) and "You translate." not in tok.decode(first["input_ids"])
    assert "<|im_start|>system\nYou translate.<|im_end|>" in tok.decode(second["input_ids"])


@pytest.mark.parametrize("suffix", ["json", "csv", "parquet"])
def test_json_csv_and_parquet_files_read_alike(tmp_path, tiny_llama, suffix) -> None:
    rows = [CHAT, CHAT, CHAT]
    path = tmp_path / f"chats.{suffix}"
    if suffix == "json":
        path.write_text(json.dumps(rows))
    elif suffix == "csv":  # a conversation in a CSV cell is JSON text
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["messages"])
            writer.writerows([[json.dumps(r["messages"])] for r in rows])
    else:
        import pandas as pd

        pd.DataFrame(rows).to_parquet(path)
    module = data(tiny_llama, str(path))
    assert [r.messages for r in module.records["train"]] == [CHAT["messages"]] * 2


def test_tool_calls_reach_the_template(tmp_path, tiny_llama) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    tok.chat_template = ("{% if tools %}TOOLS:{{ tools | map(attribute='function.name') | join(',') }}\n{% endif %}"
                         "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.tool_calls %}CALL "
                         "{{ m.tool_calls[0].function.name }}{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    record = {"messages": [{"role": "user", "content": "Weather in Paris?"},
                           {"role": "assistant", "tool_calls": [{"type": "function", "function": {
                               "name": "get_weather", "arguments": {"city": "Paris"}}}]},
                           {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "It is sunny."}],
              "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]}
    module = InstructionData(train_file=write_jsonl(tmp_path / "tools.jsonl", [record, record]), val_size=1,
                             tokenizer=tiny_llama)
    module.tokenizer = tok
    module.setup("fit")
    example = module.datasets["train"][0]
    assert tok.decode(example["input_ids"]).startswith("TOOLS:get_weather\n")
    assert tok.decode([t for t in example["labels"] if t != -100]) == "CALL get_weather<|im_end|>It is sunny.<|im_end|>"


BAD = [
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Hello"}]},
     r"bad.jsonl:2: turn 1 has role 'bot'; roles are system, user, assistant, tool"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  "}]},
     r"bad.jsonl:2: turn 1 is an empty assistant turn"),
    ({"messages": [{"role": "user", "content": "Hi"}]}, r"bad.jsonl:2: the conversation has no assistant turn"),
    ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "robot", "value": "Hello"}]},
     r"bad.jsonl:2: turn 1 is from 'robot'; ShareGPT speakers are"),
    ({"messages": [{"role": "user", "content": ["Hi"]}, {"role": "assistant", "content": "Hello"}]},
     r"bad.jsonl:2: turn 0's content must be text, not list"),
    ({"prompt": "Hi", "completion": "Hello"}, r"bad.jsonl:2: cannot tell the record's format from its fields "
                                              r"\(completion, prompt\)"),
    ({"instruction": "Hi", "output": 3}, r"bad.jsonl:2: Alpaca's 'output' must be text, not int"),
    ({"messages": "not json"}, r"bad.jsonl:2: 'messages' is text that is not JSON"),
]


@pytest.mark.parametrize("row, message", BAD, ids=[m.split(": ", 1)[1][:30] for _, m in BAD])
def test_a_bad_record_is_named_by_file_and_line(tmp_path, tiny_llama, row, message) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [CHAT, row, CHAT])
    with pytest.raises(ConfigError, match=message):
        data(tiny_llama, path)


def test_overlong_conversations_are_cut_or_dropped_and_counted(tmp_path, tiny_llama, capsys) -> None:
    long = {"messages": [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "Yes."}]}
    path = write_jsonl(tmp_path / "long.jsonl", [CHAT, long, CHAT, CHAT])
    with pytest.raises(ConfigError, match=r"long.jsonl:2: the prompt is \d+ tokens, which leaves no room"):
        data(tiny_llama, path, max_length=128)
    module = data(tiny_llama, path, max_length=128, overlong="drop")
    assert "train: dropped 1 of 3 record(s) longer than max_length=128" in capsys.readouterr().out
    assert len(module.datasets["train"]) == 2 and len(module.records["train"]) == 2
    # a multi-turn conversation cut inside a later turn keeps what fits of the earlier ones
    multi = {"messages": CHAT["messages"][:3] + [{"role": "user", "content": "word " * 300},
                                                 {"role": "assistant", "content": "Yes."}]}
    module = data(tiny_llama, write_jsonl(tmp_path / "multi.jsonl", [multi, CHAT]), max_length=128)
    example = module.datasets["train"][0]
    assert len(example["input_ids"]) == 128
    assert module.tokenizer.decode([t for t in example["labels"] if t != -100]) == "Hello!<|im_end|>"
    with pytest.raises(ConfigError, match="train_on must be all or last"):
        InstructionData(train_file=path, train_on="first")


def test_limits_and_the_validation_split(tmp_path, tiny_llama) -> None:
    rows = [{"instruction": f"Say {i}.", "output": str(i)} for i in range(20)]
    module = data(tiny_llama, write_jsonl(tmp_path / "say.jsonl", rows), val_size=5, limit_train_rows=6,
                  limit_eval_rows=3)
    assert len(module.records["train"]) == 6 and [r.reference for r in module.records["val"]] == ["15", "16", "17"]
    assert {r.reference for r in module.records["train"]} <= {str(i) for i in range(15)}


def test_chatterbot_corpus_splits_are_disjoint_human_conversations(tiny_llama) -> None:
    if importlib.util.find_spec("chatterbot_corpus") is None:
        pytest.skip("the conversations come with chatterbot-corpus (pip install --no-deps chatterbot-corpus==1.3.3)")
    module = InstructionData(source="chatterbot_corpus", tokenizer=tiny_llama)
    module.setup()
    sizes = {s: len(module.records[s]) for s in ("train", "val", "test")}
    assert sizes["train"] > 500 and 50 < sizes["val"] < 120 and 50 < sizes["test"] < 120
    sources = {s: {r.source for r in module.records[s]} for s in sizes}
    assert not sources["train"] & sources["test"] and not sources["val"] & sources["test"]
    assert any(len(r.messages) > 2 for r in module.records["train"])  # multi-turn conversations are kept whole
    assert all(r.messages[-1]["role"] == "assistant" and r.reference for r in module.records["train"])
