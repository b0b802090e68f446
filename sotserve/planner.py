"""The Skeleton-of-Thought planner: route, skeleton, parallel points, in-order answer.

``Planner(backend, **options)`` answers a question in one of four modes:

- ``sequential``: plain decoding of the chat.
- ``sot``: ask for a short numbered skeleton, then expand every point as its own
  request, all in parallel; the answer is the points in order.
- ``graph``: the skeleton may say that a point depends on earlier ones; a point
  runs once its parents are done, with their expansions in its prompt.
- ``auto``: the router picks one of the three.

Point prompts continue the skeleton request's exact token ids (its prompt, then
its reply up to the last point line), so the backend's radix cache serves all but
the point-specific tail of each point prompt.

The request's system (and developer) messages hold in every mode: a plain answer
renders the chat as it is, and every template prompt (router, skeleton, and so
every point, which continues the skeleton request) opens with them
(:func:`sotserve.prompt_heads.template_messages`).

Everything that can be known before the first event is checked before it: a chat
too long for the backend's context is an ``error`` event first (a 400 for the HTTP
layer, not an error inside a 200 stream), and a question too long for a skeleton
(its prompt and tokens, or the longest point prompt and a point's tokens) is
answered sequentially from the start, the ``done`` event's ``fallback`` (or, in
``auto`` mode, the route's reason) saying why.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

import prompts
from prompts import ChatRenderer, Message
from sotserve.backends.base import (
    Backend,
    BackendOverloadedError,
    BackendRequestError,
    BackendUnavailableError,
    CompletionParams,
)
from sotserve.executor import (
    PointExecutor,
    PointFailed,
    PointFinished,
    PointText,
    TokenBudget,
)
from sotserve.load_policy import LoadPolicy, PlannedLoad
from sotserve.merge import InOrderMerger, PreviewMismatchError
from sotserve.point_text import barred_point_token_ids
from sotserve.prompt_heads import (
    SYSTEM_ROLES,
    prompt_heads,
    system_text,
    template_messages,
    warm_prompt_heads,
)
from sotserve.routing import Router
from sotserve.schemas import (
    AnswerDelta,
    Done,
    ErrorEvent,
    Event,
    Mode,
    PlanOptions,
    PlanPoint,
    PlanReady,
    PointDelta,
    PointDone,
    PointStart,
    ResolvedMode,
    RouteDecision,
    SkeletonDelta,
    Timings,
    Usage,
)
from sotserve.skeleton_parser import SkeletonParser, line_number_jumps, title_preview
from sotserve.trained_router import router_messages

logger = logging.getLogger(__name__)

# A point's soft length: past this share of its cap (point_max_tokens) it ends at the
# next sentence end (sotserve.point_text.PointWriter), so the cap itself is rarely hit.
POINT_SOFT_SHARE = 2 / 3


# The skeleton request's engine priority (vLLM's convention: lower is served first);
# points and plain answers keep 0.
SKELETON_PRIORITY = -1


class PlannerError(Exception):
    """An answer failed; ``code`` is ``invalid_request`` or ``backend_error``."""

    def __init__(self, message: str, code: str = "backend_error") -> None:
        super().__init__(message)
        self.code = code


class InvalidQuestionError(PlannerError, ValueError):
    """The question itself is unusable (empty, wrong type)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "invalid_request")


class PointPromptTooLongError(PlannerError):
    """A point's prompt leaves the context too little room for the point: the plan
    falls back to sequential decoding (never an error of the answer)."""


# The templates of each skeleton mode: the skeleton request's and its points'.
_SKELETON_TEMPLATE: dict[ResolvedMode, str] = {"sot": "skeleton", "graph": "graph"}
_POINT_TEMPLATE: dict[ResolvedMode, str] = {"sot": "point", "graph": "graph_point"}


