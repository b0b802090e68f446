"""Shared-prefix (cascade) attention in Triton: the prefix pass and the LSE merge.

:func:`shared_prefix_attention_triton` is the GPU twin of
:func:`sot_kernels.cascade.shared_prefix_attention`. The grid is ``(Hk, row blocks,
splits)``. The ``B * group`` query rows of one KV head (row ``r`` is request
``r // group``, query head ``kv_head * group + r % group``) are tiled by ``BLOCK_M``;
each program loads its ``[BLOCK_M, D]`` query tile once and streams the prefix keys in
blocks of ``BLOCK_N``, gathered through ``prefix_slots``, with an online softmax. Both
products are ``tl.dot`` (matrix-matrix), so each prefix key is read once per row block
(once in all when ``B * group <= BLOCK_M``) instead of once per request.

``tl.dot`` needs every dimension >= 16. We pad rather than fall back to a
broadcast-and-reduce formulation: ``BLOCK_M``, ``BLOCK_N`` and ``BLOCK_D`` are powers
of two >= 16 and loads are masked (padded query rows and head-dim columns read 0,
padded keys get score -inf), so tiny groups (one request, GQA 1 is a single row) and
head sizes such as 48, 80 or 96 work. Padded rows cost tensor-core work, not memory
traffic, and the kernel is bound by reading K/V.

With few KV heads and one row block the grid would be tiny (SmolLM2: 3 programs), so
on CUDA the prefix is also split over the third grid axis (flash-decoding); each
split writes a partial ``(out, lse)`` in float32 and
:func:`sot_kernels.triton_helpers.merge_splits` merges them.

:func:`merge_attention_triton` is a Triton kernel rather than a reuse of the torch
:func:`sot_kernels.cascade.merge_attention`: on the GPU the torch merge is about eight
elementwise launches per layer over tiny tensors, so launch latency dominates; the
kernel reads each partial once in one launch. On CPU the torch merge is the path.

The module imports without CUDA; tests run the kernels with ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sot_kernels.cascade import decode_attention_with_lse
from sot_kernels.triton_helpers import (
    LOG2E,
    dot,
    dot_ieee,
    inner_contiguous,
    merge_splits,
    next_pow2,
    pow2_at_least,
    softmax_finish,
    softmax_step,
)


@triton.jit
def _shared_prefix_kernel(
    Q,
    K,
    V,
    Slots,
    Out,
    Lse,
    stride_qb,
    stride_qh,
    stride_kn,
    stride_kh,
    stride_vn,
    stride_vh,
    stride_os,
    stride_ob,
    stride_oh,
    stride_ls,
    stride_lb,
    num_rows,
    prefix_len,
    keys_per_split,
    qk_scale,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_IEEE: tl.constexpr,
):
    kv_head = tl.program_id(0)
    m_block = tl.program_id(1)
    split = tl.program_id(2)

    rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < num_rows
    req = rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM

    q = tl.load(
        Q + req[:, None] * stride_qb + head[:, None] * stride_qh + d[None, :],
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max, log2 units
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    start = split * keys_per_split
    end = tl.minimum(start + keys_per_split, prefix_len)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < end
        slot = tl.load(Slots + n, mask=n_ok, other=0).to(tl.int64)
        k_t = tl.load(  # [BLOCK_D, BLOCK_N], gathered rows of the pool
            K + slot[None, :] * stride_kn + kv_head * stride_kh + d[:, None],
            mask=n_ok[None, :] & d_ok[:, None],
            other=0.0,
        )
        s = dot(q, k_t, DOT_IEEE) * qk_scale
        s = tl.where(n_ok[None, :], s, float("-inf"))  # every block has a real key
        v = tl.load(
            V + slot[:, None] * stride_vn + kv_head * stride_vh + d[None, :],
            mask=n_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        m_i, l_i, acc = softmax_step(s, v, m_i, l_i, acc, DOT_IEEE)

    out, lse = softmax_finish(m_i, l_i, acc)
    tl.store(
        Out + split * stride_os + req[:, None] * stride_ob + head[:, None] * stride_oh + d[None, :],
        out,
        mask=row_ok[:, None] & d_ok[None, :],
    )
    tl.store(Lse + split * stride_ls + req * stride_lb + head, lse, mask=row_ok)


@triton.jit
def _merge_kernel(
    OA,
    LA,
    OB,
    LB,
    Out,
    Lse,
    num_rows,
    HEAD_DIM: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < num_rows
    d = tl.arange(0, BLOCK_D)
    ok = r_ok[:, None] & (d < HEAD_DIM)[None, :]
    la = tl.load(LA + r, mask=r_ok, other=float("-inf")).to(tl.float32)
    lb = tl.load(LB + r, mask=r_ok, other=float("-inf")).to(tl.float32)
    m = tl.maximum(la, lb)
    m = tl.where(m == float("-inf"), 0.0, m)  # both empty: keep exp() at 0, no nan
    wa = tl.exp(la - m)
    wb = tl.exp(lb - m)
    total = wa + wb
    safe = tl.where(total > 0.0, total, 1.0)  # no log(0) or 1/0, even in masked lanes
    inv = tl.where(total > 0.0, 1.0 / safe, 0.0)
    offs = r[:, None] * HEAD_DIM + d[None, :]
    oa = tl.load(OA + offs, mask=ok, other=0.0).to(tl.float32)
    ob = tl.load(OB + offs, mask=ok, other=0.0).to(tl.float32)
    out = oa * (wa * inv)[:, None] + ob * (wb * inv)[:, None]
    tl.store(Out + offs, out, mask=ok)
    tl.store(Lse + r, tl.where(total > 0.0, m + tl.log(safe), float("-inf")), mask=r_ok)


def _default_splits(device: torch.device, programs: int, prefix_len: int) -> int:
    """Enough programs to fill the GPU, but at least 128 keys per split."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(2 * sms, programs), triton.cdiv(prefix_len, 128)))


