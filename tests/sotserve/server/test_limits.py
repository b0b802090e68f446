"""The admission gate: engine requests past the limit queue, past the queue get 429,
and a queued request gives up with 503 after the queue timeout. Chat answers and raw
completions share the gate, and a skeleton answer costs one unit per point running.

Real HTTP on 127.0.0.1 against an in-process app on a tiny random-weight model, so
answers are cheap and the limits can be set small; the gate's own accounting is
checked with a scripted backend (it cannot be paced on a real engine).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from scripted_backend import ScriptedBackend

from engine import AsyncEngine
from engine.protocol import APIError
from engine.serving import AdmissionGate
from sotserve.backends.base import CompletionParams
from sotserve.server import ServerLimits, build_app
from sotserve.server.limits import AdmittedBackend

# sequential: one engine request per answer; the tiny model rarely hits its EOS
BODY = {
    "messages": [{"role": "user", "content": "Tell me a story."}],
    "max_tokens": 150,
    "stream": True,
    "sot": {"mode": "sequential"},
}


@pytest.fixture(scope="module")
def engine(tiny_llama_dir):
    eng = AsyncEngine(str(tiny_llama_dir), dtype="float32", device="cpu", kv_slots=4096)
    yield eng
    eng.close()


@contextlib.asynccontextmanager
async def serve(engine, limits: ServerLimits) -> AsyncIterator[aiohttp.ClientSession]:
    runner = web.AppRunner(build_app(engine, "tiny", limits), handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        async with aiohttp.ClientSession(f"http://{host}:{port}") as session:
            yield session
    finally:
        await runner.cleanup()


async def first_chunk(resp: aiohttp.ClientResponse) -> None:
    """Wait until the answer is running (its first SSE event arrived)."""
    assert resp.status == 200
    line = await resp.content.readline()
    assert line.startswith(b"data: ")


async def gauge(http, name: str) -> float:
    async with http.get("/metrics") as resp:
        for line in (await resp.text()).splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
    raise AssertionError(name)


async def test_over_the_limit_is_429_and_the_slot_frees(engine):
    async with serve(engine, ServerLimits(max_concurrency=1, max_queue=0)) as http:
        running = await http.post("/v1/chat/completions", json=BODY)
        await first_chunk(running)
        async with http.post("/v1/chat/completions", json=BODY) as resp:
            assert resp.status == 429
            err = (await resp.json())["error"]
        assert err["type"] == "rate_limit_error" and err["code"] == "rate_limit_exceeded"
        assert "1 concurrent" in err["message"]
        assert await gauge(http, "sotserve_rejected_total") == 1
        rejected = 'sotserve_answers_total{mode="sequential",outcome="rejected"}'
        assert await gauge(http, rejected) == 1
        await running.read()  # the first answer completes normally
        running.release()
        async with http.post("/v1/chat/completions", json=BODY) as resp:
            assert resp.status == 200
            assert (await resp.text()).endswith("data: [DONE]\n\n")


async def test_queued_answer_runs_when_the_slot_frees(engine):
    async with serve(engine, ServerLimits(max_concurrency=1, max_queue=1)) as http:
        first = await http.post("/v1/chat/completions", json=BODY)
        await first_chunk(first)
        second = asyncio.create_task(http.post("/v1/chat/completions", json=BODY))
        for _ in range(100):  # until the second request sits in the queue
            if await gauge(http, "sotserve_requests_queued") == 1:
                break
            await asyncio.sleep(0.02)
        assert await gauge(http, "sotserve_requests_queued") == 1
        assert await gauge(http, "sotserve_requests_in_flight") == 1
        async with http.post("/v1/chat/completions", json=BODY) as third:
            assert third.status == 429  # one running, one queued: full
        first.close()  # the first client hangs up, so the queued answer gets the slot
        resp = await second
        assert resp.status == 200
        text = await resp.text()
        done = [json.loads(x[6:]) for x in text.split("\n\n") if x.startswith("data: {")]
        assert done[-1]["sot"]["events"][-1]["type"] == "done"
        assert await gauge(http, "sotserve_requests_queued") == 0


async def test_gate_counts_and_rejects_without_a_server():
    gate = AdmissionGate(limit=2, max_queue=1)
    entered = asyncio.Event()
    release = asyncio.Event()

    async def hold() -> None:
        async with gate.admit("answers"):
            entered.set()
            await release.wait()

    holders = [asyncio.create_task(hold()) for _ in range(3)]
    await asyncio.sleep(0.01)
    assert (gate.running, gate.waiting) == (2, 1)
    with pytest.raises(APIError, match="limit of 2 concurrent answers") as exc:
        async with gate.admit("answers"):
            pass
    assert exc.value.status == 429
    holders[2].cancel()  # a queued client that leaves gives up its queue place
    await asyncio.sleep(0.01)
    assert (gate.running, gate.waiting) == (2, 0)
    release.set()
    await asyncio.gather(*holders, return_exceptions=True)
    assert (gate.running, gate.waiting) == (0, 0)


async def test_queue_wait_times_out_with_503():
    gate = AdmissionGate(limit=1, max_queue=4, queue_timeout_s=0.1)
    release = asyncio.Event()

    async def hold() -> None:
        async with gate.admit():
            await release.wait()

    holder = asyncio.create_task(hold())
    await asyncio.sleep(0.01)
    with pytest.raises(APIError) as exc:
        async with gate.admit():
            pass
    assert exc.value.status == 503 and exc.value.code == "queue_timeout"
    assert (gate.running, gate.waiting) == (1, 0)  # the timed-out waiter left no trace
    release.set()
    await holder
    assert gate.running == 0


async def test_an_answer_costs_one_unit_per_request_running(tokenizer):
    """Four points of one answer, a limit of three: the answer's first unit plus two
    more run at once, the fourth waits for one of them, and all units come back."""
    running = 0
    peak = 0

    backend = ScriptedBackend(tokenizer, lambda call: ["x"], delay=0.05)
    gate = AdmissionGate(limit=3, max_queue=0)
    admitted = AdmittedBackend(backend)
    peaks: list[int] = []
    gate.on_change = lambda g: peaks.append(g.running)

    async def point() -> None:
        nonlocal running, peak
        params = CompletionParams(max_tokens=4)
        async for _ in admitted.for_answer([1, 2, 3]).complete("Now explain point 1", params):
            running += 1
            peak = max(peak, running)
            await asyncio.sleep(0.05)
            running -= 1

    async with gate.admit():
        assert gate.running == 1
        await asyncio.gather(*(asyncio.create_task(point()) for _ in range(4)))
        assert gate.running == 1  # the extra units went back as the points ended
    assert gate.running == 0
    assert max(peaks) == 3 and peak == 3
    # meanwhile a new answer finds no room and an empty queue allowance: 429
    async with gate.admit():
        tasks = [asyncio.create_task(point()) for _ in range(3)]
        await asyncio.sleep(0.02)
        with pytest.raises(APIError) as exc:
            async with gate.admit():
                pass
        assert exc.value.status == 429
        await asyncio.gather(*tasks)


async def test_completions_share_the_chat_gate(engine):
    """/v1/completions is admitted through the same gate: a running chat answer at a
    limit of one leaves no room for a completion."""
    async with serve(engine, ServerLimits(max_concurrency=1, max_queue=0)) as http:
        running = await http.post("/v1/chat/completions", json=BODY)
        await first_chunk(running)
        body = {"prompt": "Hello", "max_tokens": 4}
        async with http.post("/v1/completions", json=body) as resp:
            assert resp.status == 429, await resp.text()
            assert (await resp.json())["error"]["code"] == "rate_limit_exceeded"
        running.close()
        for _ in range(100):  # the hang-up frees the unit
            if await gauge(http, "sotserve_requests_in_flight") == 0:
                break
            await asyncio.sleep(0.02)
        async with http.post("/v1/completions", json=body) as resp:
            assert resp.status == 200


def test_limits_reject_nonsense():
    with pytest.raises(ValueError):
        ServerLimits(max_concurrency=0)
    with pytest.raises(ValueError):
        ServerLimits(max_queue=-1)


@pytest.mark.parametrize("stream", [False, True])
async def test_an_answer_past_the_request_timeout_ends_with_a_clear_error(engine, stream):
    limits = ServerLimits(request_timeout_s=0.05)
    body = {**BODY, "max_tokens": 400, "stream": stream}
    async with serve(engine, limits) as http:
        async with http.post("/v1/chat/completions", json=body) as resp:
            if stream:  # the status line went out with the first event: in-band
                assert resp.status == 200
                text = await resp.text()
                errors = [json.loads(x[6:]) for x in text.split("\n\n") if '"error"' in x]
                assert errors and errors[0]["error"]["code"] == "request_timeout"
                assert text.endswith("data: [DONE]\n\n")
            else:
                assert resp.status == 504
                assert (await resp.json())["error"]["code"] == "request_timeout"
        for _ in range(100):  # the timed-out answer gave its unit back
            if await gauge(http, "sotserve_requests_in_flight") == 0:
                break
            await asyncio.sleep(0.02)
        assert await gauge(http, "sotserve_requests_in_flight") == 0


async def test_admitted_answers_at_the_limit_do_not_deadlock(tokenizer):
    """Two answers hold both units; each fans out to three points. Each point must
    find its answer's own unit once the point on it ends, or all six wait for ever
    on units only their own answers hold."""
    backend = ScriptedBackend(tokenizer, lambda call: ["x", "y"], delay=0.02)
    gate = AdmissionGate(limit=2, max_queue=4)
    admitted = AdmittedBackend(backend)

    async def point() -> None:
        params = CompletionParams(max_tokens=4)
        async for _ in admitted.complete("Now explain point 1", params):
            pass

    async def answer() -> None:
        async with gate.admit():
            await asyncio.gather(*(point() for _ in range(3)))

    await asyncio.wait_for(asyncio.gather(answer(), answer(), answer()), 10)
    assert (gate.running, gate.waiting) == (0, 0)


def test_answer_default_flags_reach_the_planner_options():
    """``sotserve serve``'s answer defaults: the load limits given, as one LoadPolicy
    (the other at its default), and a negative limit refused."""
    import argparse

    from sotserve.load_policy import DEFAULT_MAX_LOAD, DEFAULT_MAX_SEQUENTIAL
    from sotserve.server.app import add_server_args, answer_defaults

    parser = argparse.ArgumentParser()
    add_server_args(parser)
    assert "load_policy" not in answer_defaults(parser.parse_args([]))  # the planner's own
    plan = answer_defaults(parser.parse_args(["--mode", "sot", "--auto-max-sequential", "2"]))
    assert plan["mode"] == "sot"
    assert (plan["load_policy"].max_load, plan["load_policy"].max_sequential) == (
        DEFAULT_MAX_LOAD, 2,
    )  # fmt: skip
    plan = answer_defaults(parser.parse_args(["--auto-max-load", "0"]))
    assert (plan["load_policy"].max_load, plan["load_policy"].max_sequential) == (
        0, DEFAULT_MAX_SEQUENTIAL,
    )  # fmt: skip
    with pytest.raises(SystemExit, match="max_sequential must be at least 0"):
        answer_defaults(parser.parse_args(["--auto-max-sequential", "-1"]))
