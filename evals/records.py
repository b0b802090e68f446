"""What the latency harness records: one :class:`RunRecord` per question, mode and
repeat (a line of ``results.jsonl``), and the dataset rows it reads."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class Question(BaseModel):
    """One dataset row: ``question_id``, ``category``, ``question``; other fields
    (``sot_suitable``...) are kept in ``extra``."""

    question_id: int | str
    category: str
    question: str
    extra: dict[str, Any] = Field(default_factory=dict)

    @property
    def sot_suitable(self) -> bool | None:
        value = self.extra.get("sot_suitable")
        return value if isinstance(value, bool) else None


class PointRecord(BaseModel):
    index: int
    title: str
    depends_on: list[int] = Field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0


class Span(BaseModel):
    """When one part of an answer ran, in seconds since the question was sent."""

    kind: Literal["skeleton", "point", "answer"]
    index: int | None = None  # the point's, for kind == "point"
    start_s: float
    end_s: float


class AnswerTick(BaseModel):
    """One streamed piece of the answer: when it arrived (seconds since the question
    was sent) and how many answer tokens it carried."""

    t_s: float
    tokens: int


class RunRecord(BaseModel):
    """One answer: a question in one mode, as measured by the client."""

    question_id: int | str
    category: str
    sot_suitable: bool | None = None
    mode: str  # what was asked for
    resolved_mode: str | None = None  # what answered (auto: the router's pick)
    repeat: int = 0
    concurrency: int = 1
    ok: bool = True
    error: str | None = None
    answer: str = ""
    finish_reason: str | None = None
    latency_s: float | None = None  # end to end
    ttft_s: float | None = None  # first token of the answer
    skeleton_s: float | None = None  # the skeleton finished
    generated_tokens: int = 0  # completion tokens of every request of the answer
    prompt_tokens: int = 0
    cached_tokens: int = 0
    requests: int = 0
    num_points: int = 0
    fallback: bool = False
    fallback_reason: str | None = None
    routed_mode: str | None = None  # auto: the router's pick (before any fallback)
    route_reason: str | None = None
    # Prefix-cache state before the run: whether it was emptied first, and how many
    # tokens of the question's plain chat prompt it held (None: cannot be asked).
    cache_reset: bool = False
    question_cached_tokens: int | None = None
    points: list[PointRecord] = Field(default_factory=list)
    timeline: list[Span] = Field(default_factory=list)
    # Every answer delta as it arrived, with its token count; how the tokens were
    # counted: "tokenizer" (the model's, on the answer text) or "deltas" (one a delta).
    answer_ticks: list[AnswerTick] = Field(default_factory=list)
    answer_tokens_counted: str | None = None
    checks: dict[str, Any] = Field(default_factory=dict)  # automatic quality checks

    @property
    def answer_tokens(self) -> int:
        """Tokens of the answer as streamed (the sum over :attr:`answer_ticks`)."""
        return sum(t.tokens for t in self.answer_ticks)

    @property
    def cache_hit_ratio(self) -> float | None:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else None
