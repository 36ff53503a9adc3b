"""Chat rendering and loss masks over the conventions of the main model families, with exact token ids.

A word-level tokenizer built here (one token per word, space, newline or punctuation mark, and the
special tokens of each family) makes every expected id readable; the templates are our own, written
to each family's convention, and SmolLM2's real template and tokenizer close the table.
"""

from __future__ import annotations

import pytest
import torch

from lit_peft.data.chat import ChatFormat
from lit_peft.errors import ConfigError

SPECIAL = ["<s>", "</s>", "<pad>", "<eot>", "<eom>", "<hdr>", "</hdr>", "<|user|>", "<|assistant|>", "<|system|>",
           "<|end|>", "<start_of_turn>", "<end_of_turn>", "<tools>"]
WORDS = ["user", "assistant", "system", "model", "tool", "Hi", "Hello", "Be", "brief", "Bye", "Ciao", "Sum", "2", "3",
         "5", "add", "call", "x", "lit", "peft", "end", "of", "turn", "probe", "hi", "Weather", "Sunny", "weather",
         "Paris", "in", "json", ":", "-", ".", ",", "!", "?", "{", "}", "\"", " ", "\n"]

LLAMA3 = ("{{ bos_token }}{% if tools %}<tools>{% endif %}{% for m in messages %}<hdr>{{ m.role }}</hdr>\n\n"
          "{% if m.tool_calls %}call {{ m.tool_calls[0].function.name }}{% else %}{{ m.content }}{% endif %}<eot>"
          "{% endfor %}{% if add_generation_prompt %}<hdr>assistant</hdr>\n\n{% endif %}")
PHI3 = ("{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
GEMMA3 = ("{{ bos_token }}{% if messages[0].role == 'system' %}{% set first = messages[0].content + '\n\n' %}"
          "{% set messages = messages[1:] %}{% else %}{% set first = '' %}{% endif %}"
          "{% for m in messages %}<start_of_turn>{{ 'model' if m.role == 'assistant' else m.role }}\n"
          "{% if loop.first %}{{ first }}{% endif %}{{ m.content }}<end_of_turn>\n{% endfor %}"
          "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
GEMMA2 = ("{{ bos_token }}{% if messages[0].role == 'system' %}{{ raise_exception('System role not supported') }}"
          "{% endif %}{% for m in messages %}<start_of_turn>{{ 'model' if m.role == 'assistant' else m.role }}\n"
          "{{ m.content }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def word_tokenizer(template, bos_by_tokenizer: bool):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL + WORDS + ["[UNK]"])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"\w+|[^\w\s]|\s"), behavior="isolated")
    core.decoder = decoders.Fuse()
    if bos_by_tokenizer:
        core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  additional_special_tokens=SPECIAL[3:])
    tok.chat_template = template
    return tok


def ids(tok, tokens: list[str]) -> list[int]:
    got = tok.convert_tokens_to_ids(tokens)
    assert tok.unk_token_id not in got, tokens
    return got


def split(text: str) -> list[str]:
    """'<hdr>user</hdr>' -> ['<hdr>', 'user', '</hdr>']: the expected tokens written as one string."""
    import re

    return re.findall(r"<[^>\s]+>|\w+|[^\w\s]|\s", text)


SYSTEM = {"role": "system", "content": "Be brief"}
TWO_TURNS = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
             {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Ciao"}]

# (family, template, BOS by tokenizer, conversation, train_on, [(text, learned), ...] in order, stop tokens)
CASES = [
    ("llama3: template writes BOS, <eot> is not eos; the tokenizer's BOS is not doubled", LLAMA3, True,
     [SYSTEM] + TWO_TURNS, "all",
     [("<s><hdr>system</hdr>\n\nBe brief<eot><hdr>user</hdr>\n\nHi<eot><hdr>assistant</hdr>\n\n", False),
      ("Hello<eot>", True), ("<hdr>user</hdr>\n\nBye<eot><hdr>assistant</hdr>\n\n", False), ("Ciao<eot>", True)],
     ["<eot>", "</s>"]),
    ("llama3, the last turn only", LLAMA3, True, TWO_TURNS, "last",
     [("<s><hdr>user</hdr>\n\nHi<eot><hdr>assistant</hdr>\n\nHello<eot><hdr>user</hdr>\n\nBye<eot>"
       "<hdr>assistant</hdr>\n\n", False), ("Ciao<eot>", True)], ["<eot>", "</s>"]),
    ("phi3: BOS by the tokenizer, <|end|> then a newline that is not learned", PHI3, True, TWO_TURNS, "all",
     [("<s><|user|>\nHi<|end|>\n<|assistant|>\n", False), ("Hello<|end|>", True),
      ("\n<|user|>\nBye<|end|>\n<|assistant|>\n", False), ("Ciao<|end|>", True), ("\n", False)],
     ["<|end|>", "</s>"]),
    ("gemma3: the template folds the system turn into the first user turn", GEMMA3, False,
     [SYSTEM] + TWO_TURNS[:2], "all",
     [("<s><start_of_turn>user\nBe brief\n\nHi<end_of_turn>\n<start_of_turn>model\n", False),
      ("Hello<end_of_turn>", True), ("\n", False)], ["<end_of_turn>", "</s>"]),
    ("gemma2: the template refuses a system turn, so lit-peft folds it", GEMMA2, False,
     [SYSTEM] + TWO_TURNS[:2], "all",
     [("<s><start_of_turn>user\nBe brief\n\nHi<end_of_turn>\n<start_of_turn>model\n", False),
      ("Hello<end_of_turn>", True), ("\n", False)], ["<end_of_turn>", "</s>"]),
    ("no template: the plain one, BOS from the tokenizer, EOS after each answer", None, True,
     [SYSTEM] + TWO_TURNS, "all",
     [("<s>Be brief\n\nHi\n", False), ("Hello</s>", True), ("Bye\n", False), ("Ciao</s>", True)], ["</s>"]),
    ("no template, no BOS anywhere", None, False, TWO_TURNS[:2], "all",
     [("Hi\n", False), ("Hello</s>", True)], ["</s>"]),
]


@pytest.mark.parametrize("family, template, bos_by_tokenizer, messages, train_on, pieces, stops", CASES,
                         ids=[c[0] for c in CASES])
def test_rendering_and_mask_follow_each_familys_template(family, template, bos_by_tokenizer, messages, train_on,
                                                         pieces, stops) -> None:
    tok = word_tokenizer(template, bos_by_tokenizer)
    chat = ChatFormat(tok, train_on=train_on)
    got_ids, labels, prompt_len, cut = chat.encode(messages)
    expected = [(i, learned) for text, learned in pieces for i in ids(tok, split(text))]
    assert got_ids == [i for i, _ in expected] and not cut
    assert labels == [i if learned else -100 for i, learned in expected]
    assert chat.stop_ids == ids(tok, stops)
    # the generation prompt is exactly the tokens before the last learned turn
    last = max(k for k, (_, learned) in enumerate(pieces) if learned)
    before = [i for text, _ in pieces[:last] for i in ids(tok, split(text))]
    assert chat.prompt(messages[:-1]) == before and prompt_len == len(before)


def test_tool_calls_and_tools_are_rendered_by_the_template_and_learned() -> None:
    tok = word_tokenizer(LLAMA3, bos_by_tokenizer=False)
    messages = [{"role": "user", "content": "weather in Paris"},
                {"role": "assistant", "content": None,
                 "tool_calls": [{"type": "function", "function": {"name": "weather", "arguments": {"x": "Paris"}}}]},
                {"role": "tool", "content": "Sunny"}, {"role": "assistant", "content": "Sunny"}]
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {}}}]
    got_ids, labels, _, _ = ChatFormat(tok).encode(messages, tools=tools)
    learned = tok.convert_ids_to_tokens([t for t in labels if t != -100])
    assert learned == split("call weather<eot>Sunny<eot>")
    assert got_ids[1] == tok.convert_tokens_to_ids("<tools>") and labels[1] == -100  # tools rendered, not learned


