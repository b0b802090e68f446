"""``POST /v1/chat/completions``: the planner behind OpenAI's chat schema.

Streaming answers are SSE ``chat.completion.chunk`` objects. The in-order merged
answer travels in ``choices[0].delta.content`` as any OpenAI client expects; every
other planner event (skeleton text, points starting, growing and finishing, the
final ``done`` with timings) travels in the extension field ``sot.events`` of a
chunk whose delta is empty, so plain clients ignore it. A non-streamed answer
carries the same summary in ``sot`` (:class:`sotserve.schemas.AnswerInfo`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from engine.chat_template import fewest_tokens
from engine.protocol import SSE_DONE, SSE_HEADERS, APIError
from engine.server import answer_timeout, send_sse
from engine.serving import AdmissionGate, OpenAIServing, ServerLimits, client_gone
from sotserve.planner import InvalidQuestionError, Planner
from sotserve.schemas import (
    AnswerDelta,
    AnswerInfo,
    Done,
    ErrorEvent,
    Event,
    PointDone,
    PointResult,
)
from sotserve.server.chat_schema import ChatCompletionRequest
from sotserve.server.metrics import Metrics

logger = logging.getLogger(__name__)


@dataclass
class _ChatResponse:
    """The HTTP side of one chat answer while it is produced: the response ids,
    timing and what the metrics need (the planner side is planner._AnswerRun)."""

    model: str
    requested_mode: str
    t0: float = field(default_factory=time.perf_counter)
    rid: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))
    first_token_s: float | None = None
    done: Done | None = None
    points: dict[int, PointDone] = field(default_factory=dict)

    def see(self, event: Event) -> None:
        if isinstance(event, AnswerDelta) and self.first_token_s is None:
            self.first_token_s = time.perf_counter() - self.t0
        elif isinstance(event, PointDone):
            self.points[event.index] = event
        elif isinstance(event, Done):
            self.done = event

    def envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.rid,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": choices,
        }

    def usage(self) -> dict[str, Any]:
        u = self.done.usage if self.done is not None else None
        prompt = u.prompt_tokens if u else 0
        completion = u.completion_tokens if u else 0
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": u.cached_tokens if u else 0},
        }

    def info(self) -> AnswerInfo:
        assert self.done is not None
        d = self.done
        points = []
        for p in d.points:
            done = self.points.get(p.index)
            extra = (
                {}
                if done is None
                else {
                    "text": done.text,
                    "finish_reason": done.finish_reason,
                    "completion_tokens": done.completion_tokens,
                    "cached_tokens": done.cached_tokens,
                }
            )
            points.append(PointResult(**p.model_dump(), **extra))
        return AnswerInfo(
            mode=d.mode, points=points, timings=d.timings, usage=d.usage,
            route=d.route, fallback=d.fallback,
        )  # fmt: skip

    @property
    def finish_reason(self) -> str:
        # OpenAI's schema has no null finish reason on a finished answer
        return (self.done.finish_reason if self.done else None) or "stop"


def _too_long(tokens: str, max_model_len: int) -> APIError:
    return APIError(
        400, f"the messages have {tokens} tokens; this model's context length is "
        f"{max_model_len}", param="messages", code="context_length_exceeded",
    )  # fmt: skip


def _error_api(event: ErrorEvent) -> APIError:
    """The HTTP error for a failed answer, by the planner's error kind: the caller's
    input 400, an overloaded backend 429, one that failed upstream 502, one that
    could not be reached 503, anything else 500."""
    if event.code == "invalid_request":
        return APIError(400, event.message, param=event.param, code=event.error_code)
    if event.code == "overloaded":
        return APIError(429, event.message, type="rate_limit_error", code="backend_overloaded")
    if event.code == "backend_unavailable":
        status = 502 if event.error_code == "bad_gateway" else 503
        return APIError(status, event.message, type="server_error", code=event.error_code)
    return APIError(500, event.message, type="server_error", code=event.code)


class ChatHandler(OpenAIServing):
    """Answers chat requests with ``planner``; one instance per app."""

    def __init__(
        self,
        planner: Planner,
        model_names: tuple[str, ...],
        limits: ServerLimits,
        gate: AdmissionGate,
        metrics: Metrics,
    ) -> None:
        super().__init__(model_names, limits, gate)
        self.planner = planner
        self.metrics = metrics

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await self.parse(request, ChatCompletionRequest)
        overrides = self._check(body)
        mode = overrides.pop("mode")
        answer = _ChatResponse(self.model_name, mode or self.planner.options.mode)
        outcome = "error"
        try:
            async with self.gate.admit("engine requests"):
                await self._check_context(body)
                events = self.planner.stream(body.turns(), mode, **overrides)
                timeout = self.limits.request_timeout_s
                deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
                async with contextlib.aclosing(events):
                    async with asyncio.timeout_at(deadline):
                        first = await self._first(events, answer)
                    if body.stream:
                        resp, outcome = await self._stream(
                            request, answer, first, events, body.include_usage(), deadline
                        )
                        return resp
                    async with asyncio.timeout_at(deadline):
                        resp = await self._collect(request, answer, first, events)
                    outcome = "ok"
                    return resp
        except APIError as exc:
            if exc.status == 429:
                outcome = "rejected"
                self.metrics.rejected.inc()
            raise
        except TimeoutError:
            raise answer_timeout() from None
        except ConnectionResetError:
            outcome = "disconnected"
            return web.Response(status=499)  # nginx's "client closed request", for the log
        except asyncio.CancelledError:
            outcome = "disconnected"
            raise
        finally:
            self._observe(answer, outcome)

    def _check(self, body: ChatCompletionRequest) -> dict[str, Any]:
        """Reject what the planner cannot do, before admission (nothing here costs
        more than a look at the body); returns the planner overrides."""
        if len(body.messages) > self.limits.max_messages:
            raise APIError(
                400, f"{len(body.messages)} messages; this server takes at most "
                f"{self.limits.max_messages}", param="messages",
            )  # fmt: skip
        overrides = body.plan_overrides()
        max_model_len = self.planner.backend.max_model_len
        max_tokens = overrides["max_tokens"]
        param = body.token_limit_param()
        if max_tokens is not None and max_model_len is not None and max_tokens > max_model_len:
            raise APIError(
                400, f"{param}={max_tokens} is more than this model's context length "
                f"({max_model_len})", param=param,
            )  # fmt: skip
        try:
            self.planner.resolve_options(**overrides)
        except ValidationError as exc:
            err = exc.errors()[0]
            name = str(err["loc"][0]) if err["loc"] else None
            raise APIError(400, f"{name}: {err['msg']}", param=name) from None
        if max_model_len is not None:
            chars = "".join(m.text() for m in body.messages)
            if fewest_tokens(self.planner.renderer.tokenizer, chars) >= max_model_len:
                raise _too_long(f"more than {max_model_len}", max_model_len)
        return overrides

    async def _check_context(self, body: ChatCompletionRequest) -> None:
        """The chat prompt must leave room in the context. Tokenized in a worker
        thread (a long prompt takes seconds, which would stall every stream); the
        renderer keeps the result, so the planner does not tokenize it again."""
        max_model_len = self.planner.backend.max_model_len
        if max_model_len is None:
            return
        ids = await asyncio.to_thread(self.planner.renderer.render, body.turns())
        if len(ids) >= max_model_len:
            raise _too_long(str(len(ids)), max_model_len)

    async def _first(self, events: AsyncIterator[Event], answer: _ChatResponse) -> Event:
        """The first event, before any status line: bad input is still a 4xx here."""
        try:
            first = await anext(events)
        except InvalidQuestionError as exc:
            raise APIError(400, str(exc), param="messages") from None
        if isinstance(first, ErrorEvent):
            raise _error_api(first)
        answer.see(first)
        return first

    async def _collect(
        self,
        request: web.Request,
        answer: _ChatResponse,
        first: Event,
        events: AsyncIterator[Event],
    ) -> web.Response:
        event: Event | None = first
        while not isinstance(event, Done):
            if isinstance(event, ErrorEvent):
                raise _error_api(event)
            if client_gone(request):
                # nobody to answer: leaving aborts every request of the answer
                raise ConnectionResetError("client disconnected")
            event = await anext(events, None)
            if event is None:
                raise APIError(500, "the answer ended without a result", type="server_error")
            answer.see(event)
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": event.answer},
            "logprobs": None,
            "finish_reason": answer.finish_reason,
        }
        out = answer.envelope("chat.completion", [choice])
        out["usage"] = answer.usage()
        out["sot"] = answer.info().model_dump(mode="json")
        return web.json_response(out)

    async def _stream(
        self,
        request: web.Request,
        answer: _ChatResponse,
        first: Event,
        events: AsyncIterator[Event],
        include_usage: bool,
        deadline: float | None,
    ) -> tuple[web.StreamResponse, str]:
        resp = web.StreamResponse(headers=SSE_HEADERS)
        await resp.prepare(request)

        def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict:
            c = answer.envelope(
                "chat.completion.chunk",
                [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
            )
            if include_usage:
                c["usage"] = None  # as OpenAI: null on all but the usage chunk
            c.update(extra)
            return c

        try:
            await send_sse(resp, chunk({"role": "assistant", "content": ""}))
            try:
                async with asyncio.timeout_at(deadline):
                    event: Event | None = first
                    while event is not None:
                        if isinstance(event, AnswerDelta):
                            await send_sse(resp, chunk({"content": event.text}))
                        elif isinstance(event, ErrorEvent):
                            # The status line is long gone: report in-band, as vLLM does.
                            await send_sse(resp, _error_api(event).body())
                            break
                        else:
                            sot = {"events": [event.model_dump(mode="json")]}
                            finish = answer.finish_reason if isinstance(event, Done) else None
                            await send_sse(resp, chunk({}, finish, sot=sot))
                            if isinstance(event, Done):
                                break
                        event = await anext(events, None)
                        if event is not None:
                            answer.see(event)
            except TimeoutError:
                await send_sse(resp, answer_timeout().body())
            if include_usage and answer.done is not None:
                final = answer.envelope("chat.completion.chunk", [])
                final["usage"] = answer.usage()
                await send_sse(resp, final)
            await send_sse(resp, SSE_DONE)
            await resp.write_eof()
        except ConnectionResetError:
            # The caller's aclosing block closes the planner stream, which aborts every
            # request of this answer.
            logger.debug("client left %s mid-stream", answer.rid)
            return resp, "disconnected"
        return resp, "ok" if answer.done is not None else "error"

    def _observe(self, answer: _ChatResponse, outcome: str) -> None:
        m = self.metrics
        mode = answer.done.mode if answer.done is not None else answer.requested_mode
        m.answers.labels(mode, outcome).inc()
        if answer.done is None:
            return
        if answer.first_token_s is not None:
            m.ttft.labels(mode).observe(answer.first_token_s)
        m.e2e.labels(mode).observe(time.perf_counter() - answer.t0)
        u = answer.done.usage
        m.tokens.labels(mode, "prompt").inc(u.prompt_tokens)
        m.tokens.labels(mode, "completion").inc(u.completion_tokens)
        m.tokens.labels(mode, "cached").inc(u.cached_tokens)
        if answer.done.points:
            m.points.labels(mode).observe(len(answer.done.points))
        if answer.done.fallback:
            m.fallbacks.inc()
