"""The engine-only OpenAI-compatible server, over real HTTP on 127.0.0.1.

Outputs must equal what the engine itself generates, streams must frame as OpenAI's,
bad input must get a 4xx OpenAI error body (and the server keep serving), and a
client that hangs up must free its request's KV slots.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from engine import AsyncEngine, SamplingParams
from engine.server import build_app
from engine.serving import Security
from engine.stats import EngineStats

MODEL = "tiny-llama"
REPO = Path(__file__).resolve().parents[2]
GREEDY = {"temperature": 0, "max_tokens": 24, "ignore_eos": True}


@pytest.fixture(scope="module")
def aengine(tiny_llama_dir):
    eng = AsyncEngine(str(tiny_llama_dir), dtype="float32", device="cpu", kv_slots=2048)
    yield eng
    eng.close()


@contextlib.asynccontextmanager
async def _serve(
    app: web.Application, handler_cancellation: bool = True
) -> AsyncIterator[aiohttp.ClientSession]:
    """Serve ``app`` on an ephemeral 127.0.0.1 port; yield a session pointed at it."""
    runner = web.AppRunner(app, handler_cancellation=handler_cancellation)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(f"http://{host}:{port}", timeout=timeout) as session:
            yield session
    finally:
        await runner.cleanup()


@pytest.fixture
async def client(aengine) -> AsyncIterator[aiohttp.ClientSession]:
    async with _serve(build_app(aengine, MODEL)) as session:
        yield session


async def _post(client: aiohttp.ClientSession, body: Any) -> tuple[int, Any]:
    # raw bytes are sent as JSON too: what is wrong with them is their content
    json_type = {"Content-Type": "application/json"}
    kw = {"data": body, "headers": json_type} if isinstance(body, bytes) else {"json": body}
    async with client.post("/v1/completions", **kw) as resp:
        return resp.status, await resp.json()


async def _sse(resp: aiohttp.ClientResponse) -> list[Any]:
    """Parse a whole SSE body strictly: ``data: ...`` events, each ended by a blank line."""
    assert resp.status == 200
    assert resp.content_type == "text/event-stream"
    raw = await resp.text()
    assert raw.endswith("data: [DONE]\n\n")
    events = raw.split("\n\n")[:-1]
    assert all(e.startswith("data: ") and "\n" not in e for e in events), raw
    return [e[6:] if e == "data: [DONE]" else json.loads(e[6:]) for e in events]


async def _direct(eng: AsyncEngine, prompt: Any, **params: Any) -> tuple[str, list[int], str]:
    deltas = [d async for d in eng.generate(prompt, SamplingParams(**params))]
    text = "".join(d.text for d in deltas)
    return text, [t for d in deltas for t in d.token_ids], deltas[-1].finish_reason


async def _wait_for(eng: AsyncEngine, pred, timeout: float = 2.0) -> EngineStats:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    st = eng.stats()
    while not pred(st) and loop.time() < deadline:
        await asyncio.sleep(0.01)
        st = eng.stats()
    return st


def _idle(st: EngineStats) -> bool:
    return st.running == 0 and st.waiting == 0 and st.kv_slots_used == 0


def _assert_error(status: int, body: Any, want_status: int, param: str | None, code=None) -> None:
    assert status == want_status, body
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert "Traceback" not in err["message"]
    assert err["type"] == ("invalid_request_error" if want_status < 500 else "server_error")
    assert err["param"] == param
    assert err["code"] == code


# -- models, health ---------------------------------------------------------------------------
async def test_models_and_health(client, aengine):
    async with client.get("/health") as resp:
        assert resp.status == 200
        assert await resp.json() == {"status": "ok"}
    async with client.get("/v1/models") as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body["object"] == "list"
    [card] = body["data"]
    assert card["id"] == MODEL
    assert card["object"] == "model"
    assert card["max_model_len"] == aengine.max_model_len == 512


async def test_reset_prefix_cache_endpoint(aengine):
    """An admin route: served with an admin key, to that key only."""
    security = Security.for_bind("127.0.0.1", admin_api_key="admin-secret")
    async with _serve(build_app(aengine, MODEL, security=security)) as client:
        body = {"prompt": "Warm the cache with this prompt", **GREEDY, "max_tokens": 4}
        status, _ = await _post(client, body)
        assert status == 200 and aengine.stats().cache_size > 0
        async with client.post("/reset_prefix_cache") as resp:
            assert resp.status == 401
        admin = {"Authorization": "Bearer admin-secret"}
        async with client.post("/reset_prefix_cache", headers=admin) as resp:
            assert resp.status == 200
            out = await resp.json()
        assert out["freed_tokens"] > 0 and aengine.stats().cache_size == 0
        async with client.get("/reset_prefix_cache", headers=admin) as resp:
            assert resp.status == 405


async def test_reset_prefix_cache_needs_an_admin_key(client, aengine):
    """Without --admin-api-key the route does not exist, so nobody can empty the
    cache everyone shares."""
    async with client.post("/reset_prefix_cache") as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["message"]


async def test_default_model_name_is_the_models_not_its_path(aengine, tiny_llama_dir):
    """The model is a local directory: /v1/models names it, never shows its path;
    requests may name the model either way."""
    async with _serve(build_app(aengine)) as client:
        async with client.get("/v1/models") as resp:
            [card] = (await resp.json())["data"]
        assert card["id"] == Path(tiny_llama_dir).name
        assert str(tiny_llama_dir) not in json.dumps(card)
        status, body = await _post(client, {"model": card["id"], "prompt": "hi", "max_tokens": 2})
        assert status == 200, body
        status, body = await _post(
            client, {"model": aengine.model_name, "prompt": "hi", "max_tokens": 2}
        )
    assert status == 200
    assert body["model"] == card["id"]  # the served name, not the path asked for


# -- non-streaming ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "prompt",
    ["The quick brown fox", ["Once upon a time"], [1, 500, 2000, 42, 7], [[9, 8, 7, 6]]],
    ids=["str", "str-in-list", "token-ids", "token-ids-in-list"],
)
async def test_completion_matches_engine(client, aengine, prompt):
    inner = prompt[0] if isinstance(prompt, list) and isinstance(prompt[0], str | list) else prompt
    want_text, want_ids, want_finish = await _direct(aengine, inner, **GREEDY)
    prompt_ids = aengine.engine.tokenize(inner)

    status, body = await _post(
        client, {"model": MODEL, "prompt": prompt, "return_token_ids": True, **GREEDY}
    )
    assert status == 200, body
    assert body["id"].startswith("cmpl-")
    assert body["object"] == "text_completion"
    assert body["model"] == MODEL
    assert isinstance(body["created"], int)
    [choice] = body["choices"]
    assert choice["index"] == 0
    assert choice["logprobs"] is None
    assert choice["text"] == want_text
    assert choice["token_ids"] == want_ids
    assert choice["prompt_token_ids"] == prompt_ids
    assert choice["finish_reason"] == want_finish == "length"
    cached = body["usage"].pop("prompt_tokens_details")["cached_tokens"]
    assert 0 <= cached < len(prompt_ids)  # earlier tests may have cached a prefix
    assert body["usage"] == {
        "prompt_tokens": len(prompt_ids),
        "completion_tokens": 24,
        "total_tokens": len(prompt_ids) + 24,
    }
    assert _idle(await _wait_for(aengine, _idle))


async def test_plain_response_has_no_token_ids_and_defaults_to_16_tokens(client):
    status, body = await _post(client, {"prompt": "hello", "temperature": 0, "ignore_eos": True})
    assert status == 200, body
    assert set(body["choices"][0]) == {"index", "text", "finish_reason", "logprobs"}
    assert body["usage"]["completion_tokens"] == 16


async def test_null_max_tokens_means_the_rest_of_the_context(client, aengine):
    prompt = [5] * (aengine.max_model_len - 12)
    status, body = await _post(client, {"prompt": prompt, "max_tokens": None, "ignore_eos": True})
    assert status == 200, body
    assert body["usage"]["completion_tokens"] == 12
    assert body["choices"][0]["finish_reason"] == "length"


async def test_seeded_sampling_reaches_the_engine(client, aengine):
    params = {"temperature": 1.0, "top_p": 0.9, "top_k": 50, "seed": 7, "max_tokens": 12}
    want_text, _, _ = await _direct(aengine, "Roll the dice", ignore_eos=True, **params)
    for _ in range(2):
        status, body = await _post(
            client, {"prompt": "Roll the dice", "ignore_eos": True, **params}
        )
        assert status == 200, body
        assert body["choices"][0]["text"] == want_text


async def test_stop_token_ids_and_stop_strings_reach_the_engine(client, aengine):
    _, ids, _ = await _direct(aengine, "Stop me", **GREEDY)
    stop_id = ids[5]
    cut = ids.index(stop_id)
    status, body = await _post(
        client,
        {"prompt": "Stop me", "stop_token_ids": [stop_id], "return_token_ids": True, **GREEDY},
    )
    assert status == 200, body
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["choices"][0]["token_ids"] == ids[: cut + 1]

    # a stop string taken from the middle of the greedy text cuts the text there
    text, _, _ = await _direct(aengine, "Stop me", **GREEDY)
    stop = text.strip()[len(text.strip()) // 2 :][:3]
    assert stop.strip(), text
    status, body = await _post(client, {"prompt": "Stop me", "stop": stop, **GREEDY})
    assert status == 200, body
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["choices"][0]["text"] == text[: text.index(stop)]


async def test_concurrent_requests_each_match_the_engine(client, aengine):
    prompts = ["alpha beta", "gamma", "one two three four"]
    want = [await _direct(aengine, p, **GREEDY) for p in prompts]
    got = await asyncio.gather(*(_post(client, {"prompt": p, **GREEDY}) for p in prompts))
    for (status, body), (text, _, _) in zip(got, want, strict=True):
        assert status == 200, body
        assert body["choices"][0]["text"] == text
    assert len({body["id"] for _, body in got}) == 3


async def _ids_and_text(client, body):
    """``(token ids, text)`` of a completion, streamed or not as ``body`` says."""
    if body.get("stream"):
        async with client.post("/v1/completions", json=body) as resp:
            chunks = (await _sse(resp))[:-1]
        ids = [t for c in chunks for t in c["choices"][0]["token_ids"]]
        return ids, "".join(c["choices"][0]["text"] for c in chunks)
    status, out = await _post(client, body)
    assert status == 200, out
    return out["choices"][0]["token_ids"], out["choices"][0]["text"]


@pytest.mark.parametrize(
    "extra",
    [
        {"presence_penalty": 2.0},
        {"frequency_penalty": 1.5},
        {"repetition_penalty": 1.5},
        {"presence_penalty": -2, "frequency_penalty": -0.5, "repetition_penalty": 0.5},
    ],
    ids=["presence", "frequency", "repetition", "negative"],
)
async def test_penalties_reach_the_engine(client, aengine, extra):
    prompt = "The quick brown fox"  # its greedy output repeats a token early
    _, plain_ids, _ = await _direct(aengine, prompt, **GREEDY)
    want_text, want_ids, _ = await _direct(aengine, prompt, **GREEDY, **extra)
    assert want_ids != plain_ids
    for stream in (False, True):
        body = {"prompt": prompt, "return_token_ids": True, "stream": stream, **GREEDY, **extra}
        assert await _ids_and_text(client, body) == (want_ids, want_text)


async def test_logit_bias_reaches_the_engine(client, aengine):
    """OpenAI's shape: token ids as string keys, numbers (ints too) as values."""
    prompt = "The quick brown fox"
    _, plain_ids, _ = await _direct(aengine, prompt, **GREEDY)
    bans = dict.fromkeys(plain_ids, -100)
    want_text, want_ids, _ = await _direct(aengine, prompt, **GREEDY, logit_bias=bans)
    assert want_ids != plain_ids and not set(want_ids) & set(plain_ids)
    cases = [
        ({str(t): -100 for t in bans}, want_ids, want_text),
        ({"42": 100}, [42] * GREEDY["max_tokens"], None),  # every token is 42
        ({"0042": 100.0, "7": -3.5}, [42] * GREEDY["max_tokens"], None),  # leading zeros
        ({}, plain_ids, None),  # an empty object changes nothing
    ]
    for bias, ids_want, text_want in cases:
        for stream in (False, True):
            body = {"prompt": prompt, "return_token_ids": True, "stream": stream, **GREEDY}
            body["logit_bias"] = bias
            ids, text = await _ids_and_text(client, body)
            assert ids == ids_want, bias
            if text_want is not None:
                assert text == text_want
    # sampled too, and at the vocabulary's edges
    for tok in (0, 49151):
        body = {"prompt": prompt, "temperature": 1.0, "max_tokens": 8, "return_token_ids": True}
        status, out = await _post(client, {**body, "logit_bias": {str(tok): 100}})
        assert status == 200, out
        assert out["choices"][0]["token_ids"] == [tok] * 8


