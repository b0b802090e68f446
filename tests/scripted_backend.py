"""A scripted backend for planner and executor tests.

Real engines cannot be made to fail mid-stream, stall one request, or answer with
a chosen skeleton on cue, so these tests script the backend: each request's reply
is decided from its decoded prompt. Everything else (tokenizer, chat template,
planner, parser, executor, merge) is real.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from sotserve.backends.base import Backend, CompletionChunk, CompletionParams

# What a script returns for a request: text pieces to stream, or an exception to
# raise once those pieces are out.
Reply = list[str] | tuple[list[str], BaseException]


@dataclass
class Call:
    kind: str  # "skeleton", "point", "router" or "chat"
    point: int | None
    prompt: str
    params: CompletionParams
    started: float
    ended: float | None = None
    closed_early: bool = False
    prompt_ids: list[int] | None = None  # the prompt as sent, when it was token ids


@dataclass
class ScriptedBackend(Backend):
    """Replies come from ``script(call) -> Reply``; ``delay`` seconds between pieces."""

    tok: Any
    script: Callable[[Call], Reply]
    delay: float | Callable[[Call], float] = 0.0
    calls: list[Call] = field(default_factory=list)

    @property
    def tokenizer(self) -> Any:
        return self.tok

    @property
    def model_name(self) -> str:
        return "scripted"

    @property
    def max_model_len(self) -> int:
        return 8192

    def classify(self, prompt: str) -> tuple[str, int | None]:
        # the last point turn: "Point N: title" (sot) or "Now explain point N" (graph)
        turns = list(re.finditer(r"\nPoint (\d+): |Now explain point (\d+)", prompt))
        m = turns[-1] if turns else None
        if m and m.start() > prompt.rfind("skeleton of an answer"):
            return "point", int(m.group(1) or m.group(2))
        if prompt.rstrip().endswith("1.") and "skeleton of an answer" in prompt:
            return "skeleton", None
        if "Reply with one letter" in prompt:
            return "router", None
        return "chat", None

    async def complete(
        self, prompt: str | list[int], params: CompletionParams
    ) -> AsyncIterator[CompletionChunk]:
        text = prompt if isinstance(prompt, str) else self.tok.decode(prompt)
        kind, point = self.classify(text)
        loop = asyncio.get_running_loop()
        ids = None if isinstance(prompt, str) else list(prompt)
        call = Call(kind, point, text, params, loop.time(), prompt_ids=ids)
        self.calls.append(call)
        reply = self.script(call)
        pieces, error = reply if isinstance(reply, tuple) else (reply, None)
        delay = self.delay(call) if callable(self.delay) else self.delay
        n = 0
        try:
            for piece in pieces:
                if n >= params.max_tokens:
                    break
                await asyncio.sleep(delay)
                n += 1
                yield CompletionChunk(piece, self.tok.encode(piece, add_special_tokens=False))
            if error is not None:
                raise error
            reason = "length" if n >= params.max_tokens else "stop"
            yield CompletionChunk("", [], reason, len(prompt), 0)
        except GeneratorExit:
            call.closed_early = True
            raise
        except asyncio.CancelledError:
            call.closed_early = True
            raise
        finally:
            call.ended = loop.time()


def point_prompt_parents(prompt: str) -> str:
    """The 'Points written so far' block of a graph point prompt ('' if none)."""
    m = re.search(r"Points written so far:\n(.*?)\n\nNow explain point", prompt, re.S)
    return m.group(1) if m else ""
