"""The engine's command-line options and the config they become."""

from __future__ import annotations

import argparse

import pytest

from engine.cli_args import add_engine_args, engine_kwargs, serve_kwargs
from engine.config import EngineConfig


def _parse(*argv: str) -> dict:
    p = argparse.ArgumentParser()
    add_engine_args(p)
    return engine_kwargs(p.parse_args(list(argv)))


def test_defaults_pass_nothing():
    # every default is the engine's own, so the servers and LLM() agree
    assert _parse() == {}


def test_options_map_to_engine_kwargs():
    kw = _parse(
        "--max-model-len", "512", "--max-running", "8", "--kv-slots", "4096",
        "--max-batched-tokens", "256", "--attention-backend", "triton", "--no-prefix-cache",
        "--shared-prefix-min-tokens", "128", "--enforce-eager", "--cuda-graph-max-batch", "16",
        "--quantization", "int4",
    )  # fmt: skip
    assert kw == {
        "max_model_len": 512, "max_running": 8, "kv_slots": 4096, "max_batched_tokens": 256,
        "attention_backend": "triton", "prefix_cache": False, "shared_prefix_min_tokens": 128,
        "enforce_eager": True, "cuda_graph_max_batch": 16, "quantization": "int4",
    }  # fmt: skip
    EngineConfig(**{k: v for k, v in kw.items() if k != "attention_backend"})


def test_zero_turns_the_shared_prefix_path_off():
    assert _parse("--shared-prefix-min-tokens", "0") == {"shared_prefix_min_tokens": None}


def test_step_timeout_maps_to_the_engine_and_zero_turns_the_watchdog_off():
    assert _parse("--step-timeout", "2.5") == {"step_timeout": 2.5}
    assert _parse("--step-timeout", "0") == {"step_timeout": None}
    for bad in ("-1", "soon", "inf", "nan"):
        with pytest.raises(SystemExit):
            _parse("--step-timeout", bad)


def test_keep_alive_on_engine_death_is_a_serve_option():
    p = argparse.ArgumentParser()
    add_engine_args(p)
    assert serve_kwargs(p.parse_args([])) == {"keep_alive_on_engine_death": False}
    args = p.parse_args(["--keep-alive-on-engine-death"])
    assert serve_kwargs(args) == {"keep_alive_on_engine_death": True}
    assert engine_kwargs(args) == {}  # not the engine's business


def test_unknown_quantization_is_refused():
    with pytest.raises(SystemExit):
        _parse("--quantization", "fp4")
    with pytest.raises(ValueError, match="unknown quantization"):
        EngineConfig(quantization="fp4")


def test_unknown_backend_is_refused():
    with pytest.raises(SystemExit):
        _parse("--attention-backend", "flash")


@pytest.mark.parametrize(
    ("field", "value"),
    [("max_running", 0), ("max_batched_tokens", 0), ("kv_slots", 0), ("max_model_len", 1),
     ("shared_prefix_min_tokens", 0), ("cuda_graph_max_batch", -1), ("kv_cache_gib", 0)],
)  # fmt: skip
def test_config_rejects_values_below_their_floor(field, value):
    with pytest.raises(ValueError, match=field):
        EngineConfig(**{field: value})


def test_load_format_and_tokenizer_are_model_options_passed_to_the_engine():
    from engine.serving import add_model_args

    p = argparse.ArgumentParser()
    add_model_args(p)
    add_engine_args(p)
    assert engine_kwargs(p.parse_args([])) == {}
    args = p.parse_args(["--model", "llama-3.1-8b", "--load-format", "dummy", "--tokenizer", "t"])
    assert engine_kwargs(args) == {"load_format": "dummy", "tokenizer": "t"}
    EngineConfig(**engine_kwargs(args))
    with pytest.raises(SystemExit):
        p.parse_args(["--load-format", "lazy"])
