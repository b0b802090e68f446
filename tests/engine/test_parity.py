"""Greedy parity with ``transformers``' own ``generate``, token for token, in float32.

Every engine run here batches several prompts of different lengths (or lets them
arrive while others decode, or splits them into chunks, or preempts them for lack of
KV slots); each output must still equal the batch-1, unpadded Hugging Face reference.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine import LLM, SamplingParams
from engine.scheduler import ScheduledBatch

TINY_KINDS = ("llama", "qwen2", "qwen3", "mistral")
PROMPT_LENS = (3, 11, 29, 57, 88, 120)
N_TINY = 24  # new tokens per tiny-model request (references are computed this long)
N_SMOL = 32

QUESTIONS = (
    "Hi!",
    "What is the capital of France?",
    "Name three primary colors.",
    "Explain in simple terms why the sky appears blue during the day.",
    "I am planning a trip to Japan in the spring and would like to see cherry blossoms. "
    "Which cities should I visit and when is the best time to go?",
    "Write a short poem about the ocean, the moon, and a lighthouse keeper who has lived "
    "alone on a small rocky island for many years, watching ships pass by at night.",
)


def random_prompts(lens: tuple[int, ...], seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    # Skip ids 0..2 (specials); any other id of the SmolLM2 vocabulary is fine.
    return [torch.randint(3, 49152, (n,), generator=g).tolist() for n in lens]


def greedy(params_max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=params_max_tokens, temperature=0, **kw)


_REFS: dict[tuple[int, tuple[int, ...], int, bool], list[int]] = {}


def hf_greedy(model: torch.nn.Module, prompt: list[int], n: int, min_new: bool = True) -> list[int]:
    """Batch-1, unpadded ``model.generate``: the ``n`` (or fewer, at EOS) new token ids.

    With ``min_new`` EOS is suppressed for all ``n`` tokens (the reference for
    ``ignore_eos=True``). Greedy prefixes do not depend on ``n``, so one long run is
    cached per prompt and sliced.
    """
    length = max(n, N_TINY) if min_new else n
    key = (id(model), tuple(prompt), length, min_new)
    if key not in _REFS:
        with torch.inference_mode():
            out = model.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=length,
                min_new_tokens=length if min_new else None,
                do_sample=False,
            )
        _REFS[key] = out[0, len(prompt) :].tolist()
    ref = _REFS[key]
    return ref[:n]


def record_batches(engine, monkeypatch) -> list[tuple[int, list[tuple[str, int, int]]]]:
    """Log every step's batch as ``(num_decodes, [(request_id, chunk, num_computed)])``."""
    log: list[tuple[int, list[tuple[str, int, int]]]] = []
    run = engine.runner.run

    def logged_run(batch: ScheduledBatch):
        log.append(
            (len(batch.decodes), [(r.request_id, n, r.num_computed) for r, n in batch.prefills])
        )
        return run(batch)

    monkeypatch.setattr(engine.runner, "run", logged_run)
    return log


def assert_slots_all_free(llm: LLM) -> None:
    """Nothing is in use: every slot is free or an unlocked entry of the prefix cache."""
    eng = llm.engine
    assert eng.stats().kv_slots_used == 0
    cached = set(eng.cache.slots().tolist())
    assert eng.slots.free_set() | cached == set(range(1, eng.config.kv_slots + 1))
    assert eng.cache.protected_size == 0


# -- tiny random-weight families -------------------------------------------------------


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_batched_greedy_matches_hf_generate(kind, tiny_model_dirs):
    model_dir, hf = tiny_model_dirs[kind]
    llm = LLM(str(model_dir), dtype="float32", device="cpu")
    prompts = random_prompts(PROMPT_LENS)

    outs = llm.generate(prompts, greedy(N_TINY, ignore_eos=True))

    assert llm.stats().max_batch_size > 1  # they really shared steps
    assert llm.stats().max_batch_size == len(prompts)  # all fit the first step
    assert len(outs) == len(prompts)
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.prompt_token_ids == prompt
        assert out.finish_reason == "length"
        assert out.token_ids == hf_greedy(hf, prompt, N_TINY), f"{kind}, prompt of {len(prompt)}"
    assert_slots_all_free(llm)


