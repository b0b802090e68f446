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

import torch

from engine.stats import EngineStats


class BackendError(Exception):
    """A completion request failed (engine error, HTTP error, dropped connection)."""


class BackendOverloadedError(BackendError):
    """The backend is at capacity (HTTP 429 upstream): try again later."""


class BackendUnavailableError(BackendError):
    """The backend cannot answer: unreachable, timed out, stalled, or failed upstream
    (HTTP 5xx). ``status`` is what a gateway answers for it: 503 when it could not be
    reached or stalled, 502 when it answered with an error."""

    def __init__(self, message: str, status: int = 503) -> None:
        super().__init__(message)
        self.status = status


class BackendRequestError(BackendError):
    """The backend rejected the request itself (HTTP 4xx, invalid engine input).

    ``param`` names the offending field and ``code`` is the OpenAI error code
    (``context_length_exceeded``...), where the backend says.
    """

    def __init__(
        self,
        message: str,
        param: str | None = None,
        code: str | None = None,
        upstream: bool = False,
    ) -> None:
        super().__init__(message)
        self.param = param
        self.code = code
        # a remote server refused it: past the planner's own checks, so unless the
        # prompt was too long for it, the request the planner built was at fault
        self.upstream = upstream

    @property
    def callers_fault(self) -> bool:
        """The request's own input was at fault (a 400 for whoever sent it), rather
        than what the planner made of it (a 500: our bug)."""
        return not self.upstream or self.code == "context_length_exceeded"


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
    # tokens that always follow a token sequence (the engine's SamplingParams
    # .jump_forward): a speed hint the local engine applies and HTTP peers, which have
    # no such field, go without
    jump_forward: dict[tuple[int, ...], tuple[int, ...]] = field(default_factory=dict)


@dataclass
class CompletionChunk:
    """New output of one request. ``token_ids`` is None when the backend cannot say."""

    text: str
    token_ids: list[int] | None
    finish_reason: str | None = None
    prompt_tokens: int | None = None  # on the last chunk, when known
    cached_tokens: int | None = None  # prompt tokens served by the prefix cache, when known


@dataclass(frozen=True)
class EngineLoad:
    """An engine's load: requests running and waiting, the share of KV slots free, and
    the recent time of one step. None where the backend cannot say."""

    running: int
    waiting: int = 0
    kv_free: float | None = None
    step_s: float | None = None

    @property
    def requests(self) -> int:
        return self.running + self.waiting


class Backend(ABC):
    """Streams completions; cancelling the iteration must abort the request.

    ``in_flight`` counts this backend's completions now streaming (where the backend
    keeps it: HTTP ones do), the load figure of backends that report none of their own.
    """

    in_flight: int = 0

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

    def for_answer(self, prompt: list[int]) -> Backend:
        """The backend every request of one answer goes to, ``prompt`` being its chat
        prompt: a set of replicas picks one here (so the answer's requests share one
        prefix cache); a single engine is itself."""
        return self

    def members(self) -> list[Backend]:
        """The engines behind this backend, each with its own prefix cache (to warm
        each of them); a single engine is itself."""
        return [self]

    @abstractmethod
    def complete(
        self, prompt: str | list[int], params: CompletionParams
    ) -> AsyncIterator[CompletionChunk]:
        """Yield chunks until one has ``finish_reason``; raise :class:`BackendError`."""

    @property
    def gives_hidden_states(self) -> bool:
        """Whether :meth:`hidden_state` can answer (the trained router needs it)."""
        return False

    async def hidden_state(self, prompt: list[int]) -> torch.Tensor | None:
        """The model's final hidden state at ``prompt``'s last token ([hidden_size],
        float32), computed as a prefill whose K/V stay in the prefix cache; None where
        the backend cannot say (HTTP engines expose no hidden states)."""
        return None

    async def load(self) -> EngineLoad:
        """How busy the engine is now, for load-aware routing. The default counts only
        this backend's own requests in flight (all an HTTP engine lets us see)."""
        return EngineLoad(running=self.in_flight)

    async def stats(self) -> EngineStats | None:
        """Engine counters (prefix-cache hits, running requests...) where available: the
        in-process engine's snapshot; None where the backend cannot say (HTTP)."""
        return None

    async def close(self) -> None:  # noqa: B027 - optional hook, most backends need none
        """Release connections; the default has none."""
