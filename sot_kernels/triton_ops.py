"""Fused small ops in Triton: RMSNorm (+ residual add), RoPE + KV store, SiLU-and-mul.

Each op has a torch reference it is tested against (``tests/sot_kernels/test_triton_ops.py``):

- :func:`add_rms_norm_triton` / :func:`rms_norm_triton` -> ``sot_kernels.norm``
- :func:`rope_and_store_kv_triton` -> ``sot_kernels.rope.apply_rope`` +
  ``sot_kernels.attention.store_kv``
- :func:`silu_and_mul_triton` -> ``sot_kernels.activation.silu_and_mul``

Numerics: all math runs in float32, but wherever the torch reference materialises an
intermediate in the activation dtype (bf16/fp16), the kernel rounds to that dtype at
the same point (``x.to(dtype).to(float32)``). Low-precision results then agree with
the reference bit for bit (float16 checked under the interpreter; bfloat16 only where
float32 -> bf16 rounds to nearest even, as on GPUs, not under the interpreter, which
truncates) up to the last bit of exp/rsqrt, instead of drifting by a few ulps, which
keeps greedy decoding close to the torch path. In float32 those casts are no-ops and
only summation order differs.

The module imports without CUDA; under ``TRITON_INTERPRET=1`` the kernels run on CPU
tensors (slowly), which is how the tests exercise them on machines without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sot_kernels.triton_helpers import inner_contiguous, next_pow2

__all__ = [
    "add_rms_norm_triton",
    "rms_norm_triton",
    "rope_and_store_kv_triton",
    "silu_and_mul_triton",
]


def _num_warps(block: int) -> int:
    # ~256 elements per warp keeps registers low for small rows without starving big ones
    return max(1, min(8, block // 256))


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as ``[rows, last]`` with a unit stride on the last dim (a view when possible)."""
    if x.dim() == 0:
        raise ValueError("expected at least one dimension")
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[-1] > 1 and x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return x2


# --------------------------------------------------------------------------- RMSNorm


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    res_out_ptr,
    stride_x,
    stride_res,
    stride_out,
    stride_res_out,
    H,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0)
        # The reference adds in the input dtype (``x + residual``), so the new residual
        # is rounded to that dtype before it is stored *and* before it is normalised.
        h = x.to(tl.float32) + r.to(tl.float32)
        h = h.to(x.dtype)
        tl.store(res_out_ptr + row * stride_res_out + cols, h, mask=mask)
        h = h.to(tl.float32)
    else:
        h = x.to(tl.float32)
    # float32 sum of squares: bf16/fp16 would lose most of the mantissa over a long row;
    # masked lanes were loaded as 0 and so add nothing. Divide by the true H, not BLOCK.
    var = tl.sum(h * h, axis=0) / H
    h = h * tl.rsqrt(var + eps)
    # ``weight * h.to(dtype)``: the reference rounds the normalised row to the input dtype
    # before the weight multiply. The product of two bf16/fp16 values is exact in
    # float32, so rounding it once to the output dtype matches torch exactly.
    h = h.to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    out = w * h
    tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def _rms_norm_launch(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    h = x.shape[-1]
    if weight.shape != (h,):
        raise ValueError(f"weight has shape {tuple(weight.shape)}, expected ({h},)")
    # Output dtype follows torch's promotion of ``weight * h.to(x.dtype)``.
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    res_out = None
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"residual shape {tuple(residual.shape)} != x {tuple(x.shape)}")
        if residual.dtype != x.dtype:
            raise ValueError(f"residual dtype {residual.dtype} != x dtype {x.dtype}")
        res_out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if x.numel() == 0:  # T == 0: nothing to launch
        return out, res_out
    x2 = _rows(x)
    t = x2.shape[0]
    out2 = out.view(-1, h)
    res2 = _rows(residual) if residual is not None else None
    res_out2 = res_out.view(-1, h) if res_out is not None else None
    weight = weight if weight.stride(0) == 1 else weight.contiguous()
    block = next_pow2(h)
    # Grid: one program per row (T,); each program holds the whole row in registers,
    # which is what lets the add, the reduction and the scale happen in one pass.
    _rms_norm_kernel[(t,)](
        x2,
        res2 if res2 is not None else x2,
        weight,
        out2,
        res_out2 if res_out2 is not None else out2,
        x2.stride(0),
        res2.stride(0) if res2 is not None else 0,
        out2.stride(0),
        res_out2.stride(0) if res_out2 is not None else 0,
        h,
        float(eps),
        HAS_RESIDUAL=residual is not None,
        BLOCK=block,
        num_warps=_num_warps(block),
    )
    return out, res_out


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * x / rms(x)`` over the last dim; equals ``sot_kernels.norm.rms_norm``.

    ``x [..., H]`` (typically ``[T, H]``), ``weight [H]``. Launch grid: ``(rows,)``,
    one program per row with ``BLOCK = next_power_of_2(H)`` lanes, masked past ``H``.
    Returns a new tensor in ``promote_types(x.dtype, weight.dtype)`` (x's dtype when
    the weight shares it, as in the model).
    """
    out, _ = _rms_norm_launch(x, None, weight, eps)
    return out


def add_rms_norm_triton(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(x + residual), x + residual)`` in one pass; equals
    ``sot_kernels.norm.add_rms_norm``.

    ``x``, ``residual`` ``[T, H]`` of the same dtype, ``weight [H]``. Launch grid:
    ``(T,)``, one program per row, ``BLOCK = next_power_of_2(H)`` masked lanes. The sum
    is read once from memory and written once (as the new residual); both outputs are
    new tensors, the inputs are left unchanged.
    """
    out, res = _rms_norm_launch(x, residual, weight, eps)
    assert res is not None
    return out, res


