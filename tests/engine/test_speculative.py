"""Prompt-lookup speculative decoding (``engine.speculative``): the n-gram index, and an
engine that drafts giving exactly the tokens an engine that does not gives, in fewer
steps, with its slot books balanced."""

from __future__ import annotations

import pytest

from engine import LLM, SamplingParams
from engine.speculative import NgramIndex, accepted_prefix, can_draft
from prompts import ChatRenderer
from tests.engine.test_parity import assert_slots_all_free


# -- the index ------------------------------------------------------------------------
def test_lookup_continues_the_latest_occurrence_of_the_longest_suffix():
    index = NgramIndex(min_n=2, max_n=3)
    #          0  1  2  3  4  5  6  7  8  9
    tokens = [1, 2, 3, 9, 2, 3, 8, 7, 2, 3]
    # "2 3" occurred at 1-2 (then 9) and at 4-5 (then 8, 7): the latest wins
    assert index.lookup(tokens, 3) == [8, 7, 2]
    # a longer match beats a later shorter one: "1 2 3" occurred once, then 9
    assert index.lookup([*tokens, 4, 1, 2, 3], 2) == [9, 2]


def test_lookup_honours_the_limit_and_finds_nothing_without_a_repeat():
    index = NgramIndex(min_n=2, max_n=3)
    assert index.lookup([5, 6, 7, 8], 4) == []
    assert index.lookup([5, 6, 7, 8, 5, 6], 1) == [7]
    assert index.lookup([5, 6, 7, 8, 5, 6], 4) == [7, 8, 5, 6]
    # past the present the draft repeats with the occurrence's period (here 4)
    assert index.lookup([5, 6, 7, 8, 5, 6], 6) == [7, 8, 5, 6, 7, 8]
    assert NgramIndex(2, 3).lookup([9, 1, 1, 1], 3) == [1, 1, 1]  # a run of one token
    # the suffix itself is no earlier occurrence: "6 5 6" has only itself and "5 6"
    assert NgramIndex(2, 3).lookup([4, 6, 5, 6], 3) == []


def test_lookup_follows_a_growing_sequence():
    """The index is extended, not rebuilt, as tokens arrive; it finds what a fresh
    index over the same tokens finds."""
    grown = NgramIndex(min_n=1, max_n=3)
    tokens: list[int] = []
    for t in [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4]:
        tokens.append(t)
        assert grown.lookup(tokens, 3) == NgramIndex(1, 3).lookup(tokens, 3)


def test_accepted_prefix():
    assert accepted_prefix([4, 5, 6], [4, 5, 7, 1]) == 2
    assert accepted_prefix([4, 5, 6], [9, 5, 6, 1]) == 0
    assert accepted_prefix([4, 5, 6], [4, 5, 6, 1]) == 3


def test_who_may_draft():
    assert can_draft(SamplingParams(temperature=0), None)
    assert can_draft(SamplingParams(temperature=1.0), None)
    # a seeded sample must draw from its generator as plain decoding does
    seeded = SamplingParams(temperature=1.0, seed=3)
    assert not can_draft(seeded, object())  # type: ignore[arg-type]
    assert can_draft(SamplingParams(temperature=0, seed=3), object())  # type: ignore[arg-type]
    assert can_draft(SamplingParams(temperature=0, jump_forward={(5,): (6,)}), None)


# a plain word of the SmolLM2 vocabulary (the tiny models share it): a logit bias on it
# makes a random-weight model repeat it, so every draft is accepted whole
YES = 4_500

# -- the engine -----------------------------------------------------------------------
# prompts whose answers copy from them, and a question a small model answers with
# repeated phrases: drafts are found, some accepted and some rejected
PROMPTS = (
    "Repeat this line three times: the quick brown fox jumps over the lazy dog.",
    "Fix the typo and print the code again:\ndef add(a, b):\n    retrun a + b\n",
    "How can I improve my time management skills?",
)


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    renderer = ChatRenderer(tokenizer)
    return [renderer.render([{"role": "user", "content": p}]) for p in PROMPTS]


@pytest.fixture(scope="module")
def pair(smollm2_dir):
    """The embedded model as served (int4 blocks), drafting and not."""
    return LLM(str(smollm2_dir)), LLM(str(smollm2_dir), speculative_tokens=0)


