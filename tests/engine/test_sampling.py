"""Sampling: seeded reproducibility in any batch, the top-k/top-p filter, the sampler's
distribution, validation of :class:`engine.SamplingParams`, and the penalties and
min_tokens (against a literal reference, in the engine, and against ``transformers``)."""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch

import engine
from engine.detokenizer import IncrementalDetokenizer
from engine.sampler import Sampler, apply_logit_bias, apply_penalties, apply_top_k_top_p

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
    tokens = Sampler()(logits, [_req(temperature=2.0, top_k=3)] * 64)
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
        (dict(repetition_penalty=0), "repetition_penalty"),
        (dict(repetition_penalty=-1.0), "repetition_penalty"),
        (dict(repetition_penalty=10.5), "repetition_penalty"),
        (dict(repetition_penalty=float("nan")), "repetition_penalty"),
        (dict(repetition_penalty=float("inf")), "repetition_penalty"),
        (dict(repetition_penalty=True), "repetition_penalty"),
        (dict(repetition_penalty="1.2"), "repetition_penalty"),
        (dict(repetition_penalty=None), "repetition_penalty"),
        (dict(frequency_penalty=2.5), "frequency_penalty"),
        (dict(frequency_penalty=-2.01), "frequency_penalty"),
        (dict(frequency_penalty=float("nan")), "frequency_penalty"),
        (dict(frequency_penalty=True), "frequency_penalty"),
        (dict(frequency_penalty="0"), "frequency_penalty"),
        (dict(presence_penalty=3), "presence_penalty"),
        (dict(presence_penalty=float("-inf")), "presence_penalty"),
        (dict(presence_penalty=float("nan")), "presence_penalty"),
        (dict(presence_penalty=False), "presence_penalty"),
        (dict(presence_penalty=[1.0]), "presence_penalty"),
        (dict(min_tokens=-1), "min_tokens"),
        (dict(min_tokens=17), "min_tokens"),  # over the default max_tokens=16
        (dict(max_tokens=4, min_tokens=5), "min_tokens"),
        (dict(min_tokens=1.0), "min_tokens"),
        (dict(min_tokens=True), "min_tokens"),
        (dict(min_tokens="3"), "min_tokens"),
        (dict(min_tokens=None), "min_tokens"),
        (dict(logit_bias={"5": 1.0}), "logit_bias"),  # JSON's string keys: the server converts
        (dict(logit_bias={5.0: 1.0}), "logit_bias"),
        (dict(logit_bias={True: 1.0}), "logit_bias"),
        (dict(logit_bias={-1: 1.0}), "logit_bias"),
        (dict(logit_bias={None: 1.0}), "logit_bias"),
        (dict(logit_bias={5: 101}), "logit_bias"),
        (dict(logit_bias={5: -100.5}), "logit_bias"),
        (dict(logit_bias={5: 10**400}), "logit_bias"),
        (dict(logit_bias={5: float("nan")}), "logit_bias"),
        (dict(logit_bias={5: float("inf")}), "logit_bias"),
        (dict(logit_bias={5: True}), "logit_bias"),
        (dict(logit_bias={5: "1"}), "logit_bias"),
        (dict(logit_bias={5: None}), "logit_bias"),
        (dict(logit_bias=[(5, 1.0)]), "logit_bias"),
        (dict(logit_bias={t: 1.0 for t in range(1025)}), "logit_bias"),
        (dict(jump_forward=[((1,), (2,))]), "jump_forward"),
        (dict(jump_forward={(): (2,)}), "jump_forward"),
        (dict(jump_forward={(1,): ()}), "jump_forward"),
        (dict(jump_forward={(1,): 2}), "jump_forward"),
        (dict(jump_forward={1: (2,)}), "jump_forward"),
        (dict(jump_forward={(1,): (-2,)}), "jump_forward"),
        (dict(jump_forward={(1,): (True,)}), "jump_forward"),
        (dict(jump_forward={(1.0,): (2,)}), "jump_forward"),
        (dict(jump_forward={tuple(range(9)): (2,)}), "jump_forward"),
        (dict(jump_forward={(1,): tuple(range(9))}), "jump_forward"),
        (dict(jump_forward={(t,): (2,) for t in range(65)}), "jump_forward"),
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
    engine.SamplingParams(top_k=0, top_p=1e-6, temperature=2.0)  # OpenAI's bound, as HTTP's
    with pytest.raises(engine.InvalidRequestError, match="temperature"):
        engine.SamplingParams(temperature=2.01).validate()
    sp = engine.SamplingParams()
    assert (sp.repetition_penalty, sp.frequency_penalty, sp.presence_penalty) == (1.0, 0.0, 0.0)
    assert sp.min_tokens == 0 and not sp.penalized
    for edge in (
        dict(repetition_penalty=10),
        dict(repetition_penalty=1e-3),
        dict(frequency_penalty=-2, presence_penalty=2),
        dict(frequency_penalty=2.0, presence_penalty=-2.0),
        dict(max_tokens=5, min_tokens=5),
    ):
        sp = engine.SamplingParams(**edge)
        assert sp.penalized == ("min_tokens" not in edge)
    assert sp.logit_bias == {} and engine.SamplingParams(logit_bias=None).logit_bias == {}
    bias = {0: -100, 49151: 100.0, 7: 0.5}
    sp = engine.SamplingParams(logit_bias=bias)
    assert sp.logit_bias == bias and sp.logit_bias is not bias and not sp.penalized
    assert len(engine.SamplingParams(logit_bias=dict.fromkeys(range(1024), 1)).logit_bias) == 1024


