"""The torch attention backend: SDPA over gathered K/V, for the CPU (and as the
reference the Triton backend is tested against)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch

from engine.attention.base import AttentionBackend
from engine.attention.common import Group, Padded, padded, plan_groups, put, take
from engine.context import ForwardContext, get_context
from sot_kernels.attention import decode_attention, extend_attention, store_kv
from sot_kernels.cascade import shared_prefix_decode_attention


@dataclass
class _TorchPlan:
    plain: Padded | None  # decodes attended over all their keys
    groups: list[Group]  # decodes whose shared prefix is attended once per group
    # per group, the first slot when its prefix slots are one run (read in place)
    prefix_starts: list[int | None]
    extends: list[tuple[int, int, torch.Tensor]]  # (q_start, q_len, kv slots)


class TorchAttentionBackend(AttentionBackend):
    """Batched SDPA for decodes (padded to the longest), one SDPA per prefill chunk, and
    for fan-out groups (``ctx.prefix_groups``) the shared prefix attended once per group
    as one matrix-matrix pass, merged with each member's own keys by log-sum-exp."""

    def plan(self, ctx: ForwardContext) -> None:
        nd = ctx.num_decodes
        groups, plain_which = plan_groups(ctx)
        dtype = ctx.kv_pool.k.dtype
        plain = padded(ctx, plain_which, [0] * len(plain_which), dtype) if plain_which else None
        extends = []
        start = nd
        for i in range(nd, len(ctx.rows)):
            slots = ctx.req_to_token[ctx.rows[i], : ctx.kv_lens[i]]
            extends.append((start, ctx.q_lens[i], slots))
            start += ctx.q_lens[i]
        starts = [_run_start(g.prefix_slots) for g in groups]
        ctx.attn = _TorchPlan(plain, groups, starts, extends)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, scale: float
    ) -> torch.Tensor:
        ctx = get_context()
        plan = cast(_TorchPlan, ctx.attn)  # what this backend's ``plan`` put there
        k_cache, v_cache = ctx.kv_pool.k[layer], ctx.kv_pool.v[layer]
        store_kv(k_cache, v_cache, ctx.out_slots, k, v)
        nd = ctx.num_decodes
        plain = plan.plain
        if plain is not None and plain.which is None and nd == q.shape[0] and not plan.groups:
            return decode_attention(q, k_cache, v_cache, plain.index, plain.mask, scale)
        out = torch.empty_like(q)
        if plain is not None:
            qp = take(q, plain.which, plain.index.shape[0])
            res = decode_attention(qp, k_cache, v_cache, plain.index, plain.mask, scale)
            put(out, plain.which, res)
        for g, first in zip(plan.groups, plan.prefix_starts, strict=True):
            qg = take(q, g.suffix.which, g.suffix.index.shape[0])
            res = shared_prefix_decode_attention(
                qg, k_cache, v_cache, g.prefix_slots, g.suffix.index, g.suffix.lens, scale, first
            )
            put(out, g.suffix.which, res)
        for start, n, slots in plan.extends:
            out[start : start + n] = extend_attention(
                q[start : start + n], k_cache, v_cache, slots, scale
            )
        return out


def _run_start(slots: torch.Tensor) -> int | None:
    """``slots[0]`` if ``slots`` are consecutive (one prefill writes its tokens to a run
    of free slots, so a shared prefix often is), else ``None``."""
    n = slots.numel()
    if n == 0:
        return None
    first = int(slots[0])
    if int(slots[-1]) - first != n - 1 or (n > 1 and not bool((slots.diff() == 1).all())):
        return None
    return first