def test_a_cut_turn_loses_its_end_and_is_reported() -> None:
    tok = word_tokenizer(PHI3, bos_by_tokenizer=True)
    got_ids, labels, _, cut = ChatFormat(tok).encode([{"role": "user", "content": "Hi"},
                                                   {"role": "assistant", "content": "Hello,Hello"}], max_turn_tokens=2)
    assert cut and tok.convert_ids_to_tokens([t for t in labels if t != -100]) == ["Hello", ","]
    # the cut turn still ends where the template ends it, as context: later turns follow a closed turn
    assert tok.convert_ids_to_tokens(got_ids[-3:]) == [",", "<|end|>", "\n"] and labels[-2] == -100


def test_a_template_that_rewrites_earlier_turns_is_refused_for_all_turns_only() -> None:
    # renders only the last assistant turn's content (as reasoning templates drop earlier thoughts)
    template = ("{% for m in messages %}<|{{ m.role }}|>{% if m.role != 'assistant' or loop.last %}{{ m.content }}"
                "{% endif %}<|end|>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    tok = word_tokenizer(template, bos_by_tokenizer=False)
    with pytest.raises(ConfigError, match="renders an earlier assistant turn differently.*train_on: last"):
        ChatFormat(tok, train_on="all").encode(TWO_TURNS)
    _, labels, _, _ = ChatFormat(tok, train_on="last").encode(TWO_TURNS)
    assert tok.convert_ids_to_tokens([t for t in labels if t != -100]) == ["Ciao", "<|end|>"]


def test_smollm2s_real_template(tiny_llama) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    chat = ChatFormat(tok)
    got_ids, labels, _, _ = chat.encode(TWO_TURNS)
    end, start = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|im_start|>")
    piece = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    system = [start] + piece("system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face") + [end]
    expected = [(system + piece("\n") + [start] + piece("user\nHi") + [end] + piece("\n") + [start]
                 + piece("assistant\n"), False), (piece("Hello") + [end], True),
                (piece("\n") + [start] + piece("user\nBye") + [end] + piece("\n") + [start] + piece("assistant\n"), False),
                (piece("Ciao") + [end], True), (piece("\n"), False)]
    assert got_ids == [i for p, _ in expected for i in p]
    assert labels == [i if learned else -100 for p, learned in expected for i in p]
    assert chat.stop_ids == [end]  # SmolLM2's end of turn is its eos


def test_generation_stops_on_the_models_ids_and_the_templates_end_of_turn() -> None:
    from types import SimpleNamespace

    from lit_peft.tasks.causal_lm import CausalLM

    tok = word_tokenizer(LLAMA3, bos_by_tokenizer=True)
    task = CausalLM.__new__(CausalLM)
    torch.nn.Module.__init__(task)
    task.tokenizer = tok
    eot, eom, eos = ids(tok, ["<eot>", "<eom>", "</s>"])
    task.backbone = torch.nn.Module()
    task.backbone.generation_config = SimpleNamespace(eos_token_id=[eos, eom])  # Llama-3-Instruct lists several
    assert task.stop_ids() == [eos, eom, eot]
    task.backbone.generation_config = SimpleNamespace(eos_token_id=None)
    assert task.stop_ids() == [eot, eos]


def metaspace_tokenizer(template):
    """A Llama-2-style SentencePiece tokenizer (words carry a leading '▁'), BOS by the tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, decoders
    from transformers import PreTrainedTokenizerFast

    words = ["It", "is", "four", "Two", "plus", "two", "?", "Hi", "Be", "brief", "Hello", "Bye", "Ciao"]
    vocab = {t: i for i, t in enumerate(["<s>", "</s>", "[INST]", "[/INST]", "<unk>", "▁"] + [f"▁{w}" for w in words]
                                        + words)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    core.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  additional_special_tokens=["[INST]", "[/INST]"])
    tok.chat_template = template
    return tok


# Mistral-Instruct v0.3's convention: the system text goes into the *last* user turn, answers end with EOS
MISTRAL = ("{{ bos_token }}{% if messages[0].role == 'system' %}{% set sys = messages[0].content %}"
           "{% set messages = messages[1:] %}{% endif %}{% for m in messages %}{% if m.role == 'user' %}"
           "{% if loop.last and sys is defined %}[INST] {{ sys }} {{ m.content }}[/INST]{% else %}"
           "[INST] {{ m.content }}[/INST]{% endif %}{% else %} {{ m.content | trim }}{{ eos_token }}{% endif %}{% endfor %}")


def test_sentencepiece_ids_are_the_whole_texts_and_the_prompt_is_their_prefix() -> None:
    """Tokenized turn by turn, '▁' would start every answer (['▁', '▁It', ...]); the whole text gives '▁It'."""
    tok = metaspace_tokenizer(MISTRAL)
    chat = ChatFormat(tok)
    messages = [{"role": "user", "content": "Two plus two?"}, {"role": "assistant", "content": "It is four"}]
    ids, labels, prompt_len, _ = chat.encode(messages)
    whole = tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
    assert ids == whole
    assert tok.convert_ids_to_tokens([t for t in labels if t != -100]) == ["▁It", "▁is", "▁four", "</s>"]
    assert tok.convert_ids_to_tokens(ids[:prompt_len])[-1] == "[/INST]" and all(t == -100 for t in labels[:prompt_len])


def test_a_system_turn_that_only_the_last_user_turn_shows_is_folded_into_the_first() -> None:
    tok = metaspace_tokenizer(MISTRAL)
    for train_on in ("all", "last"):
        ids, labels, _, _ = ChatFormat(tok, train_on=train_on).encode([SYSTEM] + TWO_TURNS)
        tokens = tok.convert_ids_to_tokens(ids)
        assert tokens.count("▁Be") == 1 and tokens.index("▁Be") < tokens.index("[/INST]")  # in the first user turn
        learned = tok.convert_ids_to_tokens([t for t in labels if t != -100])
        assert learned == (["▁Hello", "</s>", "▁Ciao", "</s>"] if train_on == "all" else ["▁Ciao", "</s>"])


def test_a_template_closing_with_eos_after_the_last_turn_trains_every_turn() -> None:
    """Phi-3's template ends a conversation with EOS unless a generation prompt follows."""
    tok = word_tokenizer(PHI3 + "{% if not add_generation_prompt %}</s>{% endif %}", bos_by_tokenizer=True)
    ids, labels, _, _ = ChatFormat(tok).encode(TWO_TURNS)
    assert tok.convert_ids_to_tokens([t for t in labels if t != -100]) == ["Hello", "<|end|>", "Ciao", "<|end|>"]
    assert tok.convert_ids_to_tokens(ids[-2:]) == ["\n", "</s>"]


def test_a_template_without_an_end_of_turn_token_gets_eos_so_the_model_learns_to_stop() -> None:
    tok = word_tokenizer("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}", bos_by_tokenizer=False)
    chat = ChatFormat(tok)
    _, labels, _, _ = chat.encode(TWO_TURNS[:2])
    assert tok.convert_ids_to_tokens([t for t in labels if t != -100]) == ["Hello", "\n", "</s>"]
    assert chat.stop_ids == ids(tok, ["</s>"])