def test_mutated_params_are_revalidated(llm):
    sp = engine.SamplingParams(max_tokens=4)
    sp.max_tokens = 0
    with pytest.raises(engine.InvalidRequestError) as info:
        llm.generate("hi", sp)
    assert info.value.param == "max_tokens"
    assert not llm.engine.has_unfinished()


# -- penalties and min_tokens ---------------------------------------------------------------------
NEG_INF = float("-inf")


def _preq(prompt_ids=(), output_ids=(), stop_ids=(), generator=None, **params) -> SimpleNamespace:
    """What the sampler reads of a request, for one with these ids and parameters."""
    return SimpleNamespace(
        params=engine.SamplingParams(**params),
        prompt_ids=list(prompt_ids),
        output_ids=list(output_ids),
        stop_ids=frozenset(stop_ids),
        generator=generator,
    )


def reference_penalties(logits: torch.Tensor, reqs) -> torch.Tensor:
    """vLLM's and OpenAI's rules written out literally: row by row, token by token.

    Tokens in neither the prompt nor the output keep their logits under the repetition
    penalty, and a count of 0 subtracts nothing, so only those tokens are visited.
    """
    rows = []
    for values, r in zip(logits.tolist(), reqs, strict=True):
        p = r.params
        row = list(values)
        # 1. min_tokens: stop ids (EOS among them unless ignore_eos) are impossible
        if len(r.output_ids) < p.min_tokens:
            for t in r.stop_ids:
                if t < len(row):
                    row[t] = NEG_INF
        # 2. repetition penalty over the prompt and the output
        for t in set(r.prompt_ids) | set(r.output_ids):
            if row[t] > 0:
                row[t] = row[t] / p.repetition_penalty
            else:
                row[t] = row[t] * p.repetition_penalty
        # 3. frequency and presence over the output only
        for t in set(r.output_ids):
            count = r.output_ids.count(t)
            row[t] = row[t] - p.frequency_penalty * count
            if count > 0:
                row[t] = row[t] - p.presence_penalty
        rows.append(row)
    return torch.tensor(rows, dtype=logits.dtype)


def _mixed_batch(vocab: int = 40) -> tuple[torch.Tensor, list[SimpleNamespace]]:
    """Logits and requests covering each rule, alone and together, next to plain rows."""
    g = torch.Generator().manual_seed(21)
    logits = torch.randn(9, vocab, generator=g) * 3
    reqs = [
        _preq([1, 2, 3], [4], temperature=0),  # plain
        _preq([0, 5, 6, 7], [8, 8, 9], temperature=0, repetition_penalty=1.5),
        _preq([10, 11], [], temperature=0, repetition_penalty=0.7),  # < 1 favours repeats
        # 12 is in the prompt and once in the output: it counts once
        _preq(
            [12, 13],
            [14, 14, 14, 15, 12],
            temperature=0,
            frequency_penalty=0.5,
            presence_penalty=0.25,
        ),
        _preq([], [16, 16, 17], temperature=0, frequency_penalty=-0.8, presence_penalty=-1.0),
        # not reached: every stop id in the vocabulary goes (99 is past it)
        _preq([3], [18, 19], stop_ids=[2, 30, 99], temperature=0, min_tokens=3),
        _preq([3], [18, 19], stop_ids=[2, 30], temperature=0, min_tokens=2),  # reached
        # all together; 17 is a stop id and in the prompt
        _preq(
            [17, 20, 21],
            [22, 22, 20],
            stop_ids=[2, 17],
            temperature=0,
            min_tokens=5,
            repetition_penalty=1.2,
            frequency_penalty=0.3,
            presence_penalty=0.6,
        ),
        _preq([], [], temperature=0),  # plain, nothing generated yet
    ]
    # signs the rules treat differently; penalised tokens at the top of their rows,
    # with a runner-up (25) that the penalty lets win
    top = 20.0
    logits[1, 5], logits[1, 6], logits[1, 8], logits[1, 25] = 2.0, -1.5, top, top - 1
    logits[2, 10], logits[2, 11] = -0.5, 0.4
    logits[3, 14], logits[3, 12], logits[3, 25] = top, -2.0, top - 1
    logits[5, 30], logits[5, 25] = top, top - 1
    logits[6, 30] = top
    logits[7, 17], logits[7, 22], logits[7, 20], logits[7, 25] = top, top - 1, -1.0, top - 2
    return logits, reqs