class Planner:
    """Answers questions on ``backend``; ``options`` are :class:`PlanOptions` defaults."""

    def __init__(
        self, backend: Backend, load_policy: LoadPolicy | None = None, **options: Any
    ) -> None:
        self.backend = backend
        self.options = PlanOptions(**options)
        self.renderer = ChatRenderer(backend.tokenizer)
        # the requests this planner's answers in flight will hold: auto's load check
        # counts them before the engine sees them
        self.planned = PlannedLoad()
        self.router = Router(self.renderer, load_policy, planned=self.planned)
        # every point request bars line breaks and colons (a point is one paragraph of
        # prose); found once here, at start-up, not on the first answer's critical path
        self.point_bans = dict.fromkeys(barred_point_token_ids(backend.tokenizer), -100.0)
        self.prompt_heads = prompt_heads(self.renderer)
        # the skeleton's "." after each line number goes in without a step of its own
        self.skeleton_jumps = line_number_jumps(backend.tokenizer)

    async def warm_up(self) -> int:
        """Have the backend cache the fixed heads of this planner's prompts (see
        :mod:`sotserve.prompt_heads`); returns the head tokens sent. Servers call it at
        start-up and after emptying the prefix cache."""
        return await warm_prompt_heads(self.backend, self.prompt_heads)

    def resolve_options(self, mode: Mode | None = None, **overrides: Any) -> PlanOptions:
        """These defaults with per-call overrides, validated."""
        values = self.options.model_dump()
        values.update({k: v for k, v in overrides.items() if v is not None})
        if mode is not None:
            values["mode"] = mode
        return PlanOptions(**values)

    async def route(
        self, question: str, messages: list[Message] | None = None, **overrides: Any
    ) -> RouteDecision:
        """What ``auto`` would choose for ``question`` now, without answering it.

        ``messages`` is the chat before it (system text, earlier turns). Raises
        :class:`InvalidQuestionError` for an empty or malformed question. Cheap on any
        input: the routers read the question's two ends only, never all of a huge one.
        """
        if not isinstance(question, str):
            raise InvalidQuestionError("question must be a string")
        chat = _as_messages([*(messages or []), {"role": "user", "content": question}])
        opts = self.resolve_options("auto", **overrides)
        # the chat's prompt when nothing is cut (the trained router encodes it then)
        ids = self.renderer.render(router_messages(chat))
        backend = self.backend.for_answer(ids)
        return await self.router.decide(backend, chat, question_text(chat), opts, Usage(), ids)

    async def stream(
        self, question: str | list[Message], mode: Mode | None = None, **overrides: Any
    ) -> AsyncIterator[Event]:
        """Events of one answer, ending with ``done`` or ``error``.

        Raises :class:`InvalidQuestionError` (before any event) for an empty or
        malformed question. Closing the iterator early aborts every request.
        """
        messages = _as_messages(question)
        opts = self.resolve_options(mode, **overrides)
        async with contextlib.aclosing(_AnswerRun(self, messages, opts).run()) as events:
            async for event in events:
                yield event

    def context_needed(
        self, question: str | list[Message], mode: ResolvedMode = "sot", **overrides: Any
    ) -> int:
        """The context length a skeleton answer of ``question`` in ``mode`` needs, by
        the estimate the planner checks before it plans: on a backend with a shorter
        ``max_model_len`` it answers sequentially (the ``done`` event says why)."""
        run = _AnswerRun(self, _as_messages(question), self.resolve_options(mode, **overrides))
        return run.plan_needs(mode)[1]

    async def answer(
        self, question: str | list[Message], mode: Mode | None = None, **overrides: Any
    ) -> Done:
        """The finished answer; raises :class:`PlannerError` if it failed."""
        # closed here, not whenever it is collected: what the answer held goes back now
        async with contextlib.aclosing(self.stream(question, mode, **overrides)) as events:
            async for event in events:
                if isinstance(event, ErrorEvent):
                    raise PlannerError(event.message, event.code)
                if isinstance(event, Done):
                    return event
        raise PlannerError("the answer ended without a result")


def _as_messages(question: str | list[Message]) -> list[Message]:
    if isinstance(question, str):
        messages = [{"role": "user", "content": question}]
    elif isinstance(question, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in question
    ):
        # "developer" is OpenAI's newer name for "system"; chat templates know only that
        messages = [
            {"role": "system" if m["role"] in SYSTEM_ROLES else m["role"], "content": m["content"]}
            for m in question
        ]
    else:
        raise InvalidQuestionError("question must be a string or a list of chat messages")
    users = [m for m in messages if m["role"] == "user"]
    if not users or not users[-1]["content"].strip():
        raise InvalidQuestionError("the question is empty")
    return messages


