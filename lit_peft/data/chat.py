"""Conversations -> token ids and a loss mask, through the tokenizer's own chat template.

transformers renders a conversation (``apply_chat_template``) but says where the assistant's words
lie only for templates marked with ``{% generation %}``, which few models' templates are. So this
module finds them by rendering prefixes: for assistant turn ``i``, the conversation up to ``i``
with the generation prompt, and up to and including ``i``; the text between is what the model
must learn to write for that turn: its content (or tool calls) and the template's own end of turn
(``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``), never a ``tokenizer.eos_token`` the template
does not use. A template that renders an earlier turn differently once later turns follow (one
that drops past reasoning) breaks that prefix property; such a conversation is refused for
``train_on: all`` with a message saying to train on the last turn only.

The rendered text is tokenized a segment at a time (each span between assistant text and the
rest), so a prompt's tokens are the ones generation sees when it is given the same prompt. BOS:
a template that writes it keeps it; where the template does not and the tokenizer adds it by its
own special-token logic (``tokenizer("x")`` starts with BOS), it is added once.

Tokenizers without a template get the plain template (``PLAIN``): the system prompt and a blank
line, then each user turn followed by a newline, each assistant turn followed by EOS; the
tokenizer adds its own leading special tokens (BOS where it uses one).

Generation stops on ``stop_ids``: the template's end-of-turn token with EOS (the task adds the
model's ``generation_config.eos_token_id``, a list for Llama-3-Instruct).
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from lit_peft.errors import ConfigError

ROLES = ("system", "user", "assistant", "tool")
PLAIN = "[system + '\\n\\n'] + user + '\\n' + assistant + EOS + user + '\\n' + assistant + EOS ..."
_PROBE = "lit-peft end-of-turn probe"


class ChatFormat:
    """Render conversations of one tokenizer; ``train_on`` is ``all`` assistant turns or the ``last``."""

    def __init__(self, tokenizer: Any, train_on: Literal["all", "last"] = "all") -> None:
        if train_on not in ("all", "last"):
            raise ConfigError(f"train_on must be 'all' or 'last', got {train_on!r}")
        self.tok, self.train_on = tokenizer, train_on
        self.templated = bool(getattr(tokenizer, "chat_template", None))
        self.fold_system = False  # set when the template refuses a system turn (Gemma 2): folded into the first user turn
        self.lead = self._leading_special_ids()
        self.end_of_turn = self._end_of_turn() if self.templated else []
        self.end_text = tokenizer.decode(self.end_of_turn) if self.end_of_turn else ""

    # ---- what the tokenizer and the template add ----------------------------------------------
    def _leading_special_ids(self) -> list[int]:
        """The special tokens the tokenizer puts before any text (BOS for Llama-2, none for GPT-2)."""
        plain = self.tok("x", add_special_tokens=False)["input_ids"]
        full = self.tok("x")["input_ids"]
        for start in range(len(full) - len(plain) + 1):
            if full[start:start + len(plain)] == plain:
                return full[:start]
        return []

    def _end_of_turn(self) -> list[int]:
        """The template's end-of-turn token: the first special token it writes after an assistant's words."""
        try:
            text = self._template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}])
        except ConfigError:  # a template with demands of its own: stop on EOS, and let a real record say what fails
            return []
        tail = text[text.rfind(_PROBE) + len(_PROBE):] if _PROBE in text else ""
        special = set(self.tok.all_special_ids) | {i for i, t in self.tok.added_tokens_decoder.items() if t.special}
        for token in self.tok(tail, add_special_tokens=False)["input_ids"]:
            if token in special:
                return [token]
        return []

    @property
    def stop_ids(self) -> list[int]:
        """Token ids that end a generated turn: the template's end of turn and EOS."""
        ids = list(self.end_of_turn)
        if self.tok.eos_token_id is not None and self.tok.eos_token_id not in ids:
            ids.append(self.tok.eos_token_id)
        return ids

    def _template(self, messages: list[dict], tools: Optional[list] = None, generation_prompt: bool = False) -> str:
        if self.fold_system:
            messages = fold_system(messages)
        kwargs = {"tools": tools} if tools else {}
        try:
            return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt, **kwargs)
        except Exception as err:  # jinja's TemplateError, or a template reading a field the turn lacks
            if not self.fold_system and messages and messages[0]["role"] == "system" and "system" in str(err).lower():
                self.fold_system = True  # Gemma-2-style templates raise on a system turn
                return self._template(messages, tools, generation_prompt)
            raise ConfigError(f"the tokenizer's chat template cannot render this conversation "
                              f"({type(err).__name__}: {err}); check its roles and fields") from err

    # ---- rendering -------------------------------------------------------------------------------
    def segments(self, messages: list[dict], tools: Optional[list] = None) -> list[tuple[str, bool]]:
        """The conversation's text cut into (text, learned) pieces; learned pieces are assistant turns."""
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        learned = turns if self.train_on == "all" else turns[-1:]
        if not self.templated:
            return self._plain_segments(messages, set(learned))
        whole = self._template(messages, tools)
        pieces, at = [], 0
        for i in learned:
            before = self._template(messages[:i], tools, generation_prompt=True)
            through = self._template(messages[:i + 1], tools)
            if not (whole.startswith(before) and whole.startswith(through) and len(before) >= at):
                raise ConfigError(
                    "the chat template renders an earlier assistant turn differently once later turns follow, so its "
                    "text cannot be marked for training; set train_on: last (train on the final assistant turn only)")
            turn = whole[len(before):len(through)]
            end = turn.rfind(self.end_text) + len(self.end_text) if self.end_text and self.end_text in turn else len(turn)
            pieces += [(whole[at:len(before)], False), (turn[:end], True)]  # what follows the end of turn
            at = len(before) + end  # (ChatML's newline) is never generated, so never learned

        pieces.append((whole[at:], False))
        return [p for p in pieces if p[0]]

    def _plain_segments(self, messages: list[dict], learned: set[int]) -> list[tuple[str, bool]]:
        pieces: list[tuple[str, bool]] = []
        eos = self.tok.eos_token or ""
        for i, m in enumerate(messages):
            if m["role"] == "system":
                pieces.append((m["content"] + "\n\n", False))
            elif m["role"] == "assistant":
                pieces.append((m["content"] + eos, i in learned))
            else:
                pieces.append((m["content"] + "\n", False))
        return pieces

    def encode(self, messages: list[dict], tools: Optional[list] = None,
               max_turn_tokens: Optional[int] = None) -> tuple[list[int], list[int], bool]:
        """Token ids of the conversation, labels (-100 outside the learned assistant turns), and whether a
        learned turn was cut to ``max_turn_tokens`` (its end, end of turn included, is dropped)."""
        ids, labels, cut = list(self.lead), [-100] * len(self.lead), False
        for text, learned in self.segments(messages, tools):
            piece = self.tok(text, add_special_tokens=False)["input_ids"]
            if learned and max_turn_tokens is not None and len(piece) > max_turn_tokens:
                piece, cut = piece[:max_turn_tokens], True
            ids += piece
            labels += piece if learned else [-100] * len(piece)
        ids, labels = self._dedupe_lead(ids, labels)
        return ids, labels, cut

    def prompt(self, messages: list[dict], tools: Optional[list] = None) -> list[int]:
        """Token ids that ask for the next assistant turn after ``messages`` (for generation)."""
        if self.templated:
            text = self._template(messages, tools, generation_prompt=True)
        else:
            text = "".join(t for t, _ in self._plain_segments(messages, set()))
        ids = list(self.lead) + self.tok(text, add_special_tokens=False)["input_ids"]
        return self._dedupe_lead(ids, None)[0]

    def _dedupe_lead(self, ids: list[int], labels: Optional[list[int]]) -> tuple[list[int], list[int]]:
        """Drop the tokenizer's leading tokens where the template wrote them itself (never BOS twice)."""
        n = len(self.lead)
        if n and ids[n:2 * n] == self.lead:
            ids = ids[n:]
            labels = labels[n:] if labels is not None else labels
        return ids, labels


def fold_system(messages: list[dict]) -> list[dict]:
    """A leading system turn moved into the first user turn (for templates without a system role)."""
    if not messages or messages[0]["role"] != "system":
        return messages
    system, rest = messages[0]["content"], [dict(m) for m in messages[1:]]
    for m in rest:
        if m["role"] == "user":
            m["content"] = f"{system}\n\n{m['content']}"
            return rest
    return rest