async def test_min_tokens_reaches_the_engine(client, aengine):
    _, ids, _ = await _direct(aengine, "Stop me", **GREEDY)
    body = {"prompt": "Stop me", "stop_token_ids": [ids[0]], "return_token_ids": True, **GREEDY}
    status, out = await _post(client, body)
    assert status == 200, out
    assert out["choices"][0]["token_ids"] == ids[:1]
    _, want_ids, want_finish = await _direct(
        aengine, "Stop me", stop_token_ids=[ids[0]], min_tokens=5, **GREEDY
    )
    status, out = await _post(client, {**body, "min_tokens": 5})
    assert status == 200, out
    got = out["choices"][0]["token_ids"]
    assert got == want_ids and out["choices"][0]["finish_reason"] == want_finish
    assert len(got) >= 5 and ids[0] not in got[:5]
    assert out["usage"]["completion_tokens"] == len(got)
    # min_tokens up to max_tokens is fine, also when max_tokens is null (the context)
    status, out = await _post(client, {"prompt": "hi", "max_tokens": 3, "min_tokens": 3})
    assert status == 200 and out["usage"]["completion_tokens"] == 3, out
    status, out = await _post(client, {"prompt": "hi", "max_tokens": None, "min_tokens": 400})
    assert status == 200 and out["usage"]["completion_tokens"] >= 400, out


