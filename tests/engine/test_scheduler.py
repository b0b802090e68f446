"""Request priority in the scheduler (vLLM's ``priority``: lower is served first).

Engine-level tests on the tiny random-weight Llama, driving ``LLMEngine.step()`` and
recording every step's batch: admission order, aging (the bounded wait of a cold
request behind cache hits), preemption victims (least urgent, then least preempted,
then newest) under KV pressure, urgent requests taking room from less urgent ones, and
the prefill cap while an urgent request decodes.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from engine import LLM, InvalidRequestError, SamplingParams
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.request import Request
from engine.scheduler import ScheduledBatch

URGENT = -1


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


def prompt(seed: int, n: int) -> list[int]:
    """``n`` random token ids; different seeds share no prefix in practice."""
    rng = random.Random(seed)
    return [rng.randrange(100, 49000) for _ in range(n)]


def make_engine(tiny_llama_dir: Path, **config) -> LLMEngine:
    return LLMEngine(str(tiny_llama_dir), dtype="float32", device="cpu", **config)


class Steps:
    """Records the batch of every step an engine runs (what the forward got)."""

    def __init__(self, eng: LLMEngine, monkeypatch: pytest.MonkeyPatch) -> None:
        self.batches: list[tuple[list[Request], list[tuple[Request, int]]]] = []
        run = eng.runner.run

        def recording_run(batch: ScheduledBatch):
            self.batches.append((list(batch.decodes), list(batch.prefills)))
            return run(batch)

        monkeypatch.setattr(eng.runner, "run", recording_run)

    def prefill_tokens(self, i: int) -> int:
        return sum(n for _, n in self.batches[i][1])

    def first_scheduled(self, req: Request) -> int:
        return next(
            i for i, (d, p) in enumerate(self.batches) if req in d or any(r is req for r, _ in p)
        )


def record_victims(eng: LLMEngine, monkeypatch: pytest.MonkeyPatch) -> list[Request]:
    victims: list[Request] = []
    preempt = eng.scheduler._preempt

    def recording_preempt() -> Request:
        victims.append(preempt())
        return victims[-1]

    monkeypatch.setattr(eng.scheduler, "_preempt", recording_preempt)
    return victims


def add(eng: LLMEngine, ids: list[int], max_tokens: int, priority: int = 0) -> Request:
    req = eng.make_request(ids, greedy(max_tokens), priority=priority)
    eng.add(req)
    return req


def run_to_end(eng: LLMEngine, limit: int = 500) -> None:
    for _ in range(limit):
        if not eng.has_unfinished():
            return
        eng.step()
    raise AssertionError(f"not done after {limit} steps: {eng.stats()}")


# -- the prefill cap while an urgent request decodes -------------------------------------------
@pytest.mark.parametrize("cap", [32, 8])
def test_urgent_decode_caps_prefill_until_it_finishes(tiny_llama_dir, monkeypatch, cap):
    eng = make_engine(tiny_llama_dir, kv_slots=4096, urgent_prefill_tokens=cap)
    assert eng.config.max_batched_tokens >= 6 * 100 + 1  # uncapped, all fit one step
    steps = Steps(eng, monkeypatch)
    urgent = add(eng, prompt(0, 20), max_tokens=10, priority=URGENT)
    eng.step()  # its prompt; it decodes from now on
    assert urgent.is_decoding
    normal = [add(eng, prompt(1 + i, 100 + i), max_tokens=3) for i in range(6)]

    while urgent.finish_reason is None:
        eng.step()
    during = range(1, len(steps.batches))
    assert len(during) == 9  # one decode step per remaining token
    for i in during:
        decodes, _ = steps.batches[i]
        assert urgent in decodes, f"step {i} left out the urgent decode"
        assert steps.prefill_tokens(i) <= cap, f"step {i} prefilled {steps.prefill_tokens(i)}"
    # the cap is a cap, not a stall: the normal requests prefill all along
    assert sum(steps.prefill_tokens(i) for i in during) == 9 * cap
    # (a request with one prompt token left decodes it; that is not a prefill row)
    waiting = [r for r in normal if r.finish_reason is None and r.num_pending > 1]
    pending = sum(r.num_pending for r in waiting)
    assert pending > cap

    # urgent request gone: the rest of the prompts go in one step, uncapped
    eng.step()
    assert steps.prefill_tokens(len(steps.batches) - 1) == pending
    run_to_end(eng)
    assert all(len(r.output_ids) == 3 for r in normal)
    assert len(urgent.output_ids) == 10


def test_prefill_is_not_capped_without_a_more_urgent_decode(tiny_llama_dir, monkeypatch):
    # The same traffic with the first request at the normal priority: no cap.
    eng = make_engine(tiny_llama_dir, kv_slots=4096, urgent_prefill_tokens=32)
    steps = Steps(eng, monkeypatch)
    first = add(eng, prompt(0, 20), max_tokens=10)
    eng.step()
    normal = [add(eng, prompt(1 + i, 100 + i), max_tokens=3) for i in range(6)]
    eng.step()
    assert first in steps.batches[1][0]
    assert steps.prefill_tokens(1) == sum(len(r.prompt_ids) for r in normal)
    run_to_end(eng)


def test_urgent_prefill_is_not_capped_and_counts_towards_the_cap(tiny_llama_dir, monkeypatch):
    eng = make_engine(tiny_llama_dir, kv_slots=4096, urgent_prefill_tokens=32)
    steps = Steps(eng, monkeypatch)
    urgent = add(eng, prompt(0, 20), max_tokens=20, priority=URGENT)
    eng.step()
    normal = add(eng, prompt(1, 100), max_tokens=3)
    eng.step()  # the normal prompt gets the cap: 32 tokens
    assert steps.batches[1][1] == [(normal, 32)]
    # a second urgent request: as urgent as the decoding one, so not capped, and it
    # uses up the cap (20 tokens of 32 leave 12 for the normal request)
    second = add(eng, prompt(2, 20), max_tokens=3, priority=URGENT)
    eng.step()
    assert urgent in steps.batches[2][0]
    assert sorted(((r.priority, n) for r, n in steps.batches[2][1])) == [(URGENT, 20), (0, 12)]
    third = add(eng, prompt(3, 60), max_tokens=3, priority=URGENT)
    eng.step()  # 60 urgent tokens: over the cap by itself, nothing left for the normal one
    assert [(r, n) for r, n in steps.batches[3][1]] == [(third, 60)]
    assert second in steps.batches[3][0]
    run_to_end(eng)


def test_urgent_request_does_not_wait_for_a_capped_sibling_prefix(tiny_llama_dir, monkeypatch):
    # Waiting requests normally let a sibling prefilling their prefix finish it first;
    # not behind a less urgent sibling, whose chunks the cap keeps small.
    eng = make_engine(tiny_llama_dir, kv_slots=4096, urgent_prefill_tokens=32)
    steps = Steps(eng, monkeypatch)
    add(eng, prompt(80, 10), max_tokens=30, priority=URGENT)
    eng.step()
    shared = prompt(81, 150)
    sibling = add(eng, shared + prompt(82, 50), max_tokens=3)
    eng.step()
    assert steps.batches[-1][1] == [(sibling, 32)]
    urgent = add(eng, shared + prompt(83, 10), max_tokens=3, priority=URGENT)
    eng.step()
    # at once, reusing the 32 cached tokens, and the sibling gets nothing of the cap
    assert steps.batches[-1][1] == [(urgent, 160 - 32)]
    run_to_end(eng)
    assert len(urgent.output_ids) == len(sibling.output_ids) == 3


def test_cap_none_turns_it_off(tiny_llama_dir, monkeypatch):
    eng = make_engine(tiny_llama_dir, kv_slots=4096, urgent_prefill_tokens=None)
    steps = Steps(eng, monkeypatch)
    add(eng, prompt(0, 20), max_tokens=5, priority=URGENT)
    eng.step()
    normal = [add(eng, prompt(1 + i, 100), max_tokens=2) for i in range(3)]
    eng.step()
    assert steps.prefill_tokens(1) == sum(len(r.prompt_ids) for r in normal)
    run_to_end(eng)


def test_urgent_prefill_tokens_default_and_validation():
    assert EngineConfig().urgent_prefill_tokens == 32
    assert EngineConfig(urgent_prefill_tokens=0).urgent_prefill_tokens == 0
    with pytest.raises(ValueError, match="urgent_prefill_tokens"):
        EngineConfig(urgent_prefill_tokens=-1)


# -- admission order ----------------------------------------------------------------------------
def test_waiting_requests_are_admitted_by_priority_then_arrival(tiny_llama_dir, monkeypatch):
    eng = make_engine(tiny_llama_dir, kv_slots=1024, max_running=1)
    steps = Steps(eng, monkeypatch)
    prios = [0, 2, URGENT, 1, 0, -5]
    reqs = [add(eng, prompt(10 + i, 12), 2, priority=p) for i, p in enumerate(prios)]
    run_to_end(eng)
    order = sorted(reqs, key=steps.first_scheduled)
    assert [r.priority for r in order] == [-5, URGENT, 0, 0, 1, 2]
    assert order[2] is reqs[0] and order[3] is reqs[4]  # equal priority: arrival
    assert eng.stats().preemptions == 0


def test_priority_comes_before_the_longest_cached_prefix(tiny_llama_dir, monkeypatch):
    eng = make_engine(tiny_llama_dir, kv_slots=1024, max_running=1)
    base = prompt(20, 40)
    add(eng, base, 1)
    run_to_end(eng)  # base is now in the prefix cache
    steps = Steps(eng, monkeypatch)
    cached = add(eng, base + prompt(21, 4), 2, priority=1)
    fresh = add(eng, prompt(22, 30), 2, priority=0)
    run_to_end(eng)
    assert steps.first_scheduled(fresh) < steps.first_scheduled(cached)

    # at equal priority the longest cached prefix still goes first
    steps = Steps(eng, monkeypatch)
    fresh = add(eng, prompt(23, 30), 2)
    cached = add(eng, base + prompt(24, 4), 2)
    run_to_end(eng)
    assert steps.first_scheduled(cached) < steps.first_scheduled(fresh)


# -- aging: a bounded wait behind cache hits ----------------------------------------------------
def stream_of_cache_hits(
    eng: LLMEngine, steps: Steps, n: int, cold_priority: int = 0, hit_priority: int = 0
) -> tuple[Request, int]:
    """Run ``n`` steps that each add a request continuing a cached prefix, with a cold
    request added at the third; returns it and the index of the first step it could
    go in. With 2 rows, each cache hit holds one for 2 steps (prefill, then its last
    token), so every step one finishes and the next one takes its row."""
    base = prompt(90, 48)
    add(eng, base, 1)
    run_to_end(eng)  # base is cached: every request below starts with a 48-token hit
    cold, added = None, -1
    for k in range(n):
        add(eng, base + prompt(1000 + k, 4), 2, priority=hit_priority)
        if k == 2:
            cold = add(eng, prompt(91, 16), 2, priority=cold_priority)
            added = len(steps.batches)
        eng.step()
    assert cold is not None
    return cold, added


@pytest.mark.parametrize("max_wait", [8, None])  # None: the default
def test_cold_request_waits_at_most_max_wait_steps_behind_cache_hits(
    tiny_llama_dir, monkeypatch, max_wait
):
    cfg = {} if max_wait is None else {"max_wait_steps": max_wait}
    eng = make_engine(tiny_llama_dir, kv_slots=2048, max_running=2, **cfg)
    bound = eng.config.max_wait_steps
    assert bound == (max_wait or 64)
    steps = Steps(eng, monkeypatch)
    cold, added = stream_of_cache_hits(eng, steps, n=bound + 20)
    assert cold.output_ids, "the cold request never got in while the stream went on"
    wait = steps.first_scheduled(cold) - added
    # For `bound` steps the cache hits go first (the order prefix caching wants); at
    # the first step it is aged, the cold request takes the row a finishing hit frees.
    assert wait == bound, wait
    run_to_end(eng)
    assert cold.finish_reason == "length" and eng.stats().preemptions == 0


def test_without_aging_a_cold_request_starves_behind_cache_hits(tiny_llama_dir, monkeypatch):
    # The same traffic with aging off: the failure aging exists for.
    eng = make_engine(tiny_llama_dir, kv_slots=2048, max_running=2, max_wait_steps=None)
    steps = Steps(eng, monkeypatch)
    cold, _ = stream_of_cache_hits(eng, steps, n=100)
    assert not cold.output_ids and cold.row is None  # 97 steps and still waiting
    run_to_end(eng)  # the stream has ended: now it goes in
    assert cold.finish_reason == "length"


def test_aging_never_passes_a_more_urgent_request(tiny_llama_dir, monkeypatch):
    # Priorities stay strict: a stream of more urgent cache hits keeps an aged request
    # waiting for as long as it lasts.
    eng = make_engine(tiny_llama_dir, kv_slots=2048, max_running=2, max_wait_steps=4)
    steps = Steps(eng, monkeypatch)
    cold, _ = stream_of_cache_hits(eng, steps, n=40, cold_priority=1, hit_priority=URGENT)
    assert not cold.output_ids and cold.row is None  # aged for 33 steps, still waiting
    run_to_end(eng)
    assert cold.finish_reason == "length"
    assert eng.stats().preemptions == 0  # it never got in only to be thrown out


def test_aged_requests_go_longest_waiting_first_and_zero_is_first_come(tiny_llama_dir, monkeypatch):
    # max_wait_steps=0: every request is aged at once, so at equal priority admission is
    # first come, first served, cached prefix or not.
    eng = make_engine(tiny_llama_dir, kv_slots=1024, max_running=1, max_wait_steps=0)
    base = prompt(20, 40)
    add(eng, base, 1)
    run_to_end(eng)
    steps = Steps(eng, monkeypatch)
    fresh = add(eng, prompt(22, 30), 2)
    cached = add(eng, base + prompt(21, 4), 2)
    run_to_end(eng)
    assert steps.first_scheduled(fresh) < steps.first_scheduled(cached)


@pytest.mark.parametrize("max_wait", [0, None])
def test_an_aged_request_does_not_wait_for_a_sibling_prefill(tiny_llama_dir, monkeypatch, max_wait):
    # A waiting request lets a sibling that is prefilling its prefix finish it first, but
    # not once aged: requests behind it would be admitted past it meanwhile.
    eng = make_engine(
        tiny_llama_dir, kv_slots=4096, max_batched_tokens=100, max_wait_steps=max_wait
    )
    steps = Steps(eng, monkeypatch)
    shared = prompt(81, 150)
    sibling = add(eng, shared + prompt(82, 10), 3)
    eng.step()  # its first 100 tokens, cached at once
    late = add(eng, shared + prompt(83, 10), 3)
    eng.step()
    if max_wait == 0:  # aged at once: in now, on the 100 cached tokens
        assert steps.batches[-1][1] == [(sibling, 60), (late, 40)]
    else:  # waits a step for the rest of the shared 150
        assert steps.batches[-1][1] == [(sibling, 60)]
    run_to_end(eng)
    assert len(late.output_ids) == len(sibling.output_ids) == 3


def test_max_wait_steps_default_and_validation():
    assert EngineConfig().max_wait_steps == 64
    assert EngineConfig(max_wait_steps=0).max_wait_steps == 0
    assert EngineConfig(max_wait_steps=None).max_wait_steps is None
    with pytest.raises(ValueError, match="max_wait_steps"):
        EngineConfig(max_wait_steps=-1)


# -- preemption ---------------------------------------------------------------------------------
def test_preemption_takes_the_least_urgent_request_first(tiny_llama_dir, monkeypatch):
    # 64 slots and three requests of 16 + 16 tokens: decoding runs out of slots.
    eng = make_engine(tiny_llama_dir, kv_slots=64, max_batched_tokens=64)
    victims = record_victims(eng, monkeypatch)
    ref = make_engine(tiny_llama_dir, kv_slots=4096)
    oldest = add(eng, prompt(30, 16), 16, priority=1)  # oldest, but least urgent
    mid = add(eng, prompt(31, 16), 16)
    newest = add(eng, prompt(32, 16), 16)
    run_to_end(eng)
    assert victims, "the pool was never short: no preemption"
    # without priorities the newest would go; never one for a less urgent request
    assert all(v is oldest for v in victims)
    for r in (oldest, mid, newest):
        want = add(ref, r.prompt_ids, 16)
        run_to_end(ref)
        assert r.output_ids == want.output_ids  # preemption changed nothing but timing


def test_equal_priorities_still_preempt_the_newest(tiny_llama_dir, monkeypatch):
    eng = make_engine(tiny_llama_dir, kv_slots=64, max_batched_tokens=64)
    victims = record_victims(eng, monkeypatch)
    first = add(eng, prompt(30, 16), 16, priority=3)
    add(eng, prompt(31, 16), 16, priority=3)
    newest = add(eng, prompt(32, 16), 16, priority=3)
    run_to_end(eng)
    assert victims and victims[0] is newest and first not in victims


def test_urgent_waiting_request_takes_a_row_from_a_less_urgent_one(tiny_llama_dir, monkeypatch):
    eng = make_engine(tiny_llama_dir, kv_slots=1024, max_running=2)
    steps = Steps(eng, monkeypatch)
    victims = record_victims(eng, monkeypatch)
    a = add(eng, prompt(40, 10), 30)
    b = add(eng, prompt(41, 10), 30)
    eng.step()
    eng.step()
    assert eng.table.num_free_rows == 0
    urgent = add(eng, prompt(42, 10), 5, priority=URGENT)
    eng.step()
    assert victims == [b]  # the newest of the less urgent ones
    assert any(r is urgent for r, _ in steps.batches[-1][1])  # admitted at once
    assert b in eng.scheduler.waiting  # and b did not take its row back
    run_to_end(eng)
    assert victims == [b]
    assert urgent.finish_reason == a.finish_reason == b.finish_reason == "length"


def test_less_urgent_waiting_request_preempts_nothing(tiny_llama_dir, monkeypatch):
    eng = make_engine(tiny_llama_dir, kv_slots=1024, max_running=2)
    victims = record_victims(eng, monkeypatch)
    add(eng, prompt(50, 10), 8, priority=URGENT)
    add(eng, prompt(51, 10), 8, priority=URGENT)
    eng.step()
    normal = add(eng, prompt(52, 10), 3)
    same = add(eng, prompt(53, 10), 3, priority=URGENT)
    for _ in range(5):
        eng.step()
    assert normal.row is None and same.row is None  # both wait for a row
    run_to_end(eng)
    assert victims == []
    assert normal.finish_reason == same.finish_reason == "length"


def test_urgent_waiting_request_makes_room_in_a_full_pool(tiny_llama_dir, monkeypatch):
    eng = make_engine(tiny_llama_dir, kv_slots=64, max_batched_tokens=64, prefix_cache=False)
    steps = Steps(eng, monkeypatch)
    victims = record_victims(eng, monkeypatch)
    normal = [add(eng, prompt(60 + i, 28), 20) for i in range(2)]
    eng.step()  # 56 of 64 slots
    urgent = add(eng, prompt(62, 16), 4, priority=URGENT)
    eng.step()
    assert victims == [normal[1]]
    assert any(r is urgent for r, _ in steps.batches[-1][1])
    run_to_end(eng)
    assert all(v in normal for v in victims)
    assert all(len(r.output_ids) == 20 for r in normal) and len(urgent.output_ids) == 4


def drive_checking_victims(
    eng: LLMEngine, arrivals: dict[int, list[tuple[list[int], int, int]]], limit: int = 1000
) -> tuple[list[Request], list[Request]]:
    """Add ``arrivals[step]`` (prompt, max_tokens, priority) before each step and run to
    the end, checking at every preemption that the victim was the least urgent running
    request and, among those, preempted no more often than any other. Returns the
    requests and the victims."""
    sched = eng.scheduler
    preempt = sched._preempt
    victims: list[Request] = []

    def checked_preempt() -> Request:
        before = {r: (r.priority, r.preemptions) for r in sched.running}
        victim = preempt()
        prio, count = before.pop(victim)
        assert all(p <= prio for p, _ in before.values()), "a more urgent request was taken"
        peers = [n for p, n in before.values() if p == prio]
        assert all(count <= n for n in peers), f"preempted again ({count}) before {peers}"
        victims.append(victim)
        return victim

    sched._preempt = checked_preempt  # type: ignore[method-assign]
    try:
        reqs: list[Request] = []
        step = 0
        while step <= max(arrivals, default=0) or eng.has_unfinished():
            for ids, n, prio in arrivals.get(step, []):
                reqs.append(add(eng, ids, n, priority=prio))
            eng.step()
            step += 1
            assert step < limit, f"not done after {limit} steps: {eng.stats()}"
    finally:
        del sched._preempt
    return reqs, victims


def assert_outputs_as_alone(ref: LLMEngine, reqs: list[Request]) -> None:
    """Each request produced what it produces alone in a roomy pool (greedy)."""
    for r in reqs:
        assert r.finish_reason == "length"
        alone = add(ref, r.prompt_ids, r.params.max_tokens)
        run_to_end(ref)
        assert r.output_ids == alone.output_ids, "preemption changed a request's tokens"


def test_preemption_goes_round_instead_of_hitting_one_request_again(tiny_llama_dir):
    # Two long requests and a newcomer every 3 steps in an 80-slot pool: it runs short
    # again and again. Always taking the newest preempted one newcomer 4 times here (8
    # preemptions in all); taking the least preempted, no request is preempted twice
    # (6 in all), and every request finishes with the tokens it has alone.
    eng = make_engine(tiny_llama_dir, kv_slots=80, max_batched_tokens=32)
    arrivals = {0: [(prompt(300, 4), 30, 0), (prompt(301, 4), 30, 0)]}
    arrivals |= {3 + 3 * k: [(prompt(310 + k, 4), 14, 0)] for k in range(5)}
    reqs, victims = drive_checking_victims(eng, arrivals)
    assert len(victims) >= 5, "the pool was hardly short: no test of the victim choice"
    counts = [r.preemptions for r in reqs]
    assert max(counts) == 1, counts
    assert_outputs_as_alone(make_engine(tiny_llama_dir, kv_slots=4096), reqs)


@pytest.fixture(scope="module")
def roomy(tiny_llama_dir) -> LLMEngine:
    return make_engine(tiny_llama_dir, kv_slots=4096)


@pytest.fixture(scope="module")
def tight(tiny_llama_dir) -> dict[int, LLMEngine]:
    return {kv: make_engine(tiny_llama_dir, kv_slots=kv, max_batched_tokens=32) for kv in (64, 96)}


@settings(
    max_examples=8,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    kv=st.sampled_from([64, 96]),
    requests=st.lists(
        st.tuples(
            st.integers(0, 10),  # arrival step
            st.integers(2, 20),  # prompt length
            st.integers(5, 30),  # max_tokens
            st.sampled_from([0, 0, 0, 1]),  # priority
        ),
        min_size=2,
        max_size=6,
    ),
)
@example(kv=64, requests=[(0, 10, 30, 0)] * 6)  # six at once: 240 tokens in 64 slots
@example(kv=64, requests=[(0, 10, 30, 1)] * 3 + [(4, 10, 30, 0)] * 3)  # urgent ones later
def test_victims_are_least_urgent_then_least_preempted_under_kv_pressure(
    tight, roomy, kv, requests
):
    eng = tight[kv]
    arrivals: dict[int, list[tuple[list[int], int, int]]] = {}
    for i, (at, n, max_tokens, prio) in enumerate(requests):
        arrivals.setdefault(at, []).append((prompt(500 + i, n), max_tokens, prio))
    reqs, victims = drive_checking_victims(eng, arrivals)
    event("preempted" if victims else "no preemption")
    assert eng.cm.available == kv  # everything released: free or evictable cache
    # the reference runs them side by side in a roomy pool (no preemption), which
    # gives the tokens of each alone (test_continuous_batching checks that)
    ref = [add(roomy, r.prompt_ids, r.params.max_tokens) for r in reqs]
    run_to_end(roomy)
    for r, want in zip(reqs, ref, strict=True):
        assert r.finish_reason == "length"
        assert r.output_ids == want.output_ids, "preemption changed a request's tokens"


# -- the API ------------------------------------------------------------------------------------
def test_make_request_priority(tiny_llama_dir):
    eng = make_engine(tiny_llama_dir, kv_slots=256)
    assert eng.make_request("hi").priority == 0
    assert eng.make_request("hi", priority=-7).priority == -7
    for bad in (True, 1.5, "1", None):
        with pytest.raises(InvalidRequestError) as exc:
            eng.make_request("hi", priority=bad)
        assert exc.value.param == "priority"


def test_llm_generate_takes_priorities(tiny_llama_dir, monkeypatch):
    llm = LLM(str(tiny_llama_dir), dtype="float32", device="cpu", kv_slots=512, max_running=1)
    steps = Steps(llm.engine, monkeypatch)
    prompts = [prompt(70, 8), prompt(71, 8), prompt(72, 8)]
    outs = llm.generate(prompts, greedy(2), priority=[1, 0, URGENT])
    assert [o.prompt_token_ids for o in outs] == prompts  # outputs in input order
    firsts = [
        next(i for i, (_, p) in enumerate(steps.batches) if p and p[0][0].prompt_ids == ids)
        for ids in prompts
    ]
    assert firsts[2] < firsts[1] < firsts[0]
    with pytest.raises(InvalidRequestError) as exc:
        llm.generate(prompts, greedy(2), priority=[0, 1])
    assert exc.value.param == "priority"
