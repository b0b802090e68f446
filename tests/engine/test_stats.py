"""``LLMEngine.stats()``: the typed snapshot, field by field after a small generation."""

from __future__ import annotations

import dataclasses

import pytest

from engine import LLM, SamplingParams
from engine.stats import EngineStats

FIELDS = {
    "prompt_tokens", "computed_prefill_tokens", "decode_tokens", "generated_tokens",
    "steps", "batched_requests", "max_batch_size", "finished_requests", "aborted_requests",
    "running", "waiting", "kv_slots_used", "kv_slots_total", "cache_size", "cached_tokens",
    "evicted_tokens", "preemptions", "mean_batch_size", "graph_steps", "draft_tokens",
    "accepted_draft_tokens",
}  # fmt: skip


@pytest.fixture
def llm(tiny_llama_dir) -> LLM:
    return LLM(str(tiny_llama_dir), dtype="float32", device="cpu", kv_slots=256)


def test_a_new_engine_reports_zeros(llm):
    st = llm.stats()
    assert isinstance(st, EngineStats)
    assert {f.name for f in dataclasses.fields(st)} == FIELDS
    assert st == EngineStats(kv_slots_total=256)


def test_fields_after_a_small_generation(llm):
    # two prompts with different first tokens, so the prefix cache serves nothing
    prompts = [[101, 102, 103, 104, 105], [201, 202, 203, 204, 205, 206, 207, 208, 209]]
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (3, 4)]
    outs = llm.generate(prompts, params)
    assert [len(o.token_ids) for o in outs] == [3, 4]
    st = llm.stats()
    assert st.prompt_tokens == st.computed_prefill_tokens == 14
    assert st.cached_tokens == 0
    # the first token of each answer comes from the prefill; each later one is a decode
    assert st.decode_tokens == 2 + 3
    assert st.generated_tokens == 7
    # step 1 prefills both; both decode in steps 2-3; the longer one alone in step 4
    assert st.steps == 4
    assert st.batched_requests == 2 + 2 + 2 + 1
    assert st.max_batch_size == 2
    assert st.mean_batch_size == pytest.approx(7 / 4)
    assert (st.finished_requests, st.aborted_requests) == (2, 0)
    assert (st.running, st.waiting, st.kv_slots_used) == (0, 0, 0)
    assert st.kv_slots_total == 256
    # each finished request leaves prompt + output - 1 tokens cached (the last
    # sampled token is never fed back)
    assert st.cache_size == (5 + 3 - 1) + (9 + 4 - 1)
    assert (st.evicted_tokens, st.preemptions, st.graph_steps) == (0, 0, 0)


def test_gauges_while_running_and_counters_of_an_abort(llm):
    engine = llm.engine
    rid = engine.add_request([300, 301, 302], SamplingParams(max_tokens=8, ignore_eos=True))
    st = llm.stats()
    assert (st.waiting, st.running, st.prompt_tokens) == (1, 0, 3)
    engine.step()
    st = llm.stats()
    assert (st.waiting, st.running) == (0, 1)
    assert st.kv_slots_used == 3  # the prompt's slots, locked in the cache after prefill
    delta = engine.abort(rid)
    assert delta is not None and delta.finish_reason == "abort"
    st = llm.stats()
    assert (st.aborted_requests, st.finished_requests) == (1, 0)
    assert (st.running, st.kv_slots_used) == (0, 0)


def test_the_snapshot_is_frozen_and_converts_to_a_dict(llm):
    llm.generate([[7, 8, 9]], SamplingParams(max_tokens=2, ignore_eos=True))
    st = llm.stats()
    with pytest.raises(dataclasses.FrozenInstanceError):
        st.steps = 0  # type: ignore[misc]
    d = st.as_dict()
    assert set(d) == FIELDS
    assert d["generated_tokens"] == st.generated_tokens == 2
    assert llm.stats() == st  # nothing moved in between: equal snapshots
