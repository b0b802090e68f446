"""HTTPBackend against sotserve's engine server (tiny model, real HTTP on 127.0.0.1)."""

from __future__ import annotations

import contextlib
import socket

import pytest
from aiohttp import web

from engine import AsyncEngine
from engine.server import build_app
from sotserve.backends import (
    BackendError,
    BackendOverloadedError,
    BackendRequestError,
    BackendUnavailableError,
    CompletionParams,
    HTTPBackend,
    LocalBackend,
)


@pytest.fixture
async def served(tiny_llama_dir):
    engine = AsyncEngine(str(tiny_llama_dir), kv_slots=512)
    runner = web.AppRunner(build_app(engine, "tiny"))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    backend = HTTPBackend(f"http://127.0.0.1:{port}", "tiny", tokenizer=engine.tokenizer)
    yield engine, backend
    await backend.close()
    await runner.cleanup()
    engine.close()


async def chunks(backend, prompt, params):
    return [c async for c in backend.complete(prompt, params)]


async def test_streams_the_same_tokens_as_the_local_engine(served):
    engine, http = served
    ids = engine.tokenizer.encode("Hello there", add_special_tokens=False)
    params = CompletionParams(max_tokens=12, temperature=0.0)
    local = await chunks(LocalBackend(engine), ids, params)
    remote = await chunks(http, ids, params)
    assert [t for c in remote for t in c.token_ids] == [t for c in local for t in c.token_ids]
    assert "".join(c.text for c in remote) == "".join(c.text for c in local)
    assert remote[-1].finish_reason == "length" and remote[-1].prompt_tokens == len(ids)
    # the local run left the prompt in the radix cache; the server reports the hit
    # (all but the last prompt token, which must be computed to sample from)
    assert remote[-1].cached_tokens == len(ids) - 1


async def test_rejected_request_is_a_typed_error(served):
    _, http = served
    with pytest.raises(BackendRequestError, match="HTTP 400") as info:
        await chunks(http, [1, 2, 3], CompletionParams(max_tokens=10**9))
    assert info.value.param == "max_tokens"


async def test_unreachable_server_is_a_backend_error(tokenizer):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again below: nobody listens there
    backend = HTTPBackend(f"http://127.0.0.1:{port}", tokenizer=tokenizer, timeout=5)
    with pytest.raises(BackendError, match=r"127\.0\.0\.1"):
        await chunks(backend, [1, 2], CompletionParams(max_tokens=2))
    await backend.close()


# -- failures a real engine cannot be made to produce on cue ------------------------------
# A small aiohttp upstream stands in for vLLM here (faked: 429s, 5xx, stalls and a
# given text stream cannot be had from a real engine on demand).


def _sse(event: dict) -> bytes:
    import json

    return f"data: {json.dumps(event)}\n\n".encode()


@pytest.fixture
async def upstream():
    """Start a fake completions server with a handler; yields ``start(handler)``."""
    runners = []

    async def start(handler=None, routes=None):
        app = web.Application()
        if handler is not None:
            app.router.add_post("/v1/completions", handler)
        for (method, path), h in (routes or {}).items():
            app.router.add_route(method, path, h)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        return f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"

    yield start
    for r in runners:
        await r.cleanup()


async def _streaming(request, texts, pause=0.0, finish="stop"):
    import asyncio

    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    for t in texts:
        await resp.write(_sse({"choices": [{"text": t, "finish_reason": None}]}))
        await asyncio.sleep(pause)
    await resp.write(_sse({"choices": [{"text": "", "finish_reason": finish}]}))
    await resp.write(b"data: [DONE]\n\n")
    return resp


@pytest.mark.parametrize(
    ("status", "error", "gateway"),
    [(429, BackendOverloadedError, None), (500, BackendUnavailableError, 502),
     (503, BackendUnavailableError, 502)],
)  # fmt: skip
async def test_upstream_statuses_map_to_typed_errors(upstream, tokenizer, status, error, gateway):
    async def handler(request):
        return web.json_response({"error": {"message": "busy or broken"}}, status=status)

    url = await upstream(handler)
    backend = HTTPBackend(url, "m", tokenizer=tokenizer)
    with pytest.raises(error, match=rf"127\.0\.0\.1.*HTTP {status}: busy or broken") as info:
        await chunks(backend, [1, 2], CompletionParams(max_tokens=4))
    if gateway is not None:
        assert info.value.status == gateway
    await backend.close()


async def test_a_stalled_stream_times_out_between_chunks(upstream, tokenizer):
    import time

    async def handler(request):
        with contextlib.suppress(ConnectionError):  # the client gave up: as it should
            return await _streaming(request, [" one", " two"], pause=3)

    url = await upstream(handler)
    backend = HTTPBackend(url, "m", tokenizer=tokenizer, timeout=600, read_timeout=0.5)
    t0 = time.monotonic()
    with pytest.raises(BackendUnavailableError, match="timed out") as info:
        await chunks(backend, [1, 2], CompletionParams(max_tokens=4))
    assert time.monotonic() - t0 < 2.5  # the read timeout, not the total one
    assert info.value.status == 503
    await backend.close()


