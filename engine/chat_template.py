"""The one chat renderer: messages to token ids through a Hugging Face tokenizer's
chat template, with message text kept as text.

A chat template writes control tokens (``<|im_start|>``, ``<|im_end|>``...) around
each message. Tokenizing the rendered string as a whole would also read control
tokens typed *inside* a message, so a user could forge a system turn by writing
``<|im_end|><|im_start|>system``. OpenAI's API treats such text as text, and so do
we: the template is rendered with an unguessable marker in place of each content,
the template's own text is tokenized with its control tokens, and each content
(and a prefill) with special-token text split into ordinary tokens.

Continuations (the ids that close an assistant turn and open the next ones, to
append after a reply's exact token ids) are how a point prompt extends the skeleton
request token for token, so the radix cache shares it.
"""

from __future__ import annotations

import copy
import functools
import secrets
from collections import OrderedDict
from typing import Any

Message = dict[str, str]

_CACHE_ENTRIES = 16
_CACHE_MAX_CHARS = 2**20  # a prompt this long is past any context it could be checked for


def split_prefill(messages: list[Message]) -> tuple[list[Message], str]:
    """Separate a trailing assistant message (the start of the reply) from the turns."""
    if messages and messages[-1]["role"] == "assistant":
        return messages[:-1], messages[-1]["content"]
    return messages, ""


class ChatRenderer:
    """Renders chat messages to token ids with a tokenizer's chat template. A final
    assistant message is a prefill: the start of the reply, not a finished turn."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        # Recent whole-prompt renders: a server tokenizes a long chat in a worker
        # thread to check its length, and the planner then finds it here instead of
        # tokenizing it again on the event loop. Bounded in entries and in text.
        self._recent: OrderedDict[tuple[Any, ...], list[int]] = OrderedDict()

    # -- tokenizing ----------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Tokenize trusted template text: control-token strings become control tokens."""
        backends = _backends(self.tokenizer)
        if backends is None:
            return list(self.tokenizer.encode(text, add_special_tokens=False))
        return _encode(backends[0], text)

    def encode_plain(self, text: str) -> list[int]:
        """Tokenize untrusted text: control-token strings stay ordinary text. Safe to
        call from several threads beside :meth:`encode` (see :func:`_backends`)."""
        if not text:
            return []
        backends = _backends(self.tokenizer)
        if backends is None:
            out = self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)
            return list(out["input_ids"])
        return _encode(backends[1], text)

    # -- whole prompts -------------------------------------------------------------------
    def render_text(self, messages: list[Message]) -> str:
        """The prompt as text: turns through the chat template, then any prefill.
        Only for servers that take text prompts; their tokenizer reads control-token
        text in it, so prefer :meth:`render`."""
        turns, prefill = split_prefill(messages)
        return self._template(turns, generation_prompt=True) + prefill

    def render(self, messages: list[Message]) -> list[int]:
        """Token ids of the turns through the chat template, then any prefill; message
        text is tokenized as plain text (:meth:`encode_plain`)."""
        turns, prefill = split_prefill(messages)
        return self._cached(turns, prefill)

    def render_turns(self, turns: list[Message]) -> list[int]:
        """As :meth:`render`, with every message a finished turn (no prefill)."""
        return self._cached(turns, "")

    def _cached(self, turns: list[Message], prefill: str) -> list[int]:
        key = (prefill, *((m["role"], m["content"]) for m in turns))
        size = len(prefill) + sum(len(m["content"]) for m in turns)
        hit = self._recent.get(key)
        if hit is None:
            hit = self._render(turns, [], prefill)
            if size <= _CACHE_MAX_CHARS:
                self._recent[key] = hit
                while len(self._recent) > _CACHE_ENTRIES:
                    self._recent.popitem(last=False)
        return list(hit)  # a copy: callers extend their prompts

    def continuation_text(self, history: list[Message], more: list[Message]) -> str:
        """Text that follows an assistant reply to ``history``, ending it and adding
        ``more`` (as :meth:`render_text`, for text-prompt servers)."""
        turns, _ = split_prefill(history)
        more_turns, prefill = split_prefill(more)
        mark = _marker(secrets.token_hex(8))  # unguessable, so no message holds it
        full = self._template(
            [*turns, {"role": "assistant", "content": mark}, *more_turns], generation_prompt=True
        )
        _, found, tail = full.partition(mark)
        if not found:
            raise ValueError("the chat template dropped the assistant reply")
        return tail + prefill

    def continuation(self, history: list[Message], more: list[Message]) -> list[int]:
        """Token ids of :meth:`continuation_text`, message text kept plain."""
        turns, _ = split_prefill(history)
        more_turns, prefill = split_prefill(more)
        return self._render([*turns, {"role": "assistant", "content": ""}], more_turns, prefill,
                            after_reply=True)  # fmt: skip

    # -- internals -----------------------------------------------------------------------
    def _template(self, turns: list[Message], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            turns, add_generation_prompt=generation_prompt, tokenize=False
        )

    def _render(
        self,
        turns: list[Message],
        more: list[Message],
        prefill: str,
        after_reply: bool = False,
    ) -> list[int]:
        """Ids of ``turns + more`` (with the generation prompt) and ``prefill``; with
        ``after_reply`` only what follows the last message of ``turns`` (a reply)."""
        messages = [*turns, *more]
        nonce = secrets.token_hex(8)  # a user cannot type what they cannot guess
        marks = [_marker(f"{nonce}-{i}") for i in range(len(messages))]
        marked = [{**m, "content": mark} for m, mark in zip(messages, marks, strict=True)]
        text = self._template(marked, generation_prompt=True)
        contents = self._contents(messages, marks, text)
        heads = []  # the template's text before each message
        rest = text
        for i, mark in enumerate(marks):
            head, found, rest = rest.partition(mark)
            if not found:
                raise ValueError(f"the chat template dropped message {i}")
            heads.append(head)
        ids: list[int] = []
        # after a reply, what precedes the first message of ``more`` (or the generation
        # prompt, ``rest``) is what closes the reply's turn
        for i in range(len(turns) if after_reply else 0, len(messages)):
            ids += self.encode(heads[i])
            ids += self.encode_plain(contents[i])
        return ids + self.encode(rest) + self.encode_plain(prefill)

    def _contents(self, messages: list[Message], marks: list[str], marked: str) -> list[str]:
        """Each message's content as the template writes it: as given, or trimmed
        (templates such as Llama 3's ``| trim`` them)."""
        contents = [m["content"] for m in messages]
        stripped = [c.strip() for c in contents]
        if stripped == contents:
            return contents  # nothing to trim: no second render needed
        full = self._template(messages, generation_prompt=True)
        for candidate in (contents, stripped):
            rebuilt = marked
            for mark, content in zip(marks, candidate, strict=True):
                rebuilt = rebuilt.replace(mark, content, 1)
            if rebuilt == full:
                return candidate
        return contents


