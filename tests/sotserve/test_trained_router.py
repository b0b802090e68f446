"""The trained router: shipped parameters, model binding, held-apart accuracy,
reproduction from ``evals.train_router``, and ``Planner.route`` on it."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch

from engine import LLM, AsyncEngine
from evals import train_router
from prompts import ChatRenderer
from sotserve import trained_router as tr
from sotserve.backends import LocalBackend
from sotserve.planner import Planner

DATA = train_router.DATA_DIR
needs_data = pytest.mark.skipif(not (DATA / "vicuna80.jsonl").exists(), reason="no ../shared/data")


@pytest.fixture(scope="module")
def engine():
    eng = AsyncEngine()  # the embedded SmolLM2-135M-Instruct
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def features_dir(tmp_path_factory) -> Path:
    """Hidden states of the labelled sets, shared by this module's training tests
    (each set's from an empty prefix cache: the same wherever they are computed)."""
    return tmp_path_factory.mktemp("router-features")


def shipped() -> tr.RouterParams:
    (params,) = tr.shipped_params()
    return params


def test_shipped_parameters_are_small_versioned_and_name_their_model():
    path = Path(tr.__file__).parent / tr.PARAMS_DIR / "smollm2-135m-instruct.json"
    assert path.stat().st_size < 64 * 1024
    p = shipped()
    assert p.version == tr.PARAMS_VERSION and p.model == "SmolLM2-135M-Instruct"
    assert p.hidden_size == 576 and p.examples == 1030 + 640
    assert p.trained_on == "lima_router.jsonl+router_questions.jsonl"
    # no question text ships: numbers and names only
    raw = json.loads(path.read_text())
    assert all(isinstance(raw[k], list | int | float) for k in ("weights", "probe", "bias"))


def test_a_file_of_another_version_or_shape_is_refused():
    raw = json.loads(shipped().to_json())
    with pytest.raises(tr.RouterParamsError, match="version"):
        tr.RouterParams.from_json(json.dumps({**raw, "version": 99}))
    with pytest.raises(tr.RouterParamsError, match="hidden_size"):
        tr.RouterParams.from_json(json.dumps({**raw, "weights": raw["weights"][:3]}))
    with pytest.raises(tr.RouterParamsError, match="malformed"):
        tr.RouterParams.from_json(json.dumps({**raw, "extra": 1}))


async def test_loads_for_its_model_only(engine, tiny_llama_dir):
    backend = LocalBackend(engine)
    renderer = ChatRenderer(backend.tokenizer)
    assert await tr.load_for_backend(backend, renderer) == shipped()
    # the same shape, another model: the probe does not match
    other = dataclasses.replace(shipped(), probe=[1.0] * 576)
    assert await tr.load_for_backend(backend, renderer, [other]) is None
    # another model (the same tokenizer, another hidden size)
    async with AsyncEngine(str(tiny_llama_dir), dtype="float32", device="cpu") as tiny:
        tiny_backend = LocalBackend(tiny)
        assert await tr.load_for_backend(tiny_backend, ChatRenderer(tiny.tokenizer)) is None
        planner = Planner(tiny_backend)
        decision = await planner.route("What are some tips for saving money?")
        assert decision.source == "rules"
        assert await planner.router.trained_params(tiny_backend) is None


async def test_backends_without_hidden_states_get_the_rules(engine):
    class NoHidden(LocalBackend):
        gives_hidden_states = False  # as HTTP backends

    planner = Planner(NoHidden(engine))
    decision = await planner.route("What are the benefits of regular exercise?")
    assert decision.source == "rules"


@needs_data
async def test_the_shipped_router_holds_on_vicuna80(engine):
    """Trained on LIMA and the made-up questions: vicuna80 is held apart."""
    data = train_router.load_labelled(DATA / "vicuna80.jsonl")
    planner = Planner(LocalBackend(engine))
    picks = [(await planner.route(q)).mode for q in data.questions]
    metrics = train_router.router_metrics(list(zip(data.labels, picks, strict=True)))
    assert metrics["accuracy"] >= 0.80, metrics
    assert metrics["precision"] >= 0.75, metrics


def test_training_is_deterministic_in_data_and_seed():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(60, 12, generator=gen, dtype=torch.float64)
    labels = [bool(v) for v in (x[:, 0] + 0.3 * x[:, 1] > 0.2)]
    first = train_router.train(x, labels, seed=0)
    again = train_router.train(x.clone(), list(labels), seed=0)
    assert torch.equal(first.weights, again.weights)
    assert (first.bias, first.threshold, first.l2) == (again.bias, again.threshold, again.l2)
    assert torch.equal(first.out_of_fold, again.out_of_fold)
    # and it learns: the training set is separable along x0 + 0.3 x1
    pred = torch.sigmoid(x @ first.weights + first.bias) >= first.threshold
    assert (pred == torch.tensor(labels)).double().mean() >= 0.9


def test_the_threshold_is_the_cost_ratio():
    assert train_router.cost_threshold(1.0) == 0.5
    assert train_router.cost_threshold(train_router.SKELETON_COST) == 0.6
    assert train_router.cost_threshold(3.0) == 0.75
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="positive"):
            train_router.cost_threshold(bad)


def test_calibration_bands_count_and_share():
    prob = torch.tensor([0.05, 0.1, 0.15, 0.5, 0.9, 1.0], dtype=torch.float64)
    labels = [False, False, True, True, True, False]
    bands = train_router.calibration(prob, labels)
    assert [(b.lo, b.count) for b in bands] == [(0.0, 3), (0.4, 1), (0.8, 2)]
    assert [round(b.observed, 3) for b in bands] == [0.333, 1.0, 0.5]


def _normalized(text: str) -> str:
    return " ".join(text.lower().split())


