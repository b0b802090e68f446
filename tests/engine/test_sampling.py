"""Sampling: seeded reproducibility in any batch, the top-k/top-p filter, the sampler's
distribution, and validation of :class:`engine.SamplingParams`."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

import engine
from engine.sampler import Sampler, apply_top_k_top_p

SEEDED = dict(temperature=0.8, top_p=0.9, top_k=50, max_tokens=20, ignore_eos=True)
TARGET_PROMPT = "Hello world, tell me a story"

# Five neighbours with different prompts, lengths and sampling settings.
OTHERS = [
    ("The quick brown fox", engine.SamplingParams(temperature=1.0, max_tokens=7, ignore_eos=True)),
    (
        "Once upon a time there was",
        engine.SamplingParams(temperature=0, max_tokens=25, ignore_eos=True),
    ),
    ("a", engine.SamplingParams(temperature=0.7, top_k=10, seed=7, max_tokens=12, ignore_eos=True)),
    (
        "Numbers: 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15",
        engine.SamplingParams(temperature=1.3, top_p=0.5, max_tokens=30, ignore_eos=True),
    ),
    ("Greedy again", engine.SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)),
]


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return engine.LLM(str(tiny_llama_dir), dtype="float32", device="cpu", kv_slots=4096)


def _seeded(seed: int = 123) -> engine.SamplingParams:
    return engine.SamplingParams(seed=seed, **SEEDED)


# -- end to end: a seed fixes the output whatever shares the batch ----------------------------
def test_seeded_request_is_reproducible_alone(llm):
    first = llm.generate(TARGET_PROMPT, _seeded())[0]
    second = llm.generate(TARGET_PROMPT, _seeded())[0]
    assert len(first.token_ids) == 20
    assert first.finish_reason == "length"
    assert first.token_ids == second.token_ids
    assert first.text == second.text


@pytest.mark.parametrize("position", [0, 3, 5])
def test_seeded_request_is_independent_of_its_batch(llm, position):
    alone = llm.generate(TARGET_PROMPT, _seeded())[0].token_ids

    prompts = [p for p, _ in OTHERS]
    params = [sp for _, sp in OTHERS]
    prompts.insert(position, TARGET_PROMPT)
    params.insert(position, _seeded())
    outs = llm.generate(prompts, params)

    assert len(outs) == 6
    assert outs[position].token_ids == alone
    for out, sp in zip(outs, params, strict=True):
        assert out.finish_reason == "length"
        assert len(out.token_ids) == sp.max_tokens
    assert llm.stats().max_batch_size >= 6
    assert llm.stats().kv_slots_used == 0


def test_greedy_neighbour_is_unaffected_by_sampled_rows(llm):
    greedy = engine.SamplingParams(temperature=0, max_tokens=25, ignore_eos=True)
    alone = llm.generate("Once upon a time there was", greedy)[0].token_ids
    batched = llm.generate([p for p, _ in OTHERS], [sp for _, sp in OTHERS])[1].token_ids
    assert batched == alone


def test_different_seeds_give_different_outputs(llm):
    outs = llm.generate([TARGET_PROMPT] * 3, [_seeded(123), _seeded(124), _seeded(99)])
    ids = [tuple(o.token_ids) for o in outs]
    assert len(set(ids)) == 3
    # and the same seed in one batch twice gives the same tokens twice
    twice = llm.generate([TARGET_PROMPT] * 2, [_seeded(5), _seeded(5)])
    assert twice[0].token_ids == twice[1].token_ids


def test_unseeded_sampling_varies(llm):
    sp = engine.SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True)
    outs = llm.generate([TARGET_PROMPT] * 4, sp)
    assert len({tuple(o.token_ids) for o in outs}) > 1


# -- apply_top_k_top_p -----------------------------------------------------------------------
def _filter(
    logits: torch.Tensor, top_k: int | list[int], top_p: float | list[float]
) -> torch.Tensor:
    b = logits.shape[0]
    k = torch.tensor(top_k if isinstance(top_k, list) else [top_k] * b)
    p = torch.tensor(top_p if isinstance(top_p, list) else [top_p] * b, dtype=logits.dtype)
    return apply_top_k_top_p(logits, k, p)


def test_top_k_1_is_argmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 100, generator=g)
    out = _filter(logits, 1, 1.0)
    assert (torch.isfinite(out).sum(dim=-1) == 1).all()
    assert torch.equal(out.argmax(dim=-1), logits.argmax(dim=-1))
    probs = out.softmax(dim=-1)
    assert torch.equal(probs.argmax(dim=-1), logits.argmax(dim=-1))
    assert torch.allclose(probs.max(dim=-1).values, torch.ones(8))


@pytest.mark.parametrize("k", [2, 5, 17, 99, 100])
def test_top_k_leaves_exactly_k_finite_logits(k):
    g = torch.Generator().manual_seed(k)
    logits = torch.randn(6, 100, generator=g)
    out = _filter(logits, k, 1.0)
    finite = torch.isfinite(out)
    assert (finite.sum(dim=-1) == k).all()
    # the survivors are the k largest, with their original values in their original places
    top = logits.topk(k, dim=-1).indices
    expected = torch.zeros_like(finite).scatter_(-1, top, True)
    assert torch.equal(finite, expected)
    assert torch.equal(out[finite], logits[finite])


def test_top_k_larger_than_vocab_or_zero_is_a_no_op():
    logits = torch.randn(3, 10, generator=torch.Generator().manual_seed(1))
    assert torch.equal(_filter(logits, 0, 1.0), logits)
    assert torch.equal(_filter(logits, 50, 1.0), logits)


@pytest.mark.parametrize(
    ("p", "kept"), [(0.3, 1), (0.5, 1), (0.7, 2), (0.8, 2), (0.81, 3), (0.9, 3), (1.0, 4)]
)
def test_top_p_keeps_smallest_prefix_reaching_p(p, kept):
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    # shuffle the vocabulary so the filter must sort
    perm = torch.tensor([2, 0, 3, 1])
    logits = probs.log()[:, perm]
    out = _filter(logits, 0, p)
    finite = torch.isfinite(out)[0]
    assert int(finite.sum()) == kept
    kept_probs = sorted(probs[0, perm][finite].tolist(), reverse=True)
    assert kept_probs == pytest.approx([0.5, 0.3, 0.15, 0.05][:kept])


def test_per_row_filters_in_one_batch():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 4)
    out = _filter(probs.log(), [0, 3, 0, 2], [0.7, 1.0, 1.0, 0.95])
    assert torch.isfinite(out).sum(dim=-1).tolist() == [2, 3, 4, 2]


def test_top_k_then_top_p_renormalises():
    # after top_k=2 the survivors are [0.625, 0.375]; p=0.6 then keeps just the first
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    out = _filter(probs.log(), 2, 0.6)
    assert int(torch.isfinite(out).sum()) == 1


@pytest.mark.parametrize("seed", range(5))
def test_most_likely_token_always_survives(seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(16, 50, generator=g) * 5
    k = torch.randint(0, 5, (16,), generator=g).tolist()
    p = (torch.rand(16, generator=g) * 0.3 + 1e-6).tolist()  # tiny nuclei
    out = _filter(logits, k, p)
    best = logits.argmax(dim=-1)
    assert torch.isfinite(out[torch.arange(16), best]).all()
    assert torch.equal(out.argmax(dim=-1), best)
    # a single dominant token with p below its mass: only it survives
    dominant = torch.tensor([[10.0, 0.0, 0.0, 0.0]])
    assert int(torch.isfinite(_filter(dominant, 0, 1e-6)).sum()) == 1


# -- Sampler -----------------------------------------------------------------------------------
def _req(generator: torch.Generator | None = None, **params) -> SimpleNamespace:
    return SimpleNamespace(params=engine.SamplingParams(**params), generator=generator)


def test_temperature_zero_is_greedy():
    logits = torch.randn(5, 200, generator=torch.Generator().manual_seed(3))
    sampler = Sampler()
    assert sampler(logits, [_req(temperature=0)] * 5) == logits.argmax(dim=-1).tolist()
    # greedy rows stay greedy next to sampled rows (and ignore their own top_k/top_p)
    reqs = [
        _req(temperature=0),
        _req(temperature=1.5),
        _req(temperature=0, top_k=3, top_p=0.2),
        _req(torch.Generator().manual_seed(1), temperature=2.0, top_p=0.9),
        _req(temperature=0),
    ]
    for _ in range(10):
        tokens = sampler(logits, reqs)
        for i in (0, 2, 4):
            assert tokens[i] == int(logits[i].argmax())


def test_sampler_respects_top_k():
    logits = torch.randn(64, 30, generator=torch.Generator().manual_seed(4))
    allowed = logits.topk(3, dim=-1).indices
    torch.manual_seed(0)
    tokens = Sampler()(logits, [_req(temperature=5.0, top_k=3)] * 64)
    for row, tok in enumerate(tokens):
        assert tok in allowed[row].tolist()


def test_seeded_row_does_not_depend_on_neighbours():
    g = torch.Generator().manual_seed(11)
    row = torch.randn(1, 500, generator=g)
    others = torch.randn(3, 500, generator=g)
    sampler = Sampler()

    def neighbours(step: int) -> list[SimpleNamespace]:
        return [
            _req(temperature=1.0),
            _req(temperature=0),
            _req(torch.Generator().manual_seed(step), temperature=1.2, top_p=0.5, seed=step),
        ]

    def draws(layouts: list[tuple[int, int]]) -> list[int]:
        """30 samples of one seeded request; step i uses layout (batch size, its row)."""
        req = _req(
            torch.Generator().manual_seed(42), temperature=0.9, top_k=40, top_p=0.95, seed=42
        )
        out = []
        for step in range(30):
            size, pos = layouts[step % len(layouts)]
            reqs = neighbours(step)[: size - 1]
            reqs.insert(pos, req)
            rows = list(others[: size - 1])
            rows.insert(pos, row[0])
            out.append(sampler(torch.stack(rows), reqs)[pos])
        return out

    alone = draws([(1, 0)])
    assert draws([(4, 0), (4, 3), (2, 1), (3, 1)]) == alone
    assert draws([(2, 0), (4, 2), (1, 0)]) == alone
    assert len(set(alone)) > 1  # it really samples


def _frequencies(tokens: list[int], n: int) -> list[float]:
    counts = torch.bincount(torch.tensor(tokens), minlength=n).float()
    return (counts / counts.sum()).tolist()


PROBS = [0.7, 0.2, 0.1]
LOGITS = torch.tensor([[math.log(p) for p in PROBS]])


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        (dict(temperature=1.0), PROBS),
        (dict(temperature=0.5), [0.49 / 0.54, 0.04 / 0.54, 0.01 / 0.54]),
        (dict(temperature=1.0, top_k=2), [0.7 / 0.9, 0.2 / 0.9, 0.0]),
        (dict(temperature=1.0, top_p=0.8), [0.7 / 0.9, 0.2 / 0.9, 0.0]),
    ],
)
def test_unseeded_rows_follow_the_distribution(params, expected):
    n = 20000
    torch.manual_seed(1234)
    tokens = Sampler()(LOGITS.expand(n, 3).clone(), [_req(**params)] * n)
    assert _frequencies(tokens, 3) == pytest.approx(expected, abs=0.02)


def test_seeded_request_follows_the_distribution():
    req = _req(torch.Generator().manual_seed(2024), temperature=1.0, seed=2024)
    sampler = Sampler()
    tokens = [sampler(LOGITS, [req])[0] for _ in range(4000)]
    assert _frequencies(tokens, 3) == pytest.approx(PROBS, abs=0.03)


def test_many_seeds_follow_the_distribution():
    # one draw from each of many seeded requests in one batch
    n = 4000
    reqs = [_req(torch.Generator().manual_seed(s), temperature=1.0, seed=s) for s in range(n)]
    tokens = Sampler()(LOGITS.expand(n, 3).clone(), reqs)
    assert _frequencies(tokens, 3) == pytest.approx(PROBS, abs=0.03)


# -- SamplingParams validation ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        (dict(max_tokens=0), "max_tokens"),
        (dict(max_tokens=-1), "max_tokens"),
        (dict(max_tokens=10**9), "max_tokens"),
        (dict(max_tokens=1.5), "max_tokens"),
        (dict(max_tokens=True), "max_tokens"),
        (dict(temperature=-1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_p=-0.1), "top_p"),
        (dict(top_k=-2), "top_k"),
        (dict(top_k=2.5), "top_k"),
        (dict(seed=1.5), "seed"),
        (dict(stop=""), "stop"),
        (dict(stop=["ok", ""]), "stop"),
        (dict(stop=[3]), "stop"),
        (dict(stop_token_ids=["a"]), "stop_token_ids"),
        (dict(stop_token_ids=[1.5]), "stop_token_ids"),
        (dict(stop_token_ids=[1, None]), "stop_token_ids"),
        (dict(stop_token_ids=[-3]), "stop_token_ids"),
    ],
)
def test_sampling_params_validation(kwargs, param):
    with pytest.raises(engine.InvalidRequestError) as info:
        engine.SamplingParams(**kwargs)
    assert isinstance(info.value, ValueError)
    assert info.value.param == param
    assert str(info.value)


def test_valid_sampling_params():
    sp = engine.SamplingParams(
        max_tokens=1, temperature=0, top_p=1.0, top_k=-1, seed=0, stop="x", stop_token_ids=[0, 5]
    )
    assert sp.greedy
    assert sp.stop == ["x"]
    engine.SamplingParams(top_k=0, top_p=1e-6, temperature=100)


def test_mutated_params_are_revalidated(llm):
    sp = engine.SamplingParams(max_tokens=4)
    sp.max_tokens = 0
    with pytest.raises(engine.InvalidRequestError) as info:
        llm.generate("hi", sp)
    assert info.value.param == "max_tokens"
    assert not llm.engine.has_unfinished()
