"""Prompt templates (text files beside this module) and their chat renderer.

A template file is a list of chat messages, each introduced by a ``### <role>`` line;
lines starting with ``#`` before the first section are comments. ``$name``
placeholders are filled by :meth:`PromptTemplate.messages` (``string.Template``, so
braces in prompt text need no escaping). A final ``assistant`` message is the start
of the reply (a prefill) rather than a finished turn.

The chat renderer, :class:`ChatRenderer`, is the engine's
(:mod:`engine.chat_template`), re-exported here beside the templates it renders.
"""

from __future__ import annotations

import functools
import re
import string
from dataclasses import dataclass
from pathlib import Path

from engine.chat_template import ChatRenderer, Message, split_prefill

PROMPT_DIR = Path(__file__).resolve().parent
_SECTION = re.compile(r"^### (system|user|assistant)\s*$")
__all__ = ["ChatRenderer", "Message", "PromptTemplate", "load", "split_prefill"]


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
