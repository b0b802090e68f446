"""The attention-backend interface and its torch implementation."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch

from engine.context import ForwardContext, get_context
from kernels import activation, norm, rope
from kernels.attention import decode_attention, extend_attention, store_kv
from kernels.cascade import shared_prefix_decode_attention


@dataclass(frozen=True)
class Ops:
    """The model's small ops, from the same family of kernels as its attention."""

    rms_norm: Callable[..., torch.Tensor]
    add_rms_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    silu_and_mul: Callable[[torch.Tensor], torch.Tensor]


TORCH_OPS = Ops(norm.rms_norm, norm.add_rms_norm, activation.silu_and_mul)


class AttentionBackend(ABC):
    """Attention over the token-slot KV pool for one mixed batch.

    ``plan`` runs once per step and derives whatever index tensors the backend
    needs from the context; ``forward`` runs once per layer, stores the new
    tokens' K/V into their slots and returns the attention output.
    """

    #: the norm and activation kernels the model uses with this backend
    ops: Ops = TORCH_OPS

    @abstractmethod
    def plan(self, ctx: ForwardContext) -> None:
        """Build per-step metadata into ``ctx.attn``."""

    def forward_rope(
        self,
        qk: torch.Tensor,
        v: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        layer: int,
        scale: float,
    ) -> torch.Tensor:
        """:meth:`forward` for q and k not yet rotated by RoPE, stacked along the head
        axis (``qk [T, Hq + Hk, D]``, q first; ``v [T, Hk, D]``; ``cos``/``sin [T, D]``).

        The default rotates q and k with one call and calls :meth:`forward`; a backend
        may fuse the rotation with storing K/V into the pool instead.
        """
        nq = qk.shape[1] - v.shape[1]
        qk = rope.rotate(qk, cos, sin)
        return self.forward(qk[:, :nq], qk[:, nq:], v, layer, scale)

    @abstractmethod
    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, scale: float
    ) -> torch.Tensor:
        """``q [T, Hq, D]``, ``k``/``v [T, Hk, D]`` for the step's new tokens -> ``[T, Hq, D]``."""

    #: whether :meth:`plan_graph_decode` is implemented (decode steps can be CUDA graphs)
    supports_graphs: bool = False

    def plan_graph_decode(
        self, ctx: ForwardContext, rows: torch.Tensor, kv_lens: torch.Tensor, max_kv_len: int
    ) -> None:
        """Plan a step of ``len(rows)`` one-token decodes for CUDA graph capture.

        ``rows`` and ``kv_lens`` are device buffers that later steps overwrite in
        place, and ``ctx``'s host-side lists are empty, so the plan may depend on
        shapes and on ``max_kv_len`` (the longest any request can be) but never on
        values. A ``kv_lens`` entry of 0 marks a padding row: its output is ignored.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot run decode steps as CUDA graphs")


_KEY_MULTIPLE = 16


@dataclass
class _Padded:
    """Slots of several requests' key ranges, padded to the longest."""

    which: torch.Tensor | None  # the requests' places in the batch (None: 0..n-1)
    index: torch.Tensor  # [n, L] slots, padding points at slot 0
    lens: torch.Tensor | None  # [n] real lengths; None when none is padded
    mask: torch.Tensor | None  # [n, 1, 1, L] additive mask, or None


@dataclass
class _Group:
    """A fan-out group: members share ``prefix_slots``; ``suffix`` is each one's own keys."""

    prefix_slots: torch.Tensor  # [P]
    suffix: _Padded


@dataclass
class _TorchPlan:
    plain: _Padded | None  # decodes attended over all their keys
    groups: list[_Group]  # decodes whose shared prefix is attended once per group
    extends: list[tuple[int, int, torch.Tensor]]  # (q_start, q_len, kv slots)


def _take(q: torch.Tensor, which: torch.Tensor | None, n: int) -> torch.Tensor:
    """Rows ``which`` of ``q``; ``None`` means the first ``n`` (no gather needed)."""
    return q[:n] if which is None else q[which]