async def test_priority_reaches_the_engine(client, aengine, monkeypatch):
    seen: list[int] = []
    make = aengine.engine.make_request

    def recording(*args, **kw):
        req = make(*args, **kw)
        seen.append(req.priority)
        return req

    monkeypatch.setattr(aengine.engine, "make_request", recording)
    for stream, priority in ((False, -3), (True, 7), (False, None)):
        body = {"prompt": "hi", "max_tokens": 2, "stream": stream}
        if priority is not None:
            body["priority"] = priority
        async with client.post("/v1/completions", json=body) as resp:
            assert resp.status == 200, await resp.text()
            await resp.read()
    assert seen == [-3, 7, 0]  # vLLM's default is 0


# -- streaming --------------------------------------------------------------------------------
async def test_stream_concatenates_to_the_same_text(client, aengine):
    want_text, _, _ = await _direct(aengine, "Stream this", **GREEDY)
    async with client.post(
        "/v1/completions", json={"prompt": "Stream this", "stream": True, **GREEDY}
    ) as resp:
        events = await _sse(resp)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len(chunks) > 1
    assert len({c["id"] for c in chunks}) == 1
    for c in chunks:
        assert c["object"] == "text_completion"
        assert c["model"] == MODEL
        assert "usage" not in c
        [choice] = c["choices"]
        assert choice["index"] == 0
        assert "token_ids" not in choice
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + [
        "length"
    ]
    assert "".join(c["choices"][0]["text"] for c in chunks) == want_text


