"""The point executor's DAG scheduling, budgets and cancellation.

The backend is scripted (tests/scripted_backend.py) so that timing and faults are
under the test's control; the tokenizer is the real SmolLM2 one.
"""

from __future__ import annotations

import asyncio

import pytest
from scripted_backend import ScriptedBackend

from sotserve.backends.base import CompletionParams
from sotserve.executor import (
    PointExecutor,
    PointFailed,
    PointFinished,
    PointText,
    TokenBudget,
)
from sotserve.schemas import PlanPoint


def make(tokenizer, script, delay=0.0, budget=10_000, point_max=8, expected=4):
    calls = []

    def build_prompt(point, parents):
        calls.append((point.index, [(p.index, text) for p, text in parents]))
        # the prompt text only needs to be recognisable to the scripted backend
        return tokenizer.encode(f"Now explain point {point.index}", add_special_tokens=False)

    backend = ScriptedBackend(tokenizer, script, delay)
    queue: asyncio.Queue = asyncio.Queue()
    ex = PointExecutor(
        backend, build_prompt, CompletionParams(max_tokens=point_max), TokenBudget(budget),
        queue, expected_points=expected,
    )  # fmt: skip
    return ex, backend, queue, calls


async def drain(ex, queue, timeout=5.0):
    """Play the planner: hear events until every point is finished."""
    events = []
    while not ex.finished:
        item = await asyncio.wait_for(queue.get(), timeout)
        events.append(item)
        if isinstance(item, PointFinished):
            ex.mark_done(item.index, item.text)
        if isinstance(item, PointFailed):
            raise item.error
    return events


def P(index, *deps):
    return PlanPoint(index=index, title=f"T{index}", depends_on=list(deps))


async def test_independent_points_run_in_parallel(tokenizer):
    def pieces(point: int) -> list[str]:
        return [f" P{point}", " is", " fine."]

    ex, backend, queue, _ = make(tokenizer, lambda c: pieces(c.point), delay=0.02)
    for i in (1, 2, 3):
        ex.add(P(i))
    ex.close()
    events = await drain(ex, queue)
    starts = sorted(c.started for c in backend.calls)
    ends = sorted(c.ended for c in backend.calls)
    assert starts[-1] < ends[0]  # all three were in flight at once
    finished = {e.index: e for e in events if isinstance(e, PointFinished)}
    assert {i: f.text for i, f in finished.items()} == {i: f"P{i} is fine." for i in (1, 2, 3)}
    for i, f in finished.items():
        assert f.finish_reason == "stop"
        n = sum(len(tokenizer.encode(p, add_special_tokens=False)) for p in pieces(i))
        assert f.completion_tokens == n
        assert len([c for c in backend.calls if c.point == i]) == 1


async def test_children_wait_for_parents_and_get_their_text(tokenizer):
    ex, backend, queue, calls = make(tokenizer, lambda c: [f" text{c.point}"], delay=0.02)
    ex.add(P(1))
    ex.add(P(2))
    ex.add(P(3, 1, 2))
    ex.add(P(4, 3))
    plan = ex.close()
    assert [p.depends_on for p in plan] == [[], [], [1, 2], [3]]
    await drain(ex, queue)
    by_point = {c.point: c for c in backend.calls}
    assert by_point[3].started >= max(by_point[1].ended, by_point[2].ended)
    assert by_point[4].started >= by_point[3].ended
    assert dict(calls)[3] == [(1, "text1"), (2, "text2")]
    assert dict(calls)[4] == [(3, "text3")]


async def test_a_parent_that_finished_before_its_child_was_parsed_counts(tokenizer):
    ex, _, queue, calls = make(tokenizer, lambda c: [f" t{c.point}"])
    ex.add(P(1))
    finished = await asyncio.wait_for(queue.get(), 2)
    while not isinstance(finished, PointFinished):
        finished = await asyncio.wait_for(queue.get(), 2)
    ex.mark_done(1, finished.text)
    ex.add(P(2, 1))  # parsed only now (pipelined skeleton)
    ex.close()
    await drain(ex, queue, timeout=2.0)
    assert dict(calls)[2] == [(1, "t1")]


async def test_unknown_references_are_dropped_when_the_plan_closes(tokenizer):
    ex, backend, queue, calls = make(tokenizer, lambda c: [" x"])
    ex.add(P(1))
    ex.add(P(2, 1, 7))  # 7 might still come while the plan is open
    await asyncio.sleep(0.05)
    assert {c.point for c in backend.calls} == {1}
    plan = ex.close()
    assert plan[1].depends_on == [1]
    await drain(ex, queue)
    assert dict(calls)[2] == [(1, "x")]


