"""KV slot accounting: the allocator, the request->token table, and the engine's books
under random traffic, aborts and preemption."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

import engine
from engine.kv_cache import PAD_SLOT, ReqToTokenTable, SlotAllocator
from engine.llm_engine import LLMEngine

CPU = torch.device("cpu")


# -- SlotAllocator ------------------------------------------------------------------------------
def test_slot_allocator_alloc_and_free():
    a = SlotAllocator(10, CPU)
    assert (a.num_slots, a.num_free, a.num_used) == (10, 10, 0)
    assert a.free_set() == set(range(1, 11))

    first = a.alloc(3)
    assert first.dtype == torch.int64
    assert first.numel() == 3
    assert len(set(first.tolist())) == 3
    assert (a.num_free, a.num_used) == (7, 3)
    rest = a.alloc(7)
    assert set(first.tolist()) | set(rest.tolist()) == set(range(1, 11))
    assert a.num_free == 0
    assert a.free_set() == set()

    a.free(first)
    assert a.num_free == 3
    assert a.free_set() == set(first.tolist())
    a.free(rest)
    assert a.free_set() == set(range(1, 11))
    assert a.num_used == 0


def test_slot_allocator_never_hands_out_pad_slot():
    assert PAD_SLOT == 0
    a = SlotAllocator(16, CPU)
    rng = random.Random(0)
    held: list[torch.Tensor] = []
    for _ in range(300):
        if held and (rng.random() < 0.5 or a.num_free == 0):
            a.free(held.pop(rng.randrange(len(held))))
        else:
            got = a.alloc(rng.randint(1, a.num_free))
            assert PAD_SLOT not in got.tolist()
            held.append(got)
        out = [s for h in held for s in h.tolist()]
        assert len(out) == len(set(out)), "a slot was handed out twice"
        assert a.num_free + len(out) == 16
        assert a.free_set().isdisjoint(out)
    for h in held:
        a.free(h)
    assert a.free_set() == set(range(1, 17))


def test_slot_allocator_raises_when_exhausted():
    a = SlotAllocator(4, CPU)
    with pytest.raises(RuntimeError, match="exhausted"):
        a.alloc(5)
    assert a.num_free == 4  # a failed alloc takes nothing
    a.alloc(4)
    with pytest.raises(RuntimeError):
        a.alloc(1)
    assert a.alloc(0).numel() == 0
    a.free(torch.empty(0, dtype=torch.int64))
    assert a.num_free == 0


# -- ReqToTokenTable ------------------------------------------------------------------------------
def test_req_to_token_table_rows():
    t = ReqToTokenTable(3, 8, CPU)
    assert t.table.shape == (3, 8)
    assert t.num_free_rows == 3
    rows = [t.alloc_row() for _ in range(3)]
    assert sorted(rows) == [0, 1, 2]
    assert t.num_free_rows == 0

    t.write(rows[0], 0, torch.tensor([5, 6, 7]))
    t.write(rows[0], 3, torch.tensor([9]))
    t.write(rows[1], 2, torch.tensor([1, 2]))
    assert t.slots(rows[0], 4).tolist() == [5, 6, 7, 9]
    assert t.slots(rows[0], 4, start=2).tolist() == [7, 9]
    assert t.slots(rows[1], 4, start=2).tolist() == [1, 2]
    assert t.slots(rows[2], 8).tolist() == [PAD_SLOT] * 8  # untouched rows point at padding

    t.free_row(rows[1])
    assert t.num_free_rows == 1
    assert t.alloc_row() == rows[1]


# -- the engine's books ----------------------------------------------------------------------
CONFIGS = {
    # tiny pool, tiny token budget: chunked prefill and frequent preemption
    "small": dict(kv_slots=96, max_running=8, max_batched_tokens=16),
    # few rows: requests wait for a table row
    "rows": dict(kv_slots=128, max_running=3, max_batched_tokens=64),
    "roomy": dict(kv_slots=200, max_running=16, max_batched_tokens=2048),
    # the same small pool without the prefix cache: slots go straight back to the free list
    "nocache": dict(kv_slots=96, max_running=8, max_batched_tokens=16, prefix_cache=False),
}


@pytest.fixture(scope="module")
def engines(tiny_llama_dir) -> dict[str, LLMEngine]:
    return {
        name: LLMEngine(str(tiny_llama_dir), dtype="float32", device="cpu", **cfg)
        for name, cfg in CONFIGS.items()
    }


def check_books(eng: LLMEngine) -> None:
    """Every slot is free, held once by the prefix cache, or private to one running request.

    A running request's first ``cached_len`` slots are cache slots it locks; the rest of
    its ``num_computed`` slots are its own.
    """
    kv_slots = eng.config.kv_slots
    free = eng.slots.free_set()
    assert len(free) == eng.slots.num_free, "a slot is on the free list twice"
    assert PAD_SLOT not in free
    cache = eng.cache
    cached = cache.slots().tolist()  # empty without prefix caching (NoPrefixCache)
    cached_set = set(cached)
    assert len(cached) == len(cached_set), "a slot is in the cache twice"
    running = eng.scheduler.running
    private: list[int] = []
    for req in running:
        assert req.row is not None
        assert 0 <= req.cached_len <= req.num_computed <= req.num_tokens
        row = eng.table.slots(req.row, req.num_computed).tolist()
        assert set(row[: req.cached_len]) <= cached_set, "a locked prefix is not in the cache"
        private.extend(row[req.cached_len :])
    assert len(private) == len(set(private)), "a slot is held by two running requests"
    assert PAD_SLOT not in private and PAD_SLOT not in cached_set
    assert free.isdisjoint(private), "a held slot is also free"
    assert free.isdisjoint(cached_set), "a cached slot is also free"
    assert cached_set.isdisjoint(private), "a private slot is also in the cache"
    assert free | cached_set | set(private) == set(range(1, kv_slots + 1))
    rows = [r.row for r in running]
    assert len(rows) == len(set(rows))
    assert eng.table.num_free_rows + len(running) == eng.config.max_running
    for req in eng.scheduler.waiting:
        assert req.row is None and req.num_computed == 0
    assert cache.evictable_size + cache.protected_size == cache.total_size == len(cached)
    assert eng.stats().kv_slots_used == kv_slots - len(free) - cache.evictable_size


def check_idle(eng: LLMEngine) -> None:
    kv_slots = eng.config.kv_slots
    assert not eng.has_unfinished()
    cached = set(eng.cache.slots().tolist())
    assert eng.slots.free_set() | cached == set(range(1, kv_slots + 1))
    assert eng.cache.protected_size == 0, "a finished request still locks the cache"
    st = eng.stats()
    assert st.kv_slots_used == 0
    assert st.running == 0 and st.waiting == 0
    assert eng.table.num_free_rows == eng.config.max_running


_BASE = [random.Random(-1).randrange(100, 49000) for _ in range(64)]


def _prompt(seed: int, n: int) -> list[int]:
    """A prompt that shares a random-length prefix with a common base, so prompts
    overlap in the prefix cache at arbitrary points (mid-node matches included)."""
    rng = random.Random(seed)
    shared = rng.randrange(0, n + 1)
    return _BASE[:shared] + [rng.randrange(100, 49000) for _ in range(n - shared)]


class _JumpingParams(engine.SamplingParams):
    """Jump-forward on a fixed beat instead of on keys: after every sampled token at an
    odd output length, one or two tokens (which, by that length) are forced in. Only
    the rule lookup is replaced; the engine appends, schedules and computes the forced
    tokens as for any ``jump_forward`` rule, which random tokens would rarely match."""

    def forced_after(self, output_ids: list[int]) -> tuple[int, ...]:
        n = len(output_ids)
        return (101,) * (1 + n % 3 // 2) if n % 2 else ()


# a logit bias this strong on one token makes the random-weight model repeat it, so
# prompt-lookup drafts are found: at temperature 0 accepted whole, at 1 (unseeded:
# seeded samples get no drafts) now and then rejected
_REPEATING = {4_500: 18.0}


def drive(eng: LLMEngine, requests, aborts, max_steps: int = 2000) -> dict:
    """Add ``requests`` [(arrival_step, prompt_len, max_tokens, temperature, seed[,
    priority[, jumping[, repeating]]])] at their steps (a negative seed: an unseeded
    sample; repeating: True or a logit bias), abort at ``aborts`` [(step, index)],
    step until done, checking the books after every change. Returns {request_id:
    (request, aborted)}."""
    live: dict[str, tuple] = {}
    order: list[str] = []
    last_arrival = max(r[0] for r in requests)
    step = 0
    while step <= last_arrival or eng.has_unfinished():
        assert step < max_steps, f"no progress after {max_steps} steps: {eng.stats()}"
        for i, (arrival, plen, max_tokens, temp, seed, *rest) in enumerate(requests):
            if arrival == step:
                kind = _JumpingParams if len(rest) > 1 and rest[1] else engine.SamplingParams
                repeating = rest[2] if len(rest) > 2 else False
                bias = (
                    repeating if isinstance(repeating, dict) else _REPEATING if repeating else None
                )
                params = kind(
                    temperature=temp, seed=seed if seed >= 0 else None, max_tokens=max_tokens,
                    ignore_eos=True,
                    logit_bias=bias,
                )  # fmt: skip
                priority = rest[0] if rest else 0
                req = eng.make_request(_prompt(seed * 31 + i, plen), params, priority=priority)
                eng.add(req)
                live[req.request_id] = (req, False)
                order.append(req.request_id)
        for at, index in aborts:
            if at == step and order:
                rid = order[index % len(order)]
                req, _ = live[rid]
                was_live = req.finish_reason is None
                delta = eng.abort(rid)
                assert (delta is not None) == was_live
                if delta is not None:
                    assert delta.finish_reason == "abort"
                    live[rid] = (req, True)
                    assert req.row is None and req.num_computed == 0
                check_books(eng)
        for d in eng.step():
            req, _ = live[d.request_id]
            assert d.token_ids == req.output_ids[len(req.output_ids) - len(d.token_ids) :]
        check_books(eng)
        step += 1
    check_idle(eng)
    for req, aborted in live.values():
        if aborted:
            assert req.finish_reason == "abort"
            assert len(req.output_ids) < req.params.max_tokens
        else:
            assert req.finish_reason == "length"
            assert len(req.output_ids) == req.params.max_tokens
    return live


request_st = st.tuples(
    st.integers(0, 8),  # arrival step
    st.integers(1, 36),  # prompt length
    st.integers(1, 12),  # max_tokens
    st.sampled_from([0.0, 0.0, 1.0]),  # temperature
    st.one_of(st.integers(0, 10_000), st.integers(-9, -1)),  # seed (negative: none)
    st.sampled_from([0, 0, 1, -1]),  # priority
    st.booleans(),  # jump-forward
    st.booleans(),  # repeating: drafts
)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    config=st.sampled_from(["small", "small", "rows", "roomy"]),
    requests=st.lists(request_st, min_size=1, max_size=6),
    aborts=st.lists(st.tuples(st.integers(0, 20), st.integers(0, 10)), max_size=3),
)
@example(  # six long-ish requests at once in a 96-slot pool: preemption
    config="small",
    requests=[(0, 30, 8, 0.0, i) for i in range(6)],
    aborts=[(5, 2), (9, 6)],
)
@example(config="rows", requests=[(0, 40, 8, 1.0, i) for i in range(6)], aborts=[(0, 5)])
@example(  # an urgent request arrives while less urgent ones fill the pool
    config="small",
    requests=[(0, 30, 8, 0.0, i, 1) for i in range(5)] + [(8, 20, 8, 1.0, 7, -1)],
    aborts=[(12, 2)],
)
@example(  # ... and while they hold every row
    config="rows",
    requests=[(0, 40, 8, 1.0, i, 0) for i in range(3)] + [(2, 30, 8, 0.0, 9, -1)],
    aborts=[],
)
def test_slot_books_balance_under_random_traffic(engines, config, requests, aborts):
    eng = engines[config]
    check_idle(eng)  # the previous example left nothing behind
    before = eng.stats().preemptions
    drive(eng, requests, aborts)
    event("preempted" if eng.stats().preemptions > before else "no preemption")


def test_jump_forward_keeps_the_books_through_preemption(engines):
    """Requests whose forced tokens are computed in chunks beside others' decodes, in a
    pool too small for all of them: the books balance after every step, every request
    ends at exactly max_tokens, and nothing is left held."""
    eng = engines["small"]
    eng.reset_prefix_cache()  # what earlier (random) examples cached does not matter
    before = eng.stats().preemptions
    # even sharing their whole prompts, six requests need 36 + 6 * 16 > 96 slots
    live = drive(eng, [(0, 36, 16, 0.0, i, 0, i % 2 == 0) for i in range(6)], aborts=[(7, 3)])
    assert eng.stats().preemptions > before
    jumped = [r for r, aborted in live.values() if isinstance(r.params, _JumpingParams)]
    assert jumped and all(101 in r.output_ids for r in jumped)


def test_drafts_keep_the_books_through_preemption(engines):
    """Requests that draft (their output repeats) beside others in a pool too small for
    them all: drafts take free slots only, rejected rows give theirs back, and every
    request ends at exactly max_tokens with nothing left held."""
    eng = engines["small"]
    eng.reset_prefix_cache()
    before = eng.stats()
    # two at a time draft (speculative_max_batch), and 3 * (30 + 16) > 96
    reqs = [(0, 30, 16, 0.0, i, 0, False, True) for i in range(3)]
    # a weaker bias: greedy picks the token at some positions and not at others, so
    # some drafts are rejected
    reqs += [(4, 20, 12, 0.0, 77, 0, False, {4_500: 14.0})]
    drive(eng, reqs, aborts=[(12, 1)])
    after = eng.stats()
    assert after.preemptions > before.preemptions
    assert after.accepted_draft_tokens > before.accepted_draft_tokens
    assert after.draft_tokens - before.draft_tokens > (
        after.accepted_draft_tokens - before.accepted_draft_tokens
    )  # some drafts were rejected, and their slots went back


def test_preemption_keeps_books_and_outputs(engines):
    eng = engines["small"]
    before = eng.stats().preemptions
    requests = [(0, 25, 10, 0.0, i) for i in range(5)] + [(3, 10, 10, 1.0, 99)]
    live = drive(eng, requests, aborts=[])
    assert eng.stats().preemptions > before, "the pool was never short: no preemption"

    # Preempted and recomputed requests produce the tokens they would have without
    # preemption (greedy ones, and the seeded one too): replay them in a roomy pool.
    ref_eng = engines["roomy"]
    ref_before = ref_eng.stats().preemptions
    reqs = [r for r, _ in live.values()]
    ref = {ref_eng.add_request(r.prompt_ids, r.params): r for r in reqs}
    outputs = {rid: [] for rid in ref}
    while ref_eng.has_unfinished():
        for d in ref_eng.step():
            outputs[d.request_id].extend(d.token_ids)
    assert ref_eng.stats().preemptions == ref_before
    for rid, r in ref.items():
        assert outputs[rid] == r.output_ids, f"request {r.request_id} changed by preemption"
    check_idle(ref_eng)


def test_abort_of_waiting_and_partly_prefilled_requests(engines):
    eng = engines["small"]
    params = engine.SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    # unrelated to anything cached, so admission order is arrival order
    rng = random.Random(12345)
    a = eng.add_request([rng.randrange(100, 49000) for _ in range(60)], params)  # 4 chunks
    b = eng.add_request([rng.randrange(100, 49000) for _ in range(30)], params)
    eng.step()
    check_books(eng)
    assert eng.get_request(a).num_computed == 16  # partly prefilled
    assert eng.abort(b).finish_reason == "abort"  # still waiting
    assert eng.abort(a).finish_reason == "abort"
    assert eng.abort(a) is None
    check_books(eng)
    check_idle(eng)
