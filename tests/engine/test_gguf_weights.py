"""Reading GGUF tensors, quantized ones kept quantized, from small synthetic files.

The files are written with the ``gguf`` package (llama.cpp's own writer), and every
block type is checked against that package's de-quantizer as the reference.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFWriter
from gguf import quants as gq

from engine.gguf_weights import GGUFError, hf_name, read_gguf_weights
from engine.quantization import Int4Weight

N, K = 64, 256  # a multiple of 256, so K-quant super-blocks fit too
HEADS, KV_HEADS = 4, 2


def _random_blocks(qtype: T, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random block bytes with sane fp16 scales (K-quant types cannot be written by the
    ``gguf`` package, so their blocks are made up; the reference de-quantizes them)."""
    block, size = gq.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    half = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    if qtype == T.Q4_K:  # d, dmin lead the block
        raw[..., 0:2] = half
        raw[..., 2:4] = half
    elif qtype == T.Q6_K:  # d ends it
        raw[..., -2:] = half
    return raw.reshape(rows, -1)


def _write(path: Path, tensors: dict[str, tuple[np.ndarray, T]], arch: str = "llama") -> Path:
    w = GGUFWriter(str(path), arch)
    for name, (data, qtype) in tensors.items():
        w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _float(rows: int = N, cols: int = K, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)


def _encoded(qtype: T, seed: int = 0) -> np.ndarray:
    if qtype in (T.F32, T.F16):
        return _float(seed=seed).astype(np.float16 if qtype == T.F16 else np.float32)
    if qtype in (T.Q4_0, T.Q4_1, T.Q8_0):
        return gq.quantize(_float(seed=seed), qtype)
    return _random_blocks(qtype, N, K, seed)


def _reference(data: np.ndarray, qtype: T) -> np.ndarray:
    if qtype in (T.F32, T.F16):
        return data.astype(np.float32)
    return gq.dequantize(data, qtype).reshape(N, K)


ALL_TYPES = [T.F32, T.F16, T.Q4_0, T.Q4_1, T.Q8_0, T.Q4_K, T.Q6_K]


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("keep", [False, True], ids=["dequantized", "kept"])
def test_every_type_reads_as_its_reference(tmp_path, qtype, keep):
    data = _encoded(qtype)
    path = _write(tmp_path / "m.gguf", {"blk.0.ffn_down.weight": (data, qtype)})
    [(name, value)] = list(read_gguf_weights(path, HEADS, KV_HEADS, keep_quantized=keep))
    assert name == "model.layers.0.mlp.down_proj.weight"
    exact_int4 = qtype in (T.Q4_0, T.Q4_1, T.Q4_K)
    if keep and exact_int4:
        assert isinstance(value, Int4Weight)
        value = value.dequantize()
    assert isinstance(value, torch.Tensor) and value.shape == (N, K)
    # the int4 layout rewrites d*q + m as (q - 8)*d + (m + 8d): equal up to rounding
    np.testing.assert_allclose(value.numpy(), _reference(data, qtype), rtol=1e-5, atol=1e-5)


def test_q4_1_codes_and_scales_are_llama_cpps(tmp_path):
    """Kept as int4, Q4_1 is the file's own codes and scales, not a re-quantization."""
    data = gq.quantize(_float(), T.Q4_1)
    path = _write(tmp_path / "m.gguf", {"blk.0.ffn_up.weight": (data, T.Q4_1)})
    [(_, w)] = list(read_gguf_weights(path, HEADS, KV_HEADS, keep_quantized=True))
    blocks = data.reshape(N, K // 32, 20)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    np.testing.assert_array_equal(w.scale.numpy(), d)
    lo = blocks[..., 4:]
    codes = np.concatenate([lo & 0x0F, lo >> 4], axis=-1).reshape(N, K)
    np.testing.assert_array_equal(w.q.numpy(), codes)


def _llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf does to q/k rows of the llama architecture."""
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


@pytest.mark.parametrize("keep", [False, True])
def test_llama_q_and_k_rows_are_put_back_in_hf_order(tmp_path, keep):
    q_hf = _float(HEADS * 16, K, seed=1)
    k_hf = _float(KV_HEADS * 16, K, seed=2)
    path = _write(tmp_path / "m.gguf", {
        "blk.0.attn_q.weight": (gq.quantize(_llama_cpp_permute(q_hf, HEADS), T.Q4_1), T.Q4_1),
        "blk.0.attn_k.weight": (_llama_cpp_permute(k_hf, KV_HEADS), T.F32),
    })  # fmt: skip
    got = dict(read_gguf_weights(path, HEADS, KV_HEADS, keep_quantized=keep))
    q = got["model.layers.0.self_attn.q_proj.weight"]
    q = q.dequantize() if isinstance(q, Int4Weight) else q
    expect_q = gq.dequantize(gq.quantize(q_hf, T.Q4_1), T.Q4_1)  # rows quantize alike
    np.testing.assert_allclose(q.numpy(), expect_q, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got["model.layers.0.self_attn.k_proj.weight"].numpy(), k_hf)


def test_other_architectures_are_not_permuted(tmp_path):
    k = _float(KV_HEADS * 16, K)
    path = _write(tmp_path / "m.gguf", {"blk.0.attn_k.weight": (k, T.F32)}, arch="qwen2")
    [(_, got)] = list(read_gguf_weights(path, HEADS, KV_HEADS, keep_quantized=False))
    np.testing.assert_array_equal(got.numpy(), k)


def test_unknown_type_is_a_clear_error(tmp_path):
    # Q8_1 is a valid GGML type that nothing here (nor the gguf package) de-quantizes
    raw = np.zeros((N, K // 32 * 40), dtype=np.uint8)
    path = _write(tmp_path / "m.gguf", {"blk.0.ffn_up.weight": (raw, T.Q8_1)})
    with pytest.raises(GGUFError, match=r"ffn_up.*Q8_1"):
        list(read_gguf_weights(path, HEADS, KV_HEADS, keep_quantized=True))


def test_truncated_file_is_a_clear_error(tmp_path):
    path = _write(
        tmp_path / "m.gguf", {"blk.0.ffn_up.weight": (gq.quantize(_float(), T.Q4_1), T.Q4_1)}
    )
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(GGUFError):
        list(read_gguf_weights(path, HEADS, KV_HEADS, keep_quantized=True))


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF" + b"\xff" * 64)
    with pytest.raises(GGUFError, match="not a readable GGUF"):
        list(read_gguf_weights(path, HEADS, KV_HEADS, keep_quantized=True))


def test_unexpected_tensor_names_are_refused():
    assert hf_name("output_norm.weight") == "model.norm.weight"
    assert hf_name("blk.12.ffn_gate.weight") == "model.layers.12.mlp.gate_proj.weight"
    with pytest.raises(GGUFError, match="unexpected tensor"):
        hf_name("blk.0.ffn_gate_exps.weight")