async def test_cycles_are_broken_and_nothing_hangs(tokenizer):
    ex, backend, queue, _ = make(tokenizer, lambda c: [" y"])
    ex.add(P(1, 3))
    ex.add(P(2, 1))
    ex.add(P(3, 2))
    ex.add(P(4, 4))  # self-loop
    plan = ex.close()
    await drain(ex, queue, timeout=2.0)
    assert {c.point for c in backend.calls} == {1, 2, 3, 4}
    deps = {p.index: set(p.depends_on) for p in plan}
    assert deps[4] == set()
    # what is left is acyclic: some order runs every point after its parents
    order = [c.point for c in sorted(backend.calls, key=lambda c: c.started)]
    assert all(order.index(d) < order.index(i) for i, ds in deps.items() for d in ds)
    assert sum(len(d) for d in deps.values()) == 2  # exactly one edge of the 3-cycle cut


async def test_budget_caps_each_point_and_the_total(tokenizer):
    ex, backend, queue, _ = make(
        tokenizer, lambda c: [" w"] * 50, budget=20, point_max=8, expected=3
    )
    for i in (1, 2, 3):
        ex.add(P(i))
    ex.close()
    events = await drain(ex, queue)
    used = {e.index: e.completion_tokens for e in events if isinstance(e, PointFinished)}
    assert all(c.params.max_tokens <= 8 for c in backend.calls)
    assert sum(used.values()) <= 20
    assert all(n > 0 for n in used.values())  # fair shares: nobody starves
    assert ex.budget.remaining == 20 - sum(used.values())


async def test_exhausted_budget_finishes_points_empty(tokenizer):
    ex, backend, queue, _ = make(tokenizer, lambda c: [" w"] * 5, budget=0)
    ex.add(P(1))
    ex.add(P(2))
    ex.close()
    events = await drain(ex, queue)
    assert backend.calls == []
    assert [(e.text, e.finish_reason) for e in events] == [("", "length"), ("", "length")]


async def test_backend_error_is_reported_not_raised(tokenizer):
    def script(call):
        return ([" ok"], RuntimeError("boom")) if call.point == 2 else [" ok"]

    ex, _, queue, _ = make(tokenizer, script)
    ex.add(P(1))
    ex.add(P(2))
    ex.close()
    with pytest.raises(RuntimeError, match="boom"):
        await drain(ex, queue)


async def test_cancel_aborts_every_request_in_flight(tokenizer):
    ex, backend, queue, _ = make(
        tokenizer,
        lambda c: [f" Sentence {n}." for n in range(1000)],
        delay=0.01,
        point_max=2000,
    )
    for i in (1, 2, 3):
        ex.add(P(i))
    ex.add(P(4, 1))  # waits on its parent: never starts
    ex.close()
    assert isinstance(await asyncio.wait_for(queue.get(), 2.0), PointText)
    await asyncio.wait_for(ex.cancel(), 1.0)
    assert {c.point for c in backend.calls} == {1, 2, 3}
    assert all(c.closed_early and c.ended is not None for c in backend.calls)
    # the 3 x 2000 reserved tokens went back, less the few that were generated
    assert ex.budget.remaining >= 10_000 - 100


async def test_a_point_cut_before_any_text_is_retried_with_its_opening_barred(tokenizer):
    """A point that opens its own list (" 1. ...") shows nothing; the executor asks
    again with the opening token barred, and the prose of the retry is the point."""
    attempts: dict[int, int] = {}

    def script(call):
        attempts[call.point] = attempts.get(call.point, 0) + 1
        if call.point == 1 and attempts[1] == 1:
            return [" 1.", " Sleep", " well"]
        return [" Sleep restores", " the body.", " It"]

    ex, backend, queue, _ = make(tokenizer, script, point_max=40)
    ex.add(P(1))
    ex.add(P(2))
    ex.close()
    events = await drain(ex, queue)
    finished = {e.index: e for e in events if isinstance(e, PointFinished)}
    assert finished[1].text == finished[2].text == "Sleep restores the body."
    calls = [c for c in backend.calls if c.point == 1]
    assert len(calls) == 2 and calls[0].closed_early
    opening = tokenizer.encode(" 1.", add_special_tokens=False)[0]
    assert calls[0].params.logit_bias.get(opening) is None
    assert calls[1].params.logit_bias[opening] == -100.0
    assert [c.params.logit_bias for c in backend.calls if c.point == 2] == [{}]
    # the tokens of both attempts count, and they fit the point's reservation
    assert finished[1].completion_tokens > finished[2].completion_tokens


