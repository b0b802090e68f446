"""HTTPBackend against sotserve's engine server (tiny model, real HTTP on 127.0.0.1)."""

from __future__ import annotations

import socket

import pytest
from aiohttp import web

from engine import AsyncEngine
from engine.server import build_app
from sotserve.backends import (
    BackendError,
    BackendRequestError,
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
