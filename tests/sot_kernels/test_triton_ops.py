"""The fused Triton ops in ``sot_kernels.triton_ops`` against their torch references.

Without CUDA the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``, set by
tests/conftest.py before triton is imported) on CPU tensors; with CUDA on the GPU.
"""

from __future__ import annotations

import functools

import pytest
import torch
from triton_env import DEVICE, INTERPRETED, require_triton

require_triton()

from sot_kernels import triton_ops  # noqa: E402
from sot_kernels.activation import silu_and_mul  # noqa: E402
from sot_kernels.attention import store_kv  # noqa: E402
from sot_kernels.norm import add_rms_norm, rms_norm  # noqa: E402
from sot_kernels.rope import apply_rope, rope_cos_sin_cache  # noqa: E402
from sot_kernels.triton_ops import (  # noqa: E402
    add_rms_norm_triton,
    rms_norm_triton,
    rope_and_store_kv_triton,
    silu_and_mul_triton,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (rtol, atol). float32 differs only by summation order. The kernels round to bf16/fp16 at
# the same points as the references: float16 is bit-equal under the interpreter, while
# bfloat16 is not there (the interpreter truncates float32 -> bf16 where GPUs round to
# nearest even), and GPU exp/rsqrt approximations may flip a last bit.
TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (2e-3, 2e-3),
}
EPS = 1e-5


@functools.cache
def _unsupported(dtype: torch.dtype) -> str | None:
    """Why this dtype cannot run here (None if it can)."""
    try:
        silu_and_mul_triton(torch.ones(1, 2, dtype=dtype, device=DEVICE))
    except Exception as e:  # the interpreter or the GPU lacks the dtype
        return f"{dtype} unsupported by Triton here: {type(e).__name__}: {e}"
    return None


