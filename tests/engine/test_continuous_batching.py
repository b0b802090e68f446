"""Continuous batching: limits, requests joining and leaving every step, stop rules, stats.

Token-level references come from a plain, unconstrained engine run (whose greedy
parity with ``transformers`` is tested in ``test_parity.py``); each test then checks
that its own scheduling setup changes nothing but *when* tokens are produced.
"""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from engine import LLM, RequestDelta, SamplingParams

STAT_KEYS = (
    "prompt_tokens",
    "cached_tokens",
    "computed_prefill_tokens",
    "decode_tokens",
    "generated_tokens",
    "steps",
    "batched_requests",
    "max_batch_size",
    "finished_requests",
    "aborted_requests",
    "running",
    "waiting",
    "kv_slots_used",
    "kv_slots_total",
    "preemptions",
    "mean_batch_size",
)
SKY_QUESTION = "Explain in simple terms why the sky appears blue during the day."


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, **kw)


def random_prompts(lens: tuple[int, ...], seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 49152, (n,), generator=g).tolist() for n in lens]


def first_fresh_index(tokens: list[int], start: int) -> int:
    """The first index ``>= start`` whose token does not occur earlier in ``tokens``."""
    for k in range(start, len(tokens)):
        if tokens[k] not in tokens[:k]:
            return k
    raise AssertionError(f"no fresh token after index {start} in {tokens}")


