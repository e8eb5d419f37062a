"""Instruction data (``data.format=chat``): records to token ids with a loss mask.

A record is one example, in one of two shapes (the field names are config keys):

* ``prompt`` / ``completion`` (``data.prompt_key``, ``data.completion_key``): strings
  are joined as they are (``prompt + completion``, no separator: put the whitespace you
  want in the data); lists of messages (``[{"role", "content"}, ...]``) are a
  conversation, rendered like ``messages`` below with the completion's messages as the
  answer.
* ``messages`` (``data.messages_key``): a list of ``{"role": ..., "content": ...}``; the
  loss covers every ``assistant`` turn.

Conversations are rendered with the tokenizer's chat template where it has one (a Hugging
Face ``tokenizer_config.json``'s ``chat_template``, or a ``chat_template.jinja`` beside
it), through Jinja2 in a sandbox with the names such templates expect (``messages``,
``add_generation_prompt``, ``bos_token``, ``eos_token``, ``raise_exception``, ``tojson``,
``strftime_now``). Without a template a plain one is used: ``"{role}: {content}\\n"`` per
message, and ``"assistant: "`` before each answer.

Which tokens are completion: the text of turn ``i`` is what rendering ``messages[:i+1]``
adds to rendering ``messages[:i]`` with the generation prompt, so the generation prompt
(``<|im_start|>assistant\\n``) is prompt and the answer with its end-of-turn marker is
completion. Templates that render earlier turns differently once later ones exist (some
drop earlier reasoning) break that prefix property; then only the last assistant turn is
completion. The whole text is tokenized once, without the tokenizer's own special
tokens (the template writes them), and a token is completion when it starts inside a
completion span (character offsets from the tokenizer; tokenizers without offsets encode
the spans one by one). An EOS is appended, as completion, unless the text already ends
with one. The result is ``{'ids': int32 [n], 'mask': float32 [n]}`` (1 on completion
tokens): the packer keeps examples whole and the batch's target weights are this mask.
"""

from __future__ import annotations

import datetime
import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from routezoo.training.data.tokenizers import Tokenizer

FORMATS = ("text", "chat")