def _put(out: torch.Tensor, which: torch.Tensor | None, res: torch.Tensor) -> None:
    """Write ``res`` back to the rows :func:`_take` read."""
    if which is None:
        out[: res.shape[0]] = res
    else:
        out[which] = res


def _padded(
    ctx: ForwardContext, which: list[int], starts: list[int], dtype: torch.dtype
) -> _Padded:
    """Slots ``[starts[j], kv_len)`` of decode ``which[j]``, padded to the longest."""
    dev = ctx.req_to_token.device
    rows = torch.tensor([ctx.rows[i] for i in which], device=dev)
    lens_list = [ctx.kv_lens[i] - st for i, st in zip(which, starts, strict=True)]
    # Padded to a multiple of 16 keys: SDPA's CPU kernel reduces over keys in SIMD
    # lanes and handles a ragged tail apart, so a width that is not a multiple of the
    # vector width regroups a row's sums. On whole multiples the masked keys only add
    # exact zeros, and a request's output no longer depends on how long its
    # batch-mates are (tests/engine/test_quantized_engine.py).
    width = -(-max(lens_list) // _KEY_MULTIPLE) * _KEY_MULTIPLE
    cols = torch.arange(width, device=dev)[None, :]
    first = torch.tensor(starts, device=dev)[:, None]
    index = ctx.req_to_token[rows[:, None], (first + cols).clamp(max=ctx.req_to_token.shape[1] - 1)]
    lens = mask = None
    if min(lens_list) < width:
        lens = torch.tensor(lens_list, device=dev)
        valid = cols < lens[:, None]
        index = index.masked_fill(~valid, 0)
        # an additive mask built once per step; SDPA would convert a bool one per layer
        mask = torch.zeros(valid.shape, dtype=dtype, device=dev)
        mask = mask.masked_fill(~valid, float("-inf"))[:, None, None, :]
    contiguous = which == list(range(len(which)))
    return _Padded(None if contiguous else torch.tensor(which, device=dev), index, lens, mask)


def _plan_groups(ctx: ForwardContext) -> tuple[list[_Group], list[int]]:
    """The step's fan-out groups, and the decodes outside any group."""
    groups, grouped = [], set()
    for g in ctx.prefix_groups:
        members = list(g.members)
        grouped.update(members)
        prefix = ctx.req_to_token[ctx.rows[members[0]], : g.prefix_len]
        suffix = _padded(ctx, members, [g.prefix_len] * len(members), ctx.kv_pool.k.dtype)
        groups.append(_Group(prefix, suffix))
    return groups, [i for i in range(ctx.num_decodes) if i not in grouped]


class TorchAttentionBackend(AttentionBackend):
    """Batched SDPA for decodes (padded to the longest), one SDPA per prefill chunk, and
    for fan-out groups (``ctx.prefix_groups``) the shared prefix attended once per group
    as one matrix-matrix pass, merged with each member's own keys by log-sum-exp."""

    def plan(self, ctx: ForwardContext) -> None:
        nd = ctx.num_decodes
        groups, plain_which = _plan_groups(ctx)
        dtype = ctx.kv_pool.k.dtype
        plain = _padded(ctx, plain_which, [0] * len(plain_which), dtype) if plain_which else None
        extends = []
        start = nd
        for i in range(nd, len(ctx.rows)):
            slots = ctx.req_to_token[ctx.rows[i], : ctx.kv_lens[i]]
            extends.append((start, ctx.q_lens[i], slots))
            start += ctx.q_lens[i]
        ctx.attn = _TorchPlan(plain, groups, extends)

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
            qp = _take(q, plain.which, plain.index.shape[0])
            res = decode_attention(qp, k_cache, v_cache, plain.index, plain.mask, scale)
            _put(out, plain.which, res)
        for g in plan.groups:
            qg = _take(q, g.suffix.which, g.suffix.index.shape[0])
            res = shared_prefix_decode_attention(
                qg, k_cache, v_cache, g.prefix_slots, g.suffix.index, g.suffix.lens, scale
            )
            _put(out, g.suffix.which, res)
        for start, n, slots in plan.extends:
            out[start : start + n] = extend_attention(
                q[start : start + n], k_cache, v_cache, slots, scale
            )
        return out


@dataclass
class _TritonPlan:
    # decodes outside any group: their places in the batch (None: the first n),
    # req_to_token rows and key counts; rows is None when there are none
    decode_which: torch.Tensor | None
    decode_rows: torch.Tensor | None
    decode_lens: torch.Tensor | None
    max_decode_len: int
    decode_splits: int | None  # split-K grid; None: from max_decode_len
    groups: list[_Group]
    extend_rows: torch.Tensor | None  # [E]
    extend_starts: torch.Tensor | None  # [E + 1] offsets of each request's new tokens
    extend_lens: torch.Tensor | None  # [E] key counts after this step
    max_q_len: int


class TritonAttentionBackend(AttentionBackend):
    """Triton kernels (:mod:`kernels.triton_attention`): split-K decode attention and
    extend attention, both reading K/V through ``req_to_token`` inside the kernel, and
    the shared-prefix kernel (:mod:`kernels.triton_cascade`) for fan-out groups.

    Runs compiled on CUDA, and in Triton's interpreter on the CPU (``TRITON_INTERPRET=1``,
    for tests: slow, but the same kernels). Every kernel takes its metadata as device
    tensors, so decode steps can be captured as CUDA graphs."""

    supports_graphs = True

    def __init__(self) -> None:
        # imported here so the torch backend never needs triton
        from kernels import triton_attention, triton_cascade, triton_ops

        self._attn = triton_attention
        self._cascade = triton_cascade
        self._ops = triton_ops
        self.ops = Ops(
            triton_ops.rms_norm_triton, triton_ops.add_rms_norm_triton,
            triton_ops.silu_and_mul_triton,
        )  # fmt: skip

    def plan(self, ctx: ForwardContext) -> None:
        dev = ctx.req_to_token.device
        nd = ctx.num_decodes
        groups, plain = _plan_groups(ctx)
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
                _take(q, plan.decode_which, plan.decode_rows.shape[0]), k_cache, v_cache,
                ctx.req_to_token, plan.decode_rows, plan.decode_lens, scale,
                plan.decode_splits, max_kv_len=plan.max_decode_len,
            )  # fmt: skip
            if plain.shape[0] == q.shape[0]:  # the whole batch is plain decodes
                return plain
        out = torch.empty_like(q)
        if plain is not None:
            _put(out, plan.decode_which, plain)
        for g in plan.groups:
            res = self._cascade.shared_prefix_decode_attention_triton(
                _take(q, g.suffix.which, g.suffix.index.shape[0]), k_cache, v_cache,
                g.prefix_slots, g.suffix.index, g.suffix.lens, scale,
            )  # fmt: skip
            _put(out, g.suffix.which, res)
        if plan.extend_rows is not None:
            out[nd:] = self._attn.extend_attention_triton(
                q[nd:], k_cache, v_cache, ctx.req_to_token, plan.extend_rows,
                plan.extend_starts, plan.extend_lens, scale, max_q_len=plan.max_q_len,
            )  # fmt: skip
        return out


def create_backend(name: str | None, device: torch.device) -> AttentionBackend:
    """Pick an attention backend by name; ``None`` means the device default (triton on
    CUDA, torch on the CPU)."""
    if name is None:
        name = "triton" if device.type == "cuda" else "torch"
    if name == "torch":
        return TorchAttentionBackend()
    if name == "triton":
        return TritonAttentionBackend()
    raise ValueError(f"unknown attention backend {name!r}; available: torch, triton")
