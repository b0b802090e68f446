"""The Triton attention kernels against the torch reference in sot_kernels.attention.

Without CUDA the kernels run under the Triton interpreter (``TRITON_INTERPRET=1``,
set by tests/conftest.py before triton is imported); with CUDA they are compiled.
Shapes are tiny because the interpreter executes every program in Python.
"""

from __future__ import annotations

import pytest
import torch
from triton_env import DEVICE, INTERPRETED, require_triton

require_triton()

import sot_kernels.triton_attention as ta  # noqa: E402
from sot_kernels.attention import decode_attention, extend_attention, store_kv  # noqa: E402

GQA = [(2, 2), (4, 2), (8, 2)]  # (Hq, Hk): group sizes 1, 2, 4
# The interpreter (Triton 3.9) stores bfloat16 as uint16 and its tl.dot multiplies the
# raw integers; loads, stores and casts are fine. Compiled kernels handle bf16 natively.
BF16_SKIP = pytest.mark.skipif(INTERPRETED, reason="Triton interpreter tl.dot is wrong for bf16")
LOW_PRECISION = [torch.float16, pytest.param(torch.bfloat16, marks=BF16_SKIP)]
TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}


def _pool(lens, hk, d, dtype, table_dtype=torch.int64, seed=0, extra_rows=1):
    """A KV pool plus a req_to_token table whose requests own scattered slots.

    Slots are a random permutation of 1..N, so no request is contiguous in the pool.
    Slot 0 (padding) holds huge values, and table entries past each request's length
    point at other requests' slots: any read beyond kv_len would change the answer.
    Request i lives in table row ``extra_rows + i`` so rows != batch index.
    """
    g = torch.Generator().manual_seed(seed)
    total = sum(lens)
    num_slots = total + 8
    k = torch.randn(num_slots, hk, d, generator=g)
    v = torch.randn(num_slots, hk, d, generator=g)
    k[0] = 1e4
    v[0] = 1e4
    max_len = max(lens) + 5
    table = torch.randint(1, num_slots, (len(lens) + extra_rows, max_len), generator=g)
    perm = torch.randperm(num_slots - 1, generator=g)[:total] + 1
    rows = []
    at = 0
    for i, n in enumerate(lens):
        row = extra_rows + i
        table[row, :n] = perm[at : at + n]
        at += n
        rows.append(row)
    to = dict(device=DEVICE)
    return (
        k.to(dtype=dtype, **to),
        v.to(dtype=dtype, **to),
        table.to(dtype=table_dtype, **to),
        torch.tensor(rows, **to),
    )


def _decode_ref(q, k_cache, v_cache, table, rows, lens, scale):
    """The torch reference in float32, with kv_index/mask built like TorchAttentionBackend."""
    max_len = max(lens)
    lens_t = torch.tensor(lens, device=DEVICE)
    index = table[rows, :max_len].long()
    valid = torch.arange(max_len, device=DEVICE)[None, :] < lens_t[:, None]
    index = index.masked_fill(~valid, 0)
    mask = torch.zeros(valid.shape, device=DEVICE).masked_fill(~valid, float("-inf"))
    return decode_attention(
        q.float(), k_cache.float(), v_cache.float(), index, mask[:, None, None, :], scale
    )


def _extend_ref(q, k_cache, v_cache, table, rows, q_lens, kv_lens, scale):
    out, start = [], 0
    for row, n, kv_len in zip(rows.tolist(), q_lens, kv_lens, strict=True):
        slots = table[row, :kv_len].long()
        qi = q[start : start + n].float()
        out.append(extend_attention(qi, k_cache.float(), v_cache.float(), slots, scale))
        start += n
    return torch.cat(out) if out else q.float()


def _q(n, hq, d, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, hq, d, generator=g).to(dtype=dtype, device=DEVICE)


# ------------------------------------------------------------------------------ decode


