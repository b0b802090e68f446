"""The radix prefix cache and the prefix-aware, stall-free scheduler, end to end; and
the engine without a prefix cache (``NoPrefixCache``)."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import build_tiny_model

from engine import LLM, SamplingParams
from engine.cache_manager import CacheManager
from engine.detokenizer import IncrementalDetokenizer
from engine.kv_cache import ReqToTokenTable, SlotAllocator
from engine.llm_engine import LLMEngine
from engine.prefix_cache import NoPrefixCache, PrefixCache
from engine.radix_cache import RadixCache
from engine.request import Request

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def _tokens(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(100, 49000) for _ in range(n)]


def _hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    out = model.generate(
        torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False
    )
    return out[0, len(prompt) :].tolist()


@pytest.fixture(scope="module")
def tiny(tiny_model_dirs):
    return tiny_model_dirs["llama"]


def test_cached_prefixes_keep_greedy_parity(tiny):
    """Prompts that hit the cache fully, mid-node, or extend a cached prompt match HF."""
    path, hf = tiny
    llm = LLM(str(path), dtype="float32", device="cpu", max_batched_tokens=32)
    base = _tokens(1, 90)
    prompts = [
        base,  # fills the cache
        base,  # full hit: only the last token is recomputed
        base[:37] + _tokens(2, 20),  # diverges inside the cached edge: the node splits
        base + _tokens(3, 15),  # extends a cached prompt
        base[:37] + _tokens(4, 9),  # hits the node created by the split
    ]
    outs = []
    for p in prompts:  # one at a time, so each finds its predecessors cached
        outs.append(llm.generate([p], GREEDY)[0].token_ids)
    for p, got in zip(prompts, outs, strict=True):
        assert got == _hf_greedy(hf, p, GREEDY.max_tokens)
    st = llm.stats()
    # hits: 89 (full, last token recomputed) + 37 + 90 + 37, plus any generated tokens
    # of earlier answers that happened to be reused
    assert st.cached_tokens >= 89 + 37 + 90 + 37
    assert st.computed_prefill_tokens == sum(map(len, prompts)) - st.cached_tokens
    assert st.kv_slots_used == 0 and st.cache_size > 0


def test_generated_tokens_are_cached_for_follow_ups(tiny):
    """A multi-turn follow-up reuses the previous answer's KV, not just the prompt's."""
    path, hf = tiny
    llm = LLM(str(path), dtype="float32", device="cpu")
    first = _tokens(5, 40)
    answer = llm.generate([first], GREEDY)[0].token_ids
    follow = first + answer + _tokens(6, 10)
    got = llm.generate([follow], GREEDY)[0].token_ids
    assert got == _hf_greedy(hf, follow, GREEDY.max_tokens)
    # all of the first turn except the answer's last token (never fed back) was cached
    assert llm.stats().cached_tokens == len(first) + len(answer) - 1


def test_prefix_cache_can_be_switched_off(tiny):
    path, _ = tiny
    base = _tokens(7, 50)
    prompts = [base, base + _tokens(8, 5)]
    on = LLM(str(path), dtype="float32", device="cpu")
    off = LLM(str(path), dtype="float32", device="cpu", prefix_cache=False)
    got_on = [on.generate([p], GREEDY)[0].token_ids for p in prompts]
    got_off = [off.generate([p], GREEDY)[0].token_ids for p in prompts]
    assert got_on == got_off
    assert on.stats().cached_tokens > 0
    st = off.stats()
    assert st.cached_tokens == 0 and st.cache_size == 0
    assert st.computed_prefill_tokens == sum(map(len, prompts))
    assert off.engine.slots.num_free == off.engine.config.kv_slots


def test_fan_out_prefills_the_shared_prefix_once(tiny):
    """Eight requests sharing a 256-token prefix, submitted together."""
    path, hf = tiny
    llm = LLM(str(path), dtype="float32", device="cpu")
    shared = _tokens(9, 256)
    prompts = [shared + _tokens(100 + i, 16) for i in range(8)]
    outs = llm.generate(prompts, GREEDY)
    st = llm.stats()
    assert st.computed_prefill_tokens <= 1.2 * (256 + 8 * 16)
    assert st.cached_tokens >= 7 * 256
    for p, o in zip(prompts[:3], outs[:3], strict=True):
        assert o.token_ids == _hf_greedy(hf, p, GREEDY.max_tokens)
    no_cache = LLM(str(path), dtype="float32", device="cpu", prefix_cache=False)
    assert [o.token_ids for o in no_cache.generate(prompts, GREEDY)] == [o.token_ids for o in outs]
    assert no_cache.stats().computed_prefill_tokens == 8 * (256 + 16)


def test_eviction_under_a_small_pool(tiny):
    """A pool too small to keep every prompt cached evicts LRU entries and stays correct."""
    path, hf = tiny
    llm = LLM(str(path), dtype="float32", device="cpu", kv_slots=120, max_model_len=100)
    prompts = [_tokens(20 + i, 60) for i in range(4)]
    for p in prompts:
        assert llm.generate([p], GREEDY)[0].token_ids == _hf_greedy(hf, p, GREEDY.max_tokens)
    st = llm.stats()
    assert st.evicted_tokens > 0
    assert st.cache_size <= 120
    # the most recent prompt survived eviction and is a full hit
    before = st.cached_tokens
    llm.generate([prompts[-1]], GREEDY)
    assert llm.stats().cached_tokens - before == len(prompts[-1]) - 1


@pytest.fixture(scope="module")
def long_context_llama(tmp_path_factory, tokenizer):
    d = tmp_path_factory.mktemp("tiny-llama-4k")
    return d, build_tiny_model("llama", d, tokenizer, max_position_embeddings=4096)


def test_long_prompt_never_stalls_running_decodes(long_context_llama):
    """While a 2,000-token prompt is prefilled in chunks, every step carries every decode."""
    path, _ = long_context_llama
    eng = LLMEngine(str(path), dtype="float32", device="cpu", max_batched_tokens=256)
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    decoders = [eng.add_request(_tokens(30 + i, 20), params) for i in range(3)]
    eng.step()  # the three short prompts are prefilled together
    assert all(eng.get_request(r).is_decoding for r in decoders)
    long_id = eng.add_request(_tokens(40, 2000), SamplingParams(max_tokens=2, temperature=0.0))
    long_req = eng.get_request(long_id)

    log = []
    run = eng.runner.run

    def logged(batch):
        log.append(([r.request_id for r in batch.decodes], list(batch.prefills)))
        return run(batch)

    eng.runner.run = logged
    while long_req.num_computed < len(long_req.prompt_ids):
        eng.step()
    prefill_steps = [s for s in log if any(r.request_id == long_id for r, _ in s[1])]
    assert len(prefill_steps) >= 2000 // 256  # the prompt was split across steps
    for decodes, prefills in prefill_steps:
        assert sorted(decodes) == sorted(decoders)  # no decode left out of any step
        assert len(decodes) + sum(n for _, n in prefills) <= 256


@pytest.mark.slow
def test_smollm2_parity_with_a_cached_chat_prefix(smollm2_dir):
    """Chat prompts share the system prompt; the second one hits it mid-node, in chunks."""
    from transformers import AutoModelForCausalLM

    llm = LLM(str(smollm2_dir), dtype="float32", device="cpu", max_batched_tokens=16)
    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    questions = ["Name a primary colour.", "What is two plus two?"]
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    for q in questions:
        ids = llm.apply_chat_template([{"role": "user", "content": q}])
        assert llm.generate([ids], params)[0].token_ids == _hf_greedy(hf, ids, 10)
    assert llm.stats().cached_tokens >= 20  # the shared system prompt


# -- without a prefix cache ----------------------------------------------------------------


def test_no_prefix_cache_matches_nothing_and_holds_nothing():
    cache = NoPrefixCache()
    assert isinstance(cache, PrefixCache)
    slots, node = cache.match_prefix([1, 2, 3])
    assert slots.numel() == 0 and slots.dtype == torch.int64
    assert node is cache.root and node.is_root
    assert cache.insert([1, 2, 3], torch.tensor([7, 8, 9])) == 0
    assert cache.match_prefix([1, 2, 3])[0].numel() == 0  # inserting kept nothing
    cache.inc_lock(node)
    cache.dec_lock(node)
    assert cache.evict(10) == 0
    assert (cache.evictable_size, cache.protected_size, cache.total_size) == (0, 0, 0)
    assert cache.slots().numel() == 0
    cache.reset()


def _request(prompt: list[int], tokenizer) -> Request:
    return Request(
        request_id=str(prompt[0]), prompt_ids=prompt, params=SamplingParams(), arrival=0,
        detok=IncrementalDetokenizer(tokenizer, prompt, []), stop_ids=frozenset(),
    )  # fmt: skip


@pytest.mark.parametrize("kind", ["radix", "none"])
def test_cache_manager_books_balance_with_either_cache(kind, tokenizer):
    """Admit, compute in chunks (committing each), release: every slot comes back to the
    free list or the cache, and without a cache the request's own slots are freed."""
    alloc = SlotAllocator(64, torch.device("cpu"))
    cache = RadixCache(alloc) if kind == "radix" else NoPrefixCache()
    cm = CacheManager(alloc, ReqToTokenTable(4, 64, torch.device("cpu")), cache)
    for prompt in ([5, 6, 7, 8, 9, 10], [5, 6, 7, 11, 12]):
        req = _request(prompt, tokenizer)
        cached = cm.admit(req)
        assert cached == (3 if kind == "radix" and prompt[3] == 11 else 0)
        while req.num_pending:
            n = min(2, req.num_pending)
            cm.table.write(req.row, req.num_computed, cm.allocate(n))
            req.num_computed += n
            cm.commit(req)
            # a cache keeps what was committed; NoPrefixCache keeps it private
            assert req.cached_len == (req.num_computed if kind == "radix" else 0)
        cm.release(req)
        assert req.row is None and req.cache_node is None
        held = set(cache.slots().tolist())
        assert alloc.free_set().isdisjoint(held)
        assert alloc.free_set() | held == set(range(1, 65))
    assert cache.total_size == (8 if kind == "radix" else 0)  # 6 + the 2 new tokens