@functools.lru_cache(maxsize=8)
def _backends(tokenizer: Any) -> tuple[Any, Any] | None:
    """Two private copies of a fast tokenizer's Rust backend, one that reads
    control-token text as control tokens and one that splits it into plain text;
    None for a tokenizer without a Rust backend.

    transformers implements ``split_special_tokens`` by flipping a flag on the one
    backend it shares (``encode_special_tokens``), so tokenizing a user's text in a
    worker thread while the event loop tokenizes a template would race: template
    control tokens could come out split, or a user's typed ones parsed. Copies with
    the flag fixed cannot race, and calling them directly skips transformers'
    per-call conversions (a GIL-held list per output field)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "encode_special_tokens"):
        return None
    control, plain = copy.deepcopy(backend), copy.deepcopy(backend)
    control.encode_special_tokens = False
    plain.encode_special_tokens = True
    # no truncation or padding: whole prompts, whatever the tokenizer was set up with
    for b in (control, plain):
        b.no_truncation()
        b.no_padding()
    return control, plain


def _encode(backend: Any, text: str) -> list[int]:
    # encode_batch, not encode: only the batch call lets go of the GIL while it
    # works, so a long text tokenized in a worker thread leaves the event loop free
    return backend.encode_batch([text], add_special_tokens=False)[0].ids


def _marker(tag: str) -> str:
    # invisible separators around a tag: no template or tokenizer treats it specially
    return f"\u2063SOTSERVE-{tag}\u2063"


@functools.lru_cache(maxsize=8)
def _longest_token_chars(tokenizer: Any) -> int:
    # a vocabulary entry's spelling is at least as long as the text it covers
    # (byte-level BPE spells each byte as one character), so this bounds them all
    return max((len(t) for t in tokenizer.get_vocab()), default=1) or 1


def fewest_tokens(tokenizer: Any, text: str) -> int:
    """A lower bound on the tokens of ``text``, without tokenizing it: a cheap check
    that a prompt cannot fit a context before spending seconds on a huge one. Halved
    for safety: a normalizer that drops characters (accents, say) could make the
    text cover more characters than its tokens spell."""
    return len(text) // (2 * _longest_token_chars(tokenizer))