class StepRecorder:
    """Drives an :class:`LLMEngine` step by step and files each delta by request."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.steps = 0
        self.tokens: dict[str, list[int]] = defaultdict(list)
        self.text: dict[str, str] = defaultdict(str)
        self.reason: dict[str, str | None] = {}
        self.first_step: dict[str, int] = {}
        self.finish_step: dict[str, int] = {}
        self.per_step: list[dict[str, RequestDelta]] = []

    def step(self) -> dict[str, RequestDelta]:
        deltas = self.engine.step()
        self.steps += 1
        by_id = {d.request_id: d for d in deltas}
        assert len(by_id) == len(deltas), "two deltas for one request in one step"
        for rid, d in by_id.items():
            assert self.reason.get(rid) is None, f"{rid} got a delta after finishing"
            if d.token_ids:
                self.first_step.setdefault(rid, self.steps)
            self.tokens[rid].extend(d.token_ids)
            self.text[rid] += d.text
            self.reason[rid] = d.finish_reason
            if d.finished:
                self.finish_step[rid] = self.steps
        self.per_step.append(by_id)
        return by_id

    def run_to_end(self, limit: int = 500) -> None:
        while self.engine.has_unfinished():
            self.step()
            assert self.steps < limit


@pytest.fixture(scope="module")
def tiny_dir(tiny_model_dirs) -> Path:
    return tiny_model_dirs["llama"][0]


@pytest.fixture(scope="module")
def reference(tiny_dir):
    """Greedy tokens of one request alone on a default engine (memoized)."""
    llm = LLM(str(tiny_dir), dtype="float32", device="cpu", kv_slots=4096)
    cache: dict[tuple[tuple[int, ...], int], list[int]] = {}

    def ref(prompt: list[int], n: int) -> list[int]:
        key = (tuple(prompt), n)
        if key not in cache:
            (out,) = llm.generate([prompt], greedy(n, ignore_eos=True))
            assert out.finish_reason == "length" and len(out.token_ids) == n
            cache[key] = out.token_ids
        return cache[key]

    return ref


# -- limits and joining/leaving ------------------------------------------------------------


def test_max_running_caps_concurrency(tiny_dir, reference):
    llm = LLM(str(tiny_dir), dtype="float32", device="cpu", max_running=2)
    engine = llm.engine
    prompts = random_prompts((9, 30, 4, 17, 50), seed=10)
    max_tokens = (6, 3, 8, 4, 5)
    rids = [
        engine.add_request(p, greedy(n, ignore_eos=True))
        for p, n in zip(prompts, max_tokens, strict=True)
    ]
    assert engine.stats().waiting == 5 and engine.stats().running == 0

    rec = StepRecorder(engine)
    while engine.has_unfinished():
        batch = rec.step()
        st = engine.stats()
        assert st.running <= 2
        assert len(batch) <= 2
        finished = sum(r is not None for r in rec.reason.values())
        assert st.running + st.waiting + finished == 5
        assert rec.steps < 100

    st = engine.stats()
    assert st.max_batch_size == 2
    assert st.finished_requests == 5 and st.running == st.waiting == 0
    # FIFO admission: the third request takes the row the second frees (after step 3).
    assert rec.first_step[rids[2]] == rec.finish_step[rids[1]] + 1 == 4
    for rid, p, n in zip(rids, prompts, max_tokens, strict=True):
        assert rec.reason[rid] == "length"
        assert rec.tokens[rid] == reference(p, n)

    # The same limit through LLM.generate: all five come back, in input order.
    outs = llm.generate(prompts, [greedy(n, ignore_eos=True) for n in max_tokens])
    assert [o.token_ids for o in outs] == [
        reference(p, n) for p, n in zip(prompts, max_tokens, strict=True)
    ]
    assert llm.stats().max_batch_size == 2


def test_requests_join_and_leave_every_step(tiny_dir, reference):
    llm = LLM(str(tiny_dir), dtype="float32", device="cpu")
    engine = llm.engine
    p_a, p_b, p_c, p_d = random_prompts((12, 7, 25, 9), seed=11)
    a = engine.add_request(p_a, greedy(1, ignore_eos=True))
    b = engine.add_request(p_b, greedy(5, ignore_eos=True))
    c = engine.add_request(p_c, greedy(9, ignore_eos=True))
    rec = StepRecorder(engine)
    running_after: list[int] = []

    for _ in range(3):
        rec.step()
        running_after.append(engine.stats().running)
    d = engine.add_request(p_d, greedy(3, ignore_eos=True))
    assert engine.stats().waiting == 1
    while engine.has_unfinished():
        rec.step()
        running_after.append(engine.stats().running)
        assert rec.steps < 50

    assert rec.first_step == {a: 1, b: 1, c: 1, d: 4}  # d joins at the step after add_request
    assert rec.finish_step == {a: 1, b: 5, c: 9, d: 6}
    assert rec.steps == 9
    assert running_after == [2, 2, 2, 3, 2, 1, 1, 1, 0]
    # Every live request advances by exactly one token every step, whoever else comes or goes.
    for step, deltas in enumerate(rec.per_step, start=1):
        live = {rid for rid in (a, b, c, d) if rec.first_step[rid] <= step <= rec.finish_step[rid]}
        assert set(deltas) == live, f"step {step}"
        assert all(len(delta.token_ids) == 1 for delta in deltas.values())
    for rid, p, n in ((a, p_a, 1), (b, p_b, 5), (c, p_c, 9), (d, p_d, 3)):
        assert rec.reason[rid] == "length"
        assert rec.tokens[rid] == reference(p, n)
    assert engine.stats().kv_slots_used == 0


# -- when a request stops ----------------------------------------------------------------


def test_max_tokens_is_exact(tiny_dir, reference):
    llm = LLM(str(tiny_dir), dtype="float32", device="cpu")
    prompts = random_prompts((5, 40, 13, 70), seed=12)
    max_tokens = [1, 2, 7, 16]
    for p, n in zip(prompts, max_tokens, strict=True):
        assert llm.engine.tokenizer.eos_token_id not in reference(p, n)

    outs = llm.generate(prompts, [greedy(n) for n in max_tokens])  # EOS honoured, never hit

    assert [len(o.token_ids) for o in outs] == max_tokens
    assert all(o.finish_reason == "length" for o in outs)
    assert [o.token_ids for o in outs] == [
        reference(p, n) for p, n in zip(prompts, max_tokens, strict=True)
    ]
    assert llm.stats().generated_tokens == sum(max_tokens)


def test_stop_token_ids(tiny_dir, reference):
    llm = LLM(str(tiny_dir), dtype="float32", device="cpu")
    prompt, other = random_prompts((21, 33), seed=13)
    ref = reference(prompt, 12)
    k = first_fresh_index(ref, 4)
    stop_tok = ref[k]

    outs = llm.generate(
        [prompt, prompt, prompt, prompt, other],
        [
            greedy(12, stop_token_ids=[stop_tok]),
            greedy(12, stop_token_ids=[stop_tok], ignore_eos=True),  # ignore_eos: EOS only
            greedy(12, stop_token_ids=[ref[0]]),  # the very first (prefill) token
            greedy(12, ignore_eos=True),
            greedy(12, ignore_eos=True),
        ],
    )

    for out in outs[:2]:
        assert out.token_ids == ref[: k + 1]  # the stop token is kept, nothing after it
        assert out.finish_reason == "stop"
    assert outs[2].token_ids == ref[:1] and outs[2].finish_reason == "stop"
    # Stop ids are per request: the same prompt without them, batched alongside, runs on.
    assert outs[3].token_ids == ref and outs[3].finish_reason == "length"
    assert outs[4].token_ids == reference(other, 12) and outs[4].finish_reason == "length"
    assert llm.stats().kv_slots_used == 0


def test_eos_stops_unless_ignore_eos(tiny_dir, reference, tmp_path):
    prompt = random_prompts((19,), seed=14)[0]
    ref = reference(prompt, 10)
    k = first_fresh_index(ref, 3)
    eos = ref[k]
    # A copy of the tiny model whose EOS is a token it emits greedily at step k + 1.
    model_dir = tmp_path / "tiny-eos"
    shutil.copytree(tiny_dir, model_dir)
    for name in ("config.json", "generation_config.json"):
        cfg = json.loads((model_dir / name).read_text())
        cfg["eos_token_id"] = eos
        (model_dir / name).write_text(json.dumps(cfg))
    llm = LLM(str(model_dir), dtype="float32", device="cpu")
    assert eos in llm.engine.eos_token_ids

    stopped, ignored = llm.generate([prompt, prompt], [greedy(10), greedy(10, ignore_eos=True)])

    assert stopped.token_ids == ref[: k + 1]  # EOS is the last token returned
    assert stopped.finish_reason == "stop"
    assert ignored.token_ids == ref
    assert ignored.finish_reason == "length"


# -- the embedded SmolLM2 ----------------------------------------------------------------


@pytest.fixture(scope="module")
def smol(smollm2_dir):
    return LLM(str(smollm2_dir), dtype="float32", device="cpu")


@pytest.mark.slow
def test_smollm2_answer_ends_at_eos(smol):
    prompt = smol.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}]
    )
    tok = smol.tokenizer
    (out,) = smol.generate([prompt], greedy(200))

    assert out.finish_reason == "stop"
    assert out.token_ids[-1] == tok.eos_token_id
    assert tok.eos_token_id not in out.token_ids[:-1]
    assert len(out.token_ids) < 200
    assert "Paris" in out.text
    assert "<|im_end|>" not in out.text
    assert out.text == tok.decode(out.token_ids, skip_special_tokens=True)

    # With ignore_eos the same greedy path goes on past EOS up to max_tokens.
    n = len(out.token_ids) + 3
    (cont,) = smol.generate([prompt], greedy(n, ignore_eos=True))
    assert cont.finish_reason == "length"
    assert len(cont.token_ids) == n
    assert cont.token_ids[: len(out.token_ids)] == out.token_ids


@pytest.mark.slow
def test_smollm2_stop_strings(smol):
    prompt = smol.apply_chat_template([{"role": "user", "content": SKY_QUESTION}])
    tok = smol.tokenizer
    (full,) = smol.generate([prompt], greedy(32))
    text = full.text
    assert full.finish_reason == "length" and len(text) > 80

    def first_unique(at: int, length: int) -> tuple[str, int]:
        # A substring starting at or after ``at`` whose first occurrence is where it starts.
        for i in range(at, len(text) - length):
            s = text[i : i + length]
            if s.strip() == s and text.find(s) == i:
                return s, i
        raise AssertionError(f"no unique substring in {text!r}")

    mid, mid_at = first_unique(len(text) // 2 + 1, 7)  # may start inside a word / token
    early, early_at = first_unique(len(text) // 4, 4)
    assert early_at < mid_at
    cases = [  # (stop strings, the one that should end the text)
        ([mid], mid),
        (["never appears here", mid], mid),
        ([mid, early], early),  # the earliest match wins, whatever the list order
        (["never appears here"], None),
    ]

    engine = smol.engine
    reqs = [engine.make_request(prompt, greedy(32, stop=stops)) for stops, _ in cases]
    for req in reqs:
        engine.add(req)
    rec = StepRecorder(engine)
    rec.run_to_end()

    for req, (stops, hit) in zip(reqs, cases, strict=True):
        rid = req.request_id
        out = engine.output_of(req)
        assert rec.text[rid] == out.text  # streamed deltas add up to the final text
        assert rec.tokens[rid] == out.token_ids
        if hit is None:
            assert out.finish_reason == "length"
            assert out.text == text and out.token_ids == full.token_ids
            continue
        assert out.finish_reason == "stop", stops
        assert out.text == text[: text.find(hit)], stops  # ends right before the stop string
        # Generation ended at the token that completed the stop string.
        ids = out.token_ids
        assert ids == full.token_ids[: len(ids)] and len(ids) < len(full.token_ids)
        assert hit in tok.decode(ids, skip_special_tokens=True)
        assert hit not in tok.decode(ids[:-1], skip_special_tokens=True)


# -- stats ------------------------------------------------------------------------------------


def test_stats_are_consistent(tiny_dir, reference):
    llm = LLM(str(tiny_dir), dtype="float32", device="cpu")
    engine = llm.engine
    st = llm.stats()
    assert set(STAT_KEYS) <= set(st.as_dict())
    assert all(getattr(st, k) == 0 for k in STAT_KEYS if k != "kv_slots_total")
    assert st.kv_slots_total == engine.config.kv_slots > 0

    prompts = random_prompts((5, 20, 33), seed=15)
    max_tokens = (4, 7, 2)
    rids = [
        engine.add_request(p, greedy(n, ignore_eos=True))
        for p, n in zip(prompts, max_tokens, strict=True)
    ]
    assert llm.stats().waiting == 3 and llm.stats().prompt_tokens == 58
    rec = StepRecorder(engine)
    while engine.has_unfinished():
        rec.step()
        st = llm.stats()
        live = [i for i, rid in enumerate(rids) if rec.reason[rid] is None]
        assert st.running == len(live) and st.waiting == 0
        # Each live request holds KV for its prompt and all generated tokens but the last.
        assert st.kv_slots_used == sum(len(prompts[i]) + len(rec.tokens[rids[i]]) - 1 for i in live)
        assert st.steps == rec.steps

    st = llm.stats()
    assert st.prompt_tokens == sum(map(len, prompts))
    assert st.cached_tokens == 0
    assert st.computed_prefill_tokens == sum(map(len, prompts))  # no preemption here
    assert st.preemptions == 0
    assert st.decode_tokens == sum(n - 1 for n in max_tokens)  # the first token comes from prefill
    assert st.generated_tokens == sum(max_tokens)
    assert st.steps == max(max_tokens)
    assert st.batched_requests == sum(max_tokens)
    assert st.max_batch_size == 3
    assert st.mean_batch_size == pytest.approx(st.batched_requests / st.steps)
    assert st.finished_requests == 3 and st.aborted_requests == 0
    assert st.running == st.waiting == st.kv_slots_used == 0
    for rid, p, n in zip(rids, prompts, max_tokens, strict=True):
        assert rec.tokens[rid] == reference(p, n)


def test_stats_with_chunked_prefill_count_prompt_tokens_as_prefill(tiny_dir):
    # A 17-token prompt under a 16-token budget leaves one prompt token for step 2;
    # it is still a prompt token, not a decode.
    llm = LLM(str(tiny_dir), dtype="float32", device="cpu", max_batched_tokens=16)
    prompts = random_prompts((17, 40), seed=16)
    max_tokens = (4, 3)
    outs = llm.generate(prompts, [greedy(n, ignore_eos=True) for n in max_tokens])
    assert [len(o.token_ids) for o in outs] == list(max_tokens)

    st = llm.stats()
    assert st.preemptions == 0
    assert st.computed_prefill_tokens == st.prompt_tokens == 57
    assert st.decode_tokens == sum(n - 1 for n in max_tokens)
    assert st.generated_tokens == sum(max_tokens)