def question_text(messages: list[Message]) -> str:
    """The question a skeleton is planned for: the last user turn, with earlier turns.

    System messages are not part of it: they open the template prompts as system
    text (:func:`sotserve.prompt_heads.template_messages`), and the rules router
    reads the question's wording only."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "user")
    earlier = [m for m in messages[:last] if m["role"] in ("user", "assistant")]
    question = messages[last]["content"].strip()
    if not earlier:
        return question
    history = "\n".join(f"{m['role']}: {m['content'].strip()}" for m in earlier)
    return f"(Conversation so far:\n{history})\n{question}"


@dataclass
class _Skeleton:
    """The skeleton request's prompt and reply, kept to build point prompts from."""

    messages: list[Message]
    prompt_ids: list[int]
    prefill: str
    text: str = ""  # prefill + reply so far
    # (token ids, text length after them) per reply chunk; ids None if unknown
    chunks: list[tuple[list[int] | None, int]] = field(default_factory=list)

    def reply_ids(self, upto_chars: int, renderer: ChatRenderer) -> list[int]:
        """Reply token ids covering the text up to ``upto_chars``, never past it."""
        ids: list[int] = []
        for chunk_ids, end in self.chunks:
            if end > upto_chars:
                break
            if chunk_ids is None:  # backend gave no ids: re-tokenize the text instead
                return renderer.encode(self.text[len(self.prefill) : upto_chars])
            ids.extend(chunk_ids)
        special = set(getattr(renderer.tokenizer, "all_special_ids", ()))
        while ids and ids[-1] in special:  # e.g. the end-of-turn token
            ids.pop()
        return ids


@dataclass
class _SkeletonChunk:
    text: str
    token_ids: list[int] | None


@dataclass
class _SkeletonEnded:
    finish_reason: str | None
    error: BaseException | None = None


