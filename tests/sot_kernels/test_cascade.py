"""Shared-prefix (cascade) attention: torch path and Triton kernels against plain attention.

The Triton kernels run on CUDA when there is a GPU and under the Triton interpreter
(``TRITON_INTERPRET=1``, numpy on the CPU) otherwise.
"""

from __future__ import annotations

import pytest
import torch
from triton_env import DEVICE, require_triton

from sot_kernels.attention import decode_attention
from sot_kernels.cascade import (
    attention_with_lse,
    decode_attention_with_lse,
    merge_attention,
    shared_prefix_attention,
    shared_prefix_decode_attention,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _reference(q, k, v, scale, mask=None):
    """Softmax attention and logsumexp in float64, written out plainly."""
    group = q.shape[1] // k.shape[1]
    kk = k.double().repeat_interleave(group, dim=1)  # [L, Hq, D]
    vv = v.double().repeat_interleave(group, dim=1)
    s = torch.einsum("nhd,lhd->nhl", q.double(), kk) * scale
    if mask is not None:
        s = s.masked_fill(~mask[:, None, :], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    out = torch.einsum("nhl,lhd->nhd", torch.softmax(s, dim=-1), vv)
    return out, lse


class Fanout:
    """A pool with a group's slots scattered through it; slot 0 holds padding garbage."""

    def __init__(self, group, prefix, lens, hq, hk, d, dtype=torch.float32, seed=0):
        g = _gen(seed)
        self.num_slots = 1 + prefix + sum(lens) + 5  # a few slots nobody uses
        self.k = torch.randn(self.num_slots, hk, d, generator=g)
        self.v = torch.randn(self.num_slots, hk, d, generator=g)
        self.k[0] = 1e4
        self.v[0] = 1e4
        self.k, self.v = self.k.to(dtype), self.v.to(dtype)
        self.q = torch.randn(group, hq, d, generator=g).to(dtype)
        perm = torch.randperm(self.num_slots - 1, generator=g) + 1
        self.prefix_slots = perm[:prefix]
        s_max = max(lens)
        self.suffix_index = torch.zeros(group, s_max, dtype=torch.int64)
        taken = prefix
        for r, n in enumerate(lens):
            self.suffix_index[r, :n] = perm[taken : taken + n]
            taken += n
        self.lens = torch.tensor(lens)
        self.scale = d**-0.5

    def plain(self):
        """Plain decode attention over prefix + suffix per request (the engine's path)."""
        p = self.prefix_slots.numel()
        index = torch.cat([self.prefix_slots.expand(len(self.lens), p), self.suffix_index], 1)
        mask = torch.arange(index.shape[1])[None, :] < (p + self.lens)[:, None]
        return decode_attention(self.q, self.k, self.v, index, mask[:, None, None, :], self.scale)

    def to(self, device):
        for name in ("k", "v", "q", "prefix_slots", "suffix_index", "lens"):
            setattr(self, name, getattr(self, name).to(device))
        return self


# -- attention_with_lse and merge ----------------------------------------------------------------
@pytest.mark.parametrize(("hq", "hk"), [(4, 4), (6, 2)])
def test_attention_with_lse_matches_reference(hq, hk):
    g = _gen(1)
    q, k, v = torch.randn(5, hq, 16, generator=g), *torch.randn(2, 11, hk, 16, generator=g)
    mask = torch.rand(5, 11, generator=g) > 0.4
    mask[:, 0] = True
    for m in (None, mask):
        out, lse = attention_with_lse(q, k, v, 0.3, m)
        ref_out, ref_lse = _reference(q, k, v, 0.3, m)
        assert out.dtype == torch.float32 and lse.dtype == torch.float32
        torch.testing.assert_close(out, ref_out.float(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse, ref_lse.float(), atol=1e-5, rtol=1e-5)


def test_attention_with_lse_empty_and_fully_masked():
    g = _gen(2)
    q = torch.randn(3, 4, 8, generator=g)
    out, lse = attention_with_lse(q, torch.empty(0, 2, 8), torch.empty(0, 2, 8), 0.5)
    assert (out == 0).all() and torch.isneginf(lse).all()
    k, v = torch.randn(2, 6, 2, 8, generator=g)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[1] = False
    out, lse = attention_with_lse(q, k, v, 0.5, mask)
    assert (out[1] == 0).all() and torch.isneginf(lse[1]).all()
    assert torch.isfinite(out).all() and torch.isfinite(lse[[0, 2]]).all()


@pytest.mark.parametrize("split", [1, 4, 9])
def test_merge_equals_attention_over_concatenated_keys(split):
    g = _gen(split)
    q, k, v = torch.randn(4, 6, 16, generator=g), *torch.randn(2, 10, 3, 16, generator=g)
    a = attention_with_lse(q, k[:split], v[:split], 0.25)
    b = attention_with_lse(q, k[split:], v[split:], 0.25)
    out, lse = merge_attention(*a, *b)
    ref_out, ref_lse = _reference(q, k, v, 0.25)
    torch.testing.assert_close(out, ref_out.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse.float(), atol=1e-5, rtol=1e-5)
    # merging is symmetric
    torch.testing.assert_close(merge_attention(*b, *a)[0], out)


def test_merge_with_an_empty_side():
    g = _gen(3)
    q, k, v = torch.randn(2, 4, 8, generator=g), *torch.randn(2, 5, 2, 8, generator=g)
    full = attention_with_lse(q, k, v, 0.5)
    empty = attention_with_lse(q, k[:0], v[:0], 0.5)
    for args in ((*full, *empty), (*empty, *full)):
        out, lse = merge_attention(*args)
        torch.testing.assert_close(out, full[0])
        torch.testing.assert_close(lse, full[1])
    out, lse = merge_attention(*empty, *empty)
    assert (out == 0).all() and torch.isneginf(lse).all()


def test_decode_attention_with_lse_matches_decode_attention():
    f = Fanout(4, 0, [1, 6, 3, 6], hq=6, hk=2, d=16, seed=4)
    f.prefix_slots = f.prefix_slots[:0]
    out, lse = decode_attention_with_lse(f.q, f.k, f.v, f.suffix_index, f.lens, f.scale)
    torch.testing.assert_close(out, f.plain(), atol=1e-5, rtol=1e-5)
    for r, n in enumerate(f.lens.tolist()):
        slots = f.suffix_index[r, :n]
        _, ref_lse = _reference(f.q[r : r + 1], f.k[slots], f.v[slots], f.scale)
        torch.testing.assert_close(lse[r], ref_lse[0].float(), atol=1e-5, rtol=1e-5)


# -- the torch shared-prefix path ----------------------------------------------------------------
SUFFIX_LENS = {1: [[1], [5]], 2: [[1, 4], [3, 3]], 8: [[1, 7, 2, 9, 1, 3, 5, 4]]}
CASES = [
    (group, lens, prefix)
    for group, lens_list in SUFFIX_LENS.items()
    for lens in lens_list
    for prefix in (1, 17, 64)
]


@pytest.mark.parametrize(("hq", "hk"), [(4, 4), (6, 2)], ids=["gqa1", "gqa3"])
@pytest.mark.parametrize(("group", "lens", "prefix"), CASES)
def test_shared_prefix_equals_plain_decode_float32(group, lens, prefix, hq, hk):
    f = Fanout(group, prefix, lens, hq, hk, d=16, seed=group * 100 + prefix + sum(lens))
    out = shared_prefix_decode_attention(
        f.q, f.k, f.v, f.prefix_slots, f.suffix_index, f.lens, f.scale
    )
    assert out.shape == f.q.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, f.plain(), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize(("hq", "hk"), [(4, 4), (9, 3)], ids=["gqa1", "gqa3"])
@pytest.mark.parametrize("group", [1, 2, 8])
def test_shared_prefix_equals_plain_decode_bfloat16(group, hq, hk):
    lens = [1, 3, 8, 2, 5, 1, 4, 6][:group]
    f = Fanout(group, 64, lens, hq, hk, d=32, dtype=torch.bfloat16, seed=group)
    out = shared_prefix_decode_attention(
        f.q, f.k, f.v, f.prefix_slots, f.suffix_index, f.lens, f.scale
    )
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, f.plain(), atol=2e-2, rtol=2e-2)
    # and close to float32 attention over the same bfloat16 values
    f32 = Fanout(group, 64, lens, hq, hk, d=32, seed=group)
    f32.k, f32.v, f32.q = f.k.float(), f.v.float(), f.q.float()
    torch.testing.assert_close(out.float(), f32.plain(), atol=1e-2, rtol=1e-2)


def test_shared_prefix_without_padding_and_without_prefix():
    f = Fanout(3, 10, [4, 4, 4], hq=4, hk=2, d=16, seed=9)
    args = (f.q, f.k, f.v, f.prefix_slots, f.suffix_index)
    ref = f.plain()
    torch.testing.assert_close(
        shared_prefix_decode_attention(*args, None, f.scale), ref, atol=2e-5, rtol=1e-5
    )
    f0 = Fanout(3, 0, [2, 5, 1], hq=4, hk=2, d=16, seed=10)
    out = shared_prefix_decode_attention(
        f0.q, f0.k, f0.v, f0.prefix_slots, f0.suffix_index, f0.lens, f0.scale
    )
    torch.testing.assert_close(out, f0.plain(), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_prefix_read_in_place_equals_the_gathered_one(dtype):
    """With ``prefix_start`` the prefix is the run of slots from there, read as a view of
    the pool: the same result as gathering those slots, for the same run."""
    f = Fanout(5, 40, [1, 6, 3, 9, 2], hq=9, hk=3, d=16, dtype=dtype, seed=4)
    start = 3
    run = torch.arange(start, start + 40)
    # suffix slots outside the run, so the two reads see the same keys
    f.suffix_index = f.suffix_index % 7 + 50
    f.k, f.v = f.k.repeat(2, 1, 1), f.v.repeat(2, 1, 1)
    args = (f.q, f.k, f.v, run, f.suffix_index, f.lens, f.scale)
    gathered = shared_prefix_decode_attention(*args)
    in_place = shared_prefix_decode_attention(*args, prefix_start=start)
    torch.testing.assert_close(in_place, gathered, atol=1e-6, rtol=1e-6)
    # and a wrong start reads other keys: the argument is really used
    shifted = shared_prefix_decode_attention(*args, prefix_start=start + 1)
    assert not torch.allclose(shifted, gathered, atol=1e-3)


# -- Triton (CUDA, or the interpreter on CPU) ----------------------------------------------------
@pytest.fixture(scope="module")
def tc():
    require_triton()
    import sot_kernels.triton_cascade as module

    return module


@pytest.mark.parametrize(
    ("group", "hq", "hk", "d", "prefix", "splits"),
    [
        (1, 2, 2, 16, 1, 1),
        (1, 6, 2, 24, 17, 1),  # head dim padded to 32
        (2, 3, 3, 16, 40, 1),
        (2, 6, 2, 16, 40, 2),  # two splits merged by the combine kernel
        (8, 6, 2, 16, 33, 3),  # 24 rows: two row blocks of 16
        (8, 4, 4, 16, 17, 1),
    ],
)
def test_triton_prefix_matches_torch(tc, group, hq, hk, d, prefix, splits):
    f = Fanout(group, prefix, [1] * group, hq, hk, d, seed=prefix + group).to(DEVICE)
    out, lse = tc.shared_prefix_attention_triton(
        f.q, f.k, f.v, f.prefix_slots, f.scale, num_splits=splits, block_m=16, block_n=16
    )
    ref_out, ref_lse = shared_prefix_attention(f.q, f.k, f.v, f.prefix_slots, f.scale)
    assert out.shape == f.q.shape and lse.dtype == torch.float32
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)


def test_triton_prefix_empty(tc):
    f = Fanout(2, 0, [1, 1], hq=4, hk=2, d=16).to(DEVICE)
    out, lse = tc.shared_prefix_attention_triton(f.q, f.k, f.v, f.prefix_slots, f.scale)
    assert (out == 0).all() and torch.isneginf(lse).all()


def test_triton_merge_matches_torch(tc):
    g = _gen(5)
    out_a, out_b = torch.randn(2, 3, 5, 24, generator=g)
    lse_a, lse_b = torch.randn(2, 3, 5, generator=g) * 3
    lse_a[0, 1] = float("-inf")  # one side empty
    lse_b[2, :] = float("-inf")
    lse_a[1, 4] = lse_b[1, 4] = float("-inf")  # both empty
    out_a[1, 4] = out_b[1, 4] = 0.0
    args = [t.to(DEVICE) for t in (out_a, lse_a, out_b, lse_b)]
    out, lse = tc.merge_attention_triton(*args)
    ref_out, ref_lse = merge_attention(*args)
    torch.testing.assert_close(out, ref_out, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    ("group", "hq", "hk", "lens", "prefix"),
    [(1, 4, 4, [1], 17), (2, 6, 2, [1, 5], 20), (8, 6, 2, [1, 7, 2, 9, 1, 3, 5, 4], 33)],
)
def test_triton_cascade_end_to_end_equals_plain_decode(tc, group, hq, hk, lens, prefix):
    f = Fanout(group, prefix, lens, hq, hk, d=16, seed=group + prefix).to(DEVICE)
    out = tc.shared_prefix_decode_attention_triton(
        f.q, f.k, f.v, f.prefix_slots, f.suffix_index, f.lens, f.scale, block_n=16
    )
    assert out.dtype == f.q.dtype
    torch.testing.assert_close(out, f.plain(), atol=2e-5, rtol=1e-5)


# -- the benchmark script -------------------------------------------------------------------------
def test_bench_smoke(capsys):
    from sot_kernels import bench

    results = bench.main(
        ["--sections", "cpu,gpu", "--groups", "1,2", "--prefix", "16", "--suffix", "1,4",
         "--layers", "2", "--repeats", "2", "--warmup", "1", "--hq", "4", "--hk", "2",
         "--head-dim", "16"]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert "ratio" in printed and "plain ms" in printed
    cpu = results["cpu"]
    assert [r["group"] for r in cpu] == [1, 2]
    assert all(r["ratio"] > 0 and r["max_diff"] < 1e-4 for r in cpu)
    if not torch.cuda.is_available():
        assert "no CUDA" in printed
