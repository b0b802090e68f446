"""sotserve.openai_http: the one OpenAI HTTP client toolkit the client, the HTTP backend,
the judge and the eval runner share.

Pure functions are tested on their own; the aiohttp parts against tiny aiohttp servers
written here, which send exactly the bytes each test needs (split SSE, a huge event, a
route missing) — what a real engine cannot be made to send on demand.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from live_server import free_port

from sotserve.openai_http import (
    ErrorReply,
    InvalidResponse,
    ResponseError,
    SSEParser,
    SSEStream,
    auth_headers,
    describe,
    get_models,
    json_object,
    reset_prefix_cache,
    root_url,
)

# -- addressing ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "base",
    [
        "http://h:8000",
        "http://h:8000/",
        "http://h:8000/v1",
        "http://h:8000/v1/",
        " http://h:8000//",
    ],
)
def test_root_url_accepts_what_users_write(base: str) -> None:
    assert root_url(base) == "http://h:8000"


def test_root_url_keeps_a_path_prefix() -> None:
    # behind a proxy the server may live under a path; only /v1 is the API's own
    assert root_url("https://gw.example/llm/v1/") == "https://gw.example/llm"
    assert root_url("http://h/v1x") == "http://h/v1x"


def test_auth_headers() -> None:
    assert auth_headers("sk-1") == {"Authorization": "Bearer sk-1"}
    assert auth_headers(None) == {} and auth_headers("") == {}


def test_describe() -> None:
    assert describe(TimeoutError()) == "timed out"
    assert describe(aiohttp.ClientPayloadError("cut")) == "ClientPayloadError: cut"
    assert describe(aiohttp.ServerDisconnectedError()).startswith("ServerDisconnectedError")


# -- error bodies ----------------------------------------------------------------------------


def test_openai_error_body() -> None:
    body = {"error": {"message": "too long", "type": "invalid_request_error",
                      "param": "messages", "code": "context_length_exceeded"}}  # fmt: skip
    reply = ErrorReply.parse(json.dumps(body).encode(), 400, "Bad Request")
    assert (reply.status, reply.message, reply.type, reply.param, reply.code) == (
        400, "too long", "invalid_request_error", "messages", "context_length_exceeded",
    )  # fmt: skip
    assert reply.named_status is None and reply.body == body


def test_vllm_puts_the_status_in_code() -> None:
    reply = ErrorReply.parse('{"error": {"message": "overloaded", "type": "X", "code": 503}}')
    assert reply.status is None  # no status line: in-band
    assert reply.code == 503 and reply.named_status == 503


def test_vllm_older_top_level_error_object() -> None:
    raw = json.dumps(
        {
            "object": "error",
            "message": "bad n",
            "type": "BadRequestError",
            "param": "n",
            "code": 400,
        }
    )
    reply = ErrorReply.parse(raw, 400)
    assert (reply.message, reply.type, reply.param, reply.code) == (
        "bad n",
        "BadRequestError",
        "n",
        400,
    )


@pytest.mark.parametrize(
    ("raw", "status", "reason", "message"),
    [
        ('{"error": "unauthorized"}', 401, None, "unauthorized"),
        ('{"detail": "Not Found"}', 404, None, "Not Found"),  # FastAPI's
        ("<html>502 Bad Gateway</html>\n", 502, None, "<html>502 Bad Gateway</html>"),
        ("", 503, "Service Unavailable", "HTTP 503 Service Unavailable"),
        ("  ", 504, None, "HTTP 504 Gateway Timeout"),  # the phrase without a reason
        ("", None, None, "unknown error"),
        ('{"status": "down"}', 503, None, '{"status": "down"}'),  # says nothing: the text
    ],
)
def test_other_error_bodies(raw: str, status: int | None, reason: str | None, message: str) -> None:
    reply = ErrorReply.parse(raw.encode(), status, reason)
    assert reply.message == message and reply.status == status


def test_an_odd_field_does_not_hide_the_rest() -> None:
    body = {"error": {"message": None, "type": "server_error", "param": ["a"], "code": True,
                      "detail": "engine died"}}  # fmt: skip
    reply = ErrorReply.parse(json.dumps(body), 500)
    assert reply.message == "engine died" and reply.type == "server_error"
    assert reply.param is None
    assert reply.named_status is None  # true is no status


def test_brief_cuts_long_messages() -> None:
    reply = ErrorReply.parse("x" * 2000, 422)
    assert reply.message == "x" * 2000
    assert reply.brief() == "x" * 500 + "..." and reply.brief(10) == "x" * 10 + "..."
    assert ErrorReply.parse("short", 422).brief() == "short"


def test_json_object() -> None:
    assert json_object(b'{"a": 1}') == {"a": 1}
    with pytest.raises(InvalidResponse, match="invalid JSON"):
        json_object("{not json")
    with pytest.raises(InvalidResponse, match="not a JSON object"):
        json_object("[1, 2]")
    with pytest.raises(ResponseError) as info:
        json_object('{"error": {"message": "backend died", "type": "server_error"}}')
    reply = info.value.reply
    assert str(info.value) == reply.message == "backend died"
    assert reply.status is None and reply.type == "server_error"


# -- SSE -------------------------------------------------------------------------------------


def test_sse_parser_any_split() -> None:
    body = (
        b': hi\r\ndata: {"a": "\xc3\xa9\xe2\x9c\x93"}\r\n\r\n'
        b"data:x\rdata: y\r\rid: 3\ndata:  two spaces\n\n"
        b"data\nevent: e\ndata: after a bare data line\n\n"
        b"data: tail without blank line"
    )
    want = ['{"a": "é✓"}', "x\ny", " two spaces", "\nafter a bare data line"]
    for i in range(len(body) + 1):
        for j in range(i, len(body) + 1):
            p = SSEParser()
            got = p.feed(body[:i]) + p.feed(body[i:j]) + p.feed(body[j:]) + p.feed(b"", end=True)
            assert got == want, (i, j)


def test_sse_parser_end_of_stream() -> None:
    # CR-only line ends up to the very last byte: the held-back "\r" ends its line at EOF
    p = SSEParser()
    assert p.feed(b"data: [DONE]\r\r") == [] and p.feed(b"", end=True) == ["[DONE]"]
    # a UTF-8 character cut by the end of the stream is replaced, not lost silently
    p = SSEParser()
    assert p.feed(b"data: \xc3") == [] and p.feed(b"\n\n", end=True) == ["\ufffd"]


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[dict[tuple[str, str], Handler]], Awaitable[str]]]:
    """``await serve({(method, path): handler})`` on 127.0.0.1; returns the base URL."""
    servers: list[TestServer] = []

    async def start(routes: dict[tuple[str, str], Handler]) -> str:
        app = web.Application()
        for (method, path), handler in routes.items():
            app.router.add_route(method, path, handler)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return f"http://127.0.0.1:{server.port}"

    yield start
    for s in servers:
        await s.close()


def _writing(raw: bytes, step: int) -> Handler:
    """A handler that sends ``raw`` as an event stream, ``step`` bytes per write."""

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(0, len(raw), step):
            await resp.write(raw[i : i + step])
            await asyncio.sleep(0)
        return resp

    return handler


async def _payloads(url: str) -> tuple[list[str], bool]:
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        stream = SSEStream(resp)
        got = [data async for data in stream]
    return got, stream.done


async def test_sse_stream_reads_split_events_up_to_done(serve) -> None:
    events = ['data: {"t": "naïve ✓"}', ": ping", "data: 2", "data: [DONE]", "data: 3"]
    raw = "".join(f"{e}\r\n\r\n" for e in events)
    url = await serve({("GET", "/one"): _writing(raw.encode(), 1)})
    assert await _payloads(f"{url}/one") == (['{"t": "naïve ✓"}', "2"], True)


async def test_sse_stream_without_done_says_so(serve) -> None:
    url = await serve({("GET", "/cut"): _writing(b"data: 1\n\ndata: 2\n\n", 3)})
    assert await _payloads(f"{url}/cut") == (["1", "2"], False)


async def test_sse_stream_takes_an_event_longer_than_a_line_buffer(serve) -> None:
    # aiohttp's line iteration refuses lines past 512 KiB (LineTooLong); a chunk that
    # echoes a long prompt's token ids can be that long
    text = "word " * 200_000
    raw = f"data: {json.dumps({'text': text})}\n\ndata: [DONE]\n\n".encode()
    url = await serve({("GET", "/big"): _writing(raw, 1 << 16)})
    got, done = await _payloads(f"{url}/big")
    assert done and [json.loads(d)["text"] for d in got] == [text]


# -- routes ----------------------------------------------------------------------------------


async def test_get_models(serve) -> None:
    seen: list[str | None] = []

    async def models(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization"))
        return web.json_response({"object": "list", "data": [{"id": "m", "max_model_len": 8}, 3]})

    async def broken(request: web.Request) -> web.Response:
        return web.json_response({"error": {"message": "no", "type": "x"}}, status=401)

    async def odd(request: web.Request) -> web.Response:
        return web.json_response({"models": ["m"]})

    url = await serve({("GET", "/v1/models"): models})
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(headers=auth_headers("k")) as session:
        assert await get_models(session, url, timeout=timeout) == [{"id": "m", "max_model_len": 8}]
        assert seen == ["Bearer k"]
        for handler, error in ((broken, ResponseError), (odd, InvalidResponse)):
            other = await serve({("GET", "/v1/models"): handler})
            with pytest.raises(error) as info:
                await get_models(session, other, timeout=timeout)
        assert "without a data list" in str(info.value)


async def test_reset_prefix_cache(serve) -> None:
    seen: list[tuple[str, str, str | None]] = []

    def route(status: int) -> Handler:
        async def handler(request: web.Request) -> web.Response:
            seen.append((request.path_qs, request.method, request.headers.get("Authorization")))
            return web.json_response({}, status=status)

        return handler

    sglang = await serve({("POST", "/flush_cache"): route(200)})
    sotserve = await serve({("POST", "/reset_prefix_cache"): route(200)})
    neither = await serve({})
    async with aiohttp.ClientSession(headers=auth_headers("api")) as session:
        # the admin key replaces the session's API key
        assert await reset_prefix_cache(session, sglang, "admin") is True
        assert seen == [("/flush_cache", "POST", "Bearer admin")]
        seen.clear()
        params = {"prompt_heads": "false"}
        assert await reset_prefix_cache(session, sotserve, None, params=params) is True
        assert seen == [("/reset_prefix_cache?prompt_heads=false", "POST", "Bearer api")]
        assert await reset_prefix_cache(session, neither, "admin") is False
        gone = f"http://127.0.0.1:{free_port()}"
        assert await reset_prefix_cache(session, gone, "admin") is False