def test_requests_arriving_while_others_decode(tiny_model_dirs, monkeypatch):
    model_dir, hf = tiny_model_dirs["llama"]
    llm = LLM(str(model_dir), dtype="float32", device="cpu")
    engine = llm.engine
    log = record_batches(engine, monkeypatch)
    prompts = random_prompts((40, 5, 77, 120, 3, 31), seed=2)
    max_tokens = (24, 16, 20, 12, 24, 18)

    ids: dict[str, int] = {}
    tokens: dict[str, list[int]] = {}
    reasons: dict[str, list[str | None]] = {}

    def add(i: int) -> None:
        rid = engine.add_request(prompts[i], greedy(max_tokens[i], ignore_eos=True))
        ids[rid] = i
        tokens[rid], reasons[rid] = [], []

    def step() -> None:
        for delta in engine.step():
            assert not reasons[delta.request_id] or reasons[delta.request_id][-1] is None
            tokens[delta.request_id].extend(delta.token_ids)
            reasons[delta.request_id].append(delta.finish_reason)

    for i in range(3):
        add(i)
    for _ in range(3):
        step()
    for i in range(3, 6):
        add(i)
    steps = 3
    while engine.has_unfinished():
        step()
        steps += 1
        assert steps < 100

    # The step after the late arrivals ran the 3 decodes and the 3 new prefills together.
    decodes, prefills = log[3]
    late = {rid for rid, i in ids.items() if i >= 3}
    assert decodes == 3
    assert {rid for rid, _, _ in prefills} == late
    assert any(d > 0 and p for d, p in log)
    # Batching saved steps: fewer than running the requests one after another.
    assert engine.stats().steps == steps == len(log)
    assert steps < sum(max_tokens)
    assert steps == max(3 + max_tokens[i] if i >= 3 else max_tokens[i] for i in range(6))

    for rid, i in ids.items():
        assert tokens[rid] == hf_greedy(hf, prompts[i], max_tokens[i]), f"request {i}"
        assert reasons[rid][-1] == "length"
        assert all(r is None for r in reasons[rid][:-1])
    assert_slots_all_free(llm)


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_chunked_prefill_matches_hf(kind, tiny_model_dirs, monkeypatch):
    model_dir, hf = tiny_model_dirs[kind]
    budget = 16
    llm = LLM(str(model_dir), dtype="float32", device="cpu", max_batched_tokens=budget)
    log = record_batches(llm.engine, monkeypatch)
    # 16 fits one step exactly, 17 leaves a single prompt token for the next step.
    lens = (17, 16, 40, 5, 57, 120)
    prompts = random_prompts(lens, seed=3)
    n = 16

    outs = llm.generate(prompts, greedy(n, ignore_eos=True))

    for prompt, out in zip(prompts, outs, strict=True):
        assert out.token_ids == hf_greedy(hf, prompt, n), f"{kind}, prompt of {len(prompt)}"
        assert out.finish_reason == "length"
    # Every step kept to the budget, and prompts were really split across steps.
    assert all(d + sum(c for _, c, _ in p) <= budget for d, p in log)
    chunks: dict[str, int] = {}
    for _, prefills in log:
        for rid, _, _ in prefills:
            chunks[rid] = chunks.get(rid, 0) + 1
    assert max(chunks.values()) >= 120 // budget
    assert any(start > 0 for _, p in log for _, _, start in p)  # a chunk resumed a prompt
    st = llm.stats()
    assert st.max_batch_size > 1
    # Each prompt token and each generated token but the last was computed exactly once.
    assert st.computed_prefill_tokens + st.decode_tokens == sum(lens) + len(lens) * (n - 1)
    assert_slots_all_free(llm)


def test_small_kv_pool_preempts_and_still_matches_hf(tiny_model_dirs):
    model_dir, hf = tiny_model_dirs["llama"]
    kv_slots = 160
    llm = LLM(str(model_dir), dtype="float32", device="cpu", kv_slots=kv_slots, max_model_len=128)
    lens = (30, 45, 60, 25, 50, 12)
    prompts = random_prompts(lens, seed=4)
    assert sum(lens) + len(lens) * N_TINY > kv_slots  # they cannot all hold their KV at once

    outs = llm.generate(prompts, greedy(N_TINY, ignore_eos=True))

    st = llm.stats()
    assert st.preemptions > 0
    assert st.max_batch_size > 1
    # Preempted requests recompute their prompt and the tokens they had produced.
    assert st.computed_prefill_tokens > sum(lens)
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.token_ids == hf_greedy(hf, prompt, N_TINY), f"prompt of {len(prompt)}"
        assert out.finish_reason == "length"
    assert st.finished_requests == len(prompts)
    assert_slots_all_free(llm)