def _as_text(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        value = value.item() if value.ndim == 0 else value.tolist()
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value


class _TemplateError(ValueError):
    pass


@functools.lru_cache(maxsize=8)
def _compiled(template: str):
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise _TemplateError(f"the chat template refused the conversation: {message}")

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(template)


def _plain_render(messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool) -> str:
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
    return text + ("assistant: " if add_generation_prompt else "")


class ChatEncoder:
    """record -> ``{'ids', 'mask'}`` (module docstring; a picklable grain map).

    Args:
      tokenizer: the run's tokenizer; its ``chat_template`` (if any) renders conversations.
      prompt_key, completion_key, messages_key: the record fields.
    """

    whole_examples = True   # the packer never cuts an example across rows

    def __init__(self, tokenizer: Tokenizer, *, prompt_key: str = "prompt", completion_key: str = "completion",
                 messages_key: str = "messages") -> None:
        self.tokenizer = tokenizer
        self.prompt_key, self.completion_key, self.messages_key = prompt_key, completion_key, messages_key
        self.template = getattr(tokenizer, "chat_template", None) or None

    # ------------------------------------------------------------------ rendering
    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False) -> str:
        """The conversation as text (the tokenizer's chat template, else the plain one)."""
        if self.template is None:
            return _plain_render(messages, add_generation_prompt)
        specials = getattr(self.tokenizer, "special_tokens", {}) or {}
        return _compiled(self.template).render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                               **specials)

    def _spans(self, messages: list[dict[str, Any]]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character spans of its assistant turns."""
        full = self.render(messages)
        spans, ok = [], True
        for i, m in enumerate(messages):
            if m.get("role") != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True)
            upto = self.render(messages[: i + 1])
            if not (upto.startswith(before) and full.startswith(upto)):
                ok = False
                break
            spans.append((len(before), len(upto)))
        if not ok:   # not renderable turn by turn: the last assistant turn only
            last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
            before = self.render(messages[:last], add_generation_prompt=True) if last is not None else ""
            if last is None or not full.startswith(before):
                raise ValueError("the chat template does not render the conversation's prompt as a prefix of "
                                 "the whole conversation, so the completion tokens cannot be found")
            spans = [(len(before), len(full))]
        return full, spans

    def _messages(self, value: Any, where: str) -> list[dict[str, Any]]:
        value = _as_text(value)
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                raise ValueError(f"{where} is neither a list of messages nor JSON text holding one") from None
        if not isinstance(value, list) or not all(isinstance(m, Mapping) and "role" in m and "content" in m
                                                  for m in value):
            raise ValueError(f"{where} must be a list of {{'role', 'content'}} messages")
        return [{**m, "role": _as_text(m["role"]), "content": _as_text(m["content"])} for m in value]

    def text_and_spans(self, record: Mapping[str, Any]) -> tuple[str, list[tuple[int, int]]]:
        """The example's text and the character spans the loss covers."""
        if not isinstance(record, Mapping):
            raise ValueError(f"data.format=chat needs records with fields; got a {type(record).__name__}")
        if self.messages_key in record:
            messages = self._messages(record[self.messages_key], f"field {self.messages_key!r}")
            if not any(m["role"] == "assistant" for m in messages):
                raise ValueError(f"field {self.messages_key!r} has no assistant message: nothing to train on")
            return self._spans(messages)
        if self.prompt_key in record and self.completion_key in record:
            prompt, completion = _as_text(record[self.prompt_key]), _as_text(record[self.completion_key])
            if isinstance(prompt, str) and isinstance(completion, str):
                return prompt + completion, [(len(prompt), len(prompt) + len(completion))]
            prompt_messages = self._messages(prompt, f"field {self.prompt_key!r}")
            messages = prompt_messages + self._messages(completion, f"field {self.completion_key!r}")
            full, spans = self._spans(messages)
            start = len(self.render(prompt_messages, add_generation_prompt=True))
            spans = [(max(a, start), b) for a, b in spans if b > start]
            if not spans:
                raise ValueError(f"field {self.completion_key!r} has no assistant message: nothing to train on")
            return full, spans
        raise ValueError(f"a chat record needs {self.messages_key!r}, or {self.prompt_key!r} and "
                         f"{self.completion_key!r}; it has {sorted(record)}")

    # ------------------------------------------------------------------ tokens
    def __call__(self, record: Mapping[str, Any]) -> dict[str, np.ndarray]:
        text, spans = self.text_and_spans(record)
        tok = self.tokenizer
        with_offsets = getattr(tok, "encode_with_offsets", None)
        if with_offsets is not None:
            ids, starts = with_offsets(text)
            mask = np.zeros(len(ids), np.float32)
            for a, b in spans:
                mask[(starts >= a) & (starts < b)] = 1.0
        else:   # encode the prompt and completion pieces one by one
            cuts = sorted({0, len(text), *(x for span in spans for x in span)})
            parts = [(text[a:b], any(sa <= a and b <= sb for sa, sb in spans)) for a, b in zip(cuts, cuts[1:])]
            encoded = [(tok.encode(piece), done) for piece, done in parts if piece]
            ids = np.concatenate([e for e, _ in encoded] or [np.zeros(0, np.int32)]).astype(np.int32)
            mask = np.concatenate([np.full(len(e), float(done), np.float32) for e, done in encoded]
                                  or [np.zeros(0, np.float32)])
        if not len(ids) or ids[-1] != tok.eos_id:
            ids = np.append(ids, np.int32(tok.eos_id))
            mask = np.append(mask, np.float32(1.0))
        return {"ids": ids.astype(np.int32), "mask": mask.astype(np.float32)}
