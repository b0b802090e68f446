"""In-process backend: :class:`engine.AsyncEngine` in this process."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import torch
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from engine import (
    AsyncEngine,
    ContextLengthExceededError,
    EngineError,
    InvalidRequestError,
    SamplingParams,
)
from engine.stats import EngineStats
from sotserve.backends.base import (
    Backend,
    BackendError,
    BackendRequestError,
    CompletionChunk,
    CompletionParams,
    EngineLoad,
)

# steps a step-time figure is averaged over, at the least
_STEP_WINDOW = 4


class LocalBackend(Backend):
    """Wraps an :class:`AsyncEngine`; ``LocalBackend()`` loads the embedded model."""

    def __init__(self, engine: AsyncEngine | None = None, **engine_args: Any) -> None:
        self.engine = engine if engine is not None else AsyncEngine(**engine_args)
        self._owns_engine = engine is None
        self._mark: tuple[float, int] | None = None  # (time, steps) of the step-time window
        self._step_s: float | None = None

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.engine.tokenizer

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    async def complete(
        self, prompt: str | list[int], params: CompletionParams
    ) -> AsyncIterator[CompletionChunk]:
        try:
            sampling = SamplingParams(
                max_tokens=params.max_tokens,
                temperature=params.temperature,
                top_p=params.top_p,
                seed=params.seed,
                stop=list(params.stop),
                min_tokens=params.min_tokens,
                repetition_penalty=params.repetition_penalty,
                frequency_penalty=params.frequency_penalty,
                presence_penalty=params.presence_penalty,
                logit_bias=dict(params.logit_bias),
                jump_forward=dict(params.jump_forward),
            )
            prompt_len = None if isinstance(prompt, str) else len(prompt)
            # Leaving this loop early (cancel, break) closes engine.generate,
            # which aborts the request and frees its KV slots.
            deltas = self.engine.generate(prompt, sampling, priority=params.priority)
            async for delta in deltas:
                yield CompletionChunk(
                    delta.text,
                    delta.token_ids,
                    delta.finish_reason,
                    prompt_len if delta.finished else None,
                    delta.cached_tokens,
                )
        except InvalidRequestError as exc:
            too_long = isinstance(exc, ContextLengthExceededError)
            code = "context_length_exceeded" if too_long else None
            raise BackendRequestError(str(exc), exc.param, code) from exc
        except EngineError as exc:
            raise BackendError(str(exc)) from exc

    @property
    def gives_hidden_states(self) -> bool:
        return True

    async def hidden_state(self, prompt: list[int]) -> torch.Tensor:
        try:
            return await self.engine.embed(prompt)
        except InvalidRequestError as exc:
            raise BackendRequestError(str(exc), exc.param) from exc
        except EngineError as exc:
            raise BackendError(str(exc)) from exc

    async def load(self) -> EngineLoad:
        """Running and waiting requests, the free share of KV slots, and the mean step
        time since the last call (over at least a few steps)."""
        s = self.engine.stats()
        now = time.perf_counter()
        step_s = self._step_s
        if self._mark is not None:
            t0, steps0 = self._mark
            if s.steps - steps0 >= _STEP_WINDOW:
                step_s = (now - t0) / (s.steps - steps0)
                self._mark = (now, s.steps)
        else:
            self._mark = (now, s.steps)
        if s.running == 0 and s.waiting == 0:
            step_s = None  # an idle engine has no step time to speak of
        self._step_s = step_s
        free = 1.0 - s.kv_slots_used / s.kv_slots_total if s.kv_slots_total else None
        return EngineLoad(s.running, s.waiting, free, step_s)

    async def stats(self) -> EngineStats:
        return self.engine.stats()

    async def close(self) -> None:
        if self._owns_engine:
            self.engine.close()
