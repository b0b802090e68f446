"""The official ``openai`` SDK against ``sotserve serve`` (real HTTP, embedded SmolLM2)."""

from __future__ import annotations

import openai
import pytest

from sotserve.schemas import AnswerInfo, EventAdapter

pytestmark = pytest.mark.slow

QUESTION = "What are the most effective ways to deal with stress?"
SOT = {"sot": {"mode": "sot", "point_max_tokens": 24}}


@pytest.fixture
async def client(sotserve_url):
    async with openai.AsyncOpenAI(
        base_url=f"{sotserve_url}/v1", api_key="unused", max_retries=0, timeout=120
    ) as c:
        yield c


@pytest.fixture
async def model(client) -> str:
    return (await client.models.list()).data[0].id


async def test_non_streaming(client, model):
    resp = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=120,
        extra_body=SOT,
    )
    answer = resp.choices[0].message.content
    assert resp.choices[0].finish_reason in ("stop", "length")
    info = AnswerInfo.model_validate(resp.model_extra["sot"])
    assert info.mode == "sot" and len(info.points) >= 2
    assert all(f"**{p.title}**" in answer for p in info.points)
    assert resp.usage.completion_tokens == info.usage.completion_tokens
    assert resp.usage.prompt_tokens_details.cached_tokens == info.usage.cached_tokens > 0


async def test_streaming(client, model):
    stream = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=120,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=SOT,
    )
    content: list[str] = []
    events = []
    usage = None
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        if chunk.choices and chunk.choices[0].delta.content:
            content.append(chunk.choices[0].delta.content)
        for e in (chunk.model_extra.get("sot") or {}).get("events", []):
            events.append(EventAdapter.validate_python(e))
    done = events[-1]
    assert done.type == "done" and done.mode == "sot"
    assert "".join(content) == done.answer
    assert {e.type for e in events} >= {
        "skeleton_delta",
        "point_start",
        "point_delta",
        "point_done",
    }
    assert usage is not None and usage.completion_tokens == done.usage.completion_tokens


async def test_sequential_and_completions(client, model):
    resp = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=16,
        temperature=0,
        extra_body={"sot": {"mode": "sequential"}},
    )
    assert resp.choices[0].message.content
    assert resp.model_extra["sot"]["mode"] == "sequential"
    assert resp.usage.completion_tokens <= 16
    comp = await client.completions.create(model=model, prompt="One, two,", max_tokens=4)
    assert comp.usage.completion_tokens == 4 and comp.choices[0].text


async def test_errors_are_sdk_exceptions(client, model):
    with pytest.raises(openai.BadRequestError) as exc:
        await client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": QUESTION}],
            extra_body={"sot": {"mode": "sot", "max_points": 1}},
        )
    assert exc.value.status_code == 400 and "max_points" in str(exc.value)
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "hi"}]
        )
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=10**9
        )