PLAIN_ROWS = (0, 6, 8)  # row 6 has reached its min_tokens


def test_apply_penalties_matches_the_reference():
    logits, reqs = _mixed_batch()
    want = reference_penalties(logits, reqs)
    got = apply_penalties(logits.clone(), reqs)
    torch.testing.assert_close(got, want)
    for i in range(len(reqs)):
        assert torch.equal(want[i], logits[i]) == (i in PLAIN_ROWS), i
    # the spot checks a reader can do by hand
    assert got[1, 5] == pytest.approx(2.0 / 1.5) and got[1, 6] == pytest.approx(-1.5 * 1.5)
    assert got[2, 10] == pytest.approx(-0.5 * 0.7) and got[2, 11] == pytest.approx(0.4 / 0.7)
    assert got[3, 14] == pytest.approx(20.0 - 3 * 0.5 - 0.25)
    assert got[3, 12] == pytest.approx(-2.0 - 0.5 - 0.25)
    assert got[3, 13] == logits[3, 13]  # prompt only: no frequency or presence penalty
    assert got[5, 30] == got[5, 2] == NEG_INF and torch.isfinite(got[6]).all()
    assert got[7, 17] == got[7, 2] == NEG_INF


@pytest.mark.parametrize("vocab", [40, 49152])
def test_greedy_rows_take_the_argmax_of_the_penalised_logits(vocab):
    logits, reqs = _mixed_batch(vocab)
    want = reference_penalties(logits, reqs).argmax(dim=-1).tolist()
    sampler = Sampler()
    assert sampler(logits.clone(), reqs) == want  # some rows penalised
    changed = [i for i in range(len(reqs)) if want[i] != int(logits[i].argmax())]
    assert set(changed) >= {1, 3, 5, 7}
    # every row penalised (no gather of rows), and a single row
    rows = [i for i in range(len(reqs)) if i not in PLAIN_ROWS]
    assert sampler(logits[rows].clone(), [reqs[i] for i in rows]) == [want[i] for i in rows]
    assert sampler(logits[3:4].clone(), reqs[3:4]) == [want[3]]


def _without_penalties(req: SimpleNamespace) -> SimpleNamespace:
    params = dataclasses.replace(
        req.params, repetition_penalty=1.0, frequency_penalty=0.0, presence_penalty=0.0,
        min_tokens=0,
    )  # fmt: skip
    return SimpleNamespace(**{**vars(req), "params": params})


MIXED_SPECS = [
    dict(temperature=0),
    dict(temperature=0, repetition_penalty=1.8, presence_penalty=1.0),
    dict(temperature=0.9, seed=3, frequency_penalty=1.5),
    dict(temperature=1.1, seed=4),
    dict(temperature=0.7, top_k=5, seed=5, min_tokens=6, repetition_penalty=1.3),
    dict(temperature=0, min_tokens=3),
    dict(temperature=1.0, presence_penalty=2.0, frequency_penalty=-0.5),  # unseeded
    dict(temperature=0.8, top_p=0.9, seed=6),
]


def _decode_run(specs, penalised: bool, reference: bool, steps: int = 25):
    """``steps`` sampler calls over a batch of ``specs``, each row's tokens appended to
    its output; returns the tokens and each row's favourite token.

    Each row's favourite (far above the rest) is one of its stop ids and in its
    prompt. ``penalised=False`` drops the penalties and min_tokens from the specs.
    ``reference``: the logits go through :func:`reference_penalties` and the sampler
    sees requests without penalties. The global RNG is reseeded each step, so
    unseeded rows are comparable across runs too.
    """
    vocab = 30
    g = torch.Generator().manual_seed(8)
    base = torch.randn(len(specs), vocab, generator=g) * 2
    favourites = base.argmax(dim=-1).tolist()
    base[torch.arange(len(specs)), favourites] += 4.0
    reqs = []
    for i, spec in enumerate(specs):
        if not penalised:
            spec = {k: v for k, v in spec.items() if "penalty" not in k and k != "min_tokens"}
        gen = torch.Generator().manual_seed(spec["seed"]) if "seed" in spec else None
        stop_ids = [favourites[i], vocab - 1]
        reqs.append(_preq([favourites[i], i, 2 * i], [], stop_ids, gen, **spec))
    sampler = Sampler()
    out = [[] for _ in specs]
    for step in range(steps):
        logits = base + 0.5 * torch.randn(base.shape, generator=g)
        torch.manual_seed(1000 + step)
        if reference:
            plain = [_without_penalties(r) for r in reqs]
            tokens = sampler(reference_penalties(logits, reqs), plain)
        else:
            tokens = sampler(logits, reqs)
        for r, o, t in zip(reqs, out, tokens, strict=True):
            r.output_ids.append(t)
            o.append(t)
    return out, favourites


