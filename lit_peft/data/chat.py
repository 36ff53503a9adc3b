"""Conversations -> token ids and a loss mask, through the tokenizer's own chat template.

transformers renders a conversation (``apply_chat_template``) but says where the assistant's words
lie only for templates marked with ``{% generation %}``, which few models' templates are. So this
module finds them by rendering prefixes: for assistant turn ``i``, the conversation up to ``i``
with the generation prompt, and up to and including ``i``; the text between is what the model
must learn to write for that turn: its content (or tool calls) and the template's own end of turn
(``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``, ``<|end|>``), never a ``tokenizer.eos_token``
the template does not use; what the template writes after the end of turn (ChatML's newline,
Phi-3's closing EOS) is context. A template that rewrites an earlier turn once later turns follow
(one that drops past reasoning) cannot be marked for every turn: such a conversation is refused for
``train_on: all`` with a message saying to train on the last turn only. A template that refuses a
system turn, or places it where a prefix cannot see it (Mistral's, in the last user turn), gets the
system text folded into the first user turn.

The whole rendered text is tokenized at once and each token is labelled by the characters it
covers (a fast tokenizer's offsets), so the ids are the ones the model sees at inference, whatever
merges across a turn's boundary (SentencePiece's leading ``▁``, newlines in byte-level BPE); the
generation prompt of the last turn is the same ids cut where that turn's learned tokens start.
Slow tokenizers (no offsets) are tokenized a piece at a time. BOS: a template that writes it keeps
it; where the template does not and the tokenizer adds it by its own special-token logic
(``tokenizer("x")`` starts with BOS), it is added once. A template that writes no special token
after an assistant's words gets EOS there, or nothing would teach the model to stop.

Tokenizers without a template get the plain template: the system prompt and a blank line, then
each user turn followed by a newline, each assistant turn followed by EOS; the tokenizer adds its
own leading special tokens (BOS where it uses one).

Generation stops on ``stop_ids``: the template's end-of-turn token with EOS (the task adds the
model's ``generation_config.eos_token_id``, a list for Llama-3-Instruct).
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from lit_peft.errors import ConfigError

ROLES = ("system", "user", "assistant", "tool")
_PROBE = "lit-peft end-of-turn probe"


class ChatFormat:
    """Render conversations of one tokenizer; ``train_on`` is ``all`` assistant turns or the ``last``."""

    def __init__(self, tokenizer: Any, train_on: Literal["all", "last"] = "all") -> None:
        if train_on not in ("all", "last"):
            raise ConfigError(f"train_on must be 'all' or 'last', got {train_on!r}")
        self.tok, self.train_on = tokenizer, train_on
        self.templated = bool(getattr(tokenizer, "chat_template", None))
        self.lead = self._leading_special_ids()
        self.end_of_turn = self._end_of_turn() if self.templated else []
        self.end_text = tokenizer.decode(self.end_of_turn) if self.end_of_turn else ""
        # where the template marks no end of turn, EOS is written after each answer (as the plain template does)
        self.added_end = "" if self.end_of_turn else (tokenizer.eos_token or "")

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
        kwargs = {"tools": tools} if tools else {}
        try:
            return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt, **kwargs)
        except Exception as err:  # jinja's TemplateError, or a template reading a field the turn lacks
            if messages and messages[0]["role"] == "system":  # Gemma 2 and Mistral v0.1 refuse a system turn
                try:
                    return self._template(fold_system(messages), tools, generation_prompt)
                except ConfigError:
                    pass
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
            turn = through[len(before):] if through.startswith(before) else ""
            end = turn.rfind(self.end_text) + len(self.end_text) if self.end_text and self.end_text in turn else len(turn)
            turn = turn[:end]  # what follows the end of turn (ChatML's newline) is never generated, so never learned
            if not (turn and whole.startswith(before) and len(before) >= at and whole.startswith(turn, len(before))):
                if messages[0]["role"] == "system":  # Mistral writes the system text into the last user turn only
                    return self.segments(fold_system(messages), tools)
                fix = ("set train_on: last (train on the final assistant turn only)" if self.train_on == "all" else
                       "give the tokenizer a chat_template whose rendering of a conversation begins with its earlier turns'")
                raise ConfigError("the chat template renders an earlier assistant turn differently once later turns "
                                  f"follow, so its text cannot be marked for training; {fix}")
            pieces += [(whole[at:len(before)], False), (turn + self.added_end, True)]
            at = len(before) + len(turn)
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

    def _tokens(self, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
        """Token ids of the pieces' text and, per token, the index of the learned piece it belongs to
        (-1: context). A fast tokenizer tokenizes the whole text and a token belongs to a learned piece
        when it covers any of its characters; a slow one tokenizes piece by piece."""
        if not getattr(self.tok, "is_fast", False):
            ids, owner, n = [], [], 0
            for text, learned in pieces:
                piece = self.tok(text, add_special_tokens=False)["input_ids"]
                ids += piece
                owner += [n if learned else -1] * len(piece)
                n += learned
            return ids, owner
        learned_spans, at = [], 0
        for text, learned in pieces:
            if learned:
                learned_spans.append((at, at + len(text)))
            at += len(text)
        encoded = self.tok("".join(t for t, _ in pieces), add_special_tokens=False, return_offsets_mapping=True)
        owner, span = [], 0
        for start, end in encoded["offset_mapping"]:
            while span < len(learned_spans) and learned_spans[span][1] <= start:
                span += 1
            inside = span < len(learned_spans) and start < learned_spans[span][1] and max(end, start + 1) > learned_spans[span][0]
            owner.append(span if inside else -1)
        return encoded["input_ids"], owner

    def encode(self, messages: list[dict], tools: Optional[list] = None,
               max_turn_tokens: Optional[int] = None) -> tuple[list[int], list[int], int, bool]:
        """Token ids of the conversation, labels (-100 outside the learned assistant turns), how many ids
        come before the last learned turn (its generation prompt), and whether a learned turn was cut to
        ``max_turn_tokens`` (its end is dropped, except its end-of-turn token, kept as context)."""
        ids, owner = self._tokens(self.segments(messages, tools))
        counts: dict[int, int] = {}
        last_of = {span: k for k, span in enumerate(owner) if span >= 0}  # each learned turn's final token
        out_ids, labels, cut, prompt_len = list(self.lead), [-100] * len(self.lead), False, None
        last_span = max(owner) if any(o >= 0 for o in owner) else -1
        for k, (token, span) in enumerate(zip(ids, owner)):
            if span >= 0:
                counts[span] = counts.get(span, 0) + 1
                if span == last_span and prompt_len is None:
                    prompt_len = len(out_ids)
                if max_turn_tokens is not None and counts[span] > max_turn_tokens:
                    cut = True
                    if k == last_of[span] and token in self.end_of_turn:
                        out_ids.append(token)  # the turn still ends where the template ends it
                        labels.append(-100)
                    continue
            out_ids.append(token)
            labels.append(token if span >= 0 else -100)
        if prompt_len is None:
            prompt_len = len(out_ids)
        n = self._doubled_lead(out_ids)
        return out_ids[n:], labels[n:], prompt_len - n, cut

    def prompt(self, messages: list[dict], tools: Optional[list] = None) -> list[int]:
        """Token ids that ask for the next assistant turn after ``messages`` (for generation)."""
        if self.templated:
            text = self._template(messages, tools, generation_prompt=True)
        else:
            text = "".join(t for t, _ in self._plain_segments(messages, set()))
        ids = list(self.lead) + self.tok(text, add_special_tokens=False)["input_ids"]
        return ids[self._doubled_lead(ids):]

    def _doubled_lead(self, ids: list[int]) -> int:
        """How many of ``ids``' first tokens to drop: the tokenizer's leading tokens where the template wrote
        them itself right after (never BOS twice)."""
        n = len(self.lead)
        return n if n and ids[n:2 * n] == self.lead else 0


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
