"""Run questions through a target and record what the client saw.

A :class:`Target` answers a question in a mode as a stream of planner events: the
engine in this process (:class:`LocalTarget`) or a server over HTTP
(:class:`HTTPTarget`: a sotserve server in any mode, any OpenAI-compatible server
in ``sequential``). :func:`run_one` times one answer from the client's side, so
local and remote runs are measured the same way, and turns its events into a
:class:`RunRecord` with a timeline of the skeleton and every point.
"""

from __future__ import annotations

import contextlib
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import aiohttp

from sotserve.client import AsyncClient, SotserveError
from sotserve.openai_http import reset_prefix_cache, root_url

if TYPE_CHECKING:  # the engine (and torch) load only for a local target
    from engine import AsyncEngine

from evals.records import AnswerTick, PointRecord, Question, RunRecord, Span
from sotserve.schemas import (
    AnswerDelta,
    Done,
    ErrorEvent,
    Event,
    PlanReady,
    PointDone,
    PointStart,
    SkeletonDelta,
)


class TargetError(Exception):
    """The target cannot be used (unreachable, wrong kind of server)."""


class Target(ABC):
    """Something that answers questions in a mode."""

    description: str  # for the report: model, backend, where

    @abstractmethod
    def stream(self, question: str, mode: str, **options: Any) -> AsyncIterator[Event]:
        """The planner's events for one answer, ending with ``Done``."""

    @abstractmethod
    async def reset_cache(self, prompt_heads: bool = True) -> bool:
        """Empty the prefix cache; False if this target cannot. With ``prompt_heads``
        a sotserve target then caches its fixed prompt heads again (system turn,
        skeleton instructions and examples: :mod:`sotserve.prompt_heads`), as a
        running server has them, so that only the question is cold."""

    async def question_cached(self, question: str) -> int | None:
        """Tokens of the question's plain chat prompt the cache holds past the prompt's
        fixed head (the system turn), i.e. of the question itself (None: unknown)."""
        return None

    def count_tokens(self, text: str) -> int | None:
        """Tokens of ``text`` in the model's tokenizer (None: no tokenizer here)."""
        return None

    async def close(self) -> None:  # noqa: B027 - optional
        """Release what the target holds."""


class LocalTarget(Target):
    """The planner on an :class:`engine.AsyncEngine` in this process."""

    def __init__(
        self,
        model: str | None,
        dtype: str = "auto",
        device: str = "auto",
        engine: AsyncEngine | None = None,
        auto_max_load: int | None = None,
        auto_max_sequential: int | None = None,
    ) -> None:
        """``engine``: one already made (``python -m evals.latency`` makes it with its
        step loop on the main thread, as the servers run); else one with a step thread.
        ``auto_max_load``, ``auto_max_sequential``: the load policy's limits (None: the
        defaults)."""
        from engine import AsyncEngine
        from sotserve.backends.local import LocalBackend
        from sotserve.load_policy import LoadPolicy
        from sotserve.planner import Planner

        self.engine = engine or AsyncEngine(model, dtype=dtype, device=device)
        policy = LoadPolicy.overriding(auto_max_load, auto_max_sequential)
        self.planner = Planner(LocalBackend(self.engine), policy)
        cfg = self.engine.engine.config
        self.description = (
            f"{self.engine.model_name} in process ({cfg.dtype}, {cfg.device}), sotserve engine"
        ).replace("torch.", "")

    def stream(self, question: str, mode: str, **options: Any) -> AsyncIterator[Event]:
        return self.planner.stream(question, mode, **options)  # type: ignore[arg-type]

    async def reset_cache(self, prompt_heads: bool = True) -> bool:
        await self.engine.reset_prefix_cache()
        if prompt_heads:
            await self.planner.warm_up()
        return True

    async def question_cached(self, question: str) -> int | None:
        ids = self.engine.apply_chat_template([{"role": "user", "content": question}])
        head = max((len(h) for h in self.planner.prompt_heads if ids[: len(h)] == h), default=0)
        return max(await self.engine.cached_prefix_len(ids) - head, 0)

    def count_tokens(self, text: str) -> int | None:
        return len(self.engine.tokenizer.encode(text, add_special_tokens=False))

    async def close(self) -> None:
        self.engine.close()