def test_mixed_batch_over_many_steps_matches_the_reference():
    got, favourites = _decode_run(MIXED_SPECS, penalised=True, reference=False)
    assert got == _decode_run(MIXED_SPECS, penalised=True, reference=True)[0]
    plain, _ = _decode_run(MIXED_SPECS, penalised=False, reference=False)
    for i, spec in enumerate(MIXED_SPECS):
        uses = any("penalty" in k or k == "min_tokens" for k in spec)
        # rows without penalties sample as they would in a batch without any
        assert (got[i] == plain[i]) != uses, (i, spec)
    # min_tokens: no stop id until it is reached; then the favourite is back
    for i in (4, 5):
        n = MIXED_SPECS[i]["min_tokens"]
        assert not {favourites[i], 29} & set(got[i][:n]), (i, got[i])
        assert favourites[i] in plain[i][:n]
    assert plain[5] == [favourites[5]] * 25
    assert got[5][3] == favourites[5]


def test_batches_without_penalties_skip_them(monkeypatch):
    def must_not_run(*args):
        raise AssertionError("apply_penalties ran")

    monkeypatch.setattr(engine.sampler, "apply_penalties", must_not_run)
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(2))
    reqs = [
        _preq([1], [2, 3], temperature=0),
        _preq([1], [], [], torch.Generator().manual_seed(1), temperature=0.8, seed=1),
        _preq([1], [4, 5], stop_ids=[2], temperature=0, min_tokens=2),  # reached
        _preq([1], [], temperature=1.0, top_k=3),
    ]
    before = logits.clone()
    tokens = Sampler()(logits, reqs)
    assert torch.equal(logits, before)
    assert tokens[0] == int(before[0].argmax()) and tokens[2] == int(before[2].argmax())
    for extra in (dict(min_tokens=3), dict(presence_penalty=0.1), dict(repetition_penalty=1.1)):
        with pytest.raises(AssertionError, match="apply_penalties ran"):
            Sampler()(logits[[0, 1, 2, 3, 0]], [*reqs, _preq([1], [4, 5], [2], **extra)])


def test_min_tokens_masks_eos_and_stop_token_ids_until_reached(llm):
    eng = llm.engine
    eos = min(eng.eos_token_ids)
    logits = torch.full((1, eng.vocab_size), -50.0)
    logits[0, eos], logits[0, 11], logits[0, 12] = 10.0, 9.0, 8.0
    sampler = Sampler()
    for ignore_eos in (False, True):
        sp = engine.SamplingParams(
            temperature=0, min_tokens=3, stop_token_ids=[11], ignore_eos=ignore_eos
        )
        req = eng.make_request([5, 6, 7], sp)
        assert req.stop_ids == ({11} if ignore_eos else {11} | eng.eos_token_ids)
        for _ in range(3):
            token = sampler(logits.clone(), [req])[0]
            # with ignore_eos EOS does not stop the request, so it is not masked
            assert token == (eos if ignore_eos else 12)
            req.output_ids.append(token)
        assert sampler(logits.clone(), [req]) == [eos]
    # sampled rows: all the mass on stop ids, and none is drawn before min_tokens
    logits[0, 12] = -10.0
    req = eng.make_request(
        [5], engine.SamplingParams(temperature=1.0, min_tokens=1, stop_token_ids=[11])
    )
    tokens = sampler(logits.expand(500, -1).clone(), [req] * 500)
    assert not {eos, 11} & set(tokens)
    req.output_ids.append(tokens[0])
    tokens = sampler(logits.expand(500, -1).clone(), [req] * 500)
    assert set(tokens) == {eos, 11}  # P(12) is e-20


# -- min_tokens and stop strings ----------------------------------------------------------------
def _char_ids(tokenizer, text: str) -> list[int]:
    ids = [t for ch in text for t in tokenizer.encode(ch, add_special_tokens=False)]
    assert len(ids) == len(text) and tokenizer.decode(ids) == text  # one token a character
    return ids


@pytest.mark.parametrize(
    ("stop", "unchecked", "text", "stopped"),
    [
        (["X"], 0, "ab", True),  # no min_tokens: the first X
        (["X"], 3, "abXcd", True),  # the X inside the first 3 tokens never counts
        (["X"], 6, "abXcdXef", False),
        (["Xc"], 3, "ab", True),  # starts in unchecked text, ends in checked text
        (["ab", "zzzzz"], 3, "abXcdXef", False),  # a short one whole in unchecked text
        (["d"], 4, "abXc", True),
    ],
)
def test_detokenizer_skips_stop_strings_in_unchecked_text(
    tokenizer, stop, unchecked, text, stopped
):
    """vLLM's rule: a stop string must end in text that a token after the first
    ``min_tokens`` added."""
    detok = IncrementalDetokenizer(tokenizer, [], stop)
    for n, t in enumerate(_char_ids(tokenizer, "abXcdXef"), start=1):
        detok.add(t, check_stop=n > unchecked)
        if detok.stopped:
            break
    assert detok.text == text
    assert detok.stopped == stopped
    assert detok.pop_delta(True) == text


