"""Per-step plans both backends build: decodes' key slots padded to the longest, and
fan-out groups (decodes sharing a cached prefix, attended once per group)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.context import ForwardContext

#: decodes' key ranges are padded to a multiple of this many keys; rows padded to
#: another width sum in another order (the scheduler keeps a draft's rows in one width)
KEY_MULTIPLE = 16


@dataclass
class Padded:
    """Slots of several requests' key ranges, padded to the longest."""

    which: torch.Tensor | None  # the requests' places in the batch (None: 0..n-1)
    index: torch.Tensor  # [n, L] slots, padding points at slot 0
    lens: torch.Tensor | None  # [n] real lengths; None when none is padded
    mask: torch.Tensor | None  # [n, 1, 1, L] additive mask, or None


@dataclass
class Group:
    """A fan-out group: members share ``prefix_slots``; ``suffix`` is each one's own keys."""

    prefix_slots: torch.Tensor  # [P]
    suffix: Padded


def take(q: torch.Tensor, which: torch.Tensor | None, n: int) -> torch.Tensor:
    """Rows ``which`` of ``q``; ``None`` means the first ``n`` (no gather needed)."""
    return q[:n] if which is None else q[which]


def put(out: torch.Tensor, which: torch.Tensor | None, res: torch.Tensor) -> None:
    """Write ``res`` back to the rows :func:`take` read."""
    if which is None:
        out[: res.shape[0]] = res
    else:
        out[which] = res


def padded(ctx: ForwardContext, which: list[int], starts: list[int], dtype: torch.dtype) -> Padded:
    """Slots ``[starts[j], kv_len)`` of decode ``which[j]``, padded to the longest."""
    dev = ctx.req_to_token.device
    rows = torch.tensor([ctx.rows[i] for i in which], device=dev)
    lens_list = [ctx.kv_lens[i] - st for i, st in zip(which, starts, strict=True)]
    # Padded to a multiple of 16 keys: SDPA's CPU kernel reduces over keys in SIMD
    # lanes and handles a ragged tail apart, so a width that is not a multiple of the
    # vector width regroups a row's sums. On whole multiples the masked keys only add
    # exact zeros, and a request's output no longer depends on how long its
    # batch-mates are (tests/engine/test_quantized_engine.py).
    width = -(-max(lens_list) // KEY_MULTIPLE) * KEY_MULTIPLE
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
    return Padded(None if contiguous else torch.tensor(which, device=dev), index, lens, mask)


def plan_groups(ctx: ForwardContext) -> tuple[list[Group], list[int]]:
    """The step's fan-out groups, and the decodes outside any group."""
    groups, grouped = [], set()
    for g in ctx.prefix_groups:
        members = list(g.members)
        grouped.update(members)
        prefix = ctx.req_to_token[ctx.rows[members[0]], : g.prefix_len]
        suffix = padded(ctx, members, [g.prefix_len] * len(members), ctx.kv_pool.k.dtype)
        groups.append(Group(prefix, suffix))
    return groups, [i for i in range(ctx.num_decodes) if i not in grouped]
