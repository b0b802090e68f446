"""The attention-backend interface and its torch implementation."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from engine.context import ForwardContext, get_context
from kernels.attention import decode_attention, extend_attention, store_kv


class AttentionBackend(ABC):
    """Attention over the token-slot KV pool for one mixed batch.

    ``plan`` runs once per step and derives whatever index tensors the backend
    needs from the context; ``forward`` runs once per layer, stores the new
    tokens' K/V into their slots and returns the attention output.
    """

    @abstractmethod
    def plan(self, ctx: ForwardContext) -> None:
        """Build per-step metadata into ``ctx.attn``."""

    @abstractmethod
    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, scale: float
    ) -> torch.Tensor:
        """``q [T, Hq, D]``, ``k``/``v [T, Hk, D]`` for the step's new tokens -> ``[T, Hq, D]``."""


@dataclass
class _TorchPlan:
    decode_index: torch.Tensor | None  # [B, L] slots, padded
    decode_mask: torch.Tensor | None  # [B, 1, 1, L] additive; None when lengths are equal
    extends: list[tuple[int, int, torch.Tensor]]  # (q_start, q_len, kv slots)


class TorchAttentionBackend(AttentionBackend):
    """Batched SDPA for decodes (padded to the longest), one SDPA per prefill chunk."""

    def plan(self, ctx: ForwardContext) -> None:
        nd = ctx.num_decodes
        index = mask = None
        if nd:
            rows = torch.tensor(ctx.rows[:nd], device=ctx.req_to_token.device)
            lens = torch.tensor(ctx.kv_lens[:nd], device=ctx.req_to_token.device)
            max_len = int(max(ctx.kv_lens[:nd]))
            index = ctx.req_to_token[rows, :max_len]
            if min(ctx.kv_lens[:nd]) < max_len:
                valid = torch.arange(max_len, device=lens.device)[None, :] < lens[:, None]
                index = index.masked_fill(~valid, 0)
                # an additive mask built once per step; SDPA would convert a bool one per layer
                mask = torch.zeros(valid.shape, dtype=ctx.kv_pool.k.dtype, device=lens.device)
                mask = mask.masked_fill(~valid, float("-inf"))[:, None, None, :]
        extends = []
        start = nd
        for i in range(nd, len(ctx.rows)):
            slots = ctx.req_to_token[ctx.rows[i], : ctx.kv_lens[i]]
            extends.append((start, ctx.q_lens[i], slots))
            start += ctx.q_lens[i]
        ctx.attn = _TorchPlan(index, mask, extends)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, scale: float
    ) -> torch.Tensor:
        ctx = get_context()
        plan: _TorchPlan = ctx.attn
        k_cache, v_cache = ctx.kv_pool.k[layer], ctx.kv_pool.v[layer]
        store_kv(k_cache, v_cache, ctx.out_slots, k, v)
        nd = ctx.num_decodes
        if nd and not plan.extends:
            return decode_attention(q, k_cache, v_cache, plan.decode_index, plan.decode_mask, scale)
        out = torch.empty_like(q)
        if nd:
            out[:nd] = decode_attention(
                q[:nd], k_cache, v_cache, plan.decode_index, plan.decode_mask, scale
            )
        for start, n, slots in plan.extends:
            out[start : start + n] = extend_attention(
                q[start : start + n], k_cache, v_cache, slots, scale
            )
        return out


def create_backend(name: str | None, device: torch.device) -> AttentionBackend:
    """Pick an attention backend by name; ``None`` means the device default."""
    if name in (None, "torch"):
        return TorchAttentionBackend()
    raise ValueError(f"unknown attention backend {name!r}; available: torch")