def _greedy(**kw) -> engine.SamplingParams:
    return engine.SamplingParams(**{"temperature": 0, "max_tokens": 24, "ignore_eos": True, **kw})


def test_min_tokens_defers_stop_strings_end_to_end(llm):
    prompt = "The quick brown fox"
    base = llm.generate(prompt, _greedy())[0]
    first = llm.engine.tokenizer.decode(base.token_ids[:1]).strip()
    assert first and first in base.text
    # without min_tokens the first token's own text stops the request at once
    early = llm.generate(prompt, _greedy(stop=first))[0]
    assert early.finish_reason == "stop" and len(early.token_ids) == 1
    outcomes = set()
    for m in (2, 6):
        boundary = len(llm.generate(prompt, _greedy(max_tokens=m))[0].text)
        # the first occurrence that ends in text after the first m tokens' text
        i = base.text.find(first, max(0, boundary - len(first) + 1))
        out = llm.generate(prompt, _greedy(stop=first, min_tokens=m))[0]
        assert out.token_ids == base.token_ids[: len(out.token_ids)]
        assert len(out.token_ids) > m
        if i == -1:
            assert (out.finish_reason, out.text) == ("length", base.text)
        else:
            assert (out.finish_reason, out.text) == ("stop", base.text[:i])
        outcomes.add(out.finish_reason)
    assert outcomes == {"stop", "length"}  # both cases happened


# -- penalties and min_tokens end to end ----------------------------------------------------------
REPEATING = ["The quick brown fox", "Stop me"]  # their greedy outputs repeat a token early


def test_presence_penalty_stops_greedy_repeats(llm):
    plain = [o.token_ids for o in llm.generate(REPEATING, _greedy(max_tokens=16))]
    assert all(len(set(ids)) < 16 for ids in plain)
    # one batch: a penalised and an unpenalised request per prompt
    outs = llm.generate(
        REPEATING * 2,
        [_greedy(max_tokens=16, presence_penalty=2.0)] * 2 + [_greedy(max_tokens=16)] * 2,
    )
    for o in outs[:2]:
        assert len(set(o.token_ids)) == 16, o.token_ids
    assert [o.token_ids for o in outs[2:]] == plain
    for kw in (dict(frequency_penalty=2.0), dict(repetition_penalty=1.5)):
        outs = llm.generate(REPEATING, _greedy(max_tokens=16, **kw))
        assert [o.token_ids for o in outs] != plain, kw


def test_min_tokens_outlasts_an_early_stop_token_id(llm):
    prompt = "Once upon a time"
    base = llm.generate(prompt, _greedy())[0].token_ids
    stop_id = base[1]
    k = base.index(stop_id)
    early = llm.generate(prompt, _greedy(stop_token_ids=[stop_id]))[0]
    assert early.token_ids == base[: k + 1] and early.finish_reason == "stop"
    out = llm.generate(prompt, _greedy(stop_token_ids=[stop_id], min_tokens=6))[0]
    assert len(out.token_ids) >= 6
    assert stop_id not in out.token_ids[:6]
    assert out.token_ids[:k] == base[:k]  # identical up to the masked position
    if out.finish_reason == "stop":
        assert out.token_ids[-1] == stop_id and stop_id not in out.token_ids[:-1]
    else:
        assert out.finish_reason == "length" and len(out.token_ids) == 24
    assert llm.stats().kv_slots_used == 0


class _ReferenceProcessor:
    """A ``transformers`` logits processor applying :func:`reference_penalties` for one
    request, as the engine's request would look at each step."""

    def __init__(self, prompt: list[int], params: engine.SamplingParams, stop_ids) -> None:
        self.prompt, self.params, self.stop_ids = prompt, params, frozenset(stop_ids)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        req = SimpleNamespace(
            params=self.params,
            prompt_ids=self.prompt,
            output_ids=input_ids[0, len(self.prompt) :].tolist(),
            stop_ids=self.stop_ids,
        )
        return reference_penalties(scores, [req])


