"""Admission of a chat answer's engine requests: the shared gate
(:class:`engine.serving.AdmissionGate`) counts engine requests, not answers, so a
skeleton answer that fans out to eight points costs what it uses.

:class:`AdmittedBackend` wraps the planner's backend: each completion it runs takes
room from the lease of the answer it works for (found in the task's context, set by
:meth:`AdmissionGate.admit`), and gives it back when it ends.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import torch

from engine.serving import CURRENT_LEASE
from engine.stats import EngineStats
from sotserve.backends.base import Backend, CompletionChunk, CompletionParams, EngineLoad


class AdmittedBackend(Backend):
    """``inner``, with each completion admitted through the current answer's lease.
    Outside any answer (the start-up warm-up) completions run unadmitted."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner

    @property
    def tokenizer(self) -> Any:
        return self.inner.tokenizer

    @property
    def model_name(self) -> str:
        return self.inner.model_name

    @property
    def max_model_len(self) -> int | None:
        return self.inner.max_model_len

    def for_answer(self, prompt: list[int]) -> Backend:
        chosen = self.inner.for_answer(prompt)
        return self if chosen is self.inner else AdmittedBackend(chosen)

    def members(self) -> list[Backend]:
        return self.inner.members()

    async def complete(
        self, prompt: str | list[int], params: CompletionParams
    ) -> AsyncIterator[CompletionChunk]:
        lease = CURRENT_LEASE.get()
        if lease is None:
            async for chunk in self.inner.complete(prompt, params):
                yield chunk
            return
        async with lease.acquire():
            async for chunk in self.inner.complete(prompt, params):
                yield chunk

    @property
    def gives_hidden_states(self) -> bool:
        return self.inner.gives_hidden_states

    async def hidden_state(self, prompt: list[int]) -> torch.Tensor | None:
        # the router's one-token prefill, admitted like any request of the answer
        lease = CURRENT_LEASE.get()
        if lease is None:
            return await self.inner.hidden_state(prompt)
        async with lease.acquire():
            return await self.inner.hidden_state(prompt)

    async def load(self) -> EngineLoad:
        return await self.inner.load()

    async def stats(self) -> EngineStats | None:
        return await self.inner.stats()

    async def close(self) -> None:
        await self.inner.close()