@pytest.mark.parametrize("hq,hk", GQA)
@pytest.mark.parametrize("d", [16, 64, 48])
def test_decode_matches_torch(hq, hk, d):
    # ragged, crossing the 16-key block (15, 16, 17, 33) and split boundaries, len 1
    lens = [15, 1, 33, 16, 17]
    table_dtype = torch.int32 if d == 48 else torch.int64
    k, v, table, rows = _pool(lens, hk, d, torch.float32, table_dtype)
    q = _q(len(lens), hq, d, torch.float32)
    scale = d**-0.5
    ref = _decode_ref(q, k, v, table, rows, lens, scale)
    kv_lens = torch.tensor(lens, device=DEVICE, dtype=torch.int32)
    for splits in (1, 3):
        out = ta.decode_attention_triton(q, k, v, table, rows, kv_lens, scale, splits, block_n=16)
        assert out.dtype == q.dtype and out.shape == q.shape
        torch.testing.assert_close(out, ref, **TOL[torch.float32])


def test_decode_split_counts_agree():
    """1 split and many (incl. more splits than keys: empty splits) give one answer."""
    lens = [1, 2, 40, 17]
    k, v, table, rows = _pool(lens, 2, 16, torch.float32)
    q = _q(len(lens), 4, 16, torch.float32)
    ref = _decode_ref(q, k, v, table, rows, lens, 0.25)
    outs = [
        ta.decode_attention_triton(q, k, v, table, rows, lens, 0.25, s, block_n=16)
        for s in (1, 2, 5, 16)
    ]
    for out in outs:
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, ref, **TOL[torch.float32])
        torch.testing.assert_close(out, outs[0], atol=2e-6, rtol=2e-6)


def test_decode_default_splits_and_lse():
    assert ta.default_num_splits(1) == 1
    assert ta.default_num_splits(256) == 1
    assert ta.default_num_splits(257) == 2
    assert ta.default_num_splits(10**6) == ta.MAX_SPLITS
    lens = [9, 20]
    k, v, table, rows = _pool(lens, 1, 16, torch.float32)
    q = _q(2, 2, 16, torch.float32)
    out, lse = ta.decode_attention_triton(
        q, k, v, table, rows, lens, 0.3, 2, block_n=16, return_lse=True
    )
    torch.testing.assert_close(out, _decode_ref(q, k, v, table, rows, lens, 0.3))
    for b, n in enumerate(lens):
        keys = k[table[rows[b], :n]]  # [n, 1, D]
        scores = torch.einsum("hd,nd->hn", q[b], keys[:, 0]) * 0.3
        torch.testing.assert_close(lse[b], torch.logsumexp(scores, -1))
    # num_splits=None derives the count from the lengths
    torch.testing.assert_close(ta.decode_attention_triton(q, k, v, table, rows, lens, 0.3), out)


def test_decode_group_of_eight_and_zero_length_row():
    lens = [5, 0, 18]
    k, v, table, rows = _pool([5, 1, 18], 1, 16, torch.float32)
    q = _q(3, 8, 16, torch.float32)
    out = ta.decode_attention_triton(q, k, v, table, rows, lens, 0.25, 2, block_n=16)
    keep = [0, 2]
    ref = _decode_ref(q[keep], k, v, table, rows[keep], [5, 18], 0.25)
    torch.testing.assert_close(out[keep], ref, **TOL[torch.float32])
    # a padded row with no keys comes out as zeros, never NaN
    assert torch.equal(out[1], torch.zeros_like(out[1]))


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_decode_low_precision(dtype):
    lens = [3, 21, 16]
    k, v, table, rows = _pool(lens, 2, 48, dtype)
    q = _q(3, 8, 48, dtype)
    out = ta.decode_attention_triton(q, k, v, table, rows, lens, 48**-0.5, 2, block_n=16)
    assert out.dtype == dtype
    ref = _decode_ref(q, k, v, table, rows, lens, 48**-0.5)
    torch.testing.assert_close(out.float(), ref, **TOL[dtype])


def test_decode_empty_batch():
    k, v, table, _ = _pool([3], 2, 16, torch.float32)
    q = torch.empty(0, 4, 16, device=DEVICE)
    empty = torch.empty(0, dtype=torch.int64, device=DEVICE)
    out = ta.decode_attention_triton(q, k, v, table, empty, empty, 0.25)
    assert out.shape == (0, 4, 16)


# ------------------------------------------------------------------------------ extend