def test_penalised_greedy_matches_transformers_generate(llm, tiny_model_dirs):
    """One engine batch of differently penalised requests against batch-1 ``generate``
    with the reference rules as a logits processor. Two prompts end with the model's
    own continuation (the repetition penalty bites); the plain output of "Stop me"
    repeats a token (the frequency penalty bites)."""
    from transformers import LogitsProcessorList

    hf_model = tiny_model_dirs["llama"][1]
    n = 20
    text_prompts = ["The quick brown fox", "Stop me", "Once upon a time", "gamma"]
    prompts = []
    for i, p in enumerate(text_prompts):
        ids = llm.engine.tokenize(p)
        if i % 2 == 0:  # with the model's own first few tokens, for the repetition penalty
            ids += llm.generate(ids, _greedy(max_tokens=2 + 3 * i))[0].token_ids
        prompts.append(ids)
    plain = [o.token_ids for o in llm.generate(prompts, _greedy(max_tokens=n))]
    stop = plain[3][0]  # the fourth prompt's first greedy token
    specs = [
        dict(repetition_penalty=1.5),
        dict(frequency_penalty=1.5, presence_penalty=1.0),
        dict(repetition_penalty=0.9, frequency_penalty=-0.5, presence_penalty=0.3),
        dict(repetition_penalty=1.2, presence_penalty=1.0, min_tokens=5, stop_token_ids=[stop]),
        dict(),
    ]
    batch = [(prompts[i % len(prompts)], _greedy(max_tokens=n, **s)) for i, s in enumerate(specs)]
    outs = llm.generate([p for p, _ in batch], [sp for _, sp in batch])
    for (prompt, sp), out in zip(batch, outs, strict=True):
        with torch.inference_mode():
            ref = hf_model.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=n,
                min_new_tokens=n,  # no EOS, as ignore_eos
                do_sample=False,
                logits_processor=LogitsProcessorList(
                    [_ReferenceProcessor(prompt, sp, sp.stop_token_ids)]
                ),
            )[0, len(prompt) :].tolist()
        # transformers does not stop at stop_token_ids: the engine's output is a prefix
        assert out.token_ids == ref[: len(out.token_ids)], sp
        if out.finish_reason == "stop":
            assert out.token_ids[-1] in sp.stop_token_ids
            assert len(out.token_ids) > sp.min_tokens
        else:
            assert len(out.token_ids) == n
    changed = [outs[i].token_ids != plain[i % len(prompts)] for i in range(len(specs))]
    assert changed == [True, True, True, True, False]


# -- logit_bias -----------------------------------------------------------------------------------
def reference_logit_bias(logits: torch.Tensor, reqs) -> torch.Tensor:
    """OpenAI's rule written out literally: each listed token's logit plus its bias."""
    rows = []
    for values, r in zip(logits.tolist(), reqs, strict=True):
        row = list(values)
        for t, bias in r.params.logit_bias.items():
            row[t] = row[t] + bias
        rows.append(row)
    return torch.tensor(rows, dtype=logits.dtype)


def reference_logits(logits: torch.Tensor, reqs) -> torch.Tensor:
    """The documented order: min_tokens and the penalties, then logit_bias."""
    return reference_logit_bias(reference_penalties(logits, reqs), reqs)


def _plain(req: SimpleNamespace) -> SimpleNamespace:
    """``req`` without anything that changes its logits before temperature."""
    params = dataclasses.replace(_without_penalties(req).params, logit_bias={})
    return SimpleNamespace(**{**vars(req), "params": params})


def _biased_batch(vocab: int = 40) -> tuple[torch.Tensor, list[SimpleNamespace]]:
    """Rows with and without a bias; row 5 also has every penalty and min_tokens."""
    g = torch.Generator().manual_seed(31)
    logits = torch.randn(7, vocab, generator=g) * 3
    best = logits.argmax(dim=-1).tolist()
    reqs = [
        _preq([1], [2], temperature=0),  # plain
        _preq([1], [2], temperature=0, logit_bias={best[1]: -100}),  # ban the argmax
        _preq([], [], temperature=0, logit_bias={3: 100}),  # force 3
        _preq([], [], temperature=0, logit_bias={4: 2.5, 5: -0.5, vocab - 1: 1}),
        _preq([], [], temperature=0, logit_bias={}),  # empty: as plain
        # 6 is in the prompt and twice in the output; 2 and 9 are stop ids, not allowed yet
        _preq(
            [5, 6],
            [6, 6],
            stop_ids=[2, 9],
            temperature=0,
            min_tokens=3,
            repetition_penalty=2.0,
            frequency_penalty=0.5,
            presence_penalty=0.25,
            logit_bias={6: 0.5, 5: -1.0, 2: 100, 9: 50},
        ),
        _preq([6], [6], temperature=0, repetition_penalty=2.0),  # penalised, no bias
    ]
    logits[5, 6], logits[5, 5] = 4.0, -1.0
    return logits, reqs


UNBIASED_ROWS = (0, 4, 6)


def test_apply_logit_bias_matches_the_reference():
    logits, reqs = _biased_batch()
    want = reference_logit_bias(logits, reqs)
    got = apply_logit_bias(logits.clone(), reqs)
    torch.testing.assert_close(got, want)
    for i in range(len(reqs)):
        assert torch.equal(got[i], logits[i]) == (i in UNBIASED_ROWS), i
    assert got[2, 3] == pytest.approx(float(logits[2, 3]) + 100)
    assert got[3, 4] == pytest.approx(float(logits[3, 4]) + 2.5)
    assert got[3, 39] == pytest.approx(float(logits[3, 39]) + 1)
    # in place, also through a non-contiguous view
    view = logits.t().contiguous().t()
    assert not view.is_contiguous()
    assert apply_logit_bias(view, reqs) is view
    torch.testing.assert_close(view, want)