class HTTPTarget(Target):
    """A server at ``url``: a sotserve server answers every mode; any other
    OpenAI-compatible server (vLLM, SGLang...) answers ``sequential`` only."""

    def __init__(
        self,
        url: str,
        model: str | None = None,
        timeout: float = 600.0,
        tokenizer: str | None = None,
        api_key: str | None = None,
        admin_api_key: str | None = None,
    ) -> None:
        """``tokenizer``: the served model's (a local directory, GGUF, or "embedded"),
        to count a streamed answer's tokens; without one each delta counts as one.
        ``api_key`` is sent on every request, ``admin_api_key`` (else ``api_key``) on
        cache resets, which a sotserve server serves only to its admin key."""
        self._tokenizer: Any = None
        if tokenizer is not None:
            from engine.loader import resolve_model

            files = resolve_model(None if tokenizer == "embedded" else tokenizer)
            self._tokenizer = files.tokenizer()
        self.url = root_url(url)
        self.api_key = api_key
        self._admin_key = admin_api_key or api_key
        self.client = AsyncClient(self.url, timeout=timeout, model=model, api_key=api_key)
        self.model = model
        self.sotserve = False
        self.description = url

    async def start(self) -> None:
        """Find out what the server is; raises :class:`TargetError` if unreachable."""
        try:
            # a short timeout: a server that does not list its models in 10 s is not up
            async with AsyncClient(self.url, timeout=10, api_key=self.api_key) as probe:
                cards = await probe.model_cards()
        except SotserveError as exc:
            raise TargetError(
                f"cannot reach an OpenAI-compatible server at {self.url}: {exc}"
            ) from None
        card = next((c for c in cards if c.get("id") == self.model), cards[0] if cards else {})
        if self.model is None:  # OpenAI servers want a model: the one it serves
            self.model = card.get("id")
            self.client.model = self.model
        self.sotserve = card.get("owned_by") == "sotserve"
        kind = "sotserve server" if self.sotserve else "OpenAI-compatible server"
        self.description = f"{self.model} at {self.url} ({kind})"

    def count_tokens(self, text: str) -> int | None:
        if self._tokenizer is None:
            return None
        return len(self._tokenizer.encode(text, add_special_tokens=False))

    def stream(self, question: str, mode: str, **options: Any) -> AsyncIterator[Event]:
        if not self.sotserve:
            if mode != "sequential":
                raise TargetError(f"{self.url} is not a sotserve server: only sequential")
            # a plain server gets OpenAI's fields only
            openai = ("max_tokens", "temperature", "seed")
            options = {k: v for k, v in options.items() if k in openai}
            return self.client.stream(question, None, **options)
        return self.client.stream(question, mode, **options)  # type: ignore[arg-type]

    async def reset_cache(self, prompt_heads: bool = True) -> bool:
        # vLLM and sotserve: POST /reset_prefix_cache; SGLang: POST /flush_cache. A
        # sotserve server caches its prompt heads again unless told not to; other
        # servers know no heads (they answer sequential only, their system turn cold).
        params = None if prompt_heads or not self.sotserve else {"prompt_heads": "false"}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
            return await reset_prefix_cache(s, self.url, self._admin_key, params=params)

    async def close(self) -> None:
        await self.client.close()


class _Timeline:
    """Client-side times of the events of one answer, turned into spans."""

    def __init__(self, t0: float) -> None:
        self.t0 = t0
        self.skeleton_start: float | None = None
        self.skeleton_end: float | None = None
        self.point_start: dict[int, float] = {}
        self.point_end: dict[int, float] = {}
        self.first_token: float | None = None
        self.deltas: list[tuple[float, str]] = []  # (time, text) of every answer delta

    def see(self, event: Event) -> None:
        now = time.perf_counter() - self.t0
        if isinstance(event, SkeletonDelta) and self.skeleton_start is None:
            self.skeleton_start = now
        elif isinstance(event, PointStart):
            self.point_start.setdefault(event.point.index, now)
        elif isinstance(event, PlanReady) and self.skeleton_end is None:
            self.skeleton_end = now
        elif isinstance(event, PointDone):
            self.point_end[event.index] = now
        elif isinstance(event, AnswerDelta):
            if self.first_token is None:
                self.first_token = now
            self.deltas.append((now, event.text))

    def spans(self, done: Done, end: float) -> list[Span]:
        if not done.points:  # sequential (or a fallback): one request for the answer
            start = self.skeleton_end if done.fallback else 0.0
            return [Span(kind="answer", start_s=start or 0.0, end_s=end)]
        spans = []
        if self.skeleton_start is not None:
            skel_end = self.skeleton_end if self.skeleton_end is not None else end
            spans.append(Span(kind="skeleton", start_s=self.skeleton_start, end_s=skel_end))
        for p in done.points:
            # a point runs from when it is parsed, or (graph) when its last parent ends
            start = max(
                [self.point_start.get(p.index, 0.0)]
                + [self.point_end.get(d, 0.0) for d in p.depends_on]
            )
            spans.append(
                Span(kind="point", index=p.index, start_s=start,
                     end_s=self.point_end.get(p.index, end))
            )  # fmt: skip
        return spans


