"""``sotserve serve`` over real HTTP on 127.0.0.1 with the embedded SmolLM2.

Chat in every mode, streaming and not, must give the planner's answer in OpenAI's
shapes with the point events in the ``sot`` extension; raw completions, models,
health and metrics must work beside it.
"""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest
from live_server import ADMIN

from sotserve.schemas import AnswerInfo, EventAdapter

pytestmark = pytest.mark.slow

QUESTION = "How can I improve my time management skills?"
SMALL = {"max_tokens": 120, "sot": {"point_max_tokens": 24}}


def chat_body(mode: str, question: str = QUESTION, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "messages": [{"role": "user", "content": question}],
        **SMALL,
        "sot": {**SMALL["sot"], "mode": mode},
    }
    body.update(extra)
    return body


async def read_sse(resp: aiohttp.ClientResponse) -> list[Any]:
    """The data payloads of a whole SSE body, checked to be framed as OpenAI's."""
    assert resp.status == 200, await resp.text()
    assert resp.content_type == "text/event-stream"
    raw = await resp.text()
    assert raw.endswith("data: [DONE]\n\n")
    out = []
    for block in raw.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        payload = block[len("data: ") :]
        out.append(payload if payload == "[DONE]" else json.loads(payload))
    assert out.pop() == "[DONE]"
    return out


def check_points_in_answer(answer: str, titles: list[str]) -> None:
    pos = [answer.find(f"**{t}**") for t in titles]
    assert -1 not in pos and pos == sorted(pos), (titles, answer)


@pytest.mark.parametrize("mode", ["sot", "graph", "sequential", "auto"])
async def test_non_streaming_chat(http, mode):
    async with http.post("/v1/chat/completions", json=chat_body(mode)) as resp:
        assert resp.status == 200, await resp.text()
        out = await resp.json()
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-")
    choice = out["choices"][0]
    assert choice["message"]["role"] == "assistant"
    answer = choice["message"]["content"]
    assert answer.strip()
    assert choice["finish_reason"] in ("stop", "length")
    info = AnswerInfo.model_validate(out["sot"])
    # usage counts every request the answer made: the skeleton and each point
    usage = out["usage"]
    assert usage["prompt_tokens"] == info.usage.prompt_tokens
    assert usage["completion_tokens"] == info.usage.completion_tokens
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == info.usage.cached_tokens
    if mode in ("sot", "graph"):
        assert info.mode == mode
        assert len(info.points) >= 2
        # the skeleton, each point, and any retry of a point that opened badly (2 at most)
        assert len(info.points) + 1 <= info.usage.requests <= 3 * len(info.points) + 1
        check_points_in_answer(answer, [p.title for p in info.points])
        for p in info.points:
            assert p.text.strip() in answer
        # the skeleton's tokens come on top of the points'
        assert info.usage.completion_tokens > sum(p.completion_tokens for p in info.points)
        # the points' prompts share the question+skeleton prefix
        assert info.usage.cached_tokens > 0
        assert info.timings.skeleton_s is not None
    elif mode == "sequential":
        assert info.mode == "sequential" and info.points == [] and info.usage.requests == 1
    else:  # auto: the rule router picked a mode and said why
        assert info.route is not None and info.route.mode == info.mode
        assert info.route.reason
    assert info.timings.total_s > 0


@pytest.mark.parametrize("mode", ["sot", "graph", "sequential", "auto"])
async def test_streaming_chat(http, mode):
    body = chat_body(mode, stream=True, stream_options={"include_usage": True})
    async with http.post("/v1/chat/completions", json=body) as resp:
        chunks = await read_sse(resp)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    first = chunks[0]["choices"][0]["delta"]
    assert first == {"role": "assistant", "content": ""}
    usage_chunk = chunks.pop()
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["total_tokens"] > 0
    assert all(c["usage"] is None for c in chunks)

    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    events = [
        EventAdapter.validate_python(e) for c in chunks for e in c.get("sot", {}).get("events", [])
    ]
    types = [e.type for e in events]
    done = events[-1]
    assert done.type == "done" and types.count("done") == 1
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert content == done.answer
    assert usage_chunk["usage"]["completion_tokens"] == done.usage.completion_tokens
    if done.mode in ("sot", "graph"):
        # skeleton first, then the plan, points growing and finishing, then done
        assert (
            types.index("skeleton_delta") < types.index("point_start") < types.index("plan_ready")
        )
        started = [e.point.index for e in events if e.type == "point_start"]
        finished = sorted(e.index for e in events if e.type == "point_done")
        assert finished == sorted(started) == [p.index for p in done.points]
        for index in started:
            grown = "".join(e.text for e in events if e.type == "point_delta" and e.index == index)
            final = next(e.text for e in events if e.type == "point_done" and e.index == index)
            assert grown == final
        check_points_in_answer(content, [p.title for p in done.points])
    else:
        assert "point_start" not in types
    if mode != "auto":
        assert done.mode == mode


