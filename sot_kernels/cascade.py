"""Shared-prefix (cascade) attention over the token-slot KV pool, in plain PyTorch.

A Skeleton-of-Thought fan-out decodes ``B`` requests whose keys start with the same
``P`` prefix slots (question + skeleton), each followed by a short private suffix.
Plain decode attention reads the prefix ``B`` times, once per request, as ``B``
matrix-vector products. Here the prefix is gathered once and attended to by all
``B * group`` query rows of each KV head in one matrix-matrix product; the private
suffixes go through a small padded batch; the two partial results are merged exactly
by their log-sum-exp (``softmax`` over a union of key sets is the LSE-weighted mix of
the softmaxes over the parts).

This module is the CPU path and the reference for :mod:`sot_kernels.triton_cascade`.
All arithmetic is float32 (float64 for float64 inputs), also for bfloat16 inputs.
"""

from __future__ import annotations

import torch

from sot_kernels.attention import decode_attention


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _empty_result(
    q: torch.Tensor, out_dtype: torch.dtype, acc: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    out = torch.zeros(q.shape, dtype=out_dtype, device=q.device)
    lse = torch.full(q.shape[:-1], float("-inf"), dtype=acc, device=q.device)
    return out, lse


def _softmax_av(
    s: torch.Tensor, v: torch.Tensor, masked: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``softmax(s) @ v`` and ``logsumexp(s)`` over the last axis; ``s`` is overwritten.

    ``s [..., M, L]`` are scaled scores (``-inf`` where masked), ``v [..., L, D]``.
    With ``masked``, fully masked rows give output 0 and lse ``-inf``.
    """
    m = s.amax(-1, keepdim=True)
    if masked:
        # a fully masked row has max -inf; shifting by a finite value keeps exp() at 0
        m = m.clamp_min(torch.finfo(s.dtype).min)
    p = s.sub_(m).exp_()
    denom = p.sum(-1, keepdim=True)
    out = torch.matmul(p, v)
    out.div_(denom.clamp_min(torch.finfo(s.dtype).tiny) if masked else denom)
    lse = (m + denom.log()).squeeze(-1)  # log(0) = -inf for fully masked rows
    return out, lse


def _scaled_queries(q: torch.Tensor, scale: float) -> torch.Tensor:
    """``q * scale`` in the accumulation dtype: a new contiguous tensor."""
    return q.to(_acc_dtype(q.dtype)) * scale


def _keys_part(
    qs: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """All scaled queries ``qs [N, Hq, D]`` over the same keys ``k``/``v [L, Hk, D]``;
    output and lse in ``qs.dtype``."""
    n, hq, d = qs.shape
    hk = k.shape[1]
    group = hq // hk
    if k.shape[0] == 0 or n == 0:
        return _empty_result(qs, qs.dtype, qs.dtype)
    # rows of one KV head = (query, head-in-group) pairs: [Hk, N * group, D]
    qh = qs.view(n, hk, group, d).transpose(0, 1).reshape(hk, n * group, d)
    kh = k.to(qs.dtype).transpose(0, 1)  # [Hk, L, D]
    vh = v.to(qs.dtype).transpose(0, 1)
    s = torch.bmm(qh, kh.transpose(1, 2))  # [Hk, N * group, L]: one GEMM per KV head
    if mask is not None:
        s = s.view(hk, n, group, -1).masked_fill_(~mask[None, :, None, :], float("-inf"))
        s = s.view(hk, n * group, -1)
    out, lse = _softmax_av(s, vh, masked=mask is not None)
    out = out.view(hk, n, group, d).transpose(0, 1).reshape(n, hq, d)
    lse = lse.view(hk, n, group).transpose(0, 1).reshape(n, hq)
    return out, lse


def _padded_part(
    qs: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    kv_index: torch.Tensor,
    kv_lens: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each scaled query ``qs [B, Hq, D]`` over its own padded slots ``kv_index [B, S]``;
    output and lse in ``qs.dtype``."""
    b, hq, d = qs.shape
    s_len = kv_index.shape[1]
    if s_len == 0 or b == 0:
        return _empty_result(qs, qs.dtype, qs.dtype)
    hk = k_cache.shape[1]
    flat = kv_index.reshape(-1)
    k = k_cache.index_select(0, flat).to(qs.dtype).view(b, s_len, hk, d)
    v = v_cache.index_select(0, flat).to(qs.dtype).view(b, s_len, hk, d)
    s = torch.matmul(qs.view(b, hk, hq // hk, d), k.permute(0, 2, 3, 1))  # [B, Hk, group, S]
    masked = kv_lens is not None
    if masked:
        lens = torch.as_tensor(kv_lens, device=qs.device)
        pad = torch.arange(s_len, device=qs.device)[None, :] >= lens[:, None]  # [B, S]
        s.masked_fill_(pad[:, None, None, :], float("-inf"))
    out, lse = _softmax_av(s, v.transpose(1, 2), masked=masked)  # [B, Hk, group, D]
    return out.reshape(b, hq, d), lse.reshape(b, hq)


def attention_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every query attends to the same keys ``k``/``v [L, Hk, D]``; returns the LSE too.

    ``q [N, Hq, D]`` with ``Hq = group * Hk`` (query head ``h`` reads KV head
    ``h // group``); ``mask [N, L]`` bool, True where a key is visible, or None.
    Returns ``out [N, Hq, D]`` (``q.dtype``) and ``lse [N, Hq]`` float32 (float64 for
    float64 inputs), the natural-log ``logsumexp`` of each row's scaled scores.
    Rows that see no key (``L == 0`` or fully masked) give ``out = 0``, ``lse = -inf``.
    """
    out, lse = _keys_part(_scaled_queries(q, scale), k, v, mask)
    return out.to(q.dtype), lse


def merge_attention(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact merge of attention over two disjoint key sets into attention over their union.

    ``out_* [..., D]``, ``lse_* [...]``. Returns ``(out, lse)`` with ``lse`` the
    ``logaddexp`` of the two and ``out`` the ``exp(lse_* - lse)``-weighted mix, in
    float32 (float64 for float64 inputs). A side with ``lse = -inf`` is empty and gets
    weight 0 (its ``out`` must be finite; ours is 0); if both are empty the result is
    ``out = 0``, ``lse = -inf``.
    """
    acc = _acc_dtype(torch.promote_types(out_a.dtype, out_b.dtype))
    lse_a, lse_b = lse_a.to(acc), lse_b.to(acc)
    lse = torch.logaddexp(lse_a, lse_b)  # -inf only when both sides are empty
    # shift by a finite value so that -inf - -inf never happens
    ref = lse.clamp_min(torch.finfo(acc).min)
    w_a = torch.exp(lse_a - ref).unsqueeze(-1)
    w_b = torch.exp(lse_b - ref).unsqueeze(-1)
    out = torch.addcmul(out_a.to(acc) * w_a, out_b.to(acc), w_b)
    return out, lse


def shared_prefix_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    prefix_slots: torch.Tensor,
    scale: float,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared part: all ``B`` queries ``q [B, Hq, D]`` over the ``P`` prefix slots.

    The prefix rows are gathered once; per KV head it is one ``[B * group, D] x
    [D, P]`` product. Returns ``(out [B, Hq, D], lse [B, Hq])``; ``out`` is in
    ``out_dtype`` (default ``q.dtype``). The torch twin of
    :func:`sot_kernels.triton_cascade.shared_prefix_attention_triton`.
    """
    k = k_cache.index_select(0, prefix_slots)
    v = v_cache.index_select(0, prefix_slots)
    out, lse = _keys_part(_scaled_queries(q, scale), k, v, None)
    return out.to(out_dtype or q.dtype), lse


def decode_attention_with_lse(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    kv_index: torch.Tensor,
    kv_lens: torch.Tensor | None,
    scale: float,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded batched decode attention, like :func:`sot_kernels.attention.decode_attention`,
    that also returns the LSE (SDPA does not, hence matmuls and masking).

    ``q [B, Hq, D]``; ``kv_index [B, S]`` each request's slots padded to the longest;
    ``kv_lens [B]`` the real lengths (None when no row is padded). A row of length 0
    gives ``out = 0``, ``lse = -inf``. Returns ``(out [B, Hq, D] in out_dtype or
    q.dtype, lse [B, Hq])``.
    """
    qs = _scaled_queries(q, scale)
    out, lse = _padded_part(qs, k_cache, v_cache, kv_index, kv_lens)
    return out.to(out_dtype or q.dtype), lse


def shared_prefix_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    prefix_slots: torch.Tensor,
    suffix_index: torch.Tensor,
    suffix_lens: torch.Tensor | None,
    scale: float,
    prefix_start: int | None = None,
) -> torch.Tensor:
    """Decode attention for a group of ``B`` requests whose keys start with the same slots.

    ``q [B, Hq, D]`` (one new token per request); ``k_cache``/``v_cache [num_slots,
    Hk, D]``; ``prefix_slots [P]`` the shared slots; ``suffix_index [B, S]`` each
    request's own slots after the prefix (including its new token), padded to the
    longest; ``suffix_lens [B]`` their real lengths (None when none is padded), each
    at least 1. ``prefix_start``, when given, says the prefix slots are the range
    ``prefix_start .. prefix_start + P - 1``, read in place instead of gathered.
    Equals :func:`sot_kernels.attention.decode_attention` over ``prefix + suffix`` per
    request. Returns ``[B, Hq, D]`` in ``q.dtype``. A group of one has nothing to
    share and goes straight to ``decode_attention``.
    """
    if q.shape[0] == 1:
        # a group of one shares nothing: plain (fused SDPA) attention over prefix + suffix
        slots = torch.cat([prefix_slots, suffix_index[0]])[None, :]
        mask = None
        if suffix_lens is not None:
            lens = torch.as_tensor(suffix_lens, device=q.device)[:1] + prefix_slots.numel()
            mask = torch.arange(slots.shape[1], device=q.device)[None, :] < lens[:, None]
            mask = mask[:, None, None, :]
        return decode_attention(q, k_cache, v_cache, slots, mask, scale)
    n_prefix = prefix_slots.numel()
    if prefix_start is not None:
        k = k_cache.narrow(0, prefix_start, n_prefix)  # a view: nothing copied
        v = v_cache.narrow(0, prefix_start, n_prefix)
    else:
        k = k_cache.index_select(0, prefix_slots)  # the prefix rows, gathered once
        v = v_cache.index_select(0, prefix_slots)
    if q.device.type == "cpu" and n_prefix > 0:
        out_p, lse_p = _flash_keys_part(q, k, v, scale)
        out_s, lse_s = _flash_padded_part(q, k_cache, v_cache, suffix_index, suffix_lens, scale)
    else:
        qs = _scaled_queries(q, scale)  # scaled once for both parts
        out_p, lse_p = _keys_part(qs, k, v, None)
        out_s, lse_s = _padded_part(qs, k_cache, v_cache, suffix_index, suffix_lens)
    # merge_attention's output in three ops: the prefix's share of the softmax mass is
    # exp(lse_p) / (exp(lse_p) + exp(lse_s)) = sigmoid(lse_p - lse_s); an empty prefix
    # (lse_p = -inf) gets weight 0. Every request has at least its new token, so lse_s
    # is finite.
    w_p = torch.sigmoid(lse_p - lse_s).unsqueeze(-1)
    return torch.lerp(out_s.to(out_p.dtype), out_p, w_p.to(out_p.dtype)).to(q.dtype)


# The op ``F.scaled_dot_product_attention`` dispatches to on the CPU. Called directly
# because it also returns the log-sum-exp the merge needs; one fused pass (scores,
# softmax, values) replaces the ten or so ops of the matmul path, which measured
# 185 -> 136 us per layer for 5 requests on a 420-token prefix (2 cores).
_flash_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def _flash_keys_part(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_keys_part` (no mask, ``P > 0``) through the fused CPU kernel: every query
    row of a KV head is one row of that head's ``[B * group, P]`` pass."""
    n, hq, d = q.shape
    hk = k.shape[1]
    group = hq // hk
    qh = q.view(n, hk, group, d).transpose(0, 1).reshape(1, hk, n * group, d)
    kh = k.to(q.dtype).transpose(0, 1)[None]  # [1, Hk, P, D], strided: no copy
    vh = v.to(q.dtype).transpose(0, 1)[None]
    out, lse = _flash_cpu(qh, kh, vh, scale=scale)[:2]
    out = out.reshape(hk, n, group, d).transpose(0, 1).reshape(n, hq, d)
    return out, lse.reshape(hk, n, group).transpose(0, 1).reshape(n, hq)


def _flash_padded_part(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    kv_index: torch.Tensor,
    kv_lens: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_padded_part` through the fused CPU kernel; every row has at least one key."""
    b, hq, d = q.shape
    s_len = kv_index.shape[1]
    hk = k_cache.shape[1]
    flat = kv_index.reshape(-1)
    k = k_cache.index_select(0, flat).to(q.dtype).view(b, s_len, hk, d).transpose(1, 2)
    v = v_cache.index_select(0, flat).to(q.dtype).view(b, s_len, hk, d).transpose(1, 2)
    mask = None
    if kv_lens is not None:
        lens = torch.as_tensor(kv_lens, device=q.device)
        pad = torch.arange(s_len, device=q.device)[None, :] >= lens[:, None]  # [B, S]
        mask = torch.zeros(pad.shape, dtype=q.dtype, device=q.device)
        mask = mask.masked_fill_(pad, float("-inf"))[:, None, None, :]
    out, lse = _flash_cpu(q.view(b, hk, hq // hk, d), k, v, attn_mask=mask, scale=scale)[:2]
    return out.reshape(b, hq, d), lse.reshape(b, hq)