def test_logit_bias_comes_after_min_tokens_and_the_penalties():
    logits, reqs = _biased_batch()
    want = reference_logits(logits, reqs)
    got = apply_logit_bias(apply_penalties(logits.clone(), reqs), reqs)
    torch.testing.assert_close(got, want)
    # row 5 by hand: 4 / 2 (repetition) - 2 * 0.5 (frequency) - 0.25 (presence) + 0.5;
    # biasing first would give (4 + 0.5) / 2 - 1.25 = 1.0
    assert got[5, 6] == pytest.approx(1.25)
    assert got[5, 5] == pytest.approx(-1.0 * 2.0 - 1.0)  # (-1 - 1) * 2 = -4 if bias came first
    # min_tokens' -inf stays -inf whatever the bias
    assert got[5, 2] == got[5, 9] == NEG_INF
    assert torch.isfinite(got[[0, 1, 2, 3, 4, 6]]).all()
    # the sampler keeps that order: 4 / 2 + 0.5 = 2.5 beats 2.4; (4 + 0.5) / 2 would not
    row = torch.tensor([[0.0, 4.0, 2.4, -5.0]])
    req = _preq([1], [], temperature=0, repetition_penalty=2.0, logit_bias={1: 0.5})
    assert Sampler()(row.clone(), [req]) == [1]
    assert Sampler()(row.clone(), [_preq([1], [], temperature=0, repetition_penalty=2.0)]) == [2]


@pytest.mark.parametrize("vocab", [40, 49152])
def test_greedy_rows_take_the_argmax_of_the_biased_logits(vocab):
    logits, reqs = _biased_batch(vocab)
    want = reference_logits(logits, reqs).argmax(dim=-1).tolist()
    plain = logits.argmax(dim=-1).tolist()
    sampler = Sampler()
    assert sampler(logits.clone(), reqs) == want
    # -100 on the argmax hands the pick to the runner-up; +100 forces its token
    assert want[1] != plain[1] and want[1] == int(logits[1].topk(2).indices[1])
    assert want[2] == 3 != plain[2]
    for i in UNBIASED_ROWS[:2]:
        assert want[i] == plain[i]
    # only biased rows (no penalties at all), and a single row
    rows = [1, 2, 3]
    assert sampler(logits[rows].clone(), [reqs[i] for i in rows]) == [want[i] for i in rows]
    assert sampler(logits[1:2].clone(), reqs[1:2]) == [want[1]]


@pytest.mark.parametrize(
    "params",
    [
        dict(temperature=1.0),
        dict(temperature=2.0, top_p=0.9),
        dict(temperature=1.0, top_k=50, seed=1),
    ],
)
def test_plus_100_forces_and_minus_100_bans_sampled_tokens(params):
    n = 500
    logits = torch.randn(n, 300, generator=torch.Generator().manual_seed(5)) * 3
    gen = torch.Generator().manual_seed(1) if "seed" in params else None
    torch.manual_seed(0)
    forced = _preq(generator=gen, logit_bias={7: 100}, **params)
    assert set(Sampler()(logits.clone(), [forced] * n)) == {7}
    # one dominant token holding nearly all the mass: banned, it is never drawn
    logits[:, 11] = 30.0
    torch.manual_seed(0)
    assert set(Sampler()(logits.clone(), [_preq(generator=gen, **params)] * n)) == {11}
    banned = _preq(generator=gen, logit_bias={11: -100}, **params)
    tokens = Sampler()(logits.clone(), [banned] * n)
    assert 11 not in tokens and len(set(tokens)) > 1


BIAS_SPECS = [
    dict(temperature=0),
    dict(temperature=0, logit_bias=dict.fromkeys(range(15), -100)),  # only 15..29 left
    dict(temperature=0.9, seed=3, logit_bias={20: 100}),  # always 20
    dict(temperature=1.1, seed=4),
    dict(
        temperature=0.7, top_k=5, seed=5, min_tokens=6, repetition_penalty=1.3,
        logit_bias={1: 3.0, 2: 3.0, 3: 3.0, 29: 100},  # 29 is a stop id: not before 6 tokens
    ),
    dict(temperature=1.0, logit_bias={**dict.fromkeys(range(10), -2.0), 25: 1.5}),  # unseeded
    dict(temperature=0.8, top_p=0.9, seed=6, presence_penalty=1.0),
    dict(temperature=0, logit_bias={29: -0.75, 19: 0.5}),  # 29 leads 19 by 1.25 less
]  # fmt: skip


def _bias_run(specs, biased: bool, reference: bool, steps: int = 25) -> list[list[int]]:
    """Like :func:`_decode_run`: ``steps`` sampler calls over a batch of ``specs``,
    each row's tokens appended to its output. ``biased=False`` drops logit_bias from
    the specs; ``reference``: the logits go through :func:`reference_logits` and the
    sampler sees requests without penalties or biases."""
    vocab = 30
    g = torch.Generator().manual_seed(9)
    base = torch.randn(len(specs), vocab, generator=g) * 2
    reqs = []
    for i, spec in enumerate(specs):
        if not biased:
            spec = {k: v for k, v in spec.items() if k != "logit_bias"}
        gen = torch.Generator().manual_seed(spec["seed"]) if "seed" in spec else None
        reqs.append(_preq([i, 2 * i], [], [vocab - 1], gen, **spec))
    sampler = Sampler()
    for step in range(steps):
        logits = base + 0.5 * torch.randn(base.shape, generator=g)
        torch.manual_seed(1000 + step)
        if reference:
            tokens = sampler(reference_logits(logits, reqs), [_plain(r) for r in reqs])
        else:
            tokens = sampler(logits, reqs)
        for r, t in zip(reqs, tokens, strict=True):
            r.output_ids.append(t)
    return [r.output_ids for r in reqs]