async def test_stop_strings_past_four_are_watched_here(upstream, tokenizer):
    seen = {}

    async def handler(request):
        seen["body"] = await request.json()
        try:
            return await _streaming(request, [" Hello", " wo", "rld EN", "D and", " more"], 0.05)
        except (ConnectionResetError, RuntimeError):
            seen["aborted"] = True
            raise

    url = await upstream(handler)
    backend = HTTPBackend(url, "m", tokenizer=tokenizer)
    stops = ["s1", "s2", "s3", "s4", "END", "never"]
    out = await chunks(backend, [1, 2], CompletionParams(max_tokens=50, stop=stops))
    assert seen["body"]["stop"] == stops[:4]  # what OpenAI and vLLM accept
    assert "".join(c.text for c in out) == " Hello world "
    assert out[-1].finish_reason == "stop"
    # without a watched stop in the text, everything comes through (held text too)
    few = CompletionParams(max_tokens=50, stop=["a", "b", "c", "d", "ENDx"])
    out = await chunks(backend, [1, 2], few)
    assert "".join(c.text for c in out) == " Hello world END and more"
    await backend.close()


async def test_a_server_that_refuses_token_ids_gets_text(upstream, tokenizer):
    # as llama-cpp-python answers a token-id prompt: a 500 naming body.prompt
    bodies = []

    async def handler(request):
        body = await request.json()
        bodies.append(body)
        if isinstance(body["prompt"], list):
            msg = "validation errors: ('body', 'prompt', 'str') Input should be a valid string"
            return web.json_response({"error": {"message": msg}}, status=500)
        return await _streaming(request, [" ok"])

    url = await upstream(handler)
    backend = HTTPBackend(url, "m", tokenizer=tokenizer)
    ids = tokenizer.encode("<|im_start|>user\nHi<|im_end|>", add_special_tokens=False)
    params = CompletionParams(max_tokens=4, min_tokens=2, logit_bias={198: -100.0})
    for _ in range(2):
        out = await chunks(backend, ids, params)
        assert "".join(c.text for c in out) == " ok"
    assert isinstance(bodies[0]["prompt"], list)
    # then text, with the chat template's special tokens as written, and without
    # min_tokens, which would drop that server's logit_bias
    for body in bodies[1:]:
        assert body["prompt"] == "<|im_start|>user\nHi<|im_end|>"
        assert body["logit_bias"] == {"198": -100.0} and "min_tokens" not in body
    assert len(bodies) == 3  # the refusal is learnt once
    await backend.close()


@pytest.mark.parametrize("code", ["backend_error", 400])
async def test_an_error_after_the_stream_began_is_the_servers(upstream, tokenizer, code):
    # in-band, after the 200: whatever the body's code says (vLLM puts a status
    # there), the request was accepted, so the server failed
    async def handler(request):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(_sse({"choices": [{"text": " so far", "finish_reason": None}]}))
        await resp.write(_sse({"error": {"message": "engine died", "code": code}}))
        return resp

    url = await upstream(handler)
    backend = HTTPBackend(url, "m", tokenizer=tokenizer)
    seen = []
    with pytest.raises(BackendUnavailableError, match=r"127\.0\.0\.1.*: engine died$") as info:
        async for chunk in backend.complete([1, 2], CompletionParams(max_tokens=4)):
            seen.append(chunk.text)
    assert seen == [" so far"] and info.value.status == 502
    await backend.close()


async def test_a_vllm_refusal_keeps_its_param_and_drops_its_numeric_code(upstream, tokenizer):
    async def handler(request):
        err = {"object": "error", "message": "too long", "type": "BadRequestError",
               "param": "prompt_too_long", "code": 400}  # fmt: skip
        return web.json_response({"error": err}, status=400)

    backend = HTTPBackend(await upstream(handler), "m", tokenizer=tokenizer)
    with pytest.raises(BackendRequestError, match="HTTP 400: too long") as info:
        await chunks(backend, "text prompt", CompletionParams(max_tokens=4))
    assert info.value.param == "prompt_too_long" and info.value.code is None
    assert info.value.upstream
    await backend.close()


async def test_a_huge_stream_event_comes_through(upstream, tokenizer):
    # past aiohttp's 512 KiB line limit, which a line-by-line reader trips over
    text = "word " * 200_000

    async def handler(request):
        return await _streaming(request, [text])

    backend = HTTPBackend(await upstream(handler), "m", tokenizer=tokenizer)
    out = await chunks(backend, [1, 2], CompletionParams(max_tokens=4))
    assert "".join(c.text for c in out) == text
    await backend.close()


async def test_models_and_the_admin_key_for_a_cache_reset(upstream, tokenizer):
    seen = []

    async def models(request):
        seen.append(("models", request.headers.get("Authorization")))
        card = {"id": "m", "object": "model", "owned_by": "vllm", "max_model_len": 4096}
        return web.json_response({"object": "list", "data": [card]})

    async def reset(request):
        seen.append(("reset", request.headers.get("Authorization")))
        return web.json_response({"status": "ok"})

    url = await upstream(
        routes={("GET", "/v1/models"): models, ("POST", "/reset_prefix_cache"): reset}
    )
    backend = HTTPBackend(
        url + "/v1/", "m", tokenizer=tokenizer, api_key="api", admin_api_key="adm"
    )
    assert backend.url == url
    assert [c["id"] for c in await backend.models()] == ["m"]
    assert backend.max_model_len == 4096  # from the card
    assert await backend.reset_prefix_cache() is True
    assert seen == [("models", "Bearer api"), ("reset", "Bearer adm")]
    await backend.close()
    # without the route (and without /flush_cache): False, not an error
    bare = HTTPBackend(await upstream(routes={("GET", "/v1/models"): models}), tokenizer=tokenizer)
    assert await bare.reset_prefix_cache() is False
    await bare.close()
