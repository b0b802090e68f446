"""Typed errors with clear messages, and nothing leaks after one."""

from __future__ import annotations

import pytest

import engine
from engine.llm_engine import LLMEngine

GOOD = engine.SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return engine.LLM(str(tiny_llama_dir), dtype="float32", device="cpu", kv_slots=1024)


@pytest.fixture(autouse=True)
def nothing_leaked(request):
    """After every test the shared LLM is idle, and still generates."""
    yield
    if "llm" not in request.fixturenames:
        return
    llm = request.getfixturevalue("llm")
    assert not llm.engine.has_unfinished()
    st = llm.stats()
    assert st.kv_slots_used == 0
    assert st.running == 0 and st.waiting == 0
    out = llm.generate("still works", GOOD)[0]
    assert out.finish_reason == "length"
    assert len(out.token_ids) == 4
    assert llm.stats().kv_slots_used == 0


def test_error_hierarchy():
    assert issubclass(engine.InvalidRequestError, ValueError)
    assert issubclass(engine.InvalidRequestError, engine.EngineError)
    assert issubclass(engine.ContextLengthExceededError, engine.InvalidRequestError)
    assert issubclass(engine.ModelNotFoundError, engine.EngineError)
    assert not issubclass(engine.ModelNotFoundError, engine.InvalidRequestError)
    assert issubclass(engine.EngineDeadError, engine.EngineError)


@pytest.mark.parametrize("prompt", ["", []], ids=["empty-str", "empty-list"])
def test_empty_prompt(llm, prompt):
    with pytest.raises(engine.InvalidRequestError, match="empty") as info:
        llm.generate(prompt, GOOD)
    assert not isinstance(info.value, engine.ContextLengthExceededError)
    assert info.value.param == "prompt"


@pytest.mark.parametrize("prompt", ["", []], ids=["empty-str", "empty-list"])
def test_empty_prompt_at_engine_level(llm, prompt):
    with pytest.raises(engine.InvalidRequestError, match="empty") as info:
        llm.engine.add_request(prompt, GOOD)
    assert info.value.param == "prompt"


@pytest.mark.parametrize("prompt", [12, None, [1, "2"], [1.0, 2.0], [True]])
def test_prompt_of_wrong_type(llm, prompt):
    with pytest.raises(engine.InvalidRequestError) as info:
        llm.engine.add_request(prompt, GOOD)
    assert info.value.param == "prompt"


def test_prompt_over_context_length(llm):
    limit = llm.engine.config.max_model_len
    assert limit == 512
    for prompt in ([7] * (limit + 1), [7] * limit, "hello " * (limit + 50)):
        with pytest.raises(engine.ContextLengthExceededError) as info:
            llm.generate(prompt, GOOD)
        assert info.value.param == "prompt"
        assert str(limit) in str(info.value)
        assert "context length" in str(info.value)


def test_prompt_plus_max_tokens_over_context_length(llm):
    limit = llm.engine.config.max_model_len
    params = engine.SamplingParams(max_tokens=limit)
    with pytest.raises(engine.ContextLengthExceededError) as info:
        llm.generate([7] * 10, params)
    assert info.value.param == "max_tokens"
    msg = str(info.value)
    assert "max_tokens" in msg
    assert str(limit - 10) in msg  # says what would fit
    # exactly filling the context is fine
    out = llm.generate([7] * 10, engine.SamplingParams(max_tokens=3, ignore_eos=True))[0]
    assert len(out.token_ids) == 3
    llm.engine.make_request([7] * 10, engine.SamplingParams(max_tokens=limit - 10))


@pytest.mark.parametrize("max_tokens", [0, -1, -100])
def test_non_positive_max_tokens(llm, max_tokens):
    with pytest.raises(engine.InvalidRequestError) as info:
        engine.SamplingParams(max_tokens=max_tokens)
    assert info.value.param == "max_tokens"
    # also when set after construction
    params = engine.SamplingParams(max_tokens=4)
    params.max_tokens = max_tokens
    with pytest.raises(engine.InvalidRequestError) as info:
        llm.generate("hi", params)
    assert info.value.param == "max_tokens"
    assert not isinstance(info.value, engine.ContextLengthExceededError)


@pytest.mark.parametrize(
    ("field", "value"),
    [("temperature", -0.5), ("temperature", 1000.0), ("top_p", 0.0), ("top_p", 1.01)],
)
def test_out_of_range_sampling_values(llm, field, value):
    with pytest.raises(engine.InvalidRequestError, match=field) as info:
        engine.SamplingParams(**{field: value})
    assert info.value.param == field
    params = engine.SamplingParams(max_tokens=4)
    setattr(params, field, value)
    with pytest.raises(engine.InvalidRequestError, match=field):
        llm.generate("hi", params)