def test_mixed_batch_with_logit_bias_over_many_steps_matches_the_reference():
    got = _bias_run(BIAS_SPECS, biased=True, reference=False)
    assert got == _bias_run(BIAS_SPECS, biased=True, reference=True)
    unbiased = _bias_run(BIAS_SPECS, biased=False, reference=False)
    for i, spec in enumerate(BIAS_SPECS):
        # rows without a bias sample as they would in a batch without any
        assert (got[i] == unbiased[i]) != ("logit_bias" in spec), (i, spec)
    assert min(got[1]) >= 15 and min(unbiased[1]) < 15
    assert got[2] == [20] * 25
    assert 29 not in got[4][:6] and set(got[4][6:]) == {29}


def test_batches_without_logit_bias_skip_it(monkeypatch):
    def must_not_run(*args):
        raise AssertionError("apply_logit_bias ran")

    monkeypatch.setattr(engine.sampler, "apply_logit_bias", must_not_run)
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(2))
    reqs = [
        _preq([1], [2, 3], temperature=0),
        _preq([1], [2], temperature=0, presence_penalty=1.0),
        _preq([1], [], temperature=1.0, logit_bias={}),
    ]
    Sampler()(logits.clone(), reqs)
    with pytest.raises(AssertionError, match="apply_logit_bias ran"):
        Sampler()(logits[[0, 1, 2, 0]].clone(), [*reqs, _preq(temperature=0, logit_bias={3: 1})])


def test_logit_bias_ids_are_checked_against_the_vocabulary(llm):
    eng = llm.engine
    vocab = eng.vocab_size
    for bad in ({vocab: 1.0}, {5: 1.0, 10**12: -1.0}):
        with pytest.raises(engine.InvalidRequestError) as info:
            llm.generate("hi", _greedy(max_tokens=2, logit_bias=bad))
        assert info.value.param == "logit_bias" and str(vocab) in str(info.value)
    # values are checked again when the request is made, after a mutation
    sp = _greedy(max_tokens=2, logit_bias={5: 1.0})
    sp.logit_bias[5] = 101
    with pytest.raises(engine.InvalidRequestError) as info:
        eng.make_request("hi", sp)
    assert info.value.param == "logit_bias"
    assert not eng.has_unfinished()
    out = llm.generate("hi", _greedy(max_tokens=3, logit_bias={vocab - 1: 100}))[0]
    assert out.token_ids == [vocab - 1] * 3


BANNED_PROMPTS = ["The quick brown fox", "Once upon a time", "gamma"]


def test_banning_the_greedy_tokens_changes_the_output_end_to_end(llm):
    plain = [o.token_ids for o in llm.generate(BANNED_PROMPTS, _greedy(max_tokens=16))]
    bans = [_greedy(max_tokens=16, logit_bias=dict.fromkeys(ids, -100)) for ids in plain]
    # one batch: each prompt banned and unbanned
    outs = llm.generate(BANNED_PROMPTS * 2, bans + [_greedy(max_tokens=16)] * len(plain))
    for ids, sp, out in zip(plain, bans, outs, strict=False):
        assert out.token_ids != ids
        assert not set(out.token_ids) & set(sp.logit_bias), (out.token_ids, ids)
        assert len(out.token_ids) == 16
    assert [o.token_ids for o in outs[len(plain) :]] == plain
    # +100 on one id: nothing else is picked, greedy or sampled
    for sp in (
        _greedy(logit_bias={42: 100}),
        _greedy(temperature=1.0, seed=3, logit_bias={42: 100}),
    ):
        assert llm.generate(BANNED_PROMPTS[0], sp)[0].token_ids == [42] * 24
    assert llm.stats().kv_slots_used == 0


def test_jump_forward_takes_the_longest_matching_key():
    sp = engine.SamplingParams(jump_forward={(7,): (1,), (3, 7): (2, 2), (9, 3, 7): (5,)})
    assert sp.forced_after([4, 7]) == (1,)
    assert sp.forced_after([3, 7]) == (2, 2)
    assert sp.forced_after([9, 3, 7]) == (5,)
    assert sp.forced_after([7, 4]) == ()
    assert sp.forced_after([]) == ()
    # lists are accepted as values, as JSON would give them
    assert engine.SamplingParams(jump_forward={(7,): [1, 2]}).forced_after([7]) == (1, 2)
