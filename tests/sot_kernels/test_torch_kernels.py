"""The torch kernels against naive references written with explicit loops."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import (
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)

from sot_kernels.activation import silu_and_mul
from sot_kernels.attention import decode_attention, extend_attention, store_kv
from sot_kernels.norm import add_rms_norm, rms_norm
from sot_kernels.rope import apply_rope, rope_cos_sin_cache, rotate

D = 16
NUM_SLOTS = 48
GQA = [(4, 4), (4, 2), (8, 2)]  # (query heads, kv heads): ratios 1, 2, 4


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _cache(hk: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = _gen(seed)
    k = torch.randn(NUM_SLOTS, hk, D, generator=g)
    v = torch.randn(NUM_SLOTS, hk, D, generator=g)
    # the padding slot holds garbage that must never reach an output
    k[0] = 1e4
    v[0] = 1e4
    return k, v


def naive_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, q_pos: list[int], scale: float
) -> torch.Tensor:
    """``q [n, Hq, D]`` at positions ``q_pos``; ``keys/values [L, Hk, D]`` in order.

    Query ``i`` sees keys ``0..q_pos[i]``; query head ``h`` reads kv head ``h // (Hq/Hk)``.
    """
    n, hq, d = q.shape
    group = hq // keys.shape[1]
    out = torch.zeros(n, hq, d, dtype=torch.float64)
    for i in range(n):
        for h in range(hq):
            kvh = h // group
            visible = q_pos[i] + 1
            scores = [
                float(q[i, h].double() @ keys[j, kvh].double()) * scale for j in range(visible)
            ]
            m = max(scores)
            weights = [math.exp(s - m) for s in scores]
            total = sum(weights)
            for j in range(visible):
                out[i, h] += weights[j] / total * values[j, kvh].double()
    return out.float()


@pytest.mark.parametrize(("hq", "hk"), GQA)
@pytest.mark.parametrize(
    ("prefix", "n"),
    [(0, 6), (0, 1), (7, 4), (9, 1), (3, 12)],
    ids=["prefill", "single-token", "prefix+chunk", "prefix+single", "short-prefix"],
)
def test_extend_attention(hq, hk, prefix, n):
    k_cache, v_cache = _cache(hk, seed=hq * 100 + hk * 10 + prefix)
    g = _gen(prefix * 7 + n)
    length = prefix + n
    # a request's slots are scattered through the pool, never the padding slot
    slots = torch.randperm(NUM_SLOTS - 1, generator=g)[:length] + 1
    q = torch.randn(n, hq, D, generator=g)
    scale = D**-0.5

    out = extend_attention(q, k_cache, v_cache, slots, scale)

    ref = naive_attention(q, k_cache[slots], v_cache[slots], list(range(prefix, length)), scale)
    assert out.shape == (n, hq, D)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_extend_attention_is_causal_within_the_chunk():
    # changing a later token's key/value must not change earlier queries' outputs
    hq, hk = 4, 2
    k_cache, v_cache = _cache(hk, seed=1)
    slots = torch.arange(1, 9)
    q = torch.randn(5, hq, D, generator=_gen(2))  # prefix 3, chunk 5
    out = extend_attention(q, k_cache, v_cache, slots, 0.3)
    k2, v2 = k_cache.clone(), v_cache.clone()
    k2[8] += 5.0
    v2[8] -= 5.0
    out2 = extend_attention(q, k2, v2, slots, 0.3)
    torch.testing.assert_close(out2[:4], out[:4])
    assert not torch.allclose(out2[4], out[4])


@pytest.mark.parametrize(("hq", "hk"), GQA)
@pytest.mark.parametrize("lengths", [[1], [5], [1, 7, 3], [12, 12], [2, 11, 1, 6]])
def test_decode_attention(hq, hk, lengths):
    k_cache, v_cache = _cache(hk, seed=hq + hk + len(lengths))
    g = _gen(sum(lengths))
    b, max_len = len(lengths), max(lengths)
    perm = torch.randperm(NUM_SLOTS - 1, generator=g) + 1
    index = torch.zeros(b, max_len, dtype=torch.int64)  # padded with the PAD slot 0
    mask = torch.zeros(b, 1, 1, max_len, dtype=torch.bool)
    taken = 0
    per_req = []
    for r, n in enumerate(lengths):
        slots = perm[taken : taken + n]
        taken += n
        index[r, :n] = slots
        mask[r, 0, 0, :n] = True
        per_req.append(slots)
    q = torch.randn(b, hq, D, generator=g)
    scale = 0.2

    out = decode_attention(q, k_cache, v_cache, index, mask, scale)

    assert out.shape == (b, hq, D)
    assert torch.isfinite(out).all()
    for r, slots in enumerate(per_req):
        n = len(slots)
        ref = naive_attention(q[r : r + 1], k_cache[slots], v_cache[slots], [n - 1], scale)
        torch.testing.assert_close(out[r], ref[0], atol=1e-5, rtol=1e-5)


def test_decode_matches_last_row_of_extend():
    hq, hk = 8, 2
    k_cache, v_cache = _cache(hk, seed=5)
    slots = torch.randperm(NUM_SLOTS - 1, generator=_gen(6))[:10] + 1
    q = torch.randn(1, hq, D, generator=_gen(7))
    ext = extend_attention(q, k_cache, v_cache, slots, 0.25)
    dec = decode_attention(
        q, k_cache, v_cache, slots[None, :], torch.ones(1, 1, 1, 10, dtype=torch.bool), 0.25
    )
    torch.testing.assert_close(dec, ext, atol=1e-6, rtol=1e-5)


def test_store_kv_writes_only_its_slots():
    k_cache, v_cache = torch.zeros(10, 2, D), torch.zeros(10, 2, D)
    k, v = torch.randn(3, 2, D, generator=_gen(0)), torch.randn(3, 2, D, generator=_gen(1))
    slots = torch.tensor([7, 2, 5])
    store_kv(k_cache, v_cache, slots, k, v)
    torch.testing.assert_close(k_cache[slots], k)
    torch.testing.assert_close(v_cache[slots], v)
    untouched = [i for i in range(10) if i not in (7, 2, 5)]
    assert (k_cache[untouched] == 0).all() and (v_cache[untouched] == 0).all()


# -- norms ---------------------------------------------------------------------------------------
def _rms_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    rows = []
    for row in x.double().reshape(-1, x.shape[-1]):
        ms = sum(float(v) ** 2 for v in row) / len(row)
        rows.append(row / math.sqrt(ms + eps))
    return (torch.stack(rows).reshape(x.shape) * weight.double()).float()


@pytest.mark.parametrize("eps", [1e-6, 1e-5, 0.1])
@pytest.mark.parametrize("shape", [(1, 64), (5, 64), (2, 3, 32)])
def test_rms_norm_matches_formula(shape, eps):
    g = _gen(len(shape) + shape[-1])
    x = torch.randn(*shape, generator=g) * 3
    weight = torch.randn(shape[-1], generator=g)
    out = rms_norm(x, weight, eps)
    assert out.shape == x.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, _rms_reference(x, weight, eps), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_transformers(dtype):
    g = _gen(3)
    x = (torch.randn(4, 7, 48, generator=g) * 2).to(dtype)
    ref_mod = LlamaRMSNorm(48, eps=1e-5)
    with torch.no_grad():
        ref_mod.weight.copy_(torch.randn(48, generator=g))
    ref_mod = ref_mod.to(dtype)
    with torch.no_grad():
        ref = ref_mod(x)
    out = rms_norm(x, ref_mod.weight.detach(), 1e-5)
    assert out.dtype == ref.dtype
    if dtype == torch.float32:
        # the fused float32 path must stay bit-identical, or greedy parity can drift
        assert torch.equal(out, ref)
    torch.testing.assert_close(out, ref)


def test_add_rms_norm():
    g = _gen(4)
    x, res = torch.randn(6, 32, generator=g), torch.randn(6, 32, generator=g)
    weight = torch.randn(32, generator=g)
    x0, res0 = x.clone(), res.clone()
    normed, new_res = add_rms_norm(x, res, weight, 1e-6)
    torch.testing.assert_close(new_res, x0 + res0)
    torch.testing.assert_close(
        normed, _rms_reference(x0 + res0, weight, 1e-6), atol=1e-5, rtol=1e-5
    )
    # the inputs are not modified in place
    assert torch.equal(x, x0) and torch.equal(res, res0)


# -- activation ------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(3, 2 * 16), (2, 5, 2 * 24), (1, 2)])
def test_silu_and_mul(shape):
    x = torch.randn(*shape, generator=_gen(shape[-1])) * 4
    out = silu_and_mul(x)
    half = shape[-1] // 2
    assert out.shape == (*shape[:-1], half)
    flat_x, flat_out = x.reshape(-1, shape[-1]), out.reshape(-1, half)
    for r in range(flat_x.shape[0]):
        for j in range(half):
            gate, up = float(flat_x[r, j]), float(flat_x[r, half + j])
            expected = gate / (1.0 + math.exp(-gate)) * up
            assert float(flat_out[r, j]) == pytest.approx(expected, rel=1e-5, abs=1e-6)


# -- rope ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("hq", "hk"), GQA)
@pytest.mark.parametrize("head_dim", [16, 64])
def test_apply_rope_matches_transformers(hq, hk, head_dim):
    g = _gen(hq * head_dim)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    cos_cache, sin_cache = rope_cos_sin_cache(inv_freq, 300)
    positions = torch.tensor([0, 1, 2, 7, 150, 299])
    t = positions.numel()
    q = torch.randn(t, hq, head_dim, generator=g)
    k = torch.randn(t, hk, head_dim, generator=g)
    cos, sin = cos_cache[positions], sin_cache[positions]

    q_out, k_out = apply_rope(q, k, cos, sin)

    # transformers' layout: [batch, heads, tokens, head_dim] and cos/sin [batch, tokens, dim]
    q_ref, k_ref = apply_rotary_pos_emb(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[None], sin[None]
    )
    torch.testing.assert_close(q_out, q_ref[0].transpose(0, 1))
    torch.testing.assert_close(k_out, k_ref[0].transpose(0, 1))
    # a rotation: norms of each (i, i + d/2) pair are kept; position 0 is the identity
    half = head_dim // 2
    pair_norm = q[..., :half] ** 2 + q[..., half:] ** 2
    torch.testing.assert_close(q_out[..., :half] ** 2 + q_out[..., half:] ** 2, pair_norm)
    torch.testing.assert_close(q_out[0], q[0])


def test_rotate_stacked_heads_matches_apply_rope():
    # the model rotates q and k stacked along the head axis in one call
    head_dim = 32
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    cos_cache, sin_cache = rope_cos_sin_cache(inv_freq, 128)
    positions = torch.tensor([3, 4, 5, 100])
    g = _gen(12)
    q, k = torch.randn(4, 8, head_dim, generator=g), torch.randn(4, 2, head_dim, generator=g)
    cos, sin = cos_cache[positions], sin_cache[positions]
    both = rotate(torch.cat([q, k], dim=1), cos, sin)
    q_ref, k_ref = apply_rope(q, k, cos, sin)
    torch.testing.assert_close(both[:, :8], q_ref)
    torch.testing.assert_close(both[:, 8:], k_ref)


def test_rope_cache_matches_transformers_rotary_embedding():
    config = LlamaConfig(
        hidden_size=64,
        num_attention_heads=4,
        max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0},
    )
    rotary = LlamaRotaryEmbedding(config)
    head_dim = 16
    inv_freq = 1.0 / (500.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    cos_cache, sin_cache = rope_cos_sin_cache(inv_freq, 256)
    positions = torch.tensor([[0, 3, 64, 255]])
    cos, sin = rotary(torch.zeros(1, 4, head_dim), positions)
    torch.testing.assert_close(cos_cache[positions[0]], cos[0])
    torch.testing.assert_close(sin_cache[positions[0]], sin[0])


def test_rope_relative_position_property():
    # <rope(q, m), rope(k, n)> depends only on m - n
    head_dim = 32
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    cos_cache, sin_cache = rope_cos_sin_cache(inv_freq, 64)
    g = _gen(9)
    q, k = torch.randn(1, 1, head_dim, generator=g), torch.randn(1, 1, head_dim, generator=g)

    def dot(m: int, n: int) -> float:
        qm, _ = apply_rope(q, q, cos_cache[[m]], sin_cache[[m]])
        kn, _ = apply_rope(k, k, cos_cache[[n]], sin_cache[[n]])
        return float((qm * kn).sum())

    assert dot(10, 4) == pytest.approx(dot(30, 24), rel=1e-4, abs=1e-5)
    assert dot(5, 5) == pytest.approx(float((q * k).sum()), rel=1e-4, abs=1e-5)