async def test_stream_include_usage(client, aengine):
    prompt_ids = aengine.engine.tokenize("Count me")
    body = {"prompt": "Count me", "stream": True, "stream_options": {"include_usage": True}}
    async with client.post("/v1/completions", json={**body, **GREEDY}) as resp:
        events = await _sse(resp)
    assert events[-1] == "[DONE]"
    *content, usage_chunk = events[:-1]
    assert usage_chunk["choices"] == []
    cached = usage_chunk["usage"].pop("prompt_tokens_details")["cached_tokens"]
    assert 0 <= cached < len(prompt_ids)
    assert usage_chunk["usage"] == {
        "prompt_tokens": len(prompt_ids),
        "completion_tokens": 24,
        "total_tokens": len(prompt_ids) + 24,
    }
    assert content[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["usage"] is None for c in content)


async def test_stream_continuous_usage_stats(client, aengine):
    """vLLM's ``continuous_usage_stats``: usage so far on every chunk, so a client that
    stops reading early (the planner ending a point) still has its counts."""
    n_prompt = len(aengine.engine.tokenize("Count me"))
    options = {"include_usage": True, "continuous_usage_stats": True}
    body = {"prompt": "Count me", "stream": True, "stream_options": options, **GREEDY}
    async with client.post("/v1/completions", json=body) as resp:
        events = await _sse(resp)
    *content, usage_chunk = events[:-1]
    done = [c["usage"]["completion_tokens"] for c in content]
    assert done == sorted(done) and done[-1] == 24 and len(set(done)) > 1
    for c in content:
        assert c["usage"]["prompt_tokens"] == n_prompt
        assert c["usage"]["prompt_tokens_details"]["cached_tokens"] >= 0
    assert usage_chunk["usage"]["completion_tokens"] == 24


