"""sotserve.client.AsyncClient: against a real ``sotserve serve`` and against fakes.

The ``slow`` tests talk to a real server process with the embedded SmolLM2 (the
session fixture ``sotserve_url``). The others use tiny aiohttp servers written in
this file, each saying why: they fake faults the real server cannot produce on
demand (a slow or dying server, an in-band error, a 429, a proxy's 502 page, SSE
cut at odd places) or let the test see exactly what the client sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from live_server import free_port

from sotserve.client import (
    APIConnectionError,
    APIError,
    APITimeoutError,
    AsyncClient,
    BadRequestError,
    ChatResult,
    InternalServerError,
    NotFoundError,
    RateLimitError,
    SotserveError,
)
from sotserve.schemas import (
    AnswerDelta,
    Done,
    PlanReady,
    PointDelta,
    PointDone,
    PointStart,
    SkeletonDelta,
)

QUESTION = "How can I improve my time management skills?"
# Small budgets keep the real-server tests quick on a 2-core CPU.
SMALL = {"max_tokens": 120, "point_max_tokens": 24, "max_points": 3}

slow = pytest.mark.slow


# --------------------------------------------------------------------------- real server


@slow
async def test_chat_sot(sotserve_url: str) -> None:
    async with AsyncClient(sotserve_url) as client:
        result = await client.chat(QUESTION, "sot", **SMALL)
    assert isinstance(result, ChatResult)
    assert result.id.startswith("chatcmpl-")
    assert result.model
    assert result.content.strip()
    assert result.finish_reason in ("stop", "length")
    assert result.sot is not None
    assert result.mode == "sot"
    assert result.points is not None and len(result.points) >= 2
    assert [p.index for p in result.points] == list(range(1, len(result.points) + 1))
    # every title appears in the answer, in skeleton order
    pos = [result.content.find(f"**{p.title}**") for p in result.points]
    assert -1 not in pos and pos == sorted(pos)
    for p in result.points:
        assert p.text.strip() in result.content
    assert result.timings is not None and result.timings.total_s > 0
    # usage is the sum over every request of the answer, as sot.usage says
    u, su = result.usage, result.sot.usage
    assert u.prompt_tokens == su.prompt_tokens > 0
    assert u.completion_tokens == su.completion_tokens > 0
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert u.cached_tokens == su.cached_tokens
    assert su.requests >= 1 + len(result.points)  # skeleton + one per point
    assert u.completion_tokens <= SMALL["max_tokens"]


@slow
async def test_chat_sequential_with_message_list(sotserve_url: str) -> None:
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    async with AsyncClient(sotserve_url) as client:
        result = await client.chat(messages, "sequential", max_tokens=40)
    assert result.mode == "sequential"
    assert result.points == []
    assert "Paris" in result.content
    assert 0 < result.usage.completion_tokens <= 40
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens


@slow
async def test_stream_sot_events_in_order(sotserve_url: str) -> None:
    async with AsyncClient(sotserve_url) as client:
        events = [e async for e in client.stream(QUESTION, "sot", **SMALL)]
    kinds = [type(e) for e in events]
    allowed = {SkeletonDelta, PointStart, PlanReady, PointDelta, PointDone, AnswerDelta, Done}
    assert set(kinds) <= allowed
    done = events[-1]
    assert isinstance(done, Done) and kinds.count(Done) == 1
    assert done.mode == "sot" and len(done.points) >= 2
    first = {k: kinds.index(k) for k in (SkeletonDelta, PointStart, PlanReady)}
    assert first[SkeletonDelta] < first[PointStart] < first[PlanReady]
    plan = next(e for e in events if isinstance(e, PlanReady))
    started = [e.point for e in events if isinstance(e, PointStart)]
    assert started == plan.points == done.points
    # every PointStart comes before the plan is final, every PointDone after its start
    assert all(i < first[PlanReady] for i, k in enumerate(kinds) if k is PointStart)
    finished = [e.index for e in events if isinstance(e, PointDone)]
    assert sorted(finished) == [p.index for p in done.points]
    # the streamed answer is the final answer, and each point's deltas make its text
    assert "".join(e.text for e in events if isinstance(e, AnswerDelta)) == done.answer
    for d in (e for e in events if isinstance(e, PointDone)):
        grown = "".join(e.text for e in events if isinstance(e, PointDelta) and e.index == d.index)
        assert grown == d.text
    assert done.usage.completion_tokens > 0 and done.timings.total_s > 0


def _answers(metrics: str, mode: str, outcome: str) -> float:
    m = re.search(
        rf'^sotserve_answers_total{{mode="{mode}",outcome="{outcome}"}} (\S+)$', metrics, re.M
    )
    return float(m.group(1)) if m else 0.0


async def _metrics(url: str) -> str:
    async with aiohttp.ClientSession() as s, s.get(f"{url}/metrics") as resp:
        return await resp.text()


@slow
async def test_break_out_of_stream_aborts_answer(sotserve_url: str) -> None:
    before = _answers(await _metrics(sotserve_url), "sot", "disconnected")
    async with AsyncClient(sotserve_url) as client:
        seen = []
        # a long answer, left as soon as its first point starts: a plain `break`,
        # no aclosing, so the generator's finalizer must close the response
        async for event in client.stream(QUESTION, "sot", max_tokens=2000, point_max_tokens=400):
            seen.append(event)
            if isinstance(event, PointStart):
                break
        assert not any(isinstance(e, Done) for e in seen)

        # the server saw the client go and counted the answer as disconnected
        for _ in range(100):
            metrics = await _metrics(sotserve_url)
            if _answers(metrics, "sot", "disconnected") > before:
                break
            await asyncio.sleep(0.1)
        assert _answers(metrics, "sot", "disconnected") > before

        # and the same client goes on working
        result = await client.chat("What is the capital of France?", "sequential", max_tokens=20)
        assert result.content.strip()


@slow
async def test_models_health_and_v1_base_url(sotserve_url: str) -> None:
    for base in (sotserve_url, sotserve_url + "/", sotserve_url + "/v1", sotserve_url + "/v1/"):
        async with AsyncClient(base) as client:
            assert await client.health() is True
            models = await client.models()
            assert len(models) == 1 and models[0]
    async with AsyncClient(sotserve_url + "/v1", model=models[0]) as client:
        result = await client.chat("Say hello.", "sequential", max_tokens=8)
        assert result.model == models[0] and result.content


@slow
@pytest.mark.parametrize(
    ("messages", "kw", "param", "message"),
    [
        (
            "Hi",
            {"max_points": 1},
            "sot",
            "sot.max_points: Input should be greater than or equal to 2",
        ),
        (
            [{"role": "user", "content": ""}],
            {},
            "messages",
            "the last message must be a non-empty user message",
        ),
    ],
)
async def test_bad_request(
    sotserve_url: str, messages: Any, kw: dict, param: str, message: str
) -> None:
    async with AsyncClient(sotserve_url) as client:
        with pytest.raises(BadRequestError) as info:
            await client.chat(messages, **kw)
        assert info.value.status == 400
        assert info.value.param == param
        assert info.value.type == "invalid_request_error"
        assert str(info.value) == info.value.message == message
        # a stream fails the same way, before any event
        with pytest.raises(BadRequestError) as info:
            async for _ in client.stream(messages, **kw):
                pytest.fail("no event expected")
        assert info.value.status == 400 and info.value.param == param


@slow
async def test_unknown_model(sotserve_url: str) -> None:
    async with AsyncClient(sotserve_url, model="no-such-model") as client:
        with pytest.raises(NotFoundError) as info:
            await client.chat("Hi", max_tokens=4)
    err = info.value
    assert err.status == 404 and err.param == "model" and err.code == "model_not_found"
    assert "no-such-model" in str(err)


# --------------------------------------------------------------------------- fakes

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture
async def fake_server() -> AsyncIterator[Callable[..., Awaitable[str]]]:
    """``await fake_server(handler)`` serves ``handler`` at POST /v1/chat/completions
    (or ``routes={(method, path): handler}``) on 127.0.0.1; returns the base URL."""
    servers: list[TestServer] = []

    async def start(handler: Handler | None = None, routes: dict | None = None) -> str:
        app = web.Application()
        if handler is not None:
            app.router.add_post("/v1/chat/completions", handler)
        for (method, path), h in (routes or {}).items():
            app.router.add_route(method, path, h)
        # handler_cancellation: a client that leaves cancels its handler, as in sotserve
        server = TestServer(app, host="127.0.0.1", handler_cancellation=True)
        await server.start_server()
        servers.append(server)
        return f"http://127.0.0.1:{server.port}"

    yield start
    for s in servers:
        await s.close()


def sse(obj: Any) -> bytes:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode()


def chunk(content: str | None = None, events: list[dict] | None = None, finish=None) -> dict:
    delta = {} if content is None else {"content": content}
    out: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "model": "fake",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    if events is not None:
        out["sot"] = {"events": events}
    return out


async def sse_response(request: web.Request, *payloads: Any) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    for p in payloads:
        await resp.write(sse(p))
    return resp


POINT = {"index": 1, "title": "Plan", "depends_on": []}
TIMINGS = {"total_s": 0.5}
USAGE = {"prompt_tokens": 10, "completion_tokens": 4, "cached_tokens": 2, "requests": 2}
DONE = {
    "type": "done", "mode": "sot", "answer": "1. **Plan** naïve ✓ 😀", "points": [POINT],
    "timings": TIMINGS, "usage": USAGE, "finish_reason": "stop",
}  # fmt: skip
POINT_DONE = {
    "type": "point_done", "index": 1, "text": "naïve ✓ 😀", "finish_reason": "stop",
    "completion_tokens": 4, "prompt_tokens": 10,
}  # fmt: skip
STREAM = [
    chunk(""),  # the role chunk: empty content, no event
    chunk(events=[{"type": "skeleton_delta", "text": "1. Plan"}]),
    chunk(events=[{"type": "point_start", "point": POINT}]),
    chunk(events=[{"type": "plan_ready", "mode": "sot", "points": [POINT]}]),
    chunk(events=[{"type": "point_delta", "index": 1, "text": "naïve ✓ 😀"}]),
    chunk("1. **Plan** "),
    chunk("naïve ✓ 😀"),
    chunk(events=[POINT_DONE]),
    chunk(events=[DONE], finish="stop"),
    {"id": "chatcmpl-1", "object": "chat.completion.chunk", "choices": [], "usage": {}},
]
EXPECTED_TYPES = [
    SkeletonDelta, PointStart, PlanReady, PointDelta, AnswerDelta, AnswerDelta, PointDone, Done,
]  # fmt: skip


async def test_stream_parses_sse_split_at_every_byte(fake_server) -> None:
    # Fake: the real server writes whole events; this one writes one byte at a time
    # with CRLF line ends, comments, extra fields, a multi-line data field and
    # multi-byte UTF-8, the way a proxy or another server may deliver a stream.
    lines = [": keep-alive", "event: message", "retry: 1000"]
    for i, obj in enumerate(STREAM):
        text = json.dumps(obj, ensure_ascii=False)
        if i == 3:  # one event's JSON over two data lines (joined by "\n": still JSON)
            cut = text.index(",")
            lines += [f"data: {text[: cut + 1]}", f"data:{text[cut + 1 :]}", ""]
        else:
            lines += [f"id: {i}", f"data: {text}", ""]
    lines += [": unknown events are skipped, not fatal"]
    lines += ["data: " + json.dumps(chunk(events=[{"type": "from_the_future", "x": 1}])), ""]
    lines += ["data: [DONE]", ""]
    raw = ("\r\n".join(lines) + "\r\n").encode()

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(len(raw)):
            await resp.write(raw[i : i + 1])
            if i % 7 == 0:
                await asyncio.sleep(0)
        return resp

    url = await fake_server(handler)
    async with AsyncClient(url) as client:
        events = [e async for e in client.stream("q", "sot")]
    assert [type(e) for e in events] == EXPECTED_TYPES
    assert "".join(e.text for e in events if isinstance(e, AnswerDelta)) == DONE["answer"]
    assert events[-1] == Done.model_validate(DONE)


async def test_request_wire_format(fake_server) -> None:
    # Fake: it records exactly what the client sends, and answers as a plain
    # OpenAI server would (no `sot` extension).
    seen: list[tuple[dict, dict]] = []

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        seen.append((body, dict(request.headers)))
        if body["stream"]:
            return await sse_response(request, chunk("Hel"), chunk("lo", finish="stop"), "[DONE]")
        return web.json_response(
            {
                "id": "chatcmpl-9", "object": "chat.completion", "model": "m",
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": "Hello"},
                     "finish_reason": "length"}
                ],
                "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7,
                          "prompt_tokens_details": {"cached_tokens": 3}},
            }
        )  # fmt: skip

    url = await fake_server(chat)
    async with AsyncClient(url + "/v1/", api_key="sk-test") as client:
        result = await client.chat("hi")
        assert seen[-1][0] == {"messages": [{"role": "user", "content": "hi"}], "stream": False}
        assert seen[-1][1]["Authorization"] == "Bearer sk-test"
        assert result.content == "Hello" and result.finish_reason == "length"
        assert result.id == "chatcmpl-9" and result.model == "m"
        assert result.usage.model_dump() == {
            "prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7, "cached_tokens": 3,
        }  # fmt: skip
        assert result.sot is None and result.mode is None
        assert result.points is None and result.timings is None

        events = [
            e
            async for e in client.stream(
                [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
                "graph",
                max_tokens=50,
                temperature=0.5,
                seed=7,
                max_points=4,
                pipeline=False,
            )
        ]
    # a plain server sends no planner events: the client ends the stream with its own
    # Done (sequential, the answer, the finish reason, timings measured here)
    assert events[:2] == [AnswerDelta(text="Hel"), AnswerDelta(text="lo")]
    done = events[2]
    assert isinstance(done, Done) and len(events) == 3
    assert (done.mode, done.answer, done.finish_reason) == ("sequential", "Hello", "stop")
    assert done.usage.requests == 1 and done.points == []
    assert 0 < done.timings.first_answer_token_s <= done.timings.total_s
    body, headers = seen[-1]
    assert body == {
        "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
        "max_tokens": 50,
        "temperature": 0.5,
        "seed": 7,
        "stream": True,
        "stream_options": {"include_usage": True},
        "sot": {"mode": "graph", "max_points": 4, "pipeline": False},
    }
    assert headers["Accept"] == "text/event-stream"

    # the client's default model is sent unless a call names another
    async with AsyncClient(url, model="default-m") as client:
        await client.chat("hi", top_p=0.9)
        assert seen[-1][0]["model"] == "default-m" and seen[-1][0]["top_p"] == 0.9
        await client.chat("hi", model="other", point_max_tokens=8, router="model")
        assert seen[-1][0]["model"] == "other"
        assert seen[-1][0]["sot"] == {"point_max_tokens": 8, "router": "model"}


async def test_connection_refused() -> None:
    # nothing listens on a fresh free port
    url = f"http://127.0.0.1:{free_port()}"
    async with AsyncClient(url, timeout=5) as client:
        with pytest.raises(APIConnectionError) as info:
            await client.chat("hi")
        assert not isinstance(info.value, APITimeoutError)
        assert f"{url}/v1/chat/completions" in str(info.value)
        assert info.value.url == f"{url}/v1/chat/completions"
        with pytest.raises(APIConnectionError, match=re.escape(url)):
            async for _ in client.stream("hi"):
                pass
        with pytest.raises(APIConnectionError, match=re.escape(f"{url}/v1/models")):
            await client.models()
        assert await client.health() is False


async def test_timeout(fake_server) -> None:
    # Fake: a slow server, which sleeps before answering (or mid-stream).
    release = asyncio.Event()

    async def slow_chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if body["stream"]:
            resp = await sse_response(request, chunk("first"))
            await release.wait()
            return resp
        await release.wait()
        return web.json_response({})

    async def slow_health(request: web.Request) -> web.Response:
        await release.wait()
        return web.json_response({"status": "ok"})

    url = await fake_server(slow_chat, routes={("GET", "/health"): slow_health})
    try:
        async with AsyncClient(url, timeout=0.3) as client:
            with pytest.raises(APITimeoutError) as info:
                await client.chat("hi")
            assert isinstance(info.value, APIConnectionError)
            assert f"{url}/v1/chat/completions" in str(info.value)
            assert "0.3 s" in str(info.value) and info.value.timeout == 0.3

            seen = []
            with pytest.raises(APITimeoutError):
                async for event in client.stream("hi"):
                    seen.append(event)
            assert seen == [AnswerDelta(text="first")]  # what came before the stall

            assert await client.health() is False
    finally:
        release.set()


@pytest.mark.parametrize(
    ("error", "cls", "status"),
    [
        ({"message": "backend died", "type": "server_error", "code": "backend_error"},
         InternalServerError, 500),
        ({"message": "too long", "type": "invalid_request_error", "param": None,
          "code": "context_length_exceeded"}, BadRequestError, 400),
        # vLLM puts the status in `code`
        ({"message": "overloaded", "type": "ServiceUnavailableError", "code": 503},
         InternalServerError, 503),
    ],
)  # fmt: skip
async def test_mid_stream_error(fake_server, error: dict, cls: type, status: int) -> None:
    # Fake: the real server reports a backend failure after its 200 status line as
    # an in-band error chunk; a backend cannot be made to fail on demand.
    async def handler(request: web.Request) -> web.StreamResponse:
        return await sse_response(request, chunk("partial "), {"error": error}, "[DONE]")

    url = await fake_server(handler)
    seen = []
    async with AsyncClient(url) as client:
        with pytest.raises(cls) as info:
            async for event in client.stream("hi"):
                seen.append(event)
    assert seen == [AnswerDelta(text="partial ")]
    err = info.value
    assert err.status == status and str(err) == error["message"]
    assert err.type == error["type"] and err.code == str(error["code"])


@pytest.mark.parametrize(
    ("status", "body", "cls", "message"),
    [
        (429, {"error": {"message": "too many answers waiting", "type": "rate_limit_error",
                         "param": None, "code": "rate_limit"}},
         RateLimitError, "too many answers waiting"),
        (502, "<html><body>502 Bad Gateway</body></html>", InternalServerError,
         "<html><body>502 Bad Gateway</body></html>"),
        (413, {"error": {"message": "request body too large", "type": "invalid_request_error",
                         "param": None, "code": None}}, BadRequestError, "request body too large"),
        (401, {"error": "unauthorized"}, APIError, "unauthorized"),
        (503, "", InternalServerError, "HTTP 503 Service Unavailable"),
    ],
)  # fmt: skip
async def test_http_errors(fake_server, status: int, body: Any, cls: type, message: str) -> None:
    # Fake: a full admission queue (429), a proxy's HTML page (502) and the like are
    # hard to produce from the real server on demand.
    async def handler(request: web.Request) -> web.Response:
        if isinstance(body, dict):
            return web.json_response(body, status=status)
        return web.Response(text=body, status=status, content_type="text/html")

    url = await fake_server(handler)
    async with AsyncClient(url) as client:
        for call in (lambda: client.chat("hi"), lambda: anext(client.stream("hi"))):
            with pytest.raises(cls) as info:
                await call()
            err = info.value
            assert type(err) is cls and isinstance(err, SotserveError)
            assert err.status == status and str(err) == err.message == message
            if isinstance(body, dict) and isinstance(body["error"], dict):
                assert err.type == body["error"]["type"] and err.code == body["error"]["code"]


async def test_dropped_and_truncated_streams(fake_server) -> None:
    # Fake: a server that dies mid-answer (connection cut) or ends the stream
    # without its [DONE] line.
    async def handler(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        resp = await sse_response(request, chunk("so far"))
        if body["messages"][0]["content"] == "cut":
            request.transport.close()
        return resp

    url = await fake_server(handler)
    chat_url = f"{url}/v1/chat/completions"
    async with AsyncClient(url) as client:
        for question, match in (("cut", "failed"), ("eof", "ended before")):
            seen = []
            with pytest.raises(APIConnectionError, match=match) as info:
                async for event in client.stream(question):
                    seen.append(event)
            assert seen == [AnswerDelta(text="so far")]
            assert chat_url in str(info.value) and not isinstance(info.value, APITimeoutError)


async def test_closing_the_stream_closes_the_response(fake_server) -> None:
    # Fake: a server that streams forever and records when its client leaves.
    left = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            while True:
                await resp.write(sse(chunk("tick ")))
                await asyncio.sleep(0.01)
        except (asyncio.CancelledError, ConnectionResetError):
            left.set()
            raise

    url = await fake_server(handler)
    async with AsyncClient(url) as client:
        async with contextlib.aclosing(client.stream("hi")) as events:
            async for event in events:
                assert event == AnswerDelta(text="tick ")
                break
        await asyncio.wait_for(left.wait(), 5)  # the server saw the client go
        left.clear()

        # a plain break, without aclosing, closes it too once the generator is dropped
        async for _ in client.stream("hi"):
            break
        await asyncio.wait_for(left.wait(), 5)


async def test_close_and_reuse(fake_server) -> None:
    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "a"}, {"id": "b"}]})

    url = await fake_server(routes={("GET", "/health"): health, ("GET", "/v1/models"): models})
    client = AsyncClient(url)  # no running loop needed to build it
    assert await client.health() is True
    assert await client.models() == ["a", "b"]
    await client.close()
    await client.close()  # twice is fine
    assert await client.models() == ["a", "b"]  # a new session after close
    await client.close()


async def test_plain_server_stream_ends_with_a_done_carrying_its_usage(fake_server) -> None:
    # Fake: a plain OpenAI server (vLLM, SGLang) with a usage chunk and no `sot` field.
    async def chat(request: web.Request) -> web.StreamResponse:
        usage = {
            "id": "chatcmpl-1", "object": "chat.completion.chunk", "choices": [],
            "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11,
                      "prompt_tokens_details": {"cached_tokens": 4}},
        }  # fmt: skip
        return await sse_response(request, chunk("A"), chunk("B", finish="length"), usage, "[DONE]")

    url = await fake_server(chat)
    async with AsyncClient(url) as client:
        events = [e async for e in client.stream("q", max_tokens=2)]
    done = events[-1]
    assert isinstance(done, Done) and done.answer == "AB" and done.finish_reason == "length"
    assert done.usage.model_dump() == {
        "prompt_tokens": 9, "completion_tokens": 2, "cached_tokens": 4, "requests": 1,
    }  # fmt: skip
