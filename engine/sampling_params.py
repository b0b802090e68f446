"""Per-request sampling parameters (the vLLM / OpenAI set)."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.errors import InvalidRequestError

# Above this no sane request asks for more tokens; caught before the context check
# so the message says what is wrong.
MAX_TOKENS_LIMIT = 1 << 20
_MAX_STOP_STRINGS = 16
MAX_REPETITION_PENALTY = 10.0


def _is_number(value: object) -> bool:
    """An int or float, not a bool (NaN passes here; the range checks reject it)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop.

    ``temperature == 0`` is greedy. ``top_k <= 0`` and ``top_p == 1`` disable those
    filters. ``seed`` makes a request's samples reproducible regardless of what else
    shares its batch. Generation stops at ``max_tokens``, at any of ``stop`` (the
    stop string is cut from the text), at any ``stop_token_ids``, or at EOS unless
    ``ignore_eos``.

    Penalties follow vLLM (and, for the last two, OpenAI), applied to the logits in
    this order before temperature, top-k and top-p, greedy rows included:

    - ``min_tokens`` (0 to ``max_tokens``): until the request has generated that many
      tokens, its stop ids (``stop_token_ids`` and EOS unless ``ignore_eos``) get
      logit ``-inf``, and stop strings are not looked for: only text that tokens after
      the first ``min_tokens`` add can complete one.
    - ``repetition_penalty`` (in (0, 10]; 1 = off; vLLM sets no upper bound; typical
      values are 1 to 2): the CTRL / Hugging Face rule. Every token id in the prompt
      or the output so far has its logit divided by the penalty if it is positive,
      multiplied by it otherwise.
    - ``frequency_penalty`` and ``presence_penalty`` (each in [-2, 2]; 0 = off):
      OpenAI's rule over the output so far (not the prompt),
      ``logit[j] -= frequency_penalty * count[j] + presence_penalty * (count[j] > 0)``.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    min_tokens: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        """Whether any of the three penalties changes the logits."""
        return (
            self.repetition_penalty != 1.0
            or self.frequency_penalty != 0.0
            or self.presence_penalty != 0.0
        )

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
        if not _is_number(self.repetition_penalty):
            raise InvalidRequestError("repetition_penalty must be a number", "repetition_penalty")
        if not 0.0 < self.repetition_penalty <= MAX_REPETITION_PENALTY:  # NaN fails too
            raise InvalidRequestError(
                f"repetition_penalty must be in (0, {MAX_REPETITION_PENALTY:g}], "
                f"got {self.repetition_penalty}",
                "repetition_penalty",
            )
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            if not _is_number(value):
                raise InvalidRequestError(f"{name} must be a number", name)
            if not -2.0 <= value <= 2.0:
                raise InvalidRequestError(f"{name} must be in [-2, 2], got {value}", name)
        if isinstance(self.min_tokens, bool) or not isinstance(self.min_tokens, int):
            raise InvalidRequestError("min_tokens must be an integer", "min_tokens")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise InvalidRequestError(
                f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}",
                "min_tokens",
            )
