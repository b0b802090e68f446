"""``auto``'s decision: load-aware on a scripted engine state, and ``Planner.route`` on
bad input."""

from __future__ import annotations

import asyncio
import time

import pytest

from sotserve.backends.base import BackendUnavailableError, EngineLoad
from sotserve.load_policy import (
    DEFAULT_MAX_LOAD,
    DEFAULT_MAX_SEQUENTIAL,
    SKELETON_REQUESTS,
    LoadPolicy,
    PlannedLoad,
)
from sotserve.planner import InvalidQuestionError, Planner
from tests.scripted_backend import ScriptedBackend

LISTY = "What are the most effective ways to deal with stress?"


class LoadedBackend(ScriptedBackend):
    """A scripted backend whose engine state the test sets."""

    state: EngineLoad = EngineLoad(running=0)

    async def load(self) -> EngineLoad:
        return self.state


def backend(tokenizer, state: EngineLoad) -> LoadedBackend:
    b = LoadedBackend(tokenizer, lambda call: ["1. A\n2. B\n"])
    b.state = state
    return b


@pytest.mark.parametrize(
    ("state", "mode", "source"),
    [
        (EngineLoad(running=0, kv_free=1.0), "sot", "rules"),  # idle
        (EngineLoad(running=DEFAULT_MAX_LOAD // 2, kv_free=0.5), "sot", "rules"),  # half full
        (EngineLoad(running=DEFAULT_MAX_LOAD, kv_free=0.3), "sequential", "load"),  # saturated
        (EngineLoad(running=3, waiting=2, kv_free=0.5), "sequential", "load"),  # a queue
        (EngineLoad(running=3, kv_free=0.02), "sequential", "load"),  # out of KV slots
    ],
)
async def test_load_aware_decisions(tokenizer, state, mode, source):
    planner = Planner(backend(tokenizer, state), router="rules")
    decision = await planner.route(LISTY)
    assert (decision.mode, decision.source) == (mode, source), decision


async def test_the_load_threshold_can_be_overridden_or_turned_off(tokenizer):
    busy = EngineLoad(running=10, kv_free=0.5)
    assert (await Planner(backend(tokenizer, busy), LoadPolicy(max_load=8), router="rules")
            .route(LISTY)).source == "load"  # fmt: skip
    assert (await Planner(backend(tokenizer, busy), LoadPolicy(max_load=0), router="rules")
            .route(LISTY)).mode == "sot"  # fmt: skip
    with pytest.raises(ValueError):
        LoadPolicy(max_load=-1)
    with pytest.raises(ValueError):
        LoadPolicy(max_sequential=-1)


async def test_auto_answers_follow_the_load(tokenizer):
    saturated = backend(tokenizer, EngineLoad(running=DEFAULT_MAX_LOAD + 5))
    done = await Planner(saturated, router="rules").answer(LISTY)
    assert done.mode == "sequential" and done.route.source == "load"
    assert [c.kind for c in saturated.calls] == ["chat"]  # no router, no skeleton request


async def test_http_backends_count_their_own_requests_in_flight(tokenizer):
    b = ScriptedBackend(tokenizer, lambda call: ["x"])
    assert (await b.load()).requests == 0
    b.in_flight = DEFAULT_MAX_LOAD
    assert (await Planner(b, router="rules").route(LISTY)).source == "load"


@pytest.mark.parametrize("question", ["", "   \n", None, 3])
async def test_route_refuses_an_empty_or_malformed_question(tokenizer, question):
    with pytest.raises(InvalidQuestionError):
        await Planner(backend(tokenizer, EngineLoad(running=0))).route(question)


@pytest.mark.parametrize("router", ["rules", "trained", "model"])
async def test_route_of_megabytes_stays_cheap(tokenizer, router):
    """No router tokenizes or reads all of a huge question."""
    b = backend(tokenizer, EngineLoad(running=0))
    planner = Planner(b)
    seen: list[int] = []
    render = planner.renderer.render

    def spy(messages, *args, **kwargs):
        seen.append(sum(len(m["content"]) for m in messages))
        return render(messages, *args, **kwargs)

    planner.renderer.render = spy
    question = "How can I list ways to relax? " + "very " * 2_000_000  # 10 MB
    t0 = time.perf_counter()
    decision = await planner.route(question, router=router)
    assert time.perf_counter() - t0 < 5  # generous: a full tokenization takes far longer
    assert decision.mode in ("sequential", "sot", "graph")
    assert seen and max(seen) < 20_000  # what was rendered (and tokenized): the two ends


@pytest.mark.parametrize("router", ["rules", "model"])
async def test_a_burst_of_questions_sees_its_own_load(tokenizer, router):
    """Questions that arrive together decide before any of their requests reaches the
    engine (which reports idle throughout here); each counts the skeletons decided
    before it, so only as many skeletons start as the limit allows. The rules decide
    at once; the prompting router awaits a request, so every question of the burst
    passes the first load check while the routers run, and the check after them is
    what holds the skeletons back."""
    b = backend(tokenizer, EngineLoad(running=0, kv_free=1.0))
    b.script = lambda call: ["A"] if call.kind == "router" else ["1. A\n2. B\n"]
    # (the sequential answers beside a skeleton are left uncounted here: the next test)
    policy = LoadPolicy(max_load=3 * SKELETON_REQUESTS, max_sequential=0)
    planner = Planner(b, policy, router=router)
    done = await asyncio.gather(*(planner.answer(LISTY) for _ in range(8)))
    skeletons = [d for d in done if d.mode == "sot"]
    by_load = [d for d in done if d.route.source == "load"]
    # each answer counts 1 while it decides and 5 as a skeleton: 3 skeletons fit 15
    # when the others have decided (rules), fewer while they still decide (model)
    assert 1 <= len(skeletons) <= 3 and len(skeletons) + len(by_load) == 8, done
    assert all(d.mode == "sequential" for d in by_load)
    if router == "rules":
        assert [d.mode for d in done] == ["sot"] * 3 + ["sequential"] * 5
    else:
        assert all("the router said sot" in d.route.reason for d in by_load)
    assert "answers in flight" in by_load[0].route.reason
    assert planner.planned.on(b) == 0  # every answer gave its count back
    # one at a time, each finds the engine idle again
    assert (await planner.answer(LISTY)).mode == "sot"


async def test_an_answer_closed_early_gives_its_planned_load_back(tokenizer):
    b = backend(tokenizer, EngineLoad(running=0, kv_free=1.0))
    b.delay = 0.05
    planner = Planner(b, router="rules")
    events = planner.stream(LISTY)
    await anext(events)  # the skeleton's first text: the answer holds a skeleton's count
    assert planner.planned.on(b) == SKELETON_REQUESTS
    await events.aclose()
    assert planner.planned.on(b) == 0


async def test_no_skeleton_starts_beside_many_sequential_answers(tokenizer):
    """Answers in flight that hold a single request (routing, or sequential) are what
    a skeleton's points would slow: from DEFAULT_MAX_SEQUENTIAL of them on, auto
    answers sequentially whatever the request count allows; answers that hold
    skeletons do not count as such."""
    b = backend(tokenizer, EngineLoad(running=0, kv_free=1.0))
    b.delay = 0.02  # answers stay in flight while the test routes
    planner = Planner(b, LoadPolicy(max_load=0), router="rules")  # no request limit

    async def beside(n: int, mode: str) -> list[asyncio.Task]:
        sent = len(b.calls)
        tasks = [asyncio.create_task(planner.answer(LISTY, mode)) for _ in range(n)]
        while len(b.calls) < sent + n:
            await asyncio.sleep(0.001)  # until each has sent its first request
        return tasks

    seq = await beside(DEFAULT_MAX_SEQUENTIAL - 1, "sequential")
    assert planner.planned.single_on(b) == DEFAULT_MAX_SEQUENTIAL - 1
    assert (await planner.route(LISTY)).mode == "sot"
    seq += await beside(1, "sequential")
    decision = await planner.route(LISTY)
    assert (decision.mode, decision.source) == ("sequential", "load"), decision
    assert f"{DEFAULT_MAX_SEQUENTIAL} answers in flight decode sequentially" in decision.reason
    off = Planner(b, LoadPolicy(max_load=0, max_sequential=0), router="rules")
    off.planned = planner.planned  # the same answers in flight, the check turned off
    off.router.planned = planner.planned
    assert (await off.route(LISTY)).mode == "sot"
    await asyncio.gather(*seq)
    assert planner.planned.on(b) == planner.planned.single_on(b) == 0
    # skeleton answers in flight hold requests, not sequential answers
    sots = await beside(DEFAULT_MAX_SEQUENTIAL, "sot")
    while planner.planned.single_on(b):
        await asyncio.sleep(0.001)
    assert planner.planned.on(b) == DEFAULT_MAX_SEQUENTIAL * SKELETON_REQUESTS
    assert (await planner.route(LISTY)).mode == "sot"
    await asyncio.gather(*sots)


def test_planned_load_counts_requests_and_single_answers(tokenizer):
    b = backend(tokenizer, EngineLoad(running=0))
    planned = PlannedLoad()
    planned.start(b)
    planned.start(b)
    assert (planned.on(b), planned.single_on(b)) == (2, 2)
    planned.plan_skeleton(b)
    assert (planned.on(b), planned.single_on(b)) == (1 + SKELETON_REQUESTS, 1)
    planned.end(b, skeleton=True)
    assert (planned.on(b), planned.single_on(b)) == (1, 1)
    with pytest.raises(ValueError):
        planned.end(b, skeleton=True)  # it holds one request, not a skeleton's
    planned.end(b, skeleton=False)
    assert (planned.on(b), planned.single_on(b)) == (0, 0)
    for wrong in (lambda: planned.end(b, skeleton=False), lambda: planned.plan_skeleton(b)):
        with pytest.raises(ValueError):  # nothing counted: nothing to end or turn
            wrong()


async def test_an_answer_that_fails_before_it_counts_anything_ends_with_its_error(tokenizer):
    """A replica set with no healthy replica refuses in ``for_answer``, before the
    answer counts any load: the answer ends with that error, not another."""
    b = backend(tokenizer, EngineLoad(running=0))

    def no_replica(prompt):
        raise BackendUnavailableError("no backend is healthy (x)")

    b.for_answer = no_replica
    events = [e async for e in Planner(b, router="rules").stream(LISTY)]
    assert [type(e).__name__ for e in events] == ["ErrorEvent"]
    assert events[0].code == "backend_unavailable" and "no backend is healthy" in events[0].message
