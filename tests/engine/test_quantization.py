"""Quantized layouts, their serialization, and quantization at load on tiny models."""

from __future__ import annotations

import pytest
import torch

from engine import LLM
from engine.config import resolve_quantization
from engine.quantization import (
    Int4Weight,
    Int8Weight,
    concat_rows,
    from_tensors,
    quantize_int4,
    quantize_int8,
    to_tensors,
)
from evals.quant_quality import measure
from sot_kernels.linear import Int4Linear, Int8Linear


def test_int4_round_trip_error_is_within_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    q = quantize_int4(w)
    assert q.q.dtype == torch.uint8 and int(q.q.max()) <= 15
    err = (q.dequantize() - w).abs().view(16, 2, 32)
    assert (err <= q.scale[..., None] / 2 + 1e-6).all()


def test_int8_round_trip_error_is_within_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    q = quantize_int8(w)
    assert ((q.dequantize() - w).abs() <= q.scale[:, None] / 2 + 1e-6).all()


def test_int4_needs_whole_groups():
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_int4(torch.randn(4, 40))


@pytest.mark.parametrize("make", [quantize_int4, quantize_int8])
def test_serialization_round_trip(make):
    w = make(torch.randn(8, 64))
    flat = {**to_tensors("a.weight", w), **to_tensors("b", torch.ones(3))}
    back = from_tensors(flat)
    assert torch.equal(back["b"], torch.ones(3))
    assert type(back["a.weight"]) is type(w)
    assert torch.equal(back["a.weight"].dequantize(), w.dequantize())


def test_concat_rows_fuses_one_layout_only():
    a, b = quantize_int4(torch.randn(4, 64)), quantize_int4(torch.randn(6, 64))
    fused = concat_rows([a, b])
    assert isinstance(fused, Int4Weight) and fused.shape == (10, 64)
    assert torch.equal(fused.dequantize()[4:], b.dequantize())
    assert isinstance(concat_rows([quantize_int8(torch.randn(2, 64))] * 2), Int8Weight)
    assert concat_rows([a, quantize_int8(torch.randn(2, 64))]) is None


@pytest.mark.parametrize(
    ("quantization", "dtype", "gguf", "expect"),
    [
        ("auto", "auto", True, ("gguf", torch.float32)),
        ("auto", "bfloat16", True, ("gguf", torch.bfloat16)),
        ("auto", "float32", True, (None, torch.float32)),  # the parity path
        ("auto", "auto", False, (None, torch.float32)),
        ("int4", "auto", False, ("int4", torch.float32)),
        (None, "bfloat16", True, (None, torch.bfloat16)),
    ],
)
def test_resolve_quantization(quantization, dtype, gguf, expect):
    assert resolve_quantization(quantization, dtype, torch.device("cpu"), gguf) == expect


def test_quantization_refusals():
    with pytest.raises(ValueError, match="needs a GGUF"):
        resolve_quantization("gguf", "auto", torch.device("cpu"), False)
    with pytest.raises(ValueError, match="CPU only"):
        resolve_quantization("int4", "auto", torch.device("meta"), True)


@pytest.mark.parametrize(("mode", "kind"), [("int4", Int4Linear), ("int8", Int8Linear)])
def test_quantize_at_load(tiny_llama_dir, mode, kind):
    llm = LLM(str(tiny_llama_dir), device="cpu", quantization=mode, kv_slots=256)
    model = llm.engine.model
    layer = model.model.layers[0]
    assert isinstance(layer.self_attn.qkv_proj, kind)
    assert isinstance(layer.mlp.gate_up_proj, kind)
    assert isinstance(model.lm_head, kind)


def test_quantized_tiny_model_tracks_float32(tiny_llama_dir):
    """Teacher-forced on a tiny random model, int8 at load mostly agrees with the
    float32 model's next-token choice and int4 often does. Random Gaussian weights of a
    64-wide model lose far more to 4 bits than a trained model (whose figure, 98.6%, is
    checked in test_quantized_engine.py), but a wrong layout or a mis-wired head would
    agree about never (49,152 tokens)."""
    text = "The quick brown fox jumps over the lazy dog. " * 12
    ref, int8, int4 = measure(str(tiny_llama_dir), ["float32", "int8", "int4"], text)
    assert ref.top1_agreement == 1.0
    assert int8.top1_agreement >= 0.9, int8
    assert int4.top1_agreement >= 0.2, int4
    assert int8.top1_agreement >= int4.top1_agreement


def _tiny_llama_module(tiny_model_dirs):
    from engine.attention import TorchAttentionBackend
    from engine.models import LlamaForCausalLM, ModelArgs

    _, hf = tiny_model_dirs["llama"]
    model = LlamaForCausalLM(ModelArgs.from_hf(hf.config), TorchAttentionBackend())
    return model, {k: v.detach().clone() for k, v in hf.state_dict().items()}


def test_fused_shards_all_quantized_fuse_into_one_weight(tiny_model_dirs):
    model, state = _tiny_llama_module(tiny_model_dirs)
    attn = "model.layers.0.self_attn"
    for proj in ("q_proj", "k_proj", "v_proj"):
        state[f"{attn}.{proj}.weight"] = quantize_int4(state[f"{attn}.{proj}.weight"])
    quantized = model.load_weights(state.items())
    fused = quantized[f"{attn}.qkv_proj"]
    expect = torch.cat(
        [state[f"{attn}.{p}.weight"].dequantize() for p in ("q_proj", "k_proj", "v_proj")]
    )
    assert torch.equal(fused.dequantize(), expect)


def test_fused_shards_of_mixed_kinds_load_as_floats(tiny_model_dirs):
    """q and k quantized but v a float tensor (a GGUF may mix types): no kernel takes
    them together, so all three land de-quantized in the float matrix."""
    model, state = _tiny_llama_module(tiny_model_dirs)
    attn = "model.layers.0.self_attn"
    for proj in ("q_proj", "k_proj"):
        state[f"{attn}.{proj}.weight"] = quantize_int4(state[f"{attn}.{proj}.weight"])
    quantized = model.load_weights(state.items())
    assert f"{attn}.qkv_proj" not in quantized
    expect = torch.cat([
        state[f"{attn}.q_proj.weight"].dequantize(),
        state[f"{attn}.k_proj.weight"].dequantize(),
        state[f"{attn}.v_proj.weight"],
    ])  # fmt: skip
    assert torch.equal(model.model.layers[0].self_attn.qkv_proj.weight, expect)
