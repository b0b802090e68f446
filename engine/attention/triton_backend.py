"""The Triton attention backend: the kernels of :mod:`sot_kernels.triton_attention` and
:mod:`sot_kernels.triton_cascade`, compiled on CUDA (and interpreted on the CPU in tests)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch

from engine.attention.base import AttentionBackend
from engine.attention.common import Group, plan_groups, put, take
from engine.context import ForwardContext, get_context
from sot_kernels.attention import store_kv


@dataclass
class _TritonPlan:
    # decodes outside any group: their places in the batch (None: the first n),
    # req_to_token rows and key counts; rows is None when there are none
    decode_which: torch.Tensor | None
    decode_rows: torch.Tensor | None
    decode_lens: torch.Tensor | None
    max_decode_len: int
    decode_splits: int | None  # split-K grid; None: from max_decode_len
    groups: list[Group]
    extend_rows: torch.Tensor | None  # [E]
    extend_starts: torch.Tensor | None  # [E + 1] offsets of each request's new tokens
    extend_lens: torch.Tensor | None  # [E] key counts after this step
    max_q_len: int


class TritonAttentionBackend(AttentionBackend):
    """Triton kernels (:mod:`sot_kernels.triton_attention`): split-K decode attention and
    extend attention, both reading K/V through ``req_to_token`` inside the kernel, and
    the shared-prefix kernel (:mod:`sot_kernels.triton_cascade`) for fan-out groups.

    Runs compiled on CUDA, and in Triton's interpreter on the CPU (``TRITON_INTERPRET=1``,
    for tests: slow, but the same kernels). Every kernel takes its metadata as device
    tensors, so decode steps can be captured as CUDA graphs."""

    supports_graphs = True

    def __init__(self) -> None:
        # imported here so the torch backend never needs triton
        from sot_kernels import triton_attention, triton_cascade, triton_ops

        self._attn = triton_attention
        self._cascade = triton_cascade
        self._ops = triton_ops  # the fused RoPE + KV store

    def plan(self, ctx: ForwardContext) -> None:
        dev = ctx.req_to_token.device
        nd = ctx.num_decodes
        groups, plain = plan_groups(ctx)
        ext = range(nd, len(ctx.rows))
        starts = [0]
        for i in ext:
            starts.append(starts[-1] + ctx.q_lens[i])

        def tensor(values: list[int]) -> torch.Tensor | None:
            return torch.tensor(values, device=dev) if values else None

        ctx.attn = _TritonPlan(
            decode_which=None if plain == list(range(len(plain))) else tensor(plain),
            decode_rows=tensor([ctx.rows[i] for i in plain]),
            decode_lens=tensor([ctx.kv_lens[i] for i in plain]),
            max_decode_len=max((ctx.kv_lens[i] for i in plain), default=0),
            decode_splits=None,
            groups=groups,
            extend_rows=tensor([ctx.rows[i] for i in ext]),
            extend_starts=tensor(starts) if ext else None,
            extend_lens=tensor([ctx.kv_lens[i] for i in ext]),
            max_q_len=max((ctx.q_lens[i] for i in ext), default=0),
        )

    def plan_graph_decode(
        self, ctx: ForwardContext, rows: torch.Tensor, kv_lens: torch.Tensor, max_kv_len: int
    ) -> None:
        dev = rows.device
        # the split-K grid cannot follow the longest request of each step: fix it from
        # the batch size and the longest possible request instead
        sms = 1
        if dev.type == "cuda":
            sms = torch.cuda.get_device_properties(dev).multi_processor_count
        splits = self._attn.fixed_grid_num_splits(
            rows.shape[0], ctx.kv_pool.k.shape[2], max_kv_len, sms
        )
        ctx.attn = _TritonPlan(
            decode_which=None, decode_rows=rows, decode_lens=kv_lens,
            max_decode_len=max_kv_len, decode_splits=splits, groups=[],
            extend_rows=None, extend_starts=None, extend_lens=None, max_q_len=0,
        )  # fmt: skip

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, scale: float
    ) -> torch.Tensor:
        ctx = get_context()
        k_cache, v_cache = ctx.kv_pool.k[layer], ctx.kv_pool.v[layer]
        store_kv(k_cache, v_cache, ctx.out_slots, k, v)
        return self._attend(q, ctx, layer, scale)

    def forward_rope(
        self,
        qk: torch.Tensor,
        v: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        layer: int,
        scale: float,
    ) -> torch.Tensor:
        # one kernel rotates q and k and writes k/v into their slots: the rotated k
        # never makes a round trip through memory
        ctx = get_context()
        k_cache, v_cache = ctx.kv_pool.k[layer], ctx.kv_pool.v[layer]
        nq = qk.shape[1] - v.shape[1]
        q = self._ops.rope_and_store_kv_triton(
            qk[:, :nq], qk[:, nq:], v, cos, sin, k_cache, v_cache, ctx.out_slots
        )
        return self._attend(q, ctx, layer, scale)

    def _attend(
        self, q: torch.Tensor, ctx: ForwardContext, layer: int, scale: float
    ) -> torch.Tensor:
        """Attention of the step's queries; K/V of the new tokens are already stored."""
        plan = cast(_TritonPlan, ctx.attn)  # what this backend's ``plan`` put there
        k_cache, v_cache = ctx.kv_pool.k[layer], ctx.kv_pool.v[layer]
        nd = ctx.num_decodes
        plain = None
        if plan.decode_rows is not None:
            plain = self._attn.decode_attention_triton(
                take(q, plan.decode_which, plan.decode_rows.shape[0]), k_cache, v_cache,
                ctx.req_to_token, plan.decode_rows, plan.decode_lens, scale,
                plan.decode_splits, max_kv_len=plan.max_decode_len,
            )  # fmt: skip
            if plain.shape[0] == q.shape[0]:  # the whole batch is plain decodes
                return plain
        out = torch.empty_like(q)
        if plain is not None:
            put(out, plan.decode_which, plain)
        for g in plan.groups:
            res = self._cascade.shared_prefix_decode_attention_triton(
                take(q, g.suffix.which, g.suffix.index.shape[0]), k_cache, v_cache,
                g.prefix_slots, g.suffix.index, g.suffix.lens, scale,
            )  # fmt: skip
            put(out, g.suffix.which, res)
        if plan.extend_rows is not None:
            out[nd:] = self._attn.extend_attention_triton(
                q[nd:], k_cache, v_cache, ctx.req_to_token, plan.extend_rows,
                plan.extend_starts, plan.extend_lens, scale, max_q_len=plan.max_q_len,
            )  # fmt: skip
        return out
