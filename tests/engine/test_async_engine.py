"""AsyncEngine: concurrent streams batch, aborts free slots, text deltas are clean, bad
input fails before the first delta."""

from __future__ import annotations

import asyncio
import time

import pytest

import engine
from engine.detokenizer import IncrementalDetokenizer
from engine.sampler import Sampler
from engine.stats import EngineStats

MULTIBYTE = "héllo wörld — 日本語のテキスト 🎉🚀 naïve café"
PROMPTS = [
    "The quick brown fox",
    "Once upon a time",
    "1 2 3 4 5",
    "a",
    "Tell me about the weather in Paris today, please",
    "def main():",
]


class ForcingSampler:
    """Wraps the engine's sampler; requests listed in ``forced`` emit fixed tokens.

    Lets a random-weight model "generate" a chosen text, so the streaming path can be
    checked on multi-byte characters and stop strings end to end.
    """

    def __init__(self, inner: Sampler) -> None:
        self.inner = inner
        self.forced: dict[str, list[int]] = {}

    def __call__(self, logits, requests):
        tokens = self.inner(logits, requests)
        for i, req in enumerate(requests):
            script = self.forced.get(req.request_id)
            if script is not None:
                tokens[i] = script[len(req.output_ids)]
        return tokens


@pytest.fixture(scope="module")
def aengine(tiny_llama_dir):
    eng = engine.AsyncEngine(str(tiny_llama_dir), dtype="float32", device="cpu", kv_slots=4096)
    eng.engine.runner.sampler = ForcingSampler(eng.engine.runner.sampler)
    yield eng
    eng.close()
    assert not eng._thread.is_alive()
    assert not eng.is_alive


@pytest.fixture(scope="module")
def sync_llm(tiny_llama_dir):
    return engine.LLM(str(tiny_llama_dir), dtype="float32", device="cpu", kv_slots=4096)


async def _collect(eng, prompt, params, request_id=None) -> list[engine.RequestDelta]:
    return [d async for d in eng.generate(prompt, params, request_id)]