async def test_stream_return_token_ids(client, aengine):
    _, want_ids, _ = await _direct(aengine, "Token ids please", **GREEDY)
    body = {"prompt": "Token ids please", "stream": True, "return_token_ids": True, **GREEDY}
    async with client.post("/v1/completions", json=body) as resp:
        events = await _sse(resp)
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["prompt_token_ids"] == aengine.engine.tokenize(
        "Token ids please"
    )
    assert all("prompt_token_ids" not in c["choices"][0] for c in chunks[1:])
    assert [t for c in chunks for t in c["choices"][0]["token_ids"]] == want_ids


# -- bad input --------------------------------------------------------------------------------
CTX = "context_length_exceeded"
BAD_REQUESTS: list[tuple[str, Any, str | None, str | None]] = [
    ("malformed-json", b'{"prompt": "hi",', None, None),
    ("nan-is-not-json", b'{"prompt": "hi", "temperature": NaN}', None, None),
    ("not-utf8", b'\xff\xfe{"prompt": 1}', None, None),
    ("body-not-object", b"[1, 2]", None, None),
    ("missing-prompt", {"max_tokens": 4}, "prompt", None),
    ("prompt-int", {"prompt": 7}, "prompt", None),
    ("prompt-mixed-list", {"prompt": [1, "a"]}, "prompt", None),
    ("prompt-batch", {"prompt": ["a", "b"]}, "prompt", None),
    ("prompt-empty-string", {"prompt": ""}, "prompt", None),
    ("prompt-empty-list", {"prompt": []}, "prompt", None),
    ("prompt-token-out-of-vocab", {"prompt": [10**9]}, "prompt", None),
    ("prompt-token-negative", {"prompt": [-1]}, "prompt", None),
    ("prompt-over-context", {"prompt": [5] * 600}, "prompt", CTX),
    ("max-tokens-over-context", {"prompt": "hi", "max_tokens": 600}, "max_tokens", CTX),
    ("max-tokens-absurd", {"prompt": "hi", "max_tokens": 10**12}, "max_tokens", None),
    ("max-tokens-zero", {"prompt": "hi", "max_tokens": 0}, "max_tokens", None),
    ("max-tokens-string", {"prompt": "hi", "max_tokens": "16"}, "max_tokens", None),
    ("max-tokens-float", {"prompt": "hi", "max_tokens": 16.5}, "max_tokens", None),
    ("temperature-negative", {"prompt": "hi", "temperature": -1}, "temperature", None),
    ("temperature-string", {"prompt": "hi", "temperature": "hot"}, "temperature", None),
    ("top-p-zero", {"prompt": "hi", "top_p": 0}, "top_p", None),
    ("top-k-negative", {"prompt": "hi", "top_k": -5}, "top_k", None),
    ("top-k-bool", {"prompt": "hi", "top_k": True}, "top_k", None),
    ("seed-too-big", {"prompt": "hi", "seed": 2**70}, "seed", None),
    ("stop-empty-string", {"prompt": "hi", "stop": [""]}, "stop", None),
    ("stop-int", {"prompt": "hi", "stop": 5}, "stop", None),
    ("stop-token-ids-negative", {"prompt": "hi", "stop_token_ids": [-1]}, "stop_token_ids", None),
    ("frequency-penalty-3", {"prompt": "hi", "frequency_penalty": 3}, "frequency_penalty", None),
    (
        "frequency-penalty-string",
        {"prompt": "hi", "frequency_penalty": "1"},
        "frequency_penalty",
        None,
    ),
    ("presence-penalty-low", {"prompt": "hi", "presence_penalty": -2.5}, "presence_penalty", None),
    ("presence-penalty-bool", {"prompt": "hi", "presence_penalty": True}, "presence_penalty", None),
    ("repetition-penalty-0", {"prompt": "hi", "repetition_penalty": 0}, "repetition_penalty", None),
    (
        "repetition-penalty-negative",
        {"prompt": "hi", "repetition_penalty": -1.2},
        "repetition_penalty",
        None,
    ),
    (
        "repetition-penalty-huge",
        {"prompt": "hi", "repetition_penalty": 1e9},
        "repetition_penalty",
        None,
    ),
    (
        "repetition-penalty-string",
        {"prompt": "hi", "repetition_penalty": "1.1"},
        "repetition_penalty",
        None,
    ),
    ("min-tokens-over-max", {"prompt": "hi", "max_tokens": 4, "min_tokens": 5}, "min_tokens", None),
    ("min-tokens-over-default-max", {"prompt": "hi", "min_tokens": 17}, "min_tokens", None),
    (
        "min-tokens-over-context",
        {"prompt": "hi", "max_tokens": None, "min_tokens": 600},
        "min_tokens",
        None,
    ),
    ("min-tokens-negative", {"prompt": "hi", "min_tokens": -1}, "min_tokens", None),
    ("min-tokens-string", {"prompt": "hi", "min_tokens": "2"}, "min_tokens", None),
    ("min-tokens-float", {"prompt": "hi", "min_tokens": 2.5}, "min_tokens", None),
    ("priority-string", {"prompt": "hi", "priority": "1"}, "priority", None),
    ("priority-bool", {"prompt": "hi", "priority": True}, "priority", None),
    ("priority-float", {"prompt": "hi", "priority": 1.5}, "priority", None),
    ("priority-null", {"prompt": "hi", "priority": None}, "priority", None),
    ("logit-bias-list", {"prompt": "hi", "logit_bias": [[5, 1]]}, "logit_bias", None),
    ("logit-bias-word-key", {"prompt": "hi", "logit_bias": {"hello": 1}}, "logit_bias", None),
    ("logit-bias-negative-key", {"prompt": "hi", "logit_bias": {"-1": 1}}, "logit_bias", None),
    ("logit-bias-float-key", {"prompt": "hi", "logit_bias": {"5.0": 1}}, "logit_bias", None),
    ("logit-bias-spaced-key", {"prompt": "hi", "logit_bias": {" 5": 1}}, "logit_bias", None),
    ("logit-bias-empty-key", {"prompt": "hi", "logit_bias": {"": 1}}, "logit_bias", None),
    (
        "logit-bias-same-id-twice",
        {"prompt": "hi", "logit_bias": {"7": 1, "07": 2}},
        "logit_bias",
        None,
    ),
    ("logit-bias-out-of-vocab", {"prompt": "hi", "logit_bias": {"49152": 1}}, "logit_bias", None),
    ("logit-bias-huge-id", {"prompt": "hi", "logit_bias": {"9" * 5000: 1}}, "logit_bias", None),
    ("logit-bias-101", {"prompt": "hi", "logit_bias": {"5": 101}}, "logit_bias", None),
    ("logit-bias-below-100", {"prompt": "hi", "logit_bias": {"5": -100.5}}, "logit_bias", None),
    ("logit-bias-huge-value", {"prompt": "hi", "logit_bias": {"5": 1e308}}, "logit_bias", None),
    ("logit-bias-string-value", {"prompt": "hi", "logit_bias": {"5": "1"}}, "logit_bias", None),
    ("logit-bias-bool-value", {"prompt": "hi", "logit_bias": {"5": True}}, "logit_bias", None),
    ("logit-bias-null-value", {"prompt": "hi", "logit_bias": {"5": None}}, "logit_bias", None),
    (
        "logit-bias-nan-value",
        b'{"prompt": "hi", "logit_bias": {"5": NaN}}',
        None,  # not JSON at all
        None,
    ),
    (
        "logit-bias-too-many",
        {"prompt": "hi", "logit_bias": {str(t): 1 for t in range(1025)}},
        "logit_bias",
        None,
    ),
    ("ignore-eos-string", {"prompt": "hi", "ignore_eos": "yes"}, "ignore_eos", None),
    ("stream-string", {"prompt": "hi", "stream": "true"}, "stream", None),
    ("n-2", {"prompt": "hi", "n": 2}, "n", None),
    ("echo", {"prompt": "hi", "echo": True}, "echo", None),
    ("logprobs", {"prompt": "hi", "logprobs": 1}, "logprobs", None),
    (
        "stream-options-without-stream",
        {"prompt": "hi", "stream_options": {"include_usage": True}},
        "stream_options",
        None,
    ),
    (
        "include-usage-string",
        {"prompt": "hi", "stream": True, "stream_options": {"include_usage": "yes"}},
        "stream_options",
        None,
    ),
]


