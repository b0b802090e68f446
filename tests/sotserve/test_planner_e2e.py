"""The planner end to end on the embedded SmolLM2: in process and over real HTTP."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web

from engine import AsyncEngine
from engine.server import build_app
from sotserve.backends import HTTPBackend, LocalBackend
from sotserve.planner import Planner
from sotserve.schemas import Done, PlanReady, PointDelta, PointDone

pytestmark = pytest.mark.slow

# A few questions of ../shared/data/vicuna80.jsonl (by question_id), inline so the
# suite does not depend on a checkout layout.
VICUNA = {
    1: "How can I improve my time management skills?",
    2: "What are the most effective ways to deal with stress?",
    3: "What are the main differences between Python and JavaScript programming languages?",
    4: "How can I increase my productivity while working from home?",
    5: "Can you explain the basics of quantum computing?",
    7: "How can I develop my critical thinking skills?",
}


def vicuna(qid: int) -> str:
    return VICUNA[qid]


@pytest.fixture(scope="module")
def engine():
    # the embedded SmolLM2-135M-Instruct. Without speculative drafts: whether a request
    # drafts depends on how many others decode in that step, which differs between
    # the HTTP and the in-process run, and a draft's rows padded to a batch-mate's key
    # width can part a near-tie (README, speculative decoding); the HTTP test below
    # compares the two runs' answers token for token.
    eng = AsyncEngine(speculative_tokens=0)
    yield eng
    eng.close()


async def run(planner, question, **kw):
    events = [e async for e in planner.stream(question, **kw)]
    done = events[-1]
    assert isinstance(done, Done), done
    return events, done


async def idle(engine):
    """The engine's stats once nothing runs (or after a second). A point that its
    writer ended early closed its stream, and the engine frees an aborted request
    at its next step: that can be just after the answer is done."""
    for _ in range(100):
        st = engine.stats()
        if st.running == 0 and st.waiting == 0 and st.kv_slots_used == 0:
            break
        await asyncio.sleep(0.01)
    return st


def check_sot_answer(events, done):
    assert done.mode == "sot" and len(done.points) >= 2
    pos = [done.answer.find(f"**{p.title}**") for p in done.points]
    assert -1 not in pos and pos == sorted(pos)  # every title, in skeleton order
    point_done = [e for e in events if isinstance(e, PointDone)]
    assert sorted(e.index for e in point_done) == [p.index for p in done.points]
    prompt = sum(e.prompt_tokens for e in point_done)
    cached = sum(e.cached_tokens or 0 for e in point_done)
    return prompt, cached


@pytest.mark.parametrize(("qid", "pipeline"), [(1, True), (3, False), (5, True)])
async def test_sot_on_vicuna_questions(engine, qid, pipeline):
    before = engine.stats()
    events, done = await run(Planner(LocalBackend(engine)), vicuna(qid), mode="sot",
                             pipeline=pipeline)  # fmt: skip
    prompt, cached = check_sot_answer(events, done)
    assert cached >= 0.7 * prompt, (cached, prompt)
    after = await idle(engine)
    # the per-request counts are the engine's own: its totals moved at least as much
    assert after.cached_tokens - before.cached_tokens >= cached
    assert after.prompt_tokens - before.prompt_tokens == done.usage.prompt_tokens
    assert after.running == 0 and after.kv_slots_used == 0


async def test_a_system_message_keeps_the_points_on_the_skeletons_cached_prefix(engine):
    # the request's system text opens the skeleton prompt, so every point prompt (which
    # continues the skeleton request's ids) starts with it, and still hits the cache
    messages = [
        {"role": "system", "content": "You are a calm coach. Keep every answer practical."},
        {"role": "user", "content": vicuna(2)},
    ]
    events, done = await run(Planner(LocalBackend(engine)), messages, mode="sot")
    prompt, cached = check_sot_answer(events, done)
    assert cached >= 0.7 * prompt, (cached, prompt)


async def test_graph_mode_with_dependent_points(engine):
    # SmolLM2's graph skeleton for this question makes points 4 and 5 build on 1-3
    events, done = await run(Planner(LocalBackend(engine)), vicuna(4), mode="graph")
    plan = next(e for e in events if isinstance(e, PlanReady))
    assert plan.mode == "graph" and any(p.depends_on for p in plan.points)
    finished_at = {}
    started_at = {}
    for i, e in enumerate(events):
        if isinstance(e, PointDelta):
            started_at.setdefault(e.index, i)
        if isinstance(e, PointDone):
            finished_at[e.index] = i
    for p in plan.points:
        for parent in p.depends_on:
            if p.index in started_at:  # a child's first token comes after its parents end
                assert finished_at[parent] < started_at[p.index]
    assert done.answer.startswith(f"1. **{plan.points[0].title}**")


async def test_cancelling_mid_answer_frees_the_engine(engine):
    planner = Planner(LocalBackend(engine), point_max_tokens=200)
    stream = planner.stream(vicuna(2), mode="sot")
    async for event in stream:
        if isinstance(event, PointDelta):
            break
    await stream.aclose()
    st = await idle(engine)
    assert (st.running, st.waiting, st.kv_slots_used) == (0, 0, 0)


async def test_sot_over_http_against_our_engine_server(engine):
    runner = web.AppRunner(build_app(engine))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    backend = HTTPBackend(f"http://127.0.0.1:{port}", tokenizer=engine.tokenizer)
    try:
        events, done = await run(Planner(backend), vicuna(7), mode="sot")
        prompt, cached = check_sot_answer(events, done)
        assert cached >= 0.7 * prompt  # reported as usage.prompt_tokens_details
        # HTTP peers get no jump-forward rules (a local engine's speed hint), so the
        # local planner skips them too: the same requests, greedy, the same answer
        local_planner = Planner(LocalBackend(engine))
        local_planner.skeleton_jumps = {}
        local = await local_planner.answer(vicuna(7), mode="sot")
        assert local.answer == done.answer
    finally:
        await backend.close()
        await runner.cleanup()