async def _wait_for(eng, pred, timeout: float = 3.0) -> EngineStats:
    """Poll ``eng.stats()`` until ``pred(stats)``; return the last snapshot."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    st = eng.stats()
    while not pred(st) and loop.time() < deadline:
        await asyncio.sleep(0.02)
        st = eng.stats()
    return st


def _idle(st: EngineStats) -> bool:
    return st.running == 0 and st.waiting == 0 and st.kv_slots_used == 0


# -- concurrent streams -------------------------------------------------------------------------
async def test_concurrent_streams_match_sync_greedy(aengine, sync_llm):
    params = engine.SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    expected = [sync_llm.generate(p, params)[0] for p in PROMPTS]

    before = await _wait_for(aengine, _idle)
    streams = await asyncio.gather(*(_collect(aengine, p, params) for p in PROMPTS))
    after = await _wait_for(
        aengine, lambda s: _idle(s) and s.finished_requests >= before.finished_requests + 6
    )

    for deltas, want in zip(streams, expected, strict=True):
        assert deltas, "a stream yielded nothing"
        assert [d.finish_reason for d in deltas[:-1]] == [None] * (len(deltas) - 1)
        assert deltas[-1].finish_reason == "length"
        assert len({d.request_id for d in deltas}) == 1
        ids = [t for d in deltas for t in d.token_ids]
        assert ids == want.token_ids
        assert "".join(d.text for d in deltas) == want.text
    assert after.max_batch_size > 1
    steps = after.steps - before.steps
    batched = after.batched_requests - before.batched_requests
    assert batched == 6 * 24
    assert steps < batched, "the six streams never shared a step"
    assert _idle(after)


async def test_request_ids_are_respected_and_unique(aengine):
    params = engine.SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    gen = aengine.generate("hello", params, request_id="dup-id")
    first = await gen.__anext__()
    assert first.request_id == "dup-id"
    with pytest.raises(engine.InvalidRequestError):
        await _collect(aengine, "hello", params, request_id="dup-id")
    rest = [d async for d in gen]
    assert rest[-1].finish_reason == "length"
    assert sum(len(d.token_ids) for d in [first, *rest]) == 30
    # once finished, the id can be used again
    again = await _collect(aengine, "hello", params, request_id="dup-id")
    assert again[-1].finish_reason == "length"


# -- aborts -------------------------------------------------------------------------------------
LONG = engine.SamplingParams(temperature=0.9, max_tokens=400, ignore_eos=True)


async def test_abort_mid_stream(aengine):
    await _wait_for(aengine, _idle)
    gen = aengine.generate("Write a very long essay", LONG, request_id="to-abort")
    received = [await gen.__anext__() for _ in range(3)]
    assert all(d.finish_reason is None for d in received)
    assert await aengine.abort("to-abort") is True
    rest = [d async for d in gen]
    deltas = received + rest
    assert deltas[-1].finish_reason == "abort"
    assert all(d.finish_reason is None for d in deltas[:-1])
    assert 3 <= sum(len(d.token_ids) for d in deltas) < 400
    # aborting again, or an unknown id, reports False
    assert await aengine.abort("to-abort") is False
    assert await aengine.abort("never-existed") is False
    st = await _wait_for(aengine, _idle)
    assert st.kv_slots_used == 0
    assert st.running == 0
    assert st.waiting == 0


@pytest.mark.parametrize("how", ["abort", "finish"])
async def test_stats_are_current_when_the_stream_ends(aengine, monkeypatch, how):
    """Once ``abort()`` has returned True, or a stream has yielded its last delta, the
    request must no longer show in ``stats()`` (no polling).

    The step thread races the event loop here; a short pause after each delivery (as a
    busy thread or GIL contention would cause) makes the outcome deterministic.
    """
    await _wait_for(aengine, _idle)
    deliver = getattr(aengine, "_deliver", None)
    if deliver is not None:

        def slow_deliver(deltas):
            deliver(deltas)
            time.sleep(0.05)

        monkeypatch.setattr(aengine, "_deliver", slow_deliver)
    params = LONG if how == "abort" else engine.SamplingParams(max_tokens=4, ignore_eos=True)
    stale = []
    for i in range(4):
        rid = f"stats-{how}-{i}"
        gen = aengine.generate("Count the slots", params, request_id=rid)
        await gen.__anext__()
        if how == "abort":
            assert await aengine.abort(rid) is True
            st = aengine.stats()
            if st.kv_slots_used or st.running:
                stale.append(("after abort()", i, st.kv_slots_used, st.running))
        deltas = [d async for d in gen]
        assert deltas[-1].finish_reason == ("abort" if how == "abort" else "length")
        st = aengine.stats()
        if st.kv_slots_used or st.running:
            stale.append(("after last delta", i, st.kv_slots_used, st.running))
        await _wait_for(aengine, _idle)
    assert not stale, f"stats() still counted the finished request: {stale}"


async def test_abort_from_another_task(aengine):
    await _wait_for(aengine, _idle)
    seen = asyncio.Event()
    deltas: list[engine.RequestDelta] = []

    async def consume():
        async for d in aengine.generate("Another long one", LONG, request_id="other-task"):
            deltas.append(d)
            if len(deltas) >= 2:
                seen.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(seen.wait(), 30)
    assert await aengine.abort("other-task") is True
    await asyncio.wait_for(task, 10)
    assert deltas[-1].finish_reason == "abort"
    st = await _wait_for(aengine, _idle)
    assert st.kv_slots_used == 0 and st.running == 0


async def test_leaving_the_loop_aborts(aengine):
    await _wait_for(aengine, _idle)
    aborted = aengine.stats().aborted_requests
    n = 0
    async for _ in aengine.generate("Leave early", LONG):
        n += 1
        if n == 2:
            break
    st = await _wait_for(aengine, lambda s: _idle(s) and s.aborted_requests > aborted)
    assert st.aborted_requests == aborted + 1
    assert st.kv_slots_used == 0
    assert st.running == 0


async def test_cancelled_consumer_aborts(aengine):
    await _wait_for(aengine, _idle)
    aborted = aengine.stats().aborted_requests
    started = asyncio.Event()

    async def consume():
        async for _ in aengine.generate("Cancel me", LONG):
            started.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(started.wait(), 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    st = await _wait_for(aengine, lambda s: _idle(s) and s.aborted_requests > aborted)
    assert st.aborted_requests == aborted + 1
    assert _idle(st)


# -- incremental text ------------------------------------------------------------------------------
def _stream_detok(tokenizer, ids, prompt_ids=(), stop=()):
    detok = IncrementalDetokenizer(tokenizer, list(prompt_ids), list(stop))
    deltas = []
    for i, t in enumerate(ids):
        detok.add(t)
        done = detok.stopped or i == len(ids) - 1
        deltas.append(detok.pop_delta(done))
        if detok.stopped:
            break
    return detok, deltas


@pytest.mark.parametrize("prompt", ["", "Say it: ", "日本"])
def test_detokenizer_multibyte_round_trip(tokenizer, prompt):
    ids = tokenizer.encode(MULTIBYTE, add_special_tokens=False)
    # the point of the test: some tokens end inside a character
    assert any("\ufffd" in tokenizer.decode([t]) for t in ids)
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    detok, deltas = _stream_detok(tokenizer, ids, prompt_ids)
    for d in deltas:
        assert "\ufffd" not in d
    assert "".join(deltas) == tokenizer.decode(ids) == MULTIBYTE
    assert detok.text == MULTIBYTE
    assert not detok.stopped


def test_detokenizer_stop_string_hold_back(tokenizer):
    # as the tokenizer splits it: "abc", " END", "ING"
    ids = tokenizer.encode("abc ENDING", add_special_tokens=False)
    detok, deltas = _stream_detok(tokenizer, ids, stop=["END"])
    assert detok.stopped
    assert detok.text == "abc "
    assert "".join(deltas) == "abc "
    assert all("E" not in d for d in deltas)


def test_detokenizer_stop_string_hold_back_char_by_char(tokenizer):
    text = "abc ENDING"
    ids = [t for ch in text for t in tokenizer.encode(ch, add_special_tokens=False)]
    assert tokenizer.decode(ids) == text
    detok = IncrementalDetokenizer(tokenizer, [], ["END"])
    emitted = ""
    for t in ids:
        detok.add(t)
        emitted += detok.pop_delta(detok.stopped)
        # never releases "E" or "EN" before it knows whether "END" follows
        assert "E" not in emitted
        assert "abc ".startswith(emitted)
        if detok.stopped:
            break
    assert detok.stopped
    assert emitted == detok.text == "abc "


def test_detokenizer_releases_held_text_when_no_stop(tokenizer):
    text = "abc ENx done"
    ids = [t for ch in text for t in tokenizer.encode(ch, add_special_tokens=False)]
    assert len(ids) == len(text)  # one token per character
    detok, deltas = _stream_detok(tokenizer, ids, stop=["END"])
    assert not detok.stopped
    assert "".join(deltas) == text
    emitted = ""
    for fed, d in enumerate(deltas, start=1):
        emitted += d
        assert text.startswith(emitted)
        if text[:fed].endswith(("E", "EN")):
            assert "E" not in emitted  # held until "x" proves it is not "END"


def test_detokenizer_stop_string_spanning_multibyte(tokenizer):
    ids = tokenizer.encode(MULTIBYTE, add_special_tokens=False)
    detok, deltas = _stream_detok(tokenizer, ids, stop=["テキスト"])
    assert detok.stopped
    assert "".join(deltas) == detok.text == "héllo wörld — 日本語の"
    assert all("\ufffd" not in d for d in deltas)


async def test_stream_multibyte_end_to_end(aengine, tokenizer):
    target = tokenizer.encode(MULTIBYTE, add_special_tokens=False)
    aengine.engine.runner.sampler.forced["mb"] = target
    params = engine.SamplingParams(max_tokens=len(target), ignore_eos=True)
    deltas = await _collect(aengine, "Repeat: 日本語", params, request_id="mb")
    assert [t for d in deltas for t in d.token_ids] == target
    assert deltas[-1].finish_reason == "length"
    for d in deltas:
        assert "\ufffd" not in d.text
    assert "".join(d.text for d in deltas) == MULTIBYTE


async def test_stream_stop_string_end_to_end(aengine, tokenizer):
    target = tokenizer.encode("héllo 日本 ENDING and more", add_special_tokens=False)
    aengine.engine.runner.sampler.forced["stop"] = target
    params = engine.SamplingParams(max_tokens=len(target), ignore_eos=True, stop=["END"])
    deltas = await _collect(aengine, "Go", params, request_id="stop")
    assert deltas[-1].finish_reason == "stop"
    text = "".join(d.text for d in deltas)
    assert text == "héllo 日本 "
    assert all("E" not in d.text and "\ufffd" not in d.text for d in deltas)
    assert len([t for d in deltas for t in d.token_ids]) < len(target)


async def test_stream_text_of_random_output_matches_full_decode(aengine, tokenizer):
    # random weights at temperature 1.5 emit many byte-level tokens
    params = engine.SamplingParams(temperature=1.5, seed=3, max_tokens=80, ignore_eos=True)
    deltas = await _collect(aengine, "日本語のテキスト", params)
    ids = [t for d in deltas for t in d.token_ids]
    assert len(ids) == 80
    full = tokenizer.decode(ids, skip_special_tokens=True)
    text = "".join(d.text for d in deltas)
    assert text == full
    if "\ufffd" not in full:
        assert all("\ufffd" not in d.text for d in deltas)


# -- bad input ------------------------------------------------------------------------------------
async def test_bad_input_raises_before_first_delta(aengine):
    await _wait_for(aengine, _idle)
    with pytest.raises(engine.InvalidRequestError) as info:
        await aengine.generate("").__anext__()
    assert info.value.param == "prompt"
    with pytest.raises(engine.InvalidRequestError):
        await aengine.generate([]).__anext__()

    too_long = [5] * (aengine.max_model_len + 10)
    with pytest.raises(engine.ContextLengthExceededError):
        await aengine.generate(too_long).__anext__()
    with pytest.raises(engine.ContextLengthExceededError) as info:
        await aengine.generate(
            "hi", engine.SamplingParams(max_tokens=aengine.max_model_len)
        ).__anext__()
    assert "max_tokens" in str(info.value)
    with pytest.raises(engine.InvalidRequestError):
        await aengine.generate([aengine.engine.vocab_size]).__anext__()
    with pytest.raises(engine.InvalidRequestError):
        await aengine.generate(12345).__anext__()

    st = aengine.stats()
    assert _idle(st)
    # the engine keeps serving
    params = engine.SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    deltas = await _collect(aengine, "still alive?", params)
    assert deltas[-1].finish_reason == "length"
    assert sum(len(d.token_ids) for d in deltas) == 5
    assert _idle(await _wait_for(aengine, _idle))


async def test_reset_prefix_cache_empties_what_no_request_holds(aengine):
    params = engine.SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    prompt = "A prompt whose prefix the cache will hold afterwards"
    await aengine.reset_prefix_cache()
    assert await aengine.cached_prefix_len(prompt) == 0
    async for _ in aengine.generate(prompt, params):
        pass
    n = len(aengine.engine.tokenize(prompt))
    assert await aengine.cached_prefix_len(prompt) == n
    assert aengine.stats().cache_size >= n + 3
    freed = await aengine.reset_prefix_cache()
    assert freed >= n + 3
    assert await aengine.cached_prefix_len(prompt) == 0
    assert aengine.stats().cache_size == 0


async def test_reset_keeps_the_prefix_a_running_request_locks(aengine):
    params = engine.SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    prompt = "Another prompt, still running while the cache is reset"
    await aengine.reset_prefix_cache()
    gen = aengine.generate(prompt, params)
    await anext(gen)  # prefilled and committed: its prefix is in the cache, locked
    await aengine.reset_prefix_cache()
    assert await aengine.cached_prefix_len(prompt) > 0
    await gen.aclose()
    await aengine.reset_prefix_cache()
    assert await aengine.cached_prefix_len(prompt) == 0


# -- liveness and tokenizing, without reaching into the engine --------------------------------
async def test_is_alive_while_serving(aengine):
    assert aengine.is_alive
    assert aengine.failure is None


async def test_tokenize_matches_what_generate_runs(aengine, tokenizer):
    text = "héllo wörld, tokenize me"
    assert await aengine.tokenize(text) == tokenizer.encode(text, add_special_tokens=False)
    assert await aengine.tokenize([5, 6, 7]) == [5, 6, 7]
    # a long prompt goes to a worker thread; same ids
    long_text = "All work and no play makes Jack a dull boy. " * 200
    assert len(long_text) > 4096
    assert await aengine.tokenize(long_text) == aengine.engine.tokenize(long_text)
    with pytest.raises(engine.InvalidRequestError):
        await aengine.tokenize(12345)
    messages = [{"role": "user", "content": "Hi there"}]
    assert await aengine.tokenize_chat(messages) == aengine.apply_chat_template(messages)
    with pytest.raises(engine.InvalidRequestError):
        await aengine.tokenize_chat([])


async def test_long_prompt_is_tokenized_off_the_loop_and_still_checked(aengine):
    long_text = "word " * 2000  # over the inline limit, and far over the context
    with pytest.raises(engine.ContextLengthExceededError):
        await anext(aengine.generate(long_text))
    assert aengine.is_alive