@pytest.mark.parametrize(
    ("body", "param", "code"), [c[1:] for c in BAD_REQUESTS], ids=[c[0] for c in BAD_REQUESTS]
)
async def test_bad_request_is_400_and_server_keeps_serving(client, aengine, body, param, code):
    status, err = await _post(client, body)
    _assert_error(status, err, 400, param, code)
    assert _idle(await _wait_for(aengine, _idle))
    status, ok = await _post(client, {"prompt": "still there?", "max_tokens": 2})
    assert status == 200, ok
    assert ok["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": [5] * 600}, "prompt"),
        ({"prompt": [10**9]}, "prompt"),
        ({"prompt": "hi", "temperature": -1}, "temperature"),
        ({"prompt": "hi", "max_tokens": 600}, "max_tokens"),
    ],
)
async def test_bad_streaming_request_is_a_json_400_not_a_stream(client, body, param):
    async with client.post("/v1/completions", json={**body, "stream": True}) as resp:
        assert resp.content_type == "application/json"
        status, err = resp.status, await resp.json()
    assert status == 400
    assert err["error"]["param"] == param


async def test_unknown_model_is_404(client):
    for stream in (False, True):
        status, err = await _post(client, {"model": "gpt-4", "prompt": "hi", "stream": stream})
        _assert_error(status, err, 404, "model", "model_not_found")
    status, ok = await _post(client, {"model": MODEL, "prompt": "hi", "max_tokens": 2})
    assert status == 200, ok