async def test_a_point_cut_inside_its_first_sentence_is_continued_past_the_cut(tokenizer):
    """A point that loops before it ends one sentence would show a fragment: it is
    asked again with the fragment's tokens ending its prompt and the token that
    started the loop barred, so the sentence goes on another way. When every retry
    loops, the last attempt's fragment stands rather than nothing."""
    loop = [" Set", " limits", " on", " your", " work", " hours,", " set", " limits", " on",
            " your", " work", " hours,", " set"]  # fmt: skip
    attempts: dict[int, int] = {}

    def script(call):
        attempts[call.point] = attempts.get(call.point, 0) + 1
        if call.point == 1 and attempts[1] > 1:
            return [" and", " take", " breaks."]
        return loop  # point 1 once, point 2 every time

    ex, backend, queue, _ = make(tokenizer, script, point_max=60)
    ex.add(P(1))
    ex.add(P(2))
    ex.close()
    events = await drain(ex, queue)
    finished = {e.index: e for e in events if isinstance(e, PointFinished)}
    shown: dict[int, str] = {}
    for e in events:
        if isinstance(e, PointText):
            shown[e.index] = shown.get(e.index, "") + e.text
    assert finished[1].text == shown[1] == "Set limits on your work hours, and take breaks."
    first, second = [c for c in backend.calls if c.point == 1]
    fragment = tokenizer.encode(" Set limits on your work hours,", add_special_tokens=False)
    assert second.prompt_ids[: len(first.prompt_ids)] == first.prompt_ids
    assert second.prompt_ids[len(first.prompt_ids) :] == fragment
    loop_start = tokenizer.encode(" set", add_special_tokens=False)[0]
    assert second.params.logit_bias[loop_start] == -100.0
    assert len([c for c in backend.calls if c.point == 2]) == 3  # 1 + 2 retries
    assert finished[2].text == shown[2] == "Set limits on your work hours,"


async def test_a_point_that_only_repeats_its_title_starts_over(tokenizer):
    attempts: dict[int, int] = {}

    def script(call):
        attempts[call.point] = attempts.get(call.point, 0) + 1
        return [" Good", " sleep."] if attempts[call.point] == 1 else [" Rest", " heals."]

    ex, backend, queue, _ = make(tokenizer, script, point_max=40)
    ex.add(PlanPoint(index=1, title="Good sleep", depends_on=[]))
    ex.close()
    events = await drain(ex, queue)
    finished = [e for e in events if isinstance(e, PointFinished)]
    assert finished[0].text == "Rest heals."
    first, second = backend.calls
    assert second.prompt_ids == first.prompt_ids  # nothing of the first try is kept
    assert second.params.logit_bias[tokenizer.encode(" Good", add_special_tokens=False)[0]] == -100


@pytest.mark.parametrize("share", [2 / 3, 1.0])
async def test_points_still_running_when_most_have_ended_wrap_up(tokenizer, share):
    # Points 1 and 2 say one sentence; point 3 would write ten, slowly. Once two of
    # the three have ended (share 2/3), point 3 ends at its next sentence end.
    def pieces(call):
        if call.point == 3:
            return [f" Sentence{k} of three." for k in range(10)]
        return [f" Point{call.point} is short."]

    ex, backend, queue, _ = make(tokenizer, pieces, delay=0.02, point_max=200)
    ex.wrap_up_share = share
    ex.soft_tokens = 200
    for i in (1, 2, 3):
        ex.add(P(i))
    ex.close()
    events = await drain(ex, queue)
    third = next(e for e in events if isinstance(e, PointFinished) and e.index == 3)
    sentences = third.text.count(" of three.")
    if share < 1:
        # the others ended after its first piece (same delay, one piece each): it
        # ends at the end of its second sentence at the latest
        assert 1 <= sentences <= 2 and third.finish_reason == "stop"
        assert next(c for c in backend.calls if c.point == 3).closed_early
    else:
        assert sentences == 10


async def test_a_point_that_ends_at_once_is_retried_with_the_end_barred(tokenizer):
    # nothing at all, so no token to bar: the end of text is
    def pieces(call):
        return [] if len([c for c in backend.calls if c.point == 1]) == 1 else [" Now it talks."]

    ex, backend, queue, _ = make(tokenizer, pieces, point_max=20)
    ex.add(P(1))
    ex.close()
    events = await drain(ex, queue)
    done = next(e for e in events if isinstance(e, PointFinished))
    assert done.text == "Now it talks." and done.requests == 2
    first, second = backend.calls
    assert tokenizer.eos_token_id not in first.params.logit_bias
    assert second.params.logit_bias[tokenizer.eos_token_id] == -100.0
