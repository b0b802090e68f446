"""Per-request sampling parameters (the vLLM / OpenAI set)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from engine.errors import InvalidRequestError

# The bounds the HTTP protocol documents (one set for every layer); MAX_TOKENS_LIMIT is
# caught before the context check so the message says what is wrong, and the logit
# bias cap keeps a request's per-step bias cost bounded (OpenAI documents none).
from engine.protocol import (
    MAX_LOGIT_BIAS,
    MAX_LOGIT_BIAS_ENTRIES,
    MAX_PENALTY,
    MAX_REPETITION_PENALTY,
    MAX_TEMPERATURE,
    MAX_TOKENS_LIMIT,
)

_MAX_STOP_STRINGS = 16
_MAX_JUMP_RULES = 64
_MAX_JUMP_TOKENS = 8


def _as_tuple(value: object) -> object:
    """A list of token ids as a tuple (validation rejects anything else)."""
    return tuple(value) if isinstance(value, list) else value


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
    - ``logit_bias`` (OpenAI's): a map from token id (an int in [0, vocab size); the
      engine checks the upper bound when the request is made) to a bias in
      [-100, 100] added to that token's logit; at most 1024 entries. -100 in effect
      bans a token and +100 forces it; a token that min_tokens masked stays at
      ``-inf``. Applied after the penalties, so the bias is added to the penalised
      logit (vLLM adds it before them, which only differs with a repetition penalty)
      and no penalty can undo a ban or a forced token.

    ``jump_forward`` (SGLang's jump-forward decoding, for text a format fixes): a map
    from a token sequence to tokens that always follow it. When a sampled token makes
    the output end with a key, the tokens it maps to are appended without sampling, and
    the next step computes them with the token after them in one forward (a chunk of
    generated tokens, as cheap as a decode step on the CPU kernels). Forced tokens are
    output like sampled ones: they count towards ``max_tokens`` and can complete a
    stop string. At most 64 rules, keys and values of 1 to 8 token ids; the engine
    checks the ids against the vocabulary. Not an OpenAI or vLLM field: the planner
    sets it for the skeleton's line numbers (``sotserve.skeleton_parser``).
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
    logit_bias: dict[int, float] = field(default_factory=dict)
    jump_forward: dict[tuple[int, ...], tuple[int, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.logit_bias is None:
            self.logit_bias = {}
        elif isinstance(self.logit_bias, Mapping):
            self.logit_bias = dict(self.logit_bias)
        if self.jump_forward is None:
            self.jump_forward = {}
        elif isinstance(self.jump_forward, Mapping):  # lists as keys and values are fine
            self.jump_forward = {_as_tuple(k): _as_tuple(v) for k, v in self.jump_forward.items()}
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
        temperature = self.temperature
        if not isinstance(temperature, int | float) or not 0.0 <= temperature <= MAX_TEMPERATURE:
            raise InvalidRequestError(
                f"temperature must be in [0, {MAX_TEMPERATURE:g}], got {self.temperature}",
                "temperature",
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
            if not -MAX_PENALTY <= value <= MAX_PENALTY:
                raise InvalidRequestError(
                    f"{name} must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}], got {value}", name
                )
        if isinstance(self.min_tokens, bool) or not isinstance(self.min_tokens, int):
            raise InvalidRequestError("min_tokens must be an integer", "min_tokens")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise InvalidRequestError(
                f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}",
                "min_tokens",
            )
        self._validate_logit_bias()
        self._validate_jump_forward()

    def forced_after(self, output_ids: list[int]) -> tuple[int, ...]:
        """The tokens ``jump_forward`` appends to an output ending ``output_ids`` (empty
        if no key matches; the longest matching key wins)."""
        best: tuple[int, ...] = ()
        best_len = 0
        for key, forced in self.jump_forward.items():
            n = len(key)
            if n > best_len and n <= len(output_ids) and tuple(output_ids[-n:]) == key:
                best, best_len = forced, n
        return best

    def jump_forward_ids(self) -> set[int]:
        """Every token id ``jump_forward`` names."""
        return {t for k, v in self.jump_forward.items() for t in (*k, *v)}

    def _validate_jump_forward(self) -> None:
        rules = self.jump_forward
        if not isinstance(rules, dict):
            raise InvalidRequestError(
                "jump_forward must map token id sequences to token id sequences", "jump_forward"
            )
        if len(rules) > _MAX_JUMP_RULES:
            raise InvalidRequestError(
                f"jump_forward has {len(rules)} rules; at most {_MAX_JUMP_RULES}", "jump_forward"
            )
        for key, forced in rules.items():
            for seq in (key, forced):
                if (
                    not isinstance(seq, tuple)
                    or not 1 <= len(seq) <= _MAX_JUMP_TOKENS
                    or any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in seq)
                ):
                    raise InvalidRequestError(
                        f"jump_forward keys and values must be 1 to {_MAX_JUMP_TOKENS} "
                        f"non-negative token ids, got {seq!r}",
                        "jump_forward",
                    )

    def _validate_logit_bias(self) -> None:
        bias = self.logit_bias
        if not isinstance(bias, dict):
            raise InvalidRequestError(
                "logit_bias must be a mapping of token ids to biases", "logit_bias"
            )
        if len(bias) > MAX_LOGIT_BIAS_ENTRIES:
            raise InvalidRequestError(
                f"logit_bias has {len(bias)} entries; at most {MAX_LOGIT_BIAS_ENTRIES}",
                "logit_bias",
            )
        for token, value in bias.items():
            if isinstance(token, bool) or not isinstance(token, int) or token < 0:
                raise InvalidRequestError(
                    f"logit_bias keys must be non-negative integer token ids, got {token!r}",
                    "logit_bias",
                )
            if not _is_number(value):
                raise InvalidRequestError(
                    f"logit_bias values must be numbers, got {value!r} for token {token}",
                    "logit_bias",
                )
            if not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:  # NaN fails too
                raise InvalidRequestError(
                    f"logit_bias values must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], "
                    f"got {value} for token {token}",
                    "logit_bias",
                )
