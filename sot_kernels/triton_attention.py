"""Triton attention over the token-slot KV pool (page size 1).

The pool holds one row per token slot, ``k_cache[slot] -> [Hk, D]`` (one layer), and
``req_to_token[row, pos]`` names the slot of token ``pos`` of the request in ``row``.
The kernels read a request's slots straight from ``req_to_token`` and gather K/V rows
through them, so no per-step ``[B, L]`` index tensor is ever materialized and requests
that share a prefix simply read the same slots.

* :func:`decode_attention_triton`: one query token per request, flash-decoding
  (split-K): the sequence is cut into ``num_splits`` chunks processed by separate
  programs, whose partial results are merged by log-sum-exp in a second kernel.
* :func:`extend_attention_triton`: ``n_i`` new tokens per request (prefill chunks),
  full attention over the cached prefix and causal among the new tokens.
* :func:`store_kv_triton`: scatter the step's new K/V into their slots.

All three are checked against :mod:`sot_kernels.attention` (the torch reference), on the
CPU under ``TRITON_INTERPRET=1`` and on CUDA when a GPU is available.

Layout conventions shared by the kernels:

* **GQA.** Query head ``h`` reads KV head ``h // group`` with ``group = Hq // Hk``.
  Each program owns one KV head and *all* its ``group`` query heads, so a K/V tile is
  loaded once and used ``group`` times (decode is memory-bound; this is what makes
  GQA cheap).
* **tl.dot shapes.** ``tl.dot`` needs every dimension >= 16 on older Triton releases
  and K >= 16 for 16-bit inputs on current ones. Rather than fall back to a
  broadcast-multiply-and-sum (a ``[G, N, D]`` register tile, far too large for real
  head sizes) we pad: the query-row dimension to at least 16 rows (masked-out rows
  load zeros and are never stored) and the head dimension to
  ``max(16, next_power_of_2(D))`` with masked loads, which also covers D that is not
  a power of two. Padding rows costs nothing extra on tensor cores (an MMA tile is
  16 rows anyway) and works identically in the interpreter.
* **Precision.** Softmax statistics and the output accumulator are float32; the
  online-softmax step, the dot-precision flag and the split merge are
  :mod:`sot_kernels.triton_helpers`' (float32 inputs multiply exactly, so CUDA results
  match the torch reference to ~1e-6; 16-bit inputs use the tensor-core default).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from sot_kernels.triton_helpers import (
    LOG2E,
    dot,
    dot_ieee,
    index_tensor,
    inner_contiguous,
    merge_splits,
    next_pow2,
    softmax_finish,
    softmax_step,
)

# Split-K heuristic: one split per this many keys of the longest request, at most
# MAX_SPLITS. Short contexts keep a single split (no merge work to amortize).
KEYS_PER_SPLIT = 256
MAX_SPLITS = 16


def default_num_splits(max_kv_len: int) -> int:
    """``ceil(max_kv_len / 256)`` clamped to ``[1, 16]``."""
    return max(1, min(MAX_SPLITS, math.ceil(max(int(max_kv_len), 1) / KEYS_PER_SPLIT)))


def fixed_grid_num_splits(batch: int, num_kv_heads: int, max_kv_len: int, num_sms: int) -> int:
    """Splits for a grid fixed before the key counts are known (a CUDA graph).

    Enough ``(request, KV head, split)`` programs to give every SM two, but never more
    splits than :func:`default_num_splits` would use for the longest possible request:
    each request cuts its *own* keys into the splits, so short requests simply get
    short (or empty) chunks.
    """
    wanted = math.ceil(2 * num_sms / max(batch * num_kv_heads, 1))
    return max(1, min(wanted, default_num_splits(max_kv_len)))


# ---------------------------------------------------------------------------------------
# decode: stage 1 (one program per request x KV head x split)
# ---------------------------------------------------------------------------------------


@triton.jit
def _decode_split_kernel(
    Q,
    K,
    V,
    ReqToToken,
    Rows,
    KvLens,
    PartOut,
    PartLse,
    qk_scale,  # scale * log2(e)
    stride_qb,
    stride_qh,
    stride_kn,
    stride_kh,
    stride_vn,
    stride_vh,
    stride_rr,
    stride_pb,
    stride_ph,
    stride_ps,
    stride_lb,
    stride_lh,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_IEEE: tl.constexpr,
):
    b = tl.program_id(0)
    kh = tl.program_id(1)
    split = tl.program_id(2)

    row = tl.load(Rows + b).to(tl.int64)
    kv_len = tl.load(KvLens + b).to(tl.int32)
    # Each request is cut into NUM_SPLITS equal chunks of its *own* length, so a short
    # request next to a long one does not leave most of its programs idle. When
    # kv_len < NUM_SPLITS the trailing chunks are empty: their loop runs zero times
    # and they report lse = -inf, which the merge kernel weighs as exactly zero.
    split_len = tl.cdiv(kv_len, NUM_SPLITS)
    start = split * split_len
    end = tl.minimum(start + split_len, kv_len)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    mask_g = offs_g < GROUP
    mask_d = offs_d < HEAD_DIM
    heads = kh * GROUP + offs_g
    # [BLOCK_G, BLOCK_D]: the group's query heads; padded rows/columns are zero
    q = tl.load(
        Q + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
        mask=mask_g[:, None] & mask_d[None, :],
        other=0.0,
    )

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    table = ReqToToken + row * stride_rr
    k_head = K + kh.to(tl.int64) * stride_kh
    v_head = V + kh.to(tl.int64) * stride_vh
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        # int64 before multiplying by the slot stride: slot * Hk * D overflows int32
        # for pools of a few million slots.
        slots = tl.load(table + offs_n, mask=mask_n, other=0).to(tl.int64)
        k = tl.load(  # [BLOCK_D, BLOCK_N], already transposed for the dot
            k_head + slots[None, :] * stride_kn + offs_d[:, None],
            mask=mask_d[:, None] & mask_n[None, :],
            other=0.0,
        )
        s = dot(q, k, DOT_IEEE) * qk_scale
        s = tl.where(mask_n[None, :], s, float("-inf"))
        # the loop body only runs when the block holds >= 1 real key, so the running
        # max is finite for every row (padded rows score 0)
        v = tl.load(
            v_head + slots[:, None] * stride_vn + offs_d[None, :],
            mask=mask_n[:, None] & mask_d[None, :],
            other=0.0,
        )
        m_i, l_i, acc = softmax_step(s, v, m_i, l_i, acc, DOT_IEEE)

    # empty split (kv_len < NUM_SPLITS): out = 0 and lse = -inf, weight 0 in the merge
    out, lse = softmax_finish(m_i, l_i, acc)
    bh = b.to(tl.int64) * stride_pb + heads * stride_ph + split * stride_ps
    tl.store(PartOut + bh[:, None] + offs_d[None, :], out, mask=mask_g[:, None] & mask_d[None, :])
    tl.store(PartLse + b.to(tl.int64) * stride_lb + heads * stride_lh + split, lse, mask=mask_g)


def decode_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    req_to_token: torch.Tensor,
    rows,
    kv_lens,
    scale: float,
    num_splits: int | None = None,
    *,
    max_kv_len: int | None = None,
    block_n: int = 64,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """One query token per request, attending to all of that request's keys.

    ``q [B, Hq, D]``; ``k_cache``/``v_cache [num_slots, Hk, D]``; request ``b`` reads
    the slots ``req_to_token[rows[b], :kv_lens[b]]`` (``kv_lens`` counts the new token,
    whose K/V must already be stored). Returns ``[B, Hq, D]`` in ``q``'s dtype, plus
    the natural-log ``lse [B, Hq]`` (float32) when ``return_lse`` (for merging with
    another attention over disjoint keys, e.g. a shared prefix).

    Flash-decoding (split-K), two launches:

    1. grid ``(B, Hk, num_splits)``: program ``(b, kh, s)`` takes the ``group`` query
       heads of KV head ``kh`` as one ``[group, D]`` tile, walks chunk ``s`` of the
       request's keys in ``block_n`` steps (gathering slots from ``req_to_token``),
       keeps an online softmax, and writes the normalized partial output
       ``[B, Hq, splits, D]`` and its lse ``[B, Hq, splits]`` (float32).
    2. grid ``(B, Hq)``: merges the splits, ``out = sum_s exp(lse_s - lse) * out_s``.

    Splitting gives a batch of few long requests enough programs to fill the GPU.
    ``num_splits=None`` picks ``ceil(max_kv_len / 256)`` capped at 16; computing the
    max syncs with the device unless ``max_kv_len`` is given. ``kv_lens`` of 0 yield
    zero rows (never NaN), so padded batches are safe.
    """
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    if num_q_heads % num_kv_heads:
        raise ValueError(f"{num_q_heads} query heads do not group over {num_kv_heads} KV heads")
    if q.dtype != k_cache.dtype or k_cache.dtype != v_cache.dtype:
        raise ValueError(f"dtype mismatch: q {q.dtype}, k {k_cache.dtype}, v {v_cache.dtype}")
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, num_q_heads), dtype=torch.float32, device=q.device)
    if batch == 0:
        return (out, lse) if return_lse else out
    rows = index_tensor(rows, q.device)
    kv_lens = index_tensor(kv_lens, q.device)
    if num_splits is None:
        if max_kv_len is None:
            max_kv_len = int(kv_lens.max())
        num_splits = default_num_splits(max_kv_len)
    num_splits = max(1, int(num_splits))

    q = inner_contiguous(q)
    k_cache, v_cache = inner_contiguous(k_cache), inner_contiguous(v_cache)
    req_to_token = inner_contiguous(req_to_token)
    group = num_q_heads // num_kv_heads
    block_d = max(16, next_pow2(head_dim))
    block_n = max(16, next_pow2(block_n))

    part_out = torch.empty(
        (batch, num_q_heads, num_splits, head_dim), dtype=torch.float32, device=q.device
    )
    part_lse = torch.empty((batch, num_q_heads, num_splits), dtype=torch.float32, device=q.device)
    _decode_split_kernel[(batch, num_kv_heads, num_splits)](
        q,
        k_cache,
        v_cache,
        req_to_token,
        rows,
        kv_lens,
        part_out,
        part_lse,
        float(scale) * LOG2E,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        v_cache.stride(0),
        v_cache.stride(1),
        req_to_token.stride(0),
        part_out.stride(0),
        part_out.stride(1),
        part_out.stride(2),
        part_lse.stride(0),
        part_lse.stride(1),
        GROUP=group,
        HEAD_DIM=head_dim,
        NUM_SPLITS=num_splits,
        BLOCK_G=max(16, next_pow2(group)),
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        DOT_IEEE=dot_ieee(q.dtype),
        num_warps=4,
        num_stages=2,
    )
    merge_splits(part_out, part_lse, out, lse if return_lse else None)
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------------------------------
# extend (prefill chunks)
# ---------------------------------------------------------------------------------------


@triton.jit
def _extend_kernel(
    Q,
    K,
    V,
    Out,
    ReqToToken,
    Rows,
    QStarts,
    KvLens,
    qk_scale,  # scale * log2(e)
    stride_qt,
    stride_qh,
    stride_kn,
    stride_kh,
    stride_vn,
    stride_vh,
    stride_ot,
    stride_oh,
    stride_rr,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_IEEE: tl.constexpr,
):
    e = tl.program_id(0)
    m0 = tl.program_id(1) * BLOCK_M
    kh = tl.program_id(2)

    q_start = tl.load(QStarts + e).to(tl.int64)
    n_new = (tl.load(QStarts + e + 1).to(tl.int64) - q_start).to(tl.int32)
    if m0 >= n_new:  # the grid is sized for the longest request
        return
    kv_len = tl.load(KvLens + e).to(tl.int32)
    prefix = kv_len - n_new
    row = tl.load(Rows + e).to(tl.int64)

    # Tile rows are (token, head) pairs: BLOCK_M new tokens x BLOCK_G query heads of
    # KV head kh, token-major. One K/V tile then serves the whole GQA group.
    offs_r = tl.arange(0, BLOCK_M * BLOCK_G)
    offs_m = m0 + offs_r // BLOCK_G  # index among this request's new tokens
    offs_g = offs_r % BLOCK_G
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    mask_r = (offs_m < n_new) & (offs_g < GROUP)
    q_pos = prefix + offs_m  # absolute position of each row's query token
    tok = q_start + offs_m
    heads = kh * GROUP + offs_g
    q = tl.load(
        Q + tok[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
        mask=mask_r[:, None] & mask_d[None, :],
        other=0.0,
    )

    m_i = tl.full([BLOCK_M * BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M * BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_M * BLOCK_G, BLOCK_D], tl.float32)
    table = ReqToToken + row * stride_rr
    k_head = K + kh.to(tl.int64) * stride_kh
    v_head = V + kh.to(tl.int64) * stride_vh
    # The last query of this block sits at prefix + m0 + BLOCK_M - 1; keys past it are
    # invisible to every row, so stop there (causal skipping of later KV blocks).
    kv_end = tl.minimum(kv_len, prefix + m0 + BLOCK_M)
    for n0 in range(0, kv_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < kv_end
        slots = tl.load(table + offs_n, mask=mask_n, other=0).to(tl.int64)
        k = tl.load(
            k_head + slots[None, :] * stride_kn + offs_d[:, None],
            mask=mask_d[:, None] & mask_n[None, :],
            other=0.0,
        )
        s = dot(q, k, DOT_IEEE) * qk_scale
        # prefix keys are visible to all; new keys causally. The first block holds key
        # 0, visible to every row (padded rows included), so after it m_i is finite and
        # later fully-masked rows just add exp2(-inf) = 0 -- no NaN path.
        visible = mask_n[None, :] & (offs_n[None, :] <= q_pos[:, None])
        s = tl.where(visible, s, float("-inf"))
        v = tl.load(
            v_head + slots[:, None] * stride_vn + offs_d[None, :],
            mask=mask_n[:, None] & mask_d[None, :],
            other=0.0,
        )
        m_i, l_i, acc = softmax_step(s, v, m_i, l_i, acc, DOT_IEEE)

    out, _ = softmax_finish(m_i, l_i, acc)
    tl.store(
        Out + tok[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
        out.to(Out.dtype.element_ty),
        mask=mask_r[:, None] & mask_d[None, :],
    )


def extend_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    req_to_token: torch.Tensor,
    rows,
    q_starts,
    kv_lens,
    scale: float,
    *,
    max_q_len: int | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """New tokens of ``E`` requests: full attention over the cached prefix, causal
    among themselves.

    ``q [T, Hq, D]`` holds the requests' new tokens back to back: request ``i`` owns
    ``q[q_starts[i]:q_starts[i+1]]`` (``n_i`` tokens, ``q_starts [E+1]``) and has
    ``kv_lens[i]`` keys in total, the new ones included and already stored, at slots
    ``req_to_token[rows[i], :kv_lens[i]]``. New token ``j`` sits at position
    ``kv_lens[i] - n_i + j`` and sees keys at positions ``<=`` that. Returns
    ``[T, Hq, D]`` in ``q``'s dtype.

    grid ``(E, cdiv(max n_i, BLOCK_M), Hk)``: each program takes ``BLOCK_M`` new tokens
    of one request times the ``group`` query heads of one KV head as a single tile of
    rows, and runs an online softmax over KV blocks of ``BLOCK_N`` keys gathered
    through ``req_to_token``, stopping at the block's last causal key. Programs past
    a request's ``n_i`` exit at once. ``max n_i`` syncs with the device unless
    ``max_q_len`` is given. ``T == 0`` or ``E == 0`` returns without a launch.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    if num_q_heads % num_kv_heads:
        raise ValueError(f"{num_q_heads} query heads do not group over {num_kv_heads} KV heads")
    if q.dtype != k_cache.dtype or k_cache.dtype != v_cache.dtype:
        raise ValueError(f"dtype mismatch: q {q.dtype}, k {k_cache.dtype}, v {v_cache.dtype}")
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    rows = index_tensor(rows, q.device)
    num_reqs = rows.shape[0]
    if num_tokens == 0 or num_reqs == 0:
        return out
    q_starts = index_tensor(q_starts, q.device)
    kv_lens = index_tensor(kv_lens, q.device)
    if max_q_len is None:
        max_q_len = int((q_starts[1:] - q_starts[:-1]).max())
    if max_q_len <= 0:
        return out

    q = inner_contiguous(q)
    k_cache, v_cache = inner_contiguous(k_cache), inner_contiguous(v_cache)
    req_to_token = inner_contiguous(req_to_token)
    group = num_q_heads // num_kv_heads
    block_g = next_pow2(group)
    block_d = max(16, next_pow2(head_dim))
    if block_m is None:
        block_m = max(1, 64 // block_g)  # about 64 (token, head) rows per program
    # tl.dot wants >= 16 rows; round the token block up until the tile has them
    block_m = max(next_pow2(block_m), next_pow2(math.ceil(16 / block_g)))
    if block_n is None:
        block_n = 64 if block_d <= 128 else 32
    block_n = max(16, next_pow2(block_n))

    grid = (num_reqs, triton.cdiv(max_q_len, block_m), num_kv_heads)
    _extend_kernel[grid](
        q,
        k_cache,
        v_cache,
        out,
        req_to_token,
        rows,
        q_starts,
        kv_lens,
        float(scale) * LOG2E,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        v_cache.stride(0),
        v_cache.stride(1),
        out.stride(0),
        out.stride(1),
        req_to_token.stride(0),
        GROUP=group,
        HEAD_DIM=head_dim,
        BLOCK_M=block_m,
        BLOCK_G=block_g,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        DOT_IEEE=dot_ieee(q.dtype),
        num_warps=4 if block_m * block_g * block_d <= 64 * 64 else 8,
        num_stages=2,
    )
    return out


# ---------------------------------------------------------------------------------------
# store
# ---------------------------------------------------------------------------------------


@triton.jit
def _store_kv_kernel(
    K,
    V,
    KCache,
    VCache,
    Slots,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_kcn,
    stride_kch,
    stride_vcn,
    stride_vch,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(Slots + t).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h[:, None] < NUM_HEADS) & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(K + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    v = tl.load(V + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    tl.store(
        KCache + slot * stride_kcn + offs_h[:, None] * stride_kch + offs_d[None, :],
        k.to(KCache.dtype.element_ty),
        mask=mask,
    )
    tl.store(
        VCache + slot * stride_vcn + offs_h[:, None] * stride_vch + offs_d[None, :],
        v.to(VCache.dtype.element_ty),
        mask=mask,
    )


def store_kv_triton(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
) -> None:
    """Write the new tokens' ``k``/``v [T, Hk, D]`` into ``slots [T]`` of the pool.

    grid ``(T,)``: one program copies one token's ``[Hk, D]`` K and V rows. ``k``/``v``
    may be strided views (e.g. slices of a fused QKV projection); only their last dim
    must be contiguous (otherwise they are copied first).
    """
    num_tokens, num_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    k, v = inner_contiguous(k), inner_contiguous(v)
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("the KV pool must be contiguous in its last dimension")
    _store_kv_kernel[(num_tokens,)](
        k,
        v,
        k_cache,
        v_cache,
        slots,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        v_cache.stride(0),
        v_cache.stride(1),
        NUM_HEADS=num_heads,
        HEAD_DIM=head_dim,
        BLOCK_H=next_pow2(num_heads),
        BLOCK_D=next_pow2(head_dim),
        num_warps=1,
    )
