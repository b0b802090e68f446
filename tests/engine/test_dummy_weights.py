"""``load_format="dummy"``: a model from a config, seeded random weights, no files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine import LLM, SamplingParams
from engine.loader import ModelConfigError, resolve_dummy, shape_names
from engine.models import ModelArgs
from engine.server import main as engine_server_main

TINY = {
    "model_type": "llama", "vocab_size": 49152, "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}  # fmt: skip


def _config(tmp_path: Path, name: str = "config.json", **over) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps({**TINY, **over}))
    return path


def _dummy(path: Path, **kw) -> LLM:
    return LLM(str(path), load_format="dummy", device="cpu", kv_slots=256, **kw)


def _state(llm: LLM) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in llm.engine.model.named_parameters()}


def test_shapes_dtype_and_device_come_from_the_config(tmp_path):
    llm = _dummy(_config(tmp_path, hidden_size=96, num_attention_heads=6, num_key_value_heads=3,
                         num_hidden_layers=3), dtype="bfloat16", prepack_weights=False)  # fmt: skip
    model = llm.engine.model
    assert len(model.model.layers) == 3
    qkv = model.model.layers[0].self_attn.qkv_proj.weight
    assert qkv.shape == (96 + 2 * 48, 96)  # 6 query heads of 16, 2 x 3 KV heads of 16
    assert model.model.embed_tokens.weight.shape == (49152, 96)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    # norm scales start at 1, matrices at the config's spread (HF's default 0.02)
    assert torch.all(model.model.norm.weight == 1)
    assert qkv.float().std().item() == pytest.approx(0.02, rel=0.05)


def test_the_same_seed_gives_the_same_weights_and_another_seed_others(tmp_path):
    path = _config(tmp_path)
    a, b = (_state(_dummy(path, prepack_weights=False)) for _ in range(2))
    c = _state(_dummy(path, prepack_weights=False, dummy_seed=1))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    name = "model.layers.0.mlp.gate_up_proj.weight"
    assert not torch.equal(a[name], c[name])


def test_activations_stay_finite_through_many_layers_in_bfloat16(tmp_path):
    llm = _dummy(_config(tmp_path, num_hidden_layers=36), dtype="bfloat16")
    seen = []
    last = llm.engine.model.model.layers[-1]
    last.register_forward_hook(lambda _m, _i, out: seen.append(out[0] + out[1]))
    out = llm.generate([list(range(100, 140))], SamplingParams(max_tokens=4, ignore_eos=True))
    assert len(out[0].token_ids) == 4
    residual = torch.cat([h.float() for h in seen])
    assert torch.isfinite(residual).all()
    assert 1e-3 < residual.std().item() < 1e3


def test_qwen2_shape_carries_qkv_biases_and_fills_them(tmp_path):
    llm = _dummy(_config(tmp_path, model_type="qwen2"), prepack_weights=False)
    bias = llm.engine.model.model.layers[0].self_attn.qkv_proj.bias
    assert bias is not None and bias.abs().sum() > 0
    args = ModelArgs.from_hf(resolve_dummy("qwen2.5-7b").config())
    assert args.qkv_bias and not args.o_bias


def test_named_shapes_are_the_real_models_shapes():
    assert {"llama-3.1-8b", "qwen2.5-7b", "llama-3.2-1b", "smollm2-135m"} <= set(shape_names())
    shapes = {n: ModelArgs.from_hf(resolve_dummy(n).config()) for n in shape_names()}
    big = shapes["llama-3.1-8b"]
    assert (big.hidden_size, big.num_layers, big.num_heads, big.num_kv_heads) == (4096, 32, 32, 8)
    assert (big.intermediate_size, big.vocab_size, big.head_dim) == (14336, 128256, 128)
    qwen = shapes["qwen2.5-7b"]
    assert (qwen.hidden_size, qwen.num_layers, qwen.num_kv_heads) == (3584, 28, 4)
    assert shapes["llama-3.2-1b"].tie_word_embeddings
    # no model named: the embedded model's shape
    assert resolve_dummy(None).name == "smollm2-135m-dummy"


def test_the_tokenizer_is_smollm2_unless_one_is_given(tmp_path, tokenizer):
    llm = _dummy(_config(tmp_path))
    assert llm.tokenizer.encode("Hello world") == tokenizer.encode("Hello world")
    saved = tmp_path / "tok"
    tokenizer.save_pretrained(saved)
    assert len(_dummy(_config(tmp_path), tokenizer=str(saved)).tokenizer) == len(tokenizer)
    with pytest.raises(Exception, match="nosuch"):
        _dummy(_config(tmp_path), tokenizer=str(tmp_path / "nosuch"))


def test_an_unknown_shape_is_a_clear_error():
    with pytest.raises(ModelConfigError, match=r"unknown model shape 'llama-9b'.*llama-3\.1-8b"):
        LLM("llama-9b", load_format="dummy", device="cpu")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("{not json", "cannot read"),
        ("[1, 2]", "not a JSON object"),
        (json.dumps({**TINY, "model_type": "gpt-17"}), "no known model_type"),
        (json.dumps({**TINY, "hidden_size": 0}), "hidden_size must be a positive integer"),
        (json.dumps({**TINY, "num_key_value_heads": 3}), "must divide num_attention_heads"),
        (json.dumps({**TINY, "hidden_size": 66}), "(?s)is invalid.*not a multiple of"),
    ],
)
def test_a_bad_config_is_a_clear_error(tmp_path, text, match):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ModelConfigError, match=match):
        LLM(str(path), load_format="dummy", device="cpu")


def test_an_unknown_load_format_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown load_format 'lazy'"):
        LLM(str(_config(tmp_path)), load_format="lazy", device="cpu")


def test_a_dummy_model_cannot_keep_gguf_blocks(tmp_path):
    with pytest.raises(ValueError, match="needs a GGUF model"):
        _dummy(_config(tmp_path), quantization="gguf")


def test_the_engine_server_reports_a_bad_shape_before_listening(capsys):
    with pytest.raises(SystemExit) as exc:
        engine_server_main(["--load-format", "dummy", "--model", "llama-9b", "--device", "cpu"])
    assert exc.value.code == 2
    assert "unknown model shape 'llama-9b'" in capsys.readouterr().err
