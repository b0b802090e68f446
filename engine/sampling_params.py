"""Per-request sampling parameters (the vLLM / OpenAI set)."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.errors import InvalidRequestError

# Above this no sane request asks for more tokens; caught before the context check
# so the message says what is wrong.
MAX_TOKENS_LIMIT = 1 << 20
_MAX_STOP_STRINGS = 16


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop.

    ``temperature == 0`` is greedy. ``top_k <= 0`` and ``top_p == 1`` disable those
    filters. ``seed`` makes a request's samples reproducible regardless of what else
    shares its batch. Generation stops at ``max_tokens``, at any of ``stop`` (the
    stop string is cut from the text), at any ``stop_token_ids``, or at EOS unless
    ``ignore_eos``.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> None:
        """Reject values outside their domain; raises :class:`InvalidRequestError`."""
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int):
            raise InvalidRequestError("max_tokens must be an integer", "max_tokens")
        if self.max_tokens < 1:
            raise InvalidRequestError(
                f"max_tokens must be at least 1, got {self.max_tokens}", "max_tokens"
            )
        if self.max_tokens > MAX_TOKENS_LIMIT:
            raise InvalidRequestError(
                f"max_tokens={self.max_tokens} is absurd (limit {MAX_TOKENS_LIMIT})", "max_tokens"
            )
        if not isinstance(self.temperature, int | float) or not 0.0 <= self.temperature <= 100.0:
            raise InvalidRequestError(
                f"temperature must be in [0, 100], got {self.temperature}", "temperature"
            )
        if not isinstance(self.top_p, int | float) or not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int):
            raise InvalidRequestError("top_k must be an integer", "top_k")
        if self.top_k < -1:
            raise InvalidRequestError(
                f"top_k must be -1 (disabled) or >= 0, got {self.top_k}", "top_k"
            )
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int)
        ):
            raise InvalidRequestError("seed must be an integer", "seed")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            raise InvalidRequestError("seed must fit in 64 bits", "seed")
        if len(self.stop) > _MAX_STOP_STRINGS:
            raise InvalidRequestError(f"at most {_MAX_STOP_STRINGS} stop strings", "stop")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidRequestError("stop strings must be non-empty strings", "stop")
        if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise InvalidRequestError(
                "stop_token_ids must be non-negative integers", "stop_token_ids"
            )