# ----------------------------------------------------------------- RoPE + KV store


@triton.jit
def _rotate_heads(
    src_ptr,
    dst_ptr,
    stride_src_h,
    stride_dst_h,
    heads,
    c1,
    c2,
    s1,
    s2,
    HALF,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    """Rotate ``heads`` rows of one token (``src`` -> ``dst``, which may alias)."""
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_HALF)
    mask = (offs_h[:, None] < heads) & (offs_d[None, :] < HALF)
    src1 = src_ptr + offs_h[:, None] * stride_src_h + offs_d[None, :]
    # Both halves are loaded before anything is stored, so dst may be src (in place).
    x1 = tl.load(src1, mask=mask, other=0.0)
    x2 = tl.load(src1 + HALF, mask=mask, other=0.0)
    dt = x1.dtype
    x1f = x1.to(tl.float32)
    x2f = x2.to(tl.float32)
    # ``x * cos + rotate_half(x) * sin`` with rotate_half(x) = cat(-x2, x1). The reference
    # evaluates it with tensor ops in the activation dtype, i.e. each product and the sum
    # are rounded to bf16/fp16; round at the same points so the results are identical.
    a1 = (x1f * c1[None, :]).to(dt).to(tl.float32)
    b1 = (-x2f * s1[None, :]).to(dt).to(tl.float32)
    a2 = (x2f * c2[None, :]).to(dt).to(tl.float32)
    b2 = (x1f * s2[None, :]).to(dt).to(tl.float32)
    dst1 = dst_ptr + offs_h[:, None] * stride_dst_h + offs_d[None, :]
    tl.store(dst1, (a1 + b1).to(dst_ptr.dtype.element_ty), mask=mask)
    tl.store(dst1 + HALF, (a2 + b2).to(dst_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_store_kv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    cos_ptr,
    sin_ptr,
    q_out_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slots_ptr,
    stride_q_t,
    stride_q_h,
    stride_k_t,
    stride_k_h,
    stride_v_t,
    stride_v_h,
    stride_cos_t,
    stride_sin_t,
    stride_qo_t,
    stride_qo_h,
    stride_kc_s,
    stride_kc_h,
    stride_vc_s,
    stride_vc_h,
    HQ,
    HK,
    HALF,
    D,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    # int64 slot: slot * stride overflows int32 in large pools
    slot = tl.load(slots_ptr + t).to(tl.int64)

    # cos/sin are loaded once per token and shared by every q and k head. Both halves
    # are read (rather than assuming the table duplicates them) to match the reference
    # for any cos/sin.
    offs_d = tl.arange(0, BLOCK_HALF)
    dmask = offs_d < HALF
    c1 = tl.load(cos_ptr + t * stride_cos_t + offs_d, mask=dmask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + t * stride_cos_t + HALF + offs_d, mask=dmask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + t * stride_sin_t + offs_d, mask=dmask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + t * stride_sin_t + HALF + offs_d, mask=dmask, other=0.0).to(tl.float32)

    _rotate_heads(
        q_ptr + t * stride_q_t,
        q_out_ptr + t * stride_qo_t,
        stride_q_h,
        stride_qo_h,
        HQ,
        c1,
        c2,
        s1,
        s2,
        HALF,
        BLOCK_HQ,
        BLOCK_HALF,
    )
    # k goes straight from registers into its pool slot: it is never stored unrotated.
    _rotate_heads(
        k_ptr + t * stride_k_t,
        k_cache_ptr + slot * stride_kc_s,
        stride_k_h,
        stride_kc_h,
        HK,
        c1,
        c2,
        s1,
        s2,
        HALF,
        BLOCK_HK,
        BLOCK_HALF,
    )

    # v is copied as is.
    offs_h = tl.arange(0, BLOCK_HK)
    offs_v = tl.arange(0, BLOCK_D)
    vmask = (offs_h[:, None] < HK) & (offs_v[None, :] < D)
    v = tl.load(
        v_ptr + t * stride_v_t + offs_h[:, None] * stride_v_h + offs_v[None, :],
        mask=vmask,
        other=0.0,
    )
    tl.store(
        v_cache_ptr + slot * stride_vc_s + offs_h[:, None] * stride_vc_h + offs_v[None, :],
        v.to(v_cache_ptr.dtype.element_ty),
        mask=vmask,
    )


def rope_and_store_kv_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    q_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rotate q and k ("neox" half split) and write rotated k and v into their pool slots.

    Equals ``q, k = sot_kernels.rope.apply_rope(q, k, cos, sin)`` followed by
    ``sot_kernels.attention.store_kv(k_cache, v_cache, slots, k, v)`` and returns the
    rotated q.

    Shapes: ``q [T, Hq, D]``, ``k``/``v [T, Hk, D]``, ``cos``/``sin [T, D]`` (rows
    already gathered by position), ``k_cache``/``v_cache [S, Hk, D]``, ``slots [T]``
    (int32 or int64, distinct). q, k and v may be strided views (e.g. slices of a fused
    qkv projection) as long as their last dim is contiguous.

    The rotated q goes into a new contiguous tensor unless ``q_out`` is given; pass
    ``q_out=q`` to rotate q in place (safe: each program reads a token's heads fully
    before writing them). ``k`` and ``v`` are never modified.

    Launch grid: ``(T,)``, one program per token handling all of its q and k heads
    (``[next_pow2(H), next_pow2(D/2)]`` blocks) so cos/sin are read once per token.
    """
    t, hq, d = q.shape
    hk = k.shape[1]
    if d % 2:
        raise ValueError(f"head_dim must be even, got {d}")
    if k.shape != (t, hk, d) or v.shape != (t, hk, d):
        raise ValueError(f"k {tuple(k.shape)} / v {tuple(v.shape)} do not match q {(t, hq, d)}")
    if cos.shape != (t, d) or sin.shape != (t, d):
        raise ValueError(f"cos/sin must be ({t}, {d}), got {tuple(cos.shape)}/{tuple(sin.shape)}")
    if k_cache.shape[1:] != (hk, d) or v_cache.shape[1:] != (hk, d):
        raise ValueError("k_cache/v_cache must be [S, Hk, D]")
    if slots.shape != (t,):
        raise ValueError(f"slots must be ({t},), got {tuple(slots.shape)}")
    # Same dtype rule as the reference (tensor ops promote q/k with cos/sin).
    rot_dtype = torch.promote_types(q.dtype, cos.dtype)
    if q_out is None:
        q_out = torch.empty((t, hq, d), dtype=rot_dtype, device=q.device)
    elif q_out.shape != (t, hq, d):
        raise ValueError(f"q_out must be {(t, hq, d)}, got {tuple(q_out.shape)}")
    if t == 0:
        return q_out
    q, k, v, cos, sin = (inner_contiguous(x) for x in (q, k, v, cos, sin))
    if q_out.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("q_out, k_cache and v_cache need a contiguous last dim")
    slots = slots if slots.is_contiguous() else slots.contiguous()
    half = d // 2
    block_hq = next_pow2(hq)
    block_hk = next_pow2(hk)
    block_half = next_pow2(half)
    block_d = next_pow2(d)
    _rope_store_kv_kernel[(t,)](
        q,
        k,
        v,
        cos,
        sin,
        q_out,
        k_cache,
        v_cache,
        slots,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        cos.stride(0),
        sin.stride(0),
        q_out.stride(0),
        q_out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        v_cache.stride(0),
        v_cache.stride(1),
        hq,
        hk,
        half,
        d,
        BLOCK_HQ=block_hq,
        BLOCK_HK=block_hk,
        BLOCK_HALF=block_half,
        BLOCK_D=block_d,
        num_warps=_num_warps(block_hq * block_half),
    )
    return q_out


# ------------------------------------------------------------------ SiLU and mul


@triton.jit
def _silu_and_mul_kernel(
    x_ptr,
    out_ptr,
    stride_x,
    stride_out,
    INTER,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < INTER
    g = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    u = tl.load(x_ptr + row * stride_x + INTER + cols, mask=mask, other=0.0)
    dt = g.dtype
    gf = g.to(tl.float32)
    # silu in float32 (exp of a bf16/fp16 input would be far too coarse), then rounded
    # to the input dtype as ``F.silu(gate)`` materialises it, then ``* up`` rounded again.
    s = (gf / (1.0 + tl.exp(-gf))).to(dt).to(tl.float32)
    out = s * u.to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul_triton(x: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``x = cat(gate, up)`` ``[..., 2I]``; returns ``[..., I]``.

    Equals ``sot_kernels.activation.silu_and_mul``. Float32 math, output in x's dtype.
    Launch grid: ``(rows, cdiv(I, BLOCK))`` with ``BLOCK = min(next_pow2(I), 1024)``.
    """
    two_i = x.shape[-1]
    if two_i % 2:
        raise ValueError(f"last dim must be even, got {two_i}")
    inter = two_i // 2
    out = torch.empty((*x.shape[:-1], inter), dtype=x.dtype, device=x.device)
    if out.numel() == 0:  # T == 0: nothing to launch
        return out
    x2 = _rows(x)
    rows = x2.shape[0]
    out2 = out.view(-1, inter)
    block = min(next_pow2(inter), 1024)
    _silu_and_mul_kernel[(rows, triton.cdiv(inter, block))](
        x2,
        out2,
        x2.stride(0),
        out2.stride(0),
        inter,
        BLOCK=block,
        num_warps=_num_warps(block),
    )
    return out