class _AnswerRun:
    """The state of one answer while it streams."""

    def __init__(self, planner: Planner, messages: list[Message], opts: PlanOptions) -> None:
        self.planner = planner
        self.backend = planner.backend
        self.renderer = planner.renderer
        self.point_bans = planner.point_bans
        self.skeleton_jumps = planner.skeleton_jumps
        self.messages = messages
        self.system = system_text(messages)  # opens every template prompt
        self.chat_ids: list[int] = []  # the plain answer's prompt, rendered in run()
        self.opts = opts
        self._skeletons: dict[ResolvedMode, _Skeleton] = {}
        self._needs: dict[ResolvedMode, tuple[int, int]] = {}
        self.t0 = time.perf_counter()
        self.usage = Usage()
        self.budget = TokenBudget(opts.max_tokens)
        self.queue: asyncio.Queue[object] = asyncio.Queue()
        self.tasks: list[asyncio.Task[None]] = []
        self.executor: PointExecutor | None = None
        self.route: RouteDecision | None = None
        self.route_s: float | None = None
        self.skeleton_s: float | None = None
        self.first_answer_s: float | None = None
        # how this answer counts in planner.planned: not yet, one request, a skeleton's
        self._counted_as: Literal["none", "single", "skeleton"] = "none"

    def _elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def _answer_delta(self, text: str) -> AnswerDelta | None:
        if not text:
            return None
        if self.first_answer_s is None:
            self.first_answer_s = self._elapsed()
        return AnswerDelta(text=text)

    def _done(self, mode: ResolvedMode, answer: str, points: list[PlanPoint], **kw: Any) -> Done:
        timings = Timings(
            route_s=self.route_s,
            skeleton_s=self.skeleton_s,
            first_answer_token_s=self.first_answer_s,
            total_s=self._elapsed(),
        )
        return Done(
            mode=mode, answer=answer, points=points, timings=timings,
            usage=self.usage, route=self.route, **kw,
        )  # fmt: skip

    async def run(self) -> AsyncIterator[Event]:
        try:
            self.chat_ids = self.renderer.render(self.messages)
            # one replica for every request of the answer, so they share its cache
            self.backend = self.backend.for_answer(self.chat_ids)
            self.planner.planned.start(self.backend)
            self._counted_as = "single"
            limit = self.backend.max_model_len
            if limit is not None and len(self.chat_ids) >= limit:
                # Said first, before any backend request: the HTTP layer can still
                # answer 400. (Every skeleton prompt holds the chat too, and a plan
                # may fall back to it, so this goes for every mode.)
                yield ErrorEvent(
                    message=f"the messages have {len(self.chat_ids)} tokens; this model's "
                    f"context length is {limit}", code="invalid_request", param="messages",
                    error_code="context_length_exceeded",
                )  # fmt: skip
                return
            mode = self.opts.mode
            if mode == "auto":
                self.route = await self._route()
                self.route_s = self._elapsed()
                mode = self.route.mode
            if mode == "sequential":
                body = self._sequential(None)
            elif (misfit := self.misfit(mode)) is not None:
                body = self._too_long_for_a_plan(misfit)  # said before the first request
            else:
                self.planner.planned.plan_skeleton(self.backend)
                self._counted_as = "skeleton"
                body = self._planned(mode)
            async with contextlib.aclosing(body) as events:
                async for event in events:
                    yield event
        except BackendRequestError as exc:
            if exc.callers_fault:
                yield ErrorEvent(
                    message=str(exc), code="invalid_request", param=exc.param,
                    error_code=exc.code,
                )  # fmt: skip
            else:
                logger.error("the backend refused a request the planner made: %s", exc)
                yield ErrorEvent(message=str(exc), code="backend_error")
        except BackendOverloadedError as exc:
            yield ErrorEvent(message=str(exc), code="overloaded")
        except BackendUnavailableError as exc:
            yield ErrorEvent(
                message=str(exc), code="backend_unavailable",
                error_code="bad_gateway" if exc.status == 502 else "backend_unavailable",
            )  # fmt: skip
        except Exception as exc:  # any backend failure ends the answer with an event
            yield ErrorEvent(message=f"{exc.__class__.__name__}: {exc}", code="backend_error")
        finally:
            try:
                await self._cancel_all()
            finally:
                if self._counted_as != "none":
                    self.planner.planned.end(self.backend, self._counted_as == "skeleton")
                    self._counted_as = "none"

    async def _cancel_all(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.executor is not None:
            await self.executor.cancel()

    async def _route(self) -> RouteDecision:
        """``auto``'s choice. A question too long for either kind of skeleton is
        answered sequentially without asking the router (whose answer could not be
        used, and whose prompt holds the question too)."""
        sot_misfit = self.misfit("sot")
        if sot_misfit is not None and self.misfit("graph") is not None:
            return RouteDecision(
                mode="sequential", source="rules", reason=f"too long for a skeleton: {sot_misfit}"
            )
        return await self.planner.router.decide(
            self.backend, self.messages, question_text(self.messages), self.opts, self.usage,
            self.chat_ids, counted=self._counted_as != "none",
        )  # fmt: skip

    # -- fitting the context -------------------------------------------------------------
    def skeleton(self, mode: ResolvedMode) -> _Skeleton:
        """The skeleton request of ``mode`` (rendered once: the fit check and the plan
        both use it)."""
        if mode not in self._skeletons:
            messages = template_messages(
                _SKELETON_TEMPLATE[mode], self.system, question=question_text(self.messages)
            )
            turns, prefill = prompts.split_prefill(messages)
            ids = self.renderer.render(messages)
            self._skeletons[mode] = _Skeleton(turns, ids, prefill, text=prefill)
        return self._skeletons[mode]

    def skeleton_tokens(self) -> int:
        """What the skeleton request may generate: at most half the answer's budget
        (the points share the rest)."""
        return min(self.opts.skeleton_max_tokens, self.opts.max_tokens // 2)

    def point_tokens(self) -> int:
        """What one point request may generate: its cap, within the answer's budget."""
        return min(self.opts.point_max_tokens, self.opts.max_tokens)

    def plan_needs(self, mode: ResolvedMode) -> tuple[int, int]:
        """Context tokens the skeleton request needs (its prompt and tokens) and the
        longest point request is expected to need.

        A point prompt is the skeleton prompt, the skeleton's reply (at most
        :meth:`skeleton_tokens`) and the point's turn; the estimate renders that turn
        for the last point with an empty title (and, in graph mode, no parents'
        texts, which :meth:`_Plan.build_prompt` shortens to fit). The titles are in
        the reply already; a point whose turn repeats a very long one may still not
        fit, and the plan then falls back when that point is due.
        """
        if mode not in self._needs:  # auto mode asks before and after routing
            skel = self.skeleton(mode)
            values = {"index": self.opts.max_points, "title": "", "parents": "(none)"}
            turn = prompts.load(_POINT_TEMPLATE[mode]).messages(**values)
            tail = self.renderer.continuation(skel.messages, turn)
            skeleton_need = len(skel.prompt_ids) + self.skeleton_tokens()
            self._needs[mode] = (skeleton_need, skeleton_need + len(tail) + self.point_tokens())
        return self._needs[mode]

    def misfit(self, mode: ResolvedMode) -> str | None:
        """Why a skeleton answer in ``mode`` cannot fit the backend's context, or None."""
        limit = self.backend.max_model_len
        if limit is None:
            return None
        skeleton_need, point_need = self.plan_needs(mode)
        if skeleton_need > limit:
            n = len(self.skeleton(mode).prompt_ids)
            return (
                f"the skeleton prompt ({n} tokens) and its {self.skeleton_tokens()} tokens "
                f"exceed the context length ({limit})"
            )
        if point_need > limit:
            return (
                f"a point prompt ({point_need - self.point_tokens()} tokens) and its "
                f"{self.point_tokens()} tokens exceed the context length ({limit})"
            )
        return None

    async def _too_long_for_a_plan(self, why: str) -> AsyncIterator[Event]:
        """Sequential decoding from the start, for a question no skeleton fits."""
        fallback = f"{why}; answered with sequential decoding"
        yield PlanReady(mode="sequential", points=[], route=self.route, fallback=fallback)
        async with contextlib.aclosing(self._sequential(fallback)) as events:
            async for event in events:
                yield event

    # -- sequential ---------------------------------------------------------------------
    async def _sequential(self, fallback: str | None, shown: str = "") -> AsyncIterator[Event]:
        """Plain decoding of the chat; ``shown`` is answer text already streamed (by a
        plan that fell back), which the reply is prefilled with and continues."""
        ids = self.chat_ids
        if shown:
            ids = self.renderer.render([*self.messages, {"role": "assistant", "content": shown}])
            limit = self.backend.max_model_len
            if limit is not None and len(ids) >= limit:
                # what the plan showed already fills the context: the answer ends there
                # (the chat alone fits: run() checked it before the first event)
                yield self._done("sequential", shown, [], fallback=fallback, finish_reason="length")
                return
        room = self.backend.room(len(ids), max(self.budget.remaining, 1))
        params = self._params(room, min_tokens=min(self.opts.min_tokens, room))
        if shown and params.repetition_penalty == 1.0:
            # continuing a shown heading: without a penalty it tends to loop on headings
            params.repetition_penalty = self.opts.fallback_repetition_penalty
        parts: list[str] = []
        finish = None
        cached = None
        n = 0
        try:
            async with contextlib.aclosing(self.backend.complete(ids, params)) as stream:
                async for chunk in stream:
                    n += len(chunk.token_ids) if chunk.token_ids is not None else 1
                    parts.append(chunk.text)
                    finish = chunk.finish_reason or finish
                    cached = chunk.cached_tokens if chunk.cached_tokens is not None else cached
                    delta = self._answer_delta(chunk.text)
                    if delta is not None:
                        yield delta
        finally:
            self._count(len(ids), n, cached)
        answer = shown + "".join(parts)
        yield self._done("sequential", answer, [], fallback=fallback, finish_reason=finish)

    def _params(self, max_tokens: int, **extra: Any) -> CompletionParams:
        """The answer's sampling options for one request of ``max_tokens``; ``extra``
        sets request-specific fields (``min_tokens``, ``priority``...)."""
        o = self.opts
        params = CompletionParams(
            max_tokens=max_tokens, temperature=o.temperature, top_p=o.top_p, seed=o.seed,
            frequency_penalty=o.frequency_penalty, presence_penalty=o.presence_penalty,
            repetition_penalty=o.repetition_penalty, logit_bias=dict(o.logit_bias),
        )  # fmt: skip
        return dataclasses.replace(params, **extra)

    def _count(
        self, prompt: int, completion: int, cached: int | None = None, requests: int = 1
    ) -> None:
        self.usage.prompt_tokens += prompt
        self.usage.completion_tokens += completion
        self.usage.cached_tokens += cached or 0
        self.usage.requests += requests

    # -- sot and graph -------------------------------------------------------------------
    async def _planned(self, mode: ResolvedMode) -> AsyncIterator[Event]:
        """A skeleton answer: the skeleton and its points report on ``self.queue``, and
        :class:`_Plan` turns each message into answer events."""
        plan = _Plan(self, mode)
        skel_reserved = self.budget.reserve(self.skeleton_tokens())
        plan.skeleton_task = asyncio.create_task(self._run_skeleton(plan.skel, skel_reserved))
        self.tasks.append(plan.skeleton_task)
        yield SkeletonDelta(text=plan.skel.prefill)
        plan.parser.feed(plan.skel.prefill)  # the reply starts inside the first point line
        while plan.result is None and plan.fallback is None:
            for event in plan.handle(await self.queue.get()):
                yield event
        if plan.result is not None:
            yield plan.result
            return
        if plan.skeleton_task is not None:  # a fallback before the skeleton ended
            plan.skeleton_task.cancel()
            await asyncio.gather(plan.skeleton_task, return_exceptions=True)
        await plan.executor.cancel()
        self.executor = None
        fallback = self._sequential(plan.fallback, shown=plan.merger.answer)
        async with contextlib.aclosing(fallback) as events:
            async for event in events:
                yield event

    async def _run_skeleton(self, skel: _Skeleton, reserved: int) -> None:
        used = 0
        cached = None
        finish: str | None = None
        error: BaseException | None = None
        try:
            if reserved > 0:
                room = self.backend.room(len(skel.prompt_ids), reserved)
                # the skeleton is on every point's critical path: served first
                params = self._params(
                    room, priority=SKELETON_PRIORITY, jump_forward=self.skeleton_jumps
                )
                stream = self.backend.complete(skel.prompt_ids, params)
                async with contextlib.aclosing(stream):
                    async for chunk in stream:
                        used += len(chunk.token_ids) if chunk.token_ids is not None else 1
                        cached = chunk.cached_tokens
                        finish = chunk.finish_reason
                        await self.queue.put(_SkeletonChunk(chunk.text, chunk.token_ids))
        except asyncio.CancelledError:
            pass  # stopped early on purpose; the backend aborted the request
        except Exception as exc:
            error = exc
        self.budget.refund(reserved, used)
        self._count(len(skel.prompt_ids), used, cached)
        await self.queue.put(_SkeletonEnded(finish, error))


class _Plan:
    """One skeleton answer while it streams: the skeleton's text and parser, the point
    executor, and the in-order merge. :meth:`handle` takes each message the skeleton
    task and the point tasks put on the queue and returns the events it causes; the
    answer is over when :attr:`result` (the ``done`` event) or :attr:`fallback` (why
    it goes sequential instead) is set."""

    def __init__(self, run: _AnswerRun, mode: ResolvedMode) -> None:
        self.run = run
        self.mode = mode
        opts = run.opts
        self.skel = run.skeleton(mode)  # opens with the request's system text
        self.parser = SkeletonParser(max_points=opts.max_points)
        self.merger = InOrderMerger()
        self.point_template = prompts.load(_POINT_TEMPLATE[mode])
        self.executor = run.executor = PointExecutor(
            run.backend,
            self.build_prompt,
            # No stop strings: the writer ends a point on its text (a blank line that
            # opens a point must not end it, as a stop string would). Line breaks
            # and colons are barred (a point is one paragraph of prose) and a
            # minimum length keeps the model from ending a point before it said
            # anything.
            run._params(
                opts.point_max_tokens,
                min_tokens=min(opts.point_min_tokens, opts.point_max_tokens),
                repetition_penalty=opts.point_repetition_penalty or opts.repetition_penalty,
                logit_bias={
                    **run.point_bans,
                    **opts.logit_bias,
                },
            ),
            run.budget,
            run.queue,
            expected_points=opts.max_points,
            soft_tokens=max(1, round(opts.point_max_tokens * POINT_SOFT_SHARE)),
            wrap_up_share=opts.point_wrap_up,
        )
        self.skeleton_task: asyncio.Task[None] | None = None
        self.pending: list[PlanPoint] = []  # parsed, not yet launched (not pipelining)
        self.announced: set[int] = set()  # points whose heading the merger has
        self.points: list[PlanPoint] | None = None  # the final plan, once the skeleton ended
        self.budget_cut = False
        self.result: Done | None = None
        self.fallback: str | None = None

    def build_prompt(self, point: PlanPoint, parents: list[tuple[PlanPoint, str]]) -> list[int]:
        """A point's prompt: the skeleton request's own tokens, then the point's turn.

        The prompt should leave the context room for a whole point. In graph mode
        the parents' texts are shortened until it does (down to their titles: the
        point's own turn matters more than their wording); a prompt that still leaves
        less than the point's minimum raises :class:`PointPromptTooLongError`, and
        the plan falls back to sequential decoding.
        """
        # A pipelined point sees the skeleton up to its own line, otherwise all of it;
        # either way its prompt does not depend on timing.
        upto = (
            self.parser.line_ends[point.index]
            if self.run.opts.pipeline
            else self.parser.consumed_chars
        )
        head = self.skel.prompt_ids + self.skel.reply_ids(upto, self.run.renderer)

        def prompt(cap: int | None) -> list[int]:
            values: dict[str, object] = {"index": point.index, "title": point.title}
            if self.mode == "graph":
                values["parents"] = _parents_block(parents, cap)
            turn = self.point_template.messages(**values)
            return head + self.run.renderer.continuation(self.skel.messages, turn)

        ids = prompt(None)
        limit = self.run.backend.max_model_len
        want = self.run.point_tokens()
        if limit is None or len(ids) + want <= limit:
            return ids
        if self.mode == "graph" and parents:
            # the longest cut of each parent's text (in characters) that fits; the
            # prompt grows with the cut, so a binary search finds it in a few renders
            lo, hi, best = 0, max(len(text) for _, text in parents), None
            while lo <= hi:
                cap = (lo + hi) // 2
                candidate = prompt(cap)
                if len(candidate) + want <= limit:
                    best, lo = candidate, cap + 1
                else:
                    hi = cap - 1
            ids = best if best is not None else prompt(0)
        floor = max(1, min(self.run.opts.point_min_tokens, want))
        if len(ids) + floor > limit:
            raise PointPromptTooLongError(
                f"point {point.index}'s prompt ({len(ids)} tokens) leaves less than its "
                f"{floor} tokens of the context length ({limit})"
            )
        return ids  # the backend cuts the point's cap to what is left (Backend.room)

    def handle(self, item: object) -> list[Event]:
        """The events one queue message causes."""
        if isinstance(item, _SkeletonChunk):
            events = self.on_skeleton_chunk(item)
        elif isinstance(item, _SkeletonEnded):
            events = self.on_skeleton_ended(item)
        elif isinstance(item, PointText):
            events = self.on_point_text(item)
        elif isinstance(item, PointFinished):
            events = self.on_point_finished(item)
        elif isinstance(item, PointFailed):
            if isinstance(item.error, PointPromptTooLongError):
                return self._fall_back(str(item.error))
            raise item.error
        else:
            raise TypeError(f"unexpected message {item!r}")
        if self.points is not None and self.merger.complete and self.executor.finished:
            finish = "length" if self.budget_cut else "stop"
            self.result = self.run._done(
                self.mode, self.merger.answer, self.points, finish_reason=finish
            )
        return events

    def on_skeleton_chunk(self, item: _SkeletonChunk) -> list[Event]:
        skel = self.skel
        skel.text += item.text
        skel.chunks.append((item.token_ids, len(skel.text)))
        events: list[Event] = [SkeletonDelta(text=item.text)] if item.text else []
        new = self.parser.feed(item.text)
        if self.parser.finished and self.skeleton_task is not None:
            self.skeleton_task.cancel()  # the list is over: stop paying for junk after it
        self.pending.extend(new)
        if self.run.opts.pipeline:
            events += self._start_pending()
        else:
            # the points wait for the whole skeleton, but the answer need not: it
            # starts with point 1's heading as soon as its line is parsed
            for point in new:
                events += self._announce(point)
        if not self.announced:
            # Before that, the heading's start as the skeleton writes it, from its
            # first token on: the first answer token comes when sequential's would.
            # It is true whatever follows: point 1's heading continues it, and a plan
            # that falls back continues it in its sequential reply.
            events += self._answer(self.merger.preview(title_preview(self.parser.open_line)))
        return events

    def on_skeleton_ended(self, item: _SkeletonEnded) -> list[Event]:
        if item.error is not None:
            raise item.error
        self.pending.extend(self.parser.close(truncated=item.finish_reason == "length"))
        self.run.skeleton_s = self.run._elapsed()
        self.executor.expected_points = len(self.parser.points)
        if len(self.parser.points) < 2:
            return self._fall_back(f"the skeleton had {len(self.parser.points)} usable point(s)")
        events = self._start_pending()
        self.points = self.executor.close()
        events.append(PlanReady(mode=self.mode, points=self.points, route=self.run.route))
        return events + self._answer(self.merger.close())

    def _fall_back(self, why: str) -> list[Event]:
        """Give up the plan: the answer goes on with sequential decoding."""
        self.fallback = f"{why}; answered with sequential decoding"
        return [PlanReady(mode="sequential", points=[], route=self.run.route,
                          fallback=self.fallback)]  # fmt: skip

    def on_point_text(self, item: PointText) -> list[Event]:
        events: list[Event] = [PointDelta(index=item.index, text=item.text)]
        return events + self._answer(self.merger.delta(item.index, item.text))

    def on_point_finished(self, item: PointFinished) -> list[Event]:
        self.run._count(
            item.prompt_tokens, item.completion_tokens, item.cached_tokens, item.requests
        )
        self.budget_cut |= item.budget_cut
        done = PointDone(
            index=item.index, text=item.text, finish_reason=item.finish_reason,
            completion_tokens=item.completion_tokens, prompt_tokens=item.prompt_tokens,
            cached_tokens=item.cached_tokens,
        )  # fmt: skip
        self.executor.mark_done(item.index, item.text)
        return [done, *self._answer(self.merger.done(item.index))]

    def _start_pending(self) -> list[Event]:
        """Launch the parsed points. The answer starts with point 1 as soon as its line
        is parsed; should the skeleton end with fewer than 2 points, the sequential
        fallback continues from the text already shown, so nothing is taken back."""
        events: list[Event] = []
        for point in self.pending:
            self.executor.add(point)
            events.append(PointStart(point=point))
            events += self._announce(point)
        self.pending.clear()
        return events

    def _announce(self, point: PlanPoint) -> list[Event]:
        """Give the merger ``point``'s heading (once): it shows now if every point
        before it is done (point 1 at once)."""
        if point.index in self.announced:
            return []
        self.announced.add(point.index)
        try:
            text = self.merger.add_point(point.index, point.title)
        except PreviewMismatchError:
            # the skeleton's first line became something else than its preview
            return self._fall_back("point 1's heading did not continue its preview")
        return self._answer(text + self.merger.release())

    def _answer(self, text: str) -> list[Event]:
        delta = self.run._answer_delta(text)
        return [] if delta is None else [delta]


def _parents_block(parents: list[tuple[PlanPoint, str]], cap: int | None = None) -> str:
    """The "points written so far" of a graph point prompt, each parent's text cut to
    ``cap`` characters (at a word end, marked with an ellipsis) if given; a parent cut
    to nothing is its title alone."""
    lines = []
    for parent, text in parents:
        text = text.strip()
        if cap is not None and len(text) > cap:
            cut = text[:cap]
            if not text[cap].isspace():  # mid-word: back to the end of the word before
                cut = cut[: max(cut.rfind(" "), 0)]
            text = f"{cut.rstrip()}\u2026" if cut.strip() else ""
        lines.append(f"{parent.index}. {parent.title}: {text}" if text else
                     f"{parent.index}. {parent.title}")  # fmt: skip
    return "\n".join(lines) or "(none)"