def shared_prefix_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    prefix_slots: torch.Tensor,
    scale: float,
    *,
    out_dtype: torch.dtype | None = None,
    num_splits: int | None = None,
    block_m: int | None = None,
    block_n: int = 64,
    num_warps: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """All ``B`` queries ``q [B, Hq, D]`` over the shared ``prefix_slots [P]`` of the pool.

    ``k_cache``/``v_cache [num_slots, Hk, D]`` (one layer), ``Hq = group * Hk``.
    Returns ``(out [B, Hq, D]`` in ``out_dtype`` (default ``q.dtype``), ``lse [B, Hq]``
    float32, natural log). ``P == 0`` gives ``out = 0``, ``lse = -inf``.
    ``num_splits`` splits the prefix over more programs (default: 1 off CUDA, enough to
    fill the GPU on CUDA); ``block_m``/``block_n`` are rounded up to powers of two >= 16.
    """
    b, hq, d = q.shape
    hk = k_cache.shape[1]
    if hq % hk:
        raise ValueError(f"query heads {hq} are not a multiple of KV heads {hk}")
    group = hq // hk
    out_dtype = out_dtype or q.dtype
    out = torch.empty((b, hq, d), dtype=out_dtype, device=q.device)
    lse = torch.empty((b, hq), dtype=torch.float32, device=q.device)
    p = prefix_slots.numel()
    if p == 0 or b == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    q = inner_contiguous(q)
    k_cache, v_cache = inner_contiguous(k_cache), inner_contiguous(v_cache)
    prefix_slots = prefix_slots.contiguous()

    rows = b * group
    bm = pow2_at_least(block_m or min(64, rows))
    bn = pow2_at_least(block_n)
    bd = pow2_at_least(d)
    m_blocks = triton.cdiv(rows, bm)
    if num_splits is None:
        num_splits = _default_splits(q.device, hk * m_blocks, p)
    # whole key blocks per split, and no empty split
    keys_per_split = triton.cdiv(triton.cdiv(p, max(1, num_splits)), bn) * bn
    num_splits = triton.cdiv(p, keys_per_split)

    if num_splits == 1:
        part_o, part_l, stride_os, stride_ls = out, lse, 0, 0
    else:
        part_o = torch.empty((num_splits, b, hq, d), dtype=torch.float32, device=q.device)
        part_l = torch.empty((num_splits, b, hq), dtype=torch.float32, device=q.device)
        stride_os, stride_ls = part_o.stride(0), part_l.stride(0)
    _shared_prefix_kernel[(hk, m_blocks, num_splits)](
        q,
        k_cache,
        v_cache,
        prefix_slots,
        part_o,
        part_l,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        v_cache.stride(0),
        v_cache.stride(1),
        stride_os,
        part_o.stride(-3),
        part_o.stride(-2),
        stride_ls,
        part_l.stride(-2),
        rows,
        p,
        keys_per_split,
        scale * LOG2E,
        GROUP=group,
        HEAD_DIM=d,
        BLOCK_M=bm,
        BLOCK_N=bn,
        BLOCK_D=bd,
        DOT_IEEE=dot_ieee(q.dtype),
        num_warps=num_warps,
    )
    if num_splits > 1:
        # the partials are [S, B, Hq, D]; the merge reads them as [B, Hq, S, D] views
        merge_splits(part_o.permute(1, 2, 0, 3), part_l.permute(1, 2, 0), out, lse)
    return out, lse


def merge_attention_triton(
    out_a: torch.Tensor,
    lse_a: torch.Tensor,
    out_b: torch.Tensor,
    lse_b: torch.Tensor,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The LSE merge of :func:`sot_kernels.cascade.merge_attention` in one launch.

    ``out_* [..., D]``, ``lse_* [...]``; returns ``(out`` in ``out_dtype`` (default
    ``out_a.dtype``), ``lse`` float32). Empty sides (``lse = -inf``) get weight 0.
    """
    shape, d = out_a.shape, out_a.shape[-1]
    out = torch.empty(shape, dtype=out_dtype or out_a.dtype, device=out_a.device)
    lse = torch.empty(shape[:-1], dtype=torch.float32, device=out_a.device)
    rows = lse.numel()
    if rows == 0:
        return out, lse
    block_r = 16
    _merge_kernel[(triton.cdiv(rows, block_r),)](
        out_a.contiguous(),
        lse_a.contiguous(),
        out_b.contiguous(),
        lse_b.contiguous(),
        out,
        lse,
        rows,
        HEAD_DIM=d,
        BLOCK_R=block_r,
        BLOCK_D=next_pow2(d),
    )
    return out, lse


def shared_prefix_decode_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    prefix_slots: torch.Tensor,
    suffix_index: torch.Tensor,
    suffix_lens: torch.Tensor | None,
    scale: float,
    **prefix_kwargs,
) -> torch.Tensor:
    """:func:`sot_kernels.cascade.shared_prefix_decode_attention` with the prefix pass and
    the merge in Triton; the short private suffixes go through the torch
    :func:`sot_kernels.cascade.decode_attention_with_lse`. Returns ``[B, Hq, D]``."""
    out_p, lse_p = shared_prefix_attention_triton(
        q, k_cache, v_cache, prefix_slots, scale, out_dtype=torch.float32, **prefix_kwargs
    )
    out_s, lse_s = decode_attention_with_lse(
        q, k_cache, v_cache, suffix_index, suffix_lens, scale, torch.float32
    )
    out, _ = merge_attention_triton(out_p, lse_p, out_s, lse_s, out_dtype=q.dtype)
    return out
