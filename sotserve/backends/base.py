"""The one interface the planner needs from an inference engine.

A backend streams completions of a prompt (text or token ids). Both
implementations, in-process (:class:`LocalBackend`) and over HTTP
(:class:`HTTPBackend`), give the planner the model's tokenizer so it can render
chat templates and build point prompts that continue the skeleton's exact ids.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from engine.stats import EngineStats


class BackendError(Exception):
    """A completion request failed (engine error, HTTP error, dropped connection)."""


class BackendRequestError(BackendError):
    """The backend rejected the request itself (HTTP 4xx, invalid engine input).

    ``param`` names the offending field and ``code`` is the OpenAI error code
    (``context_length_exceeded``...), where the backend says.
    """

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


@dataclass
class CompletionParams:
    """Sampling for one completion request: the OpenAI ``/v1/completions`` fields and
    vLLM's ``min_tokens``, ``repetition_penalty`` and ``priority`` (lower is served
    first). Backends send fields at their defaults as nothing, so a peer that lacks
    one of them only sees it when it is used."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    min_tokens: int = 0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    priority: int = 0


@dataclass
class CompletionChunk:
    """New output of one request. ``token_ids`` is None when the backend cannot say."""

    text: str
    token_ids: list[int] | None
    finish_reason: str | None = None
    prompt_tokens: int | None = None  # on the last chunk, when known
    cached_tokens: int | None = None  # prompt tokens served by the prefix cache, when known


class Backend(ABC):
    """Streams completions; cancelling the iteration must abort the request."""

    @property
    @abstractmethod
    def tokenizer(self) -> Any:
        """The model's Hugging Face tokenizer (chat template, encode, decode)."""

    @property
    @abstractmethod
    def model_name(self) -> str: ...

    @property
    @abstractmethod
    def max_model_len(self) -> int | None:
        """Context length, if known, so the planner can reject long questions early."""

    def room(self, prompt_len: int, want: int) -> int:
        """``want`` output tokens, cut to what the context has left after the prompt.

        At least 1, so a prompt that fills the context is reported by the backend as
        too long rather than as a request for 0 tokens.
        """
        limit = self.max_model_len
        return want if limit is None else max(min(want, limit - prompt_len), 1)

    @abstractmethod
    def complete(
        self, prompt: str | list[int], params: CompletionParams
    ) -> AsyncIterator[CompletionChunk]:
        """Yield chunks until one has ``finish_reason``; raise :class:`BackendError`."""

    async def stats(self) -> EngineStats | None:
        """Engine counters (prefix-cache hits, running requests...) where available: the
        in-process engine's snapshot; None where the backend cannot say (HTTP)."""
        return None

    async def close(self) -> None:  # noqa: B027 - optional hook, most backends need none
        """Release connections; the default has none."""