def test_made_up_questions_are_a_clean_labelled_set():
    """The shipped training questions: unique, labelled, of both kinds."""
    rows = [json.loads(line) for line in train_router.MADE_UP.read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"mq-{i:04d}" for i in range(1, len(rows) + 1)]
    assert len({_normalized(r["question"]) for r in rows}) == len(rows)
    share = sum(r["sot_suitable"] for r in rows) / len(rows)
    assert all(isinstance(r["sot_suitable"], bool) for r in rows) and 0.25 < share < 0.5


def _content_words(text: str) -> frozenset[str]:
    words = re.findall(r"[a-z]+", text.lower())
    return frozenset(w for w in words if len(w) > 3)


@needs_data
def test_made_up_questions_are_not_drawn_from_the_held_out_sets():
    """None of them is a question of LIMA or vicuna80 (the sets they are scored on), nor
    a light edit of one: at most half of their content words in common."""
    made_up = train_router.load_labelled(train_router.MADE_UP).questions
    for name in ("lima", "vicuna80"):
        held = train_router.load_labelled(train_router.resolve(name, DATA)).questions
        assert not {_normalized(q) for q in made_up} & {_normalized(q) for q in held}, name
        held_words = [w for w in map(_content_words, held) if w]
        for q in made_up:
            a = _content_words(q)
            overlap = max((len(a & b) / len(a | b) for b in held_words), default=0.0)
            assert overlap <= 0.5, (name, q)


def test_sets_join_in_order_with_their_own_hash(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text('{"question": "q1", "sot_suitable": true}\n')
    b.write_text(
        '{"question": "q2", "sot_suitable": false}\n{"question": "q3", "sot_suitable": true}\n'
    )
    joined = train_router.load_sets(f"{a}+{b}", tmp_path)
    assert joined.questions == ["q1", "q2", "q3"] and joined.labels == [True, False, True]
    assert joined.name == "a.jsonl+b.jsonl"
    assert [p.name for p in joined.parts] == ["a.jsonl", "b.jsonl"]
    single = train_router.load_sets(str(a), tmp_path)
    assert not single.parts and joined.sha256 not in (single.sha256, joined.parts[1].sha256)
    assert train_router.load_sets("made-up", tmp_path).name == "router_questions.jsonl"


@needs_data
def test_trained_on_made_up_questions_alone_holds_on_vicuna80(features_dir):
    """The held-apart check the floor asks for, on questions written for the project:
    neither public set is in training, and vicuna80 is only scored."""
    llm = LLM()
    features = train_router.Features(llm, features_dir)
    data = train_router.load_sets("made-up", DATA)
    test = train_router.load_sets("vicuna80", DATA)
    head = train_router.train(features(data), data.labels, 0)
    # the threshold reads P(skeleton) as a probability: out of fold, the share labelled
    # suitable in each well-filled band of it is near the band's middle
    for band in train_router.calibration(head.out_of_fold, data.labels):
        if band.count >= 25:
            assert abs(band.observed - (band.lo + band.hi) / 2) <= 0.15, band
    params = train_router.make_params(llm, data, head, seed=0)
    metrics = train_router.score(params, test, features(test))
    assert metrics["accuracy"] >= 0.80, metrics
    assert metrics["precision"] >= 0.75, metrics


@needs_data
def test_the_script_reproduces_the_shipped_parameters(tmp_path, features_dir):
    """python -m evals.train_router, from the data alone: the very file that ships
    (the made-up set's hidden states come from the test above when it ran first)."""
    out = tmp_path / "params.json"
    train_router.main(["--data-dir", str(DATA), "--out", str(out), "--features", str(features_dir)])
    assert out.read_text() == shipped().to_json()


def test_a_sets_hidden_states_do_not_depend_on_the_sets_before_it():
    """What lets the tests above share hidden states: a set is embedded from an empty
    prefix cache, so the prompts of a set embedded before it (here sharing the chat
    template's opening and the first words) serve none of its tokens. A prompt
    prefilled after a cached prefix can differ in the last digits (8 of the 640
    made-up questions did, after LIMA's), which the byte-exact file would show."""
    questions = ["How do I bake bread at home?", "How do I fix a flat bike tyre?"]
    alone = train_router.embed_questions(LLM(), questions[1:])
    llm = LLM()
    train_router.embed_questions(llm, questions[:1])
    before = llm.stats().cached_tokens
    after = train_router.embed_questions(llm, questions[1:])
    assert llm.stats().cached_tokens == before
    assert torch.equal(alone, after)


def test_router_prompt_is_the_answer_prompt_for_ordinary_questions():
    chat = [{"role": "user", "content": "How can I sleep better?"}]
    assert tr.router_messages(chat) == chat
    huge = [{"role": "user", "content": "word " * 1_000_000}]
    (cut,) = tr.router_messages(huge)
    assert len(cut["content"]) <= tr.HEAD_CHARS + tr.TAIL_CHARS + 1


def test_decide_three_ways():
    p = dataclasses.replace(shipped(), weights=[0.0] * 576, bias=0.0, threshold=0.4)
    h = torch.zeros(576)
    assert tr.decide(p, h, "What are some ways to save energy?").mode == "sot"
    assert tr.decide(p, h, "How does a vaccine work?").mode == "graph"
    assert tr.decide(dataclasses.replace(p, threshold=0.6), h, "Hi").mode == "sequential"


def test_llm_embed_is_what_the_router_reads(engine):
    """The training's features (LLM.embed) and serving's (AsyncEngine.embed) agree."""
    llm = LLM()
    ids = ChatRenderer(llm.tokenizer).render(tr.question_messages(tr.PROBE_QUESTION))
    probe = llm.embed([ids])[0]
    assert tr.matches_model(shipped(), probe, len(llm.tokenizer))