async def test_unknown_route_and_method_are_json_errors(client):
    async with client.get("/v1/completions") as resp:
        assert resp.status == 405
        assert "POST" in resp.headers["Allow"]
        _assert_error(resp.status, await resp.json(), 405, None)
    async with client.get("/v1/nope") as resp:
        _assert_error(resp.status, await resp.json(), 404, None)


# -- disconnects ------------------------------------------------------------------------------
@pytest.fixture
def slow_steps(aengine, monkeypatch):
    """Make each engine step take >= 5 ms, so a 400-token request cannot finish before
    the test hangs up (the tiny model alone does ~1 ms a step)."""
    step = aengine.engine.step

    def slow_step():
        time.sleep(0.005)
        return step()

    monkeypatch.setattr(aengine.engine, "step", slow_step)


LONG = {"prompt": "Write forever", "max_tokens": 400, "ignore_eos": True, "temperature": 0}


@pytest.mark.parametrize("handler_cancellation", [True, False])
async def test_disconnect_mid_stream_aborts_the_request(aengine, slow_steps, handler_cancellation):
    before = await _wait_for(aengine, _idle)
    assert _idle(before)
    async with _serve(build_app(aengine, MODEL), handler_cancellation) as client:
        resp = await client.post("/v1/completions", json={**LONG, "stream": True})
        assert resp.status == 200
        events = 0
        while events < 3:
            line = await resp.content.readline()
            events += line.startswith(b"data: ")
        assert aengine.stats().running == 1
        resp.close()  # hang up mid-stream
        st = await _wait_for(
            aengine, lambda s: _idle(s) and s.aborted_requests > before.aborted_requests
        )
    assert st.running == 0
    assert st.kv_slots_used == 0
    assert st.aborted_requests == before.aborted_requests + 1
    assert st.generated_tokens - before.generated_tokens < 400


@pytest.mark.parametrize("handler_cancellation", [True, False])
async def test_disconnect_while_waiting_for_a_full_answer_aborts(
    aengine, slow_steps, handler_cancellation
):
    before = await _wait_for(aengine, _idle)
    async with _serve(build_app(aengine, MODEL), handler_cancellation) as client:
        task = asyncio.create_task(client.post("/v1/completions", json=LONG))
        await _wait_for(aengine, lambda s: s.running == 1)
        task.cancel()  # the client gives up and drops the connection
        with contextlib.suppress(asyncio.CancelledError):
            await task
        st = await _wait_for(
            aengine, lambda s: _idle(s) and s.aborted_requests > before.aborted_requests
        )
    assert _idle(st)
    assert st.aborted_requests == before.aborted_requests + 1


