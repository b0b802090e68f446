"""The torch attention backend: a decode's output does not depend on its batch-mates.

A request decoded next to longer ones has its keys padded to the batch's width; the
backend must give it the very bits it gets alone, or greedy output would depend on
what else the server happens to be running.
"""

from __future__ import annotations

import pytest
import torch

from engine.attention import TorchAttentionBackend
from engine.attention.torch_backend import _run_start
from engine.context import ForwardContext, set_context
from engine.kv_cache import KVPool

HQ, HK, D = 9, 3, 64


def _decode(pool: KVPool, table: torch.Tensor, q: torch.Tensor, lens: list[int]) -> torch.Tensor:
    """One decode step of ``len(lens)`` requests (rows 0..n-1 of ``table``) through the
    backend; the new token's k/v are the ones already in the pool at its last slot."""
    n = len(lens)
    last = torch.tensor([int(table[i, lens[i] - 1]) for i in range(n)])
    ctx = ForwardContext(
        positions=torch.tensor([x - 1 for x in lens]), out_slots=last,
        rows=list(range(n)), q_lens=[1] * n, kv_lens=lens, num_decodes=n,
        req_to_token=table, kv_pool=pool,
    )  # fmt: skip
    backend = TorchAttentionBackend()
    backend.plan(ctx)
    set_context(ctx)
    try:
        k, v = pool.k[0, last].clone(), pool.v[0, last].clone()
        return backend.forward(q, k, v, layer=0, scale=D**-0.5)
    finally:
        set_context(None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("length", [5, 37, 64, 130, 517])
def test_a_decode_gets_the_same_bits_next_to_longer_requests(dtype, length):
    torch.manual_seed(length)
    slots = 4096
    pool = KVPool(1, slots, HK, D, dtype, torch.device("cpu"))
    pool.k.normal_()
    pool.v.normal_()
    # every request its own scattered slots, as after churn in the pool
    table = torch.randperm(slots)[: 4 * 1024].view(4, 1024) + 1
    q = torch.randn(4, HQ, D, dtype=dtype)
    alone = _decode(pool, table, q[:1], [length])
    for others in ([length + 1], [length + 3, 2], [length + 250, 1, length + 17]):
        batched = _decode(pool, table, q[: 1 + len(others)], [length, *others])
        assert torch.equal(batched[0], alone[0]), others


def test_a_run_of_slots_is_found_and_anything_else_is_not():
    assert _run_start(torch.arange(7, 19)) == 7
    assert _run_start(torch.tensor([5])) == 5
    assert _run_start(torch.tensor([], dtype=torch.int64)) is None
    # same first and last as a run, but not one
    assert _run_start(torch.tensor([3, 5, 4, 6])) is None
    assert _run_start(torch.tensor([3, 4, 6])) is None