def answer_ticks(
    deltas: list[tuple[float, str]], count: Callable[[str], int | None]
) -> tuple[list[AnswerTick], str]:
    """The token timeline of an answer from its ``(time, text)`` deltas, and how its
    tokens were counted.

    Answer deltas carry text only, and a skeleton answer's deltas are the merger's
    (a buffered point arrives as one delta of many tokens), so with a tokenizer
    (``count`` returns an int) a delta's tokens are those the answer gained with it:
    the tokens of the text up to and including the delta, less those before it
    (never below zero, as a later piece can merge with an earlier token). Without
    one (``count`` returns None: a server over HTTP) each delta counts as one token,
    which is what a sequential stream sends; a skeleton answer is then undercounted.
    Counted after the stream, so the counting costs the timed answer nothing.
    """
    ticks: list[AnswerTick] = []
    text, before = "", 0
    for t, piece in deltas:
        text += piece
        n = count(text)
        if n is None:
            return [AnswerTick(t_s=t, tokens=1) for t, _ in deltas], "deltas"
        ticks.append(AnswerTick(t_s=t, tokens=max(n - before, 0)))
        before = max(before, n)
    return ticks, "tokenizer"


async def run_one(
    target: Target,
    question: Question,
    mode: str,
    options: dict[str, Any],
    *,
    repeat: int = 0,
    concurrency: int = 1,
    cache_reset: bool = False,
    question_cached: int | None = None,
) -> RunRecord:
    """Answer ``question`` in ``mode`` and record it; failures are recorded, not raised."""
    record = RunRecord(
        question_id=question.question_id, category=question.category,
        sot_suitable=question.sot_suitable, mode=mode, repeat=repeat,
        concurrency=concurrency, cache_reset=cache_reset,
        question_cached_tokens=question_cached,
    )  # fmt: skip
    t0 = time.perf_counter()
    timeline = _Timeline(t0)
    points: dict[int, PointDone] = {}
    done: Done | None = None
    try:
        async with contextlib.aclosing(target.stream(question.question, mode, **options)) as events:
            async for event in events:
                timeline.see(event)
                if isinstance(event, ErrorEvent):
                    raise RuntimeError(f"{event.code}: {event.message}")
                if isinstance(event, PointDone):
                    points[event.index] = event
                elif isinstance(event, Done):
                    done = event
                    break
        if done is None:
            raise RuntimeError("the answer ended without a result")
    except Exception as exc:  # recorded: one bad answer must not end the run
        record.ok = False
        record.error = f"{exc.__class__.__name__}: {exc}"
        record.latency_s = None
        return record
    end = time.perf_counter() - t0
    u = done.usage
    record.resolved_mode = done.mode
    record.routed_mode = done.route.mode if done.route else None
    record.route_reason = done.route.reason if done.route else None
    record.answer = done.answer
    record.finish_reason = done.finish_reason
    record.latency_s = end
    record.ttft_s = timeline.first_token
    record.skeleton_s = done.timings.skeleton_s
    record.generated_tokens = u.completion_tokens
    record.prompt_tokens = u.prompt_tokens
    record.cached_tokens = u.cached_tokens
    record.requests = u.requests
    record.num_points = len(done.points)
    record.fallback = done.fallback is not None
    record.fallback_reason = done.fallback
    record.points = [
        PointRecord(
            index=p.index, title=p.title, depends_on=p.depends_on,
            text=points[p.index].text if p.index in points else "",
            finish_reason=points[p.index].finish_reason if p.index in points else None,
            completion_tokens=points[p.index].completion_tokens if p.index in points else 0,
        )
        for p in done.points
    ]  # fmt: skip
    record.timeline = timeline.spans(done, end)
    if timeline.deltas:
        record.answer_ticks, record.answer_tokens_counted = answer_ticks(
            timeline.deltas, target.count_tokens
        )
    return record