def _run(llm: LLM, prompts, params) -> tuple[list[list[int]], int]:
    before = llm.stats().steps
    outs = [llm.generate([p], params)[0] for p in prompts]
    return [o.token_ids for o in outs], llm.stats().steps - before


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_tokens=96, temperature=0),
        # penalties see the draft tokens before each row as output
        SamplingParams(max_tokens=96, temperature=0, repetition_penalty=1.1),
        SamplingParams(max_tokens=96, temperature=0, frequency_penalty=0.2, min_tokens=40),
        # a seeded sample draws as it would without drafts (it gets none)
        SamplingParams(max_tokens=64, temperature=0.8, seed=11),
    ],
    ids=["greedy", "repetition", "frequency-min-tokens", "seeded"],
)
def test_drafting_gives_the_tokens_plain_decoding_gives(pair, prompts, params):
    """Verified drafts are computed as decode rows (the same kernels, the same sums),
    so the output is token for token the plain engine's, on the quantized model too;
    a greedy request takes fewer steps than tokens."""
    drafting, plain = pair
    before = drafting.stats()
    got, steps = _run(drafting, prompts, params)
    want, plain_steps = _run(plain, prompts, params)
    assert got == want
    st = drafting.stats()
    if params.seed is None:
        drafted = st.draft_tokens - before.draft_tokens
        accepted = st.accepted_draft_tokens - before.accepted_draft_tokens
        assert 0 < accepted < drafted  # some accepted, some rejected
        assert steps < plain_steps
    else:
        assert st.draft_tokens == before.draft_tokens
        assert steps == plain_steps
    assert st.generated_tokens - before.generated_tokens == sum(len(t) for t in want)
    assert_slots_all_free(drafting)
    assert plain.stats().draft_tokens == 0


# one token a step for the first three (no repeat yet), then the draft's three and one
# more a step: 5 and 6 stop inside a draft, 7 at the step's own sample, 8 and 10 in
# the next draft
@pytest.mark.parametrize("stop_len", [5, 6, 7, 8, 10])
def test_a_stop_inside_an_accepted_draft_ends_there_and_frees_the_rest(tiny_llama_dir, stop_len):
    """A logit bias makes a random-weight model repeat one token, so every draft is
    accepted whole; a stop string met part-way through a draft ends the request at
    that token (as plain decoding would) and frees the slots of the rows after it."""
    llm = LLM(str(tiny_llama_dir), dtype="float32", device="cpu", kv_slots=512)
    stop = llm.tokenizer.decode([YES] * stop_len)
    params = SamplingParams(max_tokens=40, temperature=0, logit_bias={YES: 100.0}, stop=[stop])
    out = llm.generate([[101, 102, 103]], params)[0]
    assert out.token_ids == [YES] * stop_len and out.finish_reason == "stop"
    st = llm.stats()
    assert st.accepted_draft_tokens > 0
    assert st.generated_tokens == stop_len
    assert st.steps < stop_len  # drafts took several tokens a step
    assert_slots_all_free(llm)


def test_no_drafts_past_the_batch_limit_or_with_speculation_off(tiny_llama_dir):
    """``speculative_max_batch``: a step drafts only while that few requests decode."""
    params = SamplingParams(max_tokens=12, temperature=0, logit_bias={YES: 100.0})
    prompts = [[101, 102, 103 + i] for i in range(3)]
    small = LLM(str(tiny_llama_dir), dtype="float32", device="cpu", speculative_max_batch=2)
    outs = small.generate(prompts, params)
    assert small.stats().draft_tokens == 0  # three decoded together all along
    assert all(o.token_ids == [YES] * 12 for o in outs)
    wide = LLM(str(tiny_llama_dir), dtype="float32", device="cpu", speculative_max_batch=3)
    assert [o.token_ids for o in wide.generate(prompts, params)] == [o.token_ids for o in outs]
    assert wide.stats().draft_tokens > 0
    assert wide.stats().steps < small.stats().steps
    off = LLM(str(tiny_llama_dir), dtype="float32", device="cpu", speculative_tokens=0)
    off.generate(prompts, params)
    assert off.stats().draft_tokens == 0


def test_drafts_never_outgrow_max_tokens(tiny_llama_dir):
    """A draft is cut to what ``max_tokens`` leaves, so a request ends at exactly its
    limit however the steps fall (the context's end bounds max_tokens already)."""
    llm = LLM(str(tiny_llama_dir), dtype="float32", device="cpu", max_model_len=24)
    for n in [*range(1, 12), 14]:
        params = SamplingParams(max_tokens=n, temperature=0, logit_bias={YES: 100.0})
        out = llm.generate([list(range(100, 110))], params)[0]
        assert out.token_ids == [YES] * n and out.finish_reason == "length"
    assert llm.stats().accepted_draft_tokens > 0
    assert_slots_all_free(llm)