# (new tokens, total keys) per request: whole prompt (prefix 0), a chunk after a
# prefix, a single token, a chunk crossing 16-token blocks
EXTEND_CASES = {
    "prefill": [(20, 20)],
    "chunk_with_prefix": [(7, 30)],
    "one_token": [(1, 17)],
    "ragged_mix": [(17, 17), (1, 9), (5, 37), (16, 16), (3, 3)],
}


@pytest.mark.parametrize("case", list(EXTEND_CASES))
@pytest.mark.parametrize("hq,hk", GQA)
def test_extend_matches_torch(case, hq, hk):
    reqs = EXTEND_CASES[case]
    q_lens = [n for n, _ in reqs]
    kv_lens = [kv for _, kv in reqs]
    d = 48 if hq == 8 else 16
    table_dtype = torch.int32 if hq == 4 else torch.int64
    k, v, table, rows = _pool(kv_lens, hk, d, torch.float32, table_dtype, seed=3)
    q = _q(sum(q_lens), hq, d, torch.float32)
    q_starts = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], device=DEVICE)
    out = ta.extend_attention_triton(
        q, k, v, table, rows, q_starts, kv_lens, d**-0.5, block_m=8, block_n=16
    )
    ref = _extend_ref(q, k, v, table, rows, q_lens, kv_lens, d**-0.5)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out, ref, **TOL[torch.float32])


@pytest.mark.parametrize("d", [64, 48])
def test_extend_default_blocks(d):
    reqs = [(9, 30), (4, 4)]
    q_lens, kv_lens = [n for n, _ in reqs], [kv for _, kv in reqs]
    k, v, table, rows = _pool(kv_lens, 2, d, torch.float32, seed=4)
    q = _q(sum(q_lens), 4, d, torch.float32)
    q_starts = torch.tensor([0, 9, 13], dtype=torch.int32, device=DEVICE)
    out = ta.extend_attention_triton(q, k, v, table, rows, q_starts, kv_lens, d**-0.5, max_q_len=9)
    ref = _extend_ref(q, k, v, table, rows, q_lens, kv_lens, d**-0.5)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_extend_low_precision(dtype):
    reqs = [(6, 20), (11, 11)]
    q_lens, kv_lens = [n for n, _ in reqs], [kv for _, kv in reqs]
    k, v, table, rows = _pool(kv_lens, 2, 48, dtype, seed=5)
    q = _q(sum(q_lens), 8, 48, dtype)
    q_starts = torch.tensor([0, 6, 17], device=DEVICE)
    out = ta.extend_attention_triton(
        q, k, v, table, rows, q_starts, kv_lens, 48**-0.5, block_m=4, block_n=16
    )
    assert out.dtype == dtype
    ref = _extend_ref(q, k, v, table, rows, q_lens, kv_lens, 48**-0.5)
    torch.testing.assert_close(out.float(), ref, **TOL[dtype])


def test_extend_empty():
    k, v, table, _ = _pool([3], 2, 16, torch.float32)
    q = torch.empty(0, 4, 16, device=DEVICE)
    empty = torch.empty(0, dtype=torch.int64, device=DEVICE)
    zero = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    out = ta.extend_attention_triton(q, k, v, table, empty, zero, empty, 0.25)
    assert out.shape == (0, 4, 16)


# ------------------------------------------------------------------------------- store


def test_store_kv_matches_torch():
    g = torch.Generator().manual_seed(7)
    hk, d = 2, 48
    k_cache = torch.zeros(12, hk, d, device=DEVICE)
    v_cache = torch.zeros(12, hk, d, device=DEVICE)
    # k and v as strided views of one fused projection, like a QKV split
    kv = torch.randn(5, 2 * hk, d, generator=g).to(DEVICE)
    k, v = kv[:, :hk], kv[:, hk:]
    slots = torch.tensor([7, 1, 11, 3, 4], device=DEVICE)
    ta.store_kv_triton(k_cache, v_cache, slots, k, v)
    k_ref, v_ref = torch.zeros_like(k_cache), torch.zeros_like(v_cache)
    store_kv(k_ref, v_ref, slots, k, v)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
    ta.store_kv_triton(k_cache, v_cache, slots[:0], k[:0], v[:0])  # no launch