def hf_greedy_jumping(
    model: torch.nn.Module, prompt: list[int], n: int, rules: dict[tuple[int, ...], tuple[int, ...]]
) -> tuple[list[int], int]:
    """The reference for ``jump_forward``: greedy, EOS suppressed, and after a sampled
    token that ends the output with a key, the tokens it maps to appended (``n`` in all).
    Also returns how many of the ``n`` were sampled."""
    out: list[int] = []
    sampled = 0
    with torch.inference_mode():
        while len(out) < n:
            logits = model(torch.tensor([prompt + out])).logits[0, -1]
            out.append(int(logits.argmax()))
            sampled += 1
            for key, forced in rules.items():
                if tuple(out[-len(key) :]) == key:
                    out.extend(forced)
    return out[:n], sampled


def test_jump_forward_matches_forced_greedy_decoding(tiny_model_dirs, monkeypatch):
    """Forced tokens go in without a step of their own, and the model then sees them:
    each output equals Hugging Face's greedy decoding with the same tokens forced in,
    with requests jumping in the same steps as others decode."""
    model_dir, hf = tiny_model_dirs["llama"]
    llm = LLM(str(model_dir), dtype="float32", device="cpu")
    prompts = random_prompts((5, 17, 40))
    plain = [hf_greedy(hf, p, N_TINY) for p in prompts]
    # keys the plain decodes reach (so the rules fire), forcing tokens they did not pick
    rules = {(plain[0][2],): (11, 12), (plain[1][4], plain[1][5]): (13,)}
    want, sampled = zip(*(hf_greedy_jumping(hf, p, N_TINY, rules) for p in prompts), strict=True)
    assert want[0][3:5] == [11, 12] and want[1][6] == 13
    log = record_batches(llm.engine, monkeypatch)

    outs = llm.generate(prompts, greedy(N_TINY, ignore_eos=True, jump_forward=rules))

    assert [o.token_ids for o in outs] == list(want)
    # a jumping request was a chunk of generated tokens beside the others' decodes
    assert any(d > 0 and any(n > 1 and c >= 5 for _, n, c in chunks) for d, chunks in log)
    stats = llm.stats()
    assert stats.generated_tokens == len(prompts) * N_TINY
    assert stats.decode_tokens == stats.generated_tokens - len(prompts)  # not prefill
    assert_slots_all_free(llm)
    # alone, a request takes one step per sampled token: none for the forced ones
    llm.generate(prompts[:1], greedy(N_TINY, ignore_eos=True, jump_forward=rules))
    assert llm.stats().steps - stats.steps == sampled[0] < N_TINY


def test_bfloat16_smoke(tiny_model_dirs):
    model_dir, _ = tiny_model_dirs["llama"]
    llm = LLM(str(model_dir), dtype="bfloat16", device="cpu")
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    prompts = random_prompts((4, 23, 61), seed=5)
    n = 10

    outs = llm.generate(prompts, greedy(n, ignore_eos=True))

    assert llm.stats().max_batch_size == len(prompts)
    for prompt, out in zip(prompts, outs, strict=True):
        assert len(out.token_ids) == n
        assert out.finish_reason == "length"
        assert all(0 <= t < llm.engine.vocab_size for t in out.token_ids)
        with torch.inference_mode():
            first = int(hf(torch.tensor([prompt])).logits[0, -1].argmax())
        assert out.token_ids[0] == first


# -- the embedded SmolLM2 ----------------------------------------------------------------


@pytest.fixture(scope="module")
def smol(smollm2_dir: Path):
    llm = LLM(str(smollm2_dir), dtype="float32", device="cpu")
    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    return llm, hf, tok


@pytest.mark.slow
def test_smollm2_chat_matches_hf_generate(smol):
    llm, hf, tok = smol
    prompts = [llm.apply_chat_template([{"role": "user", "content": q}]) for q in QUESTIONS]
    assert len({len(p) for p in prompts}) == len(prompts)

    # EOS is honoured on both sides (min_new_tokens would make HF suppress it, so
    # ignore_eos could not be compared): short answers end in <|im_end|>, long ones
    # run to N_SMOL.
    outs = llm.generate(prompts, greedy(N_SMOL))

    assert llm.stats().max_batch_size == len(prompts)
    eos = tok.eos_token_id
    for q, prompt, out in zip(QUESTIONS, prompts, outs, strict=True):
        ref = hf_greedy(hf, prompt, N_SMOL, min_new=False)
        assert out.token_ids == ref, q
        assert out.text == tok.decode(ref, skip_special_tokens=True), q
        assert out.finish_reason == ("stop" if ref[-1] == eos else "length"), q
    reasons = {o.finish_reason for o in outs}
    assert reasons == {"stop", "length"}  # both ways of ending are exercised