def _check_dtype(dtype: torch.dtype) -> None:
    reason = _unsupported(dtype)
    if reason is not None:
        pytest.skip(reason)


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def _same_rounding(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """Exact where both sides round one float32 result once to ``dtype``.

    Triton's interpreter truncates float32 -> bfloat16 instead of rounding to nearest
    even (the GPU rounds), so under it bfloat16 results may be one ulp off.
    """
    if INTERPRETED and dtype == torch.bfloat16:
        _close(actual, expected, dtype)
    else:
        assert torch.equal(actual, expected)


def _randn(*shape: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype=dtype, device=DEVICE)


# --------------------------------------------------------------------------- RMSNorm


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("h", [64, 576, 100])
@pytest.mark.parametrize("t", [1, 5])
def test_rms_norm(dtype: torch.dtype, h: int, t: int) -> None:
    _check_dtype(dtype)
    x = _randn(t, h, dtype=dtype, seed=h + t) * 3
    w = _randn(h, dtype=dtype, seed=1) * 0.5 + 1
    _close(rms_norm_triton(x, w, EPS), rms_norm(x, w, EPS), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("h", [64, 576, 100])
@pytest.mark.parametrize("t", [1, 5])
def test_add_rms_norm(dtype: torch.dtype, h: int, t: int) -> None:
    _check_dtype(dtype)
    x = _randn(t, h, dtype=dtype, seed=h + t)
    res = _randn(t, h, dtype=dtype, seed=h + t + 100) * 4
    w = _randn(h, dtype=dtype, seed=2) * 0.5 + 1
    x0, res0 = x.clone(), res.clone()
    out, new_res = add_rms_norm_triton(x, res, w, EPS)
    ref_out, ref_res = add_rms_norm(x, res, w, EPS)
    # the sum is one rounding of an exact float32 sum on both sides
    _same_rounding(new_res, ref_res, dtype)
    _close(out, ref_out, dtype)
    # inputs are not modified
    assert torch.equal(x, x0) and torch.equal(res, res0)


def test_rms_norm_strided_rows_and_weight_promotion() -> None:
    _check_dtype(torch.bfloat16)
    big = _randn(4, 160, dtype=torch.bfloat16, seed=3)
    x = big[:, 30:130]  # row stride 160, H = 100
    res = _randn(4, 100, dtype=torch.bfloat16, seed=4)
    w = _randn(100, dtype=torch.float32, seed=5)  # float32 weight promotes the output
    out, new_res = add_rms_norm_triton(x, res, w, EPS)
    ref_out, ref_res = add_rms_norm(x, res, w, EPS)
    assert out.dtype == torch.float32
    _same_rounding(new_res, ref_res, torch.bfloat16)
    # out is float32 but carries the bfloat16 rounding of the normalised row
    torch.testing.assert_close(
        out, ref_out, rtol=TOL[torch.bfloat16][0], atol=TOL[torch.bfloat16][1]
    )


# ----------------------------------------------------------------- RoPE + KV store

NUM_SLOTS = 40


def _cos_sin(positions: torch.Tensor, d: int, dtype: torch.dtype):
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    cos, sin = rope_cos_sin_cache(inv_freq, 512)
    # gathered by position and cast to the model dtype, as the model runner does
    return cos[positions].to(dtype).to(DEVICE), sin[positions].to(dtype).to(DEVICE)


def _rope_case(t: int, hq: int, hk: int, d: int, dtype: torch.dtype, seed: int):
    q = _randn(t, hq, d, dtype=dtype, seed=seed)
    k = _randn(t, hk, d, dtype=dtype, seed=seed + 1)
    v = _randn(t, hk, d, dtype=dtype, seed=seed + 2)
    g = torch.Generator().manual_seed(seed + 3)
    positions = torch.randint(0, 512, (t,), generator=g)
    cos, sin = _cos_sin(positions, d, dtype)
    # distinct slots scattered over the pool, in no particular order
    slots = torch.randperm(NUM_SLOTS, generator=g)[:t].to(DEVICE)
    k_cache = _randn(NUM_SLOTS, hk, d, dtype=dtype, seed=seed + 4)
    v_cache = _randn(NUM_SLOTS, hk, d, dtype=dtype, seed=seed + 5)
    return q, k, v, cos, sin, k_cache, v_cache, slots


def _rope_reference(q, k, v, cos, sin, k_cache, v_cache, slots):
    q_rot, k_rot = apply_rope(q, k, cos, sin)
    kc, vc = k_cache.clone(), v_cache.clone()
    store_kv(kc, vc, slots, k_rot, v)
    return q_rot, kc, vc


def _untouched(slots: torch.Tensor) -> torch.Tensor:
    mask = torch.ones(NUM_SLOTS, dtype=torch.bool, device=DEVICE)
    mask[slots] = False
    return mask


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [64, 48])
@pytest.mark.parametrize(("hq", "hk"), [(9, 3), (4, 4)])
@pytest.mark.parametrize("t", [1, 4])
def test_rope_and_store_kv(dtype: torch.dtype, d: int, hq: int, hk: int, t: int) -> None:
    _check_dtype(dtype)
    q, k, v, cos, sin, k_cache, v_cache, slots = _rope_case(t, hq, hk, d, dtype, seed=d + t)
    inputs = [x.clone() for x in (q, k, v)]
    ref_q, ref_kc, ref_vc = _rope_reference(q, k, v, cos, sin, k_cache, v_cache, slots)
    kc0, vc0 = k_cache.clone(), v_cache.clone()

    q_rot = rope_and_store_kv_triton(q, k, v, cos, sin, k_cache, v_cache, slots)

    _close(q_rot, ref_q, dtype)
    _close(k_cache, ref_kc, dtype)
    assert torch.equal(v_cache, ref_vc)  # a plain copy
    keep = _untouched(slots)
    assert torch.equal(k_cache[keep], kc0[keep]) and torch.equal(v_cache[keep], vc0[keep])
    for x, x0 in zip((q, k, v), inputs, strict=True):
        assert torch.equal(x, x0)  # q rotated into a new tensor; k and v read only


def test_rope_fused_qkv_views_int32_slots_in_place() -> None:
    """Strided q/k/v views of one qkv projection (as the model has them), q in place."""
    t, hq, hk, d, dtype = 3, 9, 3, 48, torch.float32
    qkv = _randn(t, (hq + 2 * hk) * d, dtype=dtype, seed=7)
    q = qkv[:, : hq * d].view(t, hq, d)
    k = qkv[:, hq * d : (hq + hk) * d].view(t, hk, d)
    v = qkv[:, (hq + hk) * d :].view(t, hk, d)
    _, _, _, cos, sin, k_cache, v_cache, slots = _rope_case(t, hq, hk, d, dtype, seed=8)
    ref_q, ref_kc, ref_vc = _rope_reference(q, k, v, cos, sin, k_cache, v_cache, slots)
    k0, v0 = k.clone(), v.clone()

    out = rope_and_store_kv_triton(
        q, k, v, cos, sin, k_cache, v_cache, slots.to(torch.int32), q_out=q
    )

    assert out is q
    _close(q, ref_q, dtype)
    _close(k_cache, ref_kc, dtype)
    assert torch.equal(v_cache, ref_vc)
    assert torch.equal(k, k0) and torch.equal(v, v0)


# ------------------------------------------------------------------ SiLU and mul


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("inter", [64, 576, 100])
@pytest.mark.parametrize("t", [1, 3])
def test_silu_and_mul(dtype: torch.dtype, inter: int, t: int) -> None:
    _check_dtype(dtype)
    x = _randn(t, 2 * inter, dtype=dtype, seed=inter + t) * 3
    _close(silu_and_mul_triton(x), silu_and_mul(x), dtype)


def test_silu_and_mul_several_column_blocks() -> None:
    # I > 1024 takes more than one program per row
    x = _randn(2, 2 * 1536, dtype=torch.float32, seed=9)
    _close(silu_and_mul_triton(x), silu_and_mul(x), torch.float32)


# --------------------------------------------------------------------- empty batch


class _NoLaunch:
    def __getitem__(self, grid):
        raise AssertionError(f"kernel launched with grid {grid} for an empty batch")


def test_empty_batch_does_not_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("_rms_norm_kernel", "_rope_store_kv_kernel", "_silu_and_mul_kernel"):
        monkeypatch.setattr(triton_ops, name, _NoLaunch())
    h, hq, hk, d = 64, 9, 3, 48
    dtype = torch.float32
    x = torch.empty(0, h, device=DEVICE)
    w = torch.ones(h, device=DEVICE)
    assert rms_norm_triton(x, w, EPS).shape == (0, h)
    out, res = add_rms_norm_triton(x, x, w, EPS)
    assert out.shape == (0, h) and res.shape == (0, h)
    assert silu_and_mul_triton(torch.empty(0, 2 * h, device=DEVICE)).shape == (0, h)

    _, _, _, _, _, k_cache, v_cache, _ = _rope_case(1, hq, hk, d, dtype, seed=10)
    kc0, vc0 = k_cache.clone(), v_cache.clone()
    empty = torch.empty(0, d, device=DEVICE)
    q_rot = rope_and_store_kv_triton(
        torch.empty(0, hq, d, device=DEVICE),
        torch.empty(0, hk, d, device=DEVICE),
        torch.empty(0, hk, d, device=DEVICE),
        empty,
        empty,
        k_cache,
        v_cache,
        torch.empty(0, dtype=torch.long, device=DEVICE),
    )
    assert q_rot.shape == (0, hq, d)
    assert torch.equal(k_cache, kc0) and torch.equal(v_cache, vc0)