@pytest.mark.parametrize("seed", [2**64, -(2**64)])
def test_seed_out_of_range(llm, seed):
    """A seed torch cannot take must be a typed request error, not a bare ValueError."""
    with pytest.raises(engine.InvalidRequestError) as info:
        llm.generate("hi", engine.SamplingParams(temperature=1.0, seed=seed, max_tokens=2))
    assert info.value.param == "seed"


def test_token_ids_outside_vocabulary(llm):
    vocab = llm.engine.vocab_size
    for bad in (-1, vocab, vocab + 1000):
        with pytest.raises(engine.InvalidRequestError, match="vocabulary") as info:
            llm.generate([1, 2, bad, 3], GOOD)
        assert info.value.param == "prompt"
        assert str(bad) in str(info.value)
    # the edges of the vocabulary are fine
    assert len(llm.generate([0, vocab - 1], GOOD)[0].token_ids) == 4


def test_params_not_sampling_params(llm):
    with pytest.raises(engine.InvalidRequestError):
        llm.engine.add_request("hi", {"max_tokens": 3})


def test_params_list_length_mismatch(llm):
    with pytest.raises(engine.InvalidRequestError):
        llm.generate(["a", "b"], [GOOD])


def test_bad_prompt_in_a_batch_queues_nothing(llm):
    good = ["one good prompt", "another good one"]
    for bad in ("", [llm.engine.vocab_size], [7] * 600):
        with pytest.raises(engine.InvalidRequestError):
            llm.generate([*good, bad, "a third good one"], GOOD)
        assert not llm.engine.has_unfinished()
        assert llm.stats().waiting == 0
    bad_params = [GOOD, GOOD, engine.SamplingParams(max_tokens=600)]
    with pytest.raises(engine.ContextLengthExceededError):
        llm.generate([*good, "bad params"], bad_params)
    assert not llm.engine.has_unfinished()
    # the good prompts alone still go through
    outs = llm.generate(good, GOOD)
    assert [len(o.token_ids) for o in outs] == [4, 4]


def test_duplicate_request_id(llm):
    eng = llm.engine
    eng.add_request("first", GOOD, request_id="same")
    try:
        with pytest.raises(engine.InvalidRequestError, match="same"):
            eng.add_request("second", GOOD, request_id="same")
    finally:
        eng.abort("same")
    assert not eng.has_unfinished()


# -- loading --------------------------------------------------------------------------------------
def test_unknown_model_path():
    with pytest.raises(engine.ModelNotFoundError, match="/nonexistent/model"):
        engine.LLM("/nonexistent/model")


@pytest.mark.parametrize("name", ["definitely-not-a-model-name", "./no/such/dir"])
def test_unknown_bare_name(name):
    with pytest.raises(engine.ModelNotFoundError) as info:
        engine.LLM(name)
    assert name.lstrip("./") in str(info.value)


def test_unknown_hub_id_offline():
    with pytest.raises(engine.ModelNotFoundError, match="no-such-org/no-such-model"):
        engine.LLM("no-such-org/no-such-model")


def test_directory_without_config(tmp_path):
    (tmp_path / "README.md").write_text("not a model")
    with pytest.raises(engine.ModelNotFoundError, match=r"config\.json"):
        engine.LLM(str(tmp_path))


def test_file_that_is_not_a_model(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"\0" * 16)
    with pytest.raises(engine.ModelNotFoundError):
        engine.LLM(str(f))


def test_unknown_engine_option(tiny_llama_dir):
    with pytest.raises(TypeError, match="no_such_option"):
        engine.LLM(str(tiny_llama_dir), device="cpu", no_such_option=1)
    with pytest.raises(TypeError):
        engine.AsyncEngine(str(tiny_llama_dir), device="cpu", max_runing=4)
    with pytest.raises(TypeError):
        LLMEngine(str(tiny_llama_dir), device="cpu", kv_slot=10)


def test_bad_dtype_and_backend(tiny_llama_dir):
    with pytest.raises(ValueError, match="dtype"):
        engine.LLM(str(tiny_llama_dir), dtype="float8", device="cpu")
    with pytest.raises(ValueError, match="backend"):
        engine.LLM(str(tiny_llama_dir), device="cpu", attention_backend="nope", kv_slots=64)
