"""The radix prefix cache and the prefix-aware, stall-free scheduler, end to end."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import build_tiny_model

from engine import LLM, SamplingParams
from engine.llm_engine import LLMEngine

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
    assert st["cached_tokens"] >= 89 + 37 + 90 + 37
    assert st["computed_prefill_tokens"] == sum(map(len, prompts)) - st["cached_tokens"]
    assert st["kv_slots_used"] == 0 and st["cache_size"] > 0


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
    assert llm.stats()["cached_tokens"] == len(first) + len(answer) - 1


def test_prefix_cache_can_be_switched_off(tiny):
    path, _ = tiny
    base = _tokens(7, 50)
    prompts = [base, base + _tokens(8, 5)]
    on = LLM(str(path), dtype="float32", device="cpu")
    off = LLM(str(path), dtype="float32", device="cpu", prefix_cache=False)
    got_on = [on.generate([p], GREEDY)[0].token_ids for p in prompts]
    got_off = [off.generate([p], GREEDY)[0].token_ids for p in prompts]
    assert got_on == got_off
    assert on.stats()["cached_tokens"] > 0
    st = off.stats()
    assert st["cached_tokens"] == 0 and st["cache_size"] == 0
    assert st["computed_prefill_tokens"] == sum(map(len, prompts))
    assert off.engine.slots.num_free == off.engine.config.kv_slots


def test_fan_out_prefills_the_shared_prefix_once(tiny):
    """Eight requests sharing a 256-token prefix, submitted together."""
    path, hf = tiny
    llm = LLM(str(path), dtype="float32", device="cpu")
    shared = _tokens(9, 256)
    prompts = [shared + _tokens(100 + i, 16) for i in range(8)]
    outs = llm.generate(prompts, GREEDY)
    st = llm.stats()
    assert st["computed_prefill_tokens"] <= 1.2 * (256 + 8 * 16)
    assert st["cached_tokens"] >= 7 * 256
    for p, o in zip(prompts[:3], outs[:3], strict=True):
        assert o.token_ids == _hf_greedy(hf, p, GREEDY.max_tokens)
    no_cache = LLM(str(path), dtype="float32", device="cpu", prefix_cache=False)
    assert [o.token_ids for o in no_cache.generate(prompts, GREEDY)] == [o.token_ids for o in outs]
    assert no_cache.stats()["computed_prefill_tokens"] == 8 * (256 + 16)


def test_eviction_under_a_small_pool(tiny):
    """A pool too small to keep every prompt cached evicts LRU entries and stays correct."""
    path, hf = tiny
    llm = LLM(str(path), dtype="float32", device="cpu", kv_slots=120, max_model_len=100)
    prompts = [_tokens(20 + i, 60) for i in range(4)]
    for p in prompts:
        assert llm.generate([p], GREEDY)[0].token_ids == _hf_greedy(hf, p, GREEDY.max_tokens)
    st = llm.stats()
    assert st["evicted_tokens"] > 0
    assert st["cache_size"] <= 120
    # the most recent prompt survived eviction and is a full hit
    before = st["cached_tokens"]
    llm.generate([prompts[-1]], GREEDY)
    assert llm.stats()["cached_tokens"] - before == len(prompts[-1]) - 1


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
    assert llm.stats()["cached_tokens"] >= 20  # the shared system prompt