# -- a dead engine ----------------------------------------------------------------------------
async def test_dead_engine_is_503(tiny_llama_dir):
    eng = AsyncEngine(str(tiny_llama_dir), dtype="float32", device="cpu", kv_slots=1024)
    try:
        async with _serve(build_app(eng, MODEL)) as client:
            resp = await client.post("/v1/completions", json={**LONG, "stream": True})
            assert resp.status == 200
            assert (await resp.content.readline()).startswith(b"data: ")

            def crash():
                raise RuntimeError("simulated engine crash")

            eng.engine.step = crash
            # the status line is sent: the death arrives in-band, then [DONE]
            text = await resp.text()
            assert text.endswith("\n\ndata: [DONE]\n\n")
            rest = [e.strip() for e in text.split("\n\n") if e.strip()]
            err = json.loads(rest[-2].removeprefix("data: "))
            _assert_error(503, err, 503, None, "engine_dead")

            for stream in (False, True):
                status, err = await _post(client, {"prompt": "hi", "stream": stream})
                _assert_error(status, err, 503, None, "engine_dead")
            async with client.get("/health") as r:
                assert r.status == 503
            async with client.get("/v1/models") as r:
                assert r.status == 200
    finally:
        eng.close()


async def test_closed_engine_is_503_not_a_hang(tiny_llama_dir):
    eng = AsyncEngine(str(tiny_llama_dir), dtype="float32", device="cpu", kv_slots=1024)
    eng.close()
    async with _serve(build_app(eng, MODEL)) as client:
        status, err = await _post(client, {"prompt": "hi"})
        _assert_error(status, err, 503, None, "engine_dead")
        async with client.get("/health") as r:
            assert r.status == 503


# -- python -m engine.server ------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(url: str, body: dict | None = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _wait_healthy(proc: subprocess.Popen, base: str, output) -> None:
    """Until ``base`` answers /health (a minute at most), failing if ``proc`` exits."""
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, output.read().decode()
        try:
            if _http(f"{base}/health")[0] == 200:
                return
        except OSError:
            pass
        assert time.monotonic() < deadline, "server never became healthy"
        time.sleep(0.1)


def test_main_serves_and_shuts_down(tiny_llama_dir):
    port = _free_port()
    cmd = [
        sys.executable, "-m", "engine.server", "--model", str(tiny_llama_dir),
        "--port", str(port), "--dtype", "float32", "--device", "cpu", "--kv-slots", "1024",
        "--max-running", "4", "--max-batched-tokens", "128", "--served-model-name", MODEL,
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=os.environ.copy(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(proc, base, proc.stdout)
        status, body = _http(f"{base}/v1/completions", {"prompt": "hi", "max_tokens": 3})
        assert status == 200, body
        assert body["model"] == MODEL
        assert body["usage"]["completion_tokens"] == 3
        status, body = _http(f"{base}/v1/models")
        assert body["data"][0]["max_model_len"] == 512
    finally:
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=30)[0].decode()
    assert proc.returncode == 0, out


def test_main_stops_on_sigterm_and_refuses_a_busy_port(tiny_llama_dir):
    """The step loop owns the main thread (engine.serve_loop): SIGTERM still ends the
    server cleanly, and a port already in use is an error exit, not a hang."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cmd = [sys.executable, "-m", "engine.server", "--model", str(tiny_llama_dir),
               "--port", str(port), "--dtype", "float32", "--kv-slots", "256"]  # fmt: skip
        refused = subprocess.run(cmd, cwd=REPO, capture_output=True, timeout=120)
        assert refused.returncode != 0
        assert b"address already in use" in refused.stderr.lower()
    cmd[cmd.index("--port") + 1] = str(port := _free_port())
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_healthy(proc, f"http://127.0.0.1:{port}", proc.stderr)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert proc.returncode == 0, proc.stderr.read().decode()


async def test_a_top_k_past_the_vocabulary_is_no_top_k(client, aengine):
    """A top_k past any vocabulary (2**70) once overflowed the sampler's tensor and
    killed the step loop for every request; it means "keep every token"."""
    body = {"prompt": "Once upon a time", "max_tokens": 6, "temperature": 1.0, "seed": 7,
            "ignore_eos": True}  # fmt: skip
    status, huge = await _post(client, {**body, "top_k": 2**70})
    assert status == 200, huge
    status, off = await _post(client, {**body, "top_k": -1})
    assert status == 200 and huge["choices"][0]["text"] == off["choices"][0]["text"]
    assert aengine.is_alive
