"""Typed planner events and options (pydantic), shared by the planner, server and client.

A rich client reads the event stream: the skeleton as it is written, the plan
(points and their dependencies), each point growing, the in-order merged answer,
and the final timings. ``Event`` is a discriminated union on ``type``, so
``EventAdapter.validate_python(obj)`` turns JSON back into the right class.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from engine.protocol import (
    MAX_PENALTY,
    MAX_REPETITION_PENALTY,
    MAX_TEMPERATURE,
    MAX_TOKENS_LIMIT,
)

Mode = Literal["sequential", "sot", "graph", "auto"]
ResolvedMode = Literal["sequential", "sot", "graph"]


class PlanOptions(BaseModel):
    """How one question is answered.

    ``max_tokens`` caps every token the answer generates (skeleton and points
    together); ``point_max_tokens`` caps each point expansion, which ends at the
    first sentence end past two thirds of it. ``pipeline`` starts a
    point as soon as its skeleton line is complete instead of after the skeleton.
    ``router`` picks who decides ``auto``: the trained head on the model's hidden
    state (:mod:`sotserve.trained_router`; the rules where it does not fit the
    model), the prompting router (falling back to rules when its reply is unclear)
    or the rules alone.
    """

    model_config = ConfigDict(extra="forbid")

    mode: Mode = "auto"
    max_points: int = Field(default=6, ge=2, le=16)
    point_max_tokens: int = Field(default=96, ge=1, le=4096)
    skeleton_max_tokens: int = Field(default=96, ge=8, le=1024)
    max_tokens: int = Field(default=1024, ge=1, le=MAX_TOKENS_LIMIT)
    # Off by default: on a 2-core CPU each point decoded beside the skeleton slows it
    # (10 vicuna80 questions: skeleton 2.37 s pipelined, 1.38 s not; see README)
    pipeline: bool = False
    router: Literal["trained", "model", "rules"] = "trained"
    temperature: float = Field(default=0.0, ge=0.0, le=MAX_TEMPERATURE)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    # OpenAI's and vLLM's penalties, for every request of the answer
    frequency_penalty: float = Field(default=0.0, ge=-MAX_PENALTY, le=MAX_PENALTY)
    presence_penalty: float = Field(default=0.0, ge=-MAX_PENALTY, le=MAX_PENALTY)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=MAX_REPETITION_PENALTY)
    logit_bias: dict[int, float] = Field(default_factory=dict)
    # the least a sequential answer writes before it may end (vLLM's min_tokens)
    min_tokens: int = Field(default=0, ge=0, le=MAX_TOKENS_LIMIT)
    # the least each point writes before it may end: no empty or title-only points
    point_min_tokens: int = Field(default=32, ge=0, le=4096)
    # once this share of the points has finished, those still running end at their
    # next sentence end: the answer waits for its last point, and a point left alone
    # decodes at batch 1, no faster than sequential (1: never)
    point_wrap_up: float = Field(default=2 / 3, gt=0.0, le=1.0)
    # points' own repetition penalty (None: the answer's)
    point_repetition_penalty: float | None = Field(default=None, gt=0.0, le=MAX_REPETITION_PENALTY)
    # The repetition penalty of a fallback that continues a point heading already shown
    # ("1. **Title**"), where the answer's own is 1 (off). Primed with a heading, SmolLM2
    # tends to write only headings, the same one over and over to the token limit
    # (vicuna80 57 and 59: 512 tokens of "N. **The Americas are not Americas**"); at
    # 1.15 both explain the heading in prose instead (1: off).
    fallback_repetition_penalty: float = Field(default=1.15, gt=0.0, le=MAX_REPETITION_PENALTY)


class PlanPoint(BaseModel):
    """One point of the skeleton: 1-based ``index`` in skeleton order."""

    index: int
    title: str
    depends_on: list[int] = Field(default_factory=list)


class Timings(BaseModel):
    """Seconds since the question arrived."""

    route_s: float | None = None
    skeleton_s: float | None = None
    first_answer_token_s: float | None = None
    total_s: float


class Usage(BaseModel):
    """Tokens of every request the answer made (router, skeleton, points)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens served by the prefix cache, where reported
    requests: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class RouteDecision(BaseModel):
    """What ``auto`` chose and why."""

    mode: ResolvedMode
    source: Literal["model", "rules", "trained", "load"]
    reason: str


class SkeletonDelta(BaseModel):
    type: Literal["skeleton_delta"] = "skeleton_delta"
    text: str


class PointStart(BaseModel):
    """A point was parsed from the skeleton and its expansion will start."""

    type: Literal["point_start"] = "point_start"
    point: PlanPoint


class PlanReady(BaseModel):
    """The skeleton is finished: the final points, or a fallback to sequential."""

    type: Literal["plan_ready"] = "plan_ready"
    mode: ResolvedMode
    points: list[PlanPoint]
    route: RouteDecision | None = None
    fallback: str | None = None  # why the planner fell back to sequential decoding


class PointDelta(BaseModel):
    type: Literal["point_delta"] = "point_delta"
    index: int
    text: str


class PointDone(BaseModel):
    """A point's expansion is complete; its prompt's prefix-cache hits where reported."""

    type: Literal["point_done"] = "point_done"
    index: int
    text: str
    finish_reason: str | None
    completion_tokens: int
    prompt_tokens: int
    cached_tokens: int | None = None


class AnswerDelta(BaseModel):
    """The next piece of the merged answer, in order."""

    type: Literal["answer_delta"] = "answer_delta"
    text: str


class Done(BaseModel):
    type: Literal["done"] = "done"
    mode: ResolvedMode
    answer: str
    points: list[PlanPoint]
    timings: Timings
    usage: Usage
    route: RouteDecision | None = None
    fallback: str | None = None
    finish_reason: str | None = None


class PointResult(PlanPoint):
    """A finished point: its plan entry and its expansion."""

    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0
    cached_tokens: int | None = None


class AnswerInfo(BaseModel):
    """How an answer was made: the ``sot`` field of a non-streamed chat completion."""

    mode: ResolvedMode
    points: list[PointResult] = Field(default_factory=list)
    timings: Timings
    usage: Usage
    route: RouteDecision | None = None
    fallback: str | None = None


class ErrorEvent(BaseModel):
    """The answer failed. ``code`` is the kind (``invalid_request``: the request was
    refused; ``backend_error``: something broke); for a refused request ``param`` and
    ``error_code`` (OpenAI's, e.g. ``context_length_exceeded``) say why, where known."""

    type: Literal["error"] = "error"
    message: str
    code: str = "backend_error"
    param: str | None = None
    error_code: str | None = None


Event = Annotated[
    SkeletonDelta
    | PointStart
    | PlanReady
    | PointDelta
    | PointDone
    | AnswerDelta
    | Done
    | ErrorEvent,
    Field(discriminator="type"),
]
EventAdapter: TypeAdapter[Event] = TypeAdapter(Event)