async def test_completions_models_health(http, sotserve_url):
    async with http.get("/v1/models") as resp:
        models = await resp.json()
    model = models["data"][0]["id"]
    assert models["data"][0]["max_model_len"] > 0
    body = {"model": model, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}
    async with http.post("/v1/completions", json=body) as resp:
        assert resp.status == 200
        out = await resp.json()
    assert out["object"] == "text_completion" and out["usage"]["completion_tokens"] == 8
    async with http.post("/v1/completions", json={**body, "stream": True}) as resp:
        chunks = await read_sse(resp)
    assert "".join(c["choices"][0]["text"] for c in chunks) == out["choices"][0]["text"]
    async with http.get("/health") as resp:
        assert resp.status == 200 and (await resp.json())["status"] == "ok"
    async with http.get("/") as resp:
        assert resp.status == 200 and "text/html" in resp.content_type


def parse_metrics(text: str) -> dict[str, float]:
    """``name{labels}`` -> value, from the Prometheus text format."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


async def metrics(http) -> dict[str, float]:
    async with http.get("/metrics") as resp:
        assert resp.status == 200
        assert resp.content_type == "text/plain"
        return parse_metrics(await resp.text())


async def test_metrics_count_answers_tokens_and_cache(http):
    # A cold cache, so the answer does not depend on what earlier tests left cached:
    # greedy tokens computed from cached KV can differ in the last bits from recomputed
    # ones, and an answer of another shape has been seen to report 278 fewer cached
    # tokens than the engine counted (an accounting gap left for the service issue).
    async with http.post("/reset_prefix_cache", headers=ADMIN) as resp:
        assert resp.status == 200
    before = await metrics(http)
    async with http.post("/v1/chat/completions", json=chat_body("sot")) as resp:
        out = await resp.json()
    after = await metrics(http)

    def delta(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta('sotserve_requests_total{endpoint="/v1/chat/completions",status="200"}') == 1
    assert delta('sotserve_answers_total{mode="sot",outcome="ok"}') == 1
    assert delta('sotserve_time_to_first_token_seconds_count{mode="sot"}') == 1
    assert delta('sotserve_e2e_latency_seconds_count{mode="sot"}') == 1
    e2e = delta('sotserve_e2e_latency_seconds_sum{mode="sot"}')
    assert 0 < delta('sotserve_time_to_first_token_seconds_sum{mode="sot"}') < e2e
    usage = out["usage"]
    assert (
        delta('sotserve_tokens_total{kind="completion",mode="sot"}') == usage["completion_tokens"]
    )
    assert delta('sotserve_tokens_total{kind="prompt",mode="sot"}') == usage["prompt_tokens"]
    cached = usage["prompt_tokens_details"]["cached_tokens"]
    assert delta('sotserve_tokens_total{kind="cached",mode="sot"}') == cached
    # the engine's own counters agree with what the answer reported
    assert delta("sotserve_engine_prompt_tokens_total") == usage["prompt_tokens"]
    assert delta("sotserve_engine_cached_prompt_tokens_total") == cached
    ratio = after["sotserve_prefix_cache_hit_ratio"]
    assert ratio == pytest.approx(
        after["sotserve_engine_cached_prompt_tokens_total"]
        / after["sotserve_engine_prompt_tokens_total"]
    )
    assert after["sotserve_engine_running_requests"] == 0
    assert after["sotserve_engine_waiting_requests"] == 0
    assert after["sotserve_kv_slots_used"] == 0
    assert after["sotserve_kv_slots_total"] > 0


async def test_reset_caches_the_prompt_heads_again_unless_told_not_to(http, tokenizer):
    # A skeleton prompt for a question never asked: after a reset the server holds
    # its fixed head (instructions and examples) again, so only the question is cold;
    # with ?prompt_heads=false nothing is cached at all.
    import prompts
    from prompts import ChatRenderer
    from sotserve.prompt_heads import prompt_heads

    renderer = ChatRenderer(tokenizer)
    messages = prompts.load("skeleton").messages(question="Why is the sea salty, Xq17?")
    ids = renderer.render(messages)
    head = max((h for h in prompt_heads(renderer) if ids[: len(h)] == h), key=len)

    async def cached_tokens_of_the_skeleton_prompt() -> int:
        body = {"prompt": ids, "max_tokens": 1, "temperature": 0}
        async with http.post("/v1/completions", json=body) as resp:
            assert resp.status == 200
            return (await resp.json())["usage"]["prompt_tokens_details"]["cached_tokens"]

    async with http.post("/reset_prefix_cache", headers=ADMIN) as resp:
        out = await resp.json()
    assert resp.status == 200 and out["prompt_head_tokens"] >= len(head)
    assert await cached_tokens_of_the_skeleton_prompt() == len(head)
    async with http.post("/reset_prefix_cache?prompt_heads=false", headers=ADMIN) as resp:
        out = await resp.json()
    assert resp.status == 200 and out["prompt_head_tokens"] == 0
    assert await cached_tokens_of_the_skeleton_prompt() == 0


@pytest.mark.parametrize(
    ("code", "error_code", "status"),
    [("invalid_request", "context_length_exceeded", 400), ("overloaded", None, 429),
     ("backend_unavailable", "bad_gateway", 502),
     ("backend_unavailable", "backend_unavailable", 503), ("backend_error", None, 500)],
)  # fmt: skip
def test_answer_error_kinds_become_gateway_statuses(code, error_code, status):
    from sotserve.schemas import ErrorEvent
    from sotserve.server.chat import _error_api

    err = _error_api(ErrorEvent(message="m", code=code, error_code=error_code))
    assert err.status == status
    assert err.body()["error"]["message"] == "m"