def test_engine_without_prefix_cache_frees_every_slot(tiny):
    """prefix_cache=False: requests sharing a prefix, chunked prefill and an abort all
    leave every slot free, nothing cached, and no request ever holds cache slots."""
    path, hf = tiny
    eng = LLMEngine(
        str(path), dtype="float32", device="cpu", prefix_cache=False, max_batched_tokens=16
    )
    assert isinstance(eng.cache, NoPrefixCache)
    shared = _tokens(30, 24)
    prompts = [shared + _tokens(31 + i, 5) for i in range(3)]
    ids = [eng.add_request(p, GREEDY) for p in prompts]
    doomed = eng.add_request(_tokens(40, 30), GREEDY)
    out: dict[str, list[int]] = {rid: [] for rid in ids}
    steps = 0
    while eng.has_unfinished():
        for d in eng.step():
            out.setdefault(d.request_id, []).extend(d.token_ids)
        steps += 1
        if steps == 2:
            assert eng.abort(doomed) is not None
        # every used slot is private to a running request, none is held by a cache
        running = eng.scheduler.running
        assert all(r.cached_len == 0 for r in running)
        assert eng.slots.num_used == sum(r.num_computed for r in running)
        assert eng.stats().kv_slots_used == eng.slots.num_used
    for rid, p in zip(ids, prompts, strict=True):
        assert out[rid] == _hf_greedy(hf, p, GREEDY.max_tokens)
    st = eng.stats()
    assert st.cached_tokens == 0 and st.cache_size == 0 and st.evicted_tokens == 0
    assert st.kv_slots_used == 0 and st.aborted_requests == 1
    assert eng.slots.num_free == eng.config.kv_slots
    assert eng.table.num_free_rows == eng.config.max_running
    assert eng.cached_prefix_len(prompts[0]) == 0
    assert eng.reset_prefix_cache() == 0
