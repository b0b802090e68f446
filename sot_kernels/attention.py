"""Attention over a token-slot KV pool, in plain PyTorch.

The pool holds one row per token slot: ``k_cache[slot] -> [Hk, D]``. A request's
keys are the slots listed in its ``req_to_token`` row, so requests that share a
prefix simply list the same slots. These functions are the CPU path and the
reference the Triton kernels are tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def store_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
) -> None:
    """Write the new tokens' ``k``/``v`` ``[T, Hk, D]`` into their ``slots [T]``."""
    k_cache.index_copy_(0, slots, k)
    v_cache.index_copy_(0, slots, v)


# Query rows per KV head are padded to a multiple of this; see decode_attention.
_QUERY_ROWS = 8


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    kv_index: torch.Tensor,
    kv_mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """One query token per request, attending to all of that request's keys.

    ``q [B, Hq, D]``; ``kv_index [B, L]`` holds each request's slots padded to the
    longest; ``kv_mask [B, 1, 1, L]`` is True (or 0.0, if additive) on real keys and
    may be None when no row is padded. Returns ``[B, Hq, D]``.

    The ``Hq / Hk`` query heads that share a KV head go in as that head's query rows
    (one pass over its keys for all of them), padded with zero rows to a multiple of
    8. The padding is what makes a request's result independent of its batch:
    SDPA's CPU kernel hands (request, head) items to threads, each with a scratch
    buffer of ``q_rows * min(L, 512) + 2 * q_rows + q_rows * D`` floats carved from one
    allocation, and a thread whose buffer is not 64-byte aligned takes other
    vectorised paths, with other rounding. With 8 query rows (and ``L`` even) every
    buffer is aligned, so an item gets the same bits on whichever thread the batch
    size puts it. (Callers pad ``L`` to a multiple of 16 for the same reason.)
    """
    b, n = kv_index.shape
    hq, d = q.shape[1], q.shape[2]
    hk = k_cache.shape[1]
    group = hq // hk
    rows = -(-group // _QUERY_ROWS) * _QUERY_ROWS
    flat = kv_index.reshape(-1)
    # index_select is much cheaper than advanced indexing for row gathers
    k = k_cache.index_select(0, flat).view(b, n, hk, d).transpose(1, 2)
    v = v_cache.index_select(0, flat).view(b, n, hk, d).transpose(1, 2)
    qg = q.reshape(b, hk, group, d)
    if rows != group:
        qg = torch.cat([qg, qg.new_zeros(b, hk, rows - group, d)], dim=2)
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=kv_mask, scale=scale)
    return out[:, :, :group].reshape(b, hq, d)


def extend_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    kv_slots: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """``n`` new tokens of one request: causal among themselves, full over the prefix.

    ``q [n, Hq, D]``; ``kv_slots [L]`` lists the request's slots up to and including
    the new tokens (prefix length ``L - n``). Returns ``[n, Hq, D]``.
    """
    n, kv_len = q.shape[0], kv_slots.shape[0]
    k = k_cache.index_select(0, kv_slots).transpose(0, 1).unsqueeze(0)  # [1, Hk, L, D]
    v = v_cache.index_select(0, kv_slots).transpose(0, 1).unsqueeze(0)
    qh = q.transpose(0, 1).unsqueeze(0)  # [1, Hq, n, D]
    if n == kv_len:
        out = F.scaled_dot_product_attention(qh, k, v, is_causal=True, scale=scale, enable_gqa=True)
    else:
        # query i sits at position (L - n + i) and may see keys 0..L-n+i
        rows = torch.arange(n, device=q.device)[:, None] + (kv_len - n)
        mask = torch.arange(kv_len, device=q.device)[None, :] <= rows
        out = F.scaled_dot_product_attention(qh, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    return out.squeeze(0).transpose(0, 1)
