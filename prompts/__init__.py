"""Prompt templates (text files beside this module) and their chat renderer.

A template file is a list of chat messages, each introduced by a ``### <role>`` line;
lines starting with ``#`` before the first section are comments. ``$name``
placeholders are filled by :meth:`PromptTemplate.messages` (``string.Template``, so
braces in prompt text need no escaping). A final ``assistant`` message is the start
of the reply (a prefill) rather than a finished turn.

:class:`ChatRenderer` turns messages into token ids through the model's own chat
template, and renders *continuations*: the ids that close an assistant turn and
open the next ones, to append after a reply's exact token ids. That is how a point
prompt extends the skeleton request token for token, so the radix cache shares it.
"""

from __future__ import annotations

import functools
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROMPT_DIR = Path(__file__).resolve().parent
_SECTION = re.compile(r"^### (system|user|assistant)\s*$")
# Stands in for the assistant's reply while rendering a continuation; no chat
# template or tokenizer treats it specially.
_MARK = "\u2063SOTSERVE-REPLY\u2063"

Message = dict[str, str]


@dataclass(frozen=True)
class PromptTemplate:
    """A parsed template: ``(role, text)`` sections with ``$placeholders``."""

    name: str
    sections: tuple[tuple[str, str], ...]

    def messages(self, **values: object) -> list[Message]:
        """The chat messages with placeholders filled; raises ``KeyError`` if one is missing."""
        out = []
        for role, text in self.sections:
            filled = string.Template(text).substitute({k: str(v) for k, v in values.items()})
            out.append({"role": role, "content": filled})
        return out


@functools.cache
def load(name: str) -> PromptTemplate:
    """Read ``prompts/<name>.txt``."""
    path = PROMPT_DIR / f"{name}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"no prompt template {name!r} in {PROMPT_DIR}")
    sections: list[tuple[str, list[str]]] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        m = _SECTION.match(line)
        if m:
            sections.append((m.group(1), []))
        elif sections:
            sections[-1][1].append(line)
        elif line.strip() and not line.startswith("#"):
            raise ValueError(f"{path}: text before the first '### <role>' section")
    if not sections:
        raise ValueError(f"{path}: no '### <role>' sections")
    return PromptTemplate(name, tuple((role, "\n".join(lines).strip()) for role, lines in sections))


def split_prefill(messages: list[Message]) -> tuple[list[Message], str]:
    """Separate a trailing assistant message (the start of the reply) from the turns."""
    if messages and messages[-1]["role"] == "assistant":
        return messages[:-1], messages[-1]["content"]
    return messages, ""


class ChatRenderer:
    """Renders chat messages to token ids with a Hugging Face tokenizer's chat template."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def encode(self, text: str) -> list[int]:
        """Tokenize text that may contain the template's special tokens."""
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def render_text(self, messages: list[Message]) -> str:
        """The prompt text: turns through the chat template, then any prefill."""
        turns, prefill = split_prefill(messages)
        text = self.tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
        return text + prefill

    def render(self, messages: list[Message]) -> list[int]:
        """Token ids of :meth:`render_text`."""
        return self.encode(self.render_text(messages))

    def continuation_text(self, history: list[Message], more: list[Message]) -> str:
        """Text that follows an assistant reply to ``history``, ending it and adding ``more``.

        The template renders ``history + [assistant reply] + more`` with a marker as
        the reply; what comes after the marker is the continuation.
        """
        turns, _ = split_prefill(history)
        more_turns, prefill = split_prefill(more)
        full = self.tokenizer.apply_chat_template(
            [*turns, {"role": "assistant", "content": _MARK}, *more_turns],
            add_generation_prompt=True,
            tokenize=False,
        )
        _, found, tail = full.partition(_MARK)
        if not found:
            raise ValueError("the chat template dropped the assistant reply")
        return tail + prefill

    def continuation(self, history: list[Message], more: list[Message]) -> list[int]:
        """Token ids of :meth:`continuation_text`."""
        return self.encode(self.continuation_text(history, more))
