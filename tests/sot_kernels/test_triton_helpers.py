"""The shared Triton helpers: the split merge against torch, on strided views, with
empty splits; and the host-side size helpers."""

from __future__ import annotations

import pytest
import torch
from triton_env import DEVICE, require_triton

require_triton()

from sot_kernels.triton_helpers import (  # noqa: E402
    inner_contiguous,
    merge_splits,
    next_pow2,
    pow2_at_least,
)


def _reference(part_out: torch.Tensor, part_lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lse = torch.logsumexp(part_lse, dim=-1)
    w = torch.exp(part_lse - lse.nan_to_num(neginf=0.0)[..., None]).nan_to_num(0.0)
    out = (w[..., None] * part_out).sum(-2)
    return out, lse


@pytest.mark.parametrize("splits", [1, 3, 5])
def test_merge_matches_torch_on_permuted_partials_with_empty_splits(splits):
    g = torch.Generator().manual_seed(splits)
    b, h, d = 2, 3, 20  # a head size that is not a power of two
    # [S, B, H, D] buffers, as the shared-prefix kernel writes them
    part_o = torch.randn(splits, b, h, d, generator=g).to(DEVICE)
    part_l = torch.randn(splits, b, h, generator=g).to(DEVICE)
    part_l[-1, 0, 0] = float("-inf")  # an empty split weighs nothing
    part_l[:, 1, 2] = float("-inf")  # a row with no keys at all: zeros, lse -inf
    o_view, l_view = part_o.permute(1, 2, 0, 3), part_l.permute(1, 2, 0)
    out = torch.empty(b, h, d, device=DEVICE)
    lse = torch.empty(b, h, device=DEVICE)
    merge_splits(o_view, l_view, out, lse)
    want_out, want_lse = _reference(o_view, l_view)
    torch.testing.assert_close(out, want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=1e-5)
    assert torch.all(out[1, 2] == 0) and lse[1, 2] == float("-inf")


def test_merge_without_lse_writes_the_output_in_its_dtype():
    part_o = torch.randn(1, 2, 4, 16).to(DEVICE)
    part_l = torch.zeros(1, 2, 4).to(DEVICE)  # equal weights: the mean of the splits
    out = torch.empty(1, 2, 16, dtype=torch.float16, device=DEVICE)
    merge_splits(part_o, part_l, out)
    torch.testing.assert_close(out, part_o.mean(-2).half(), atol=1e-3, rtol=1e-3)


def test_size_helpers():
    assert [next_pow2(x) for x in (0, 1, 2, 3, 64, 65)] == [1, 1, 2, 4, 64, 128]
    assert [pow2_at_least(x) for x in (1, 16, 17)] == [16, 16, 32]
    assert pow2_at_least(3, least=1) == 4
    x = torch.zeros(4, 6)[:, ::2]
    assert inner_contiguous(x).stride(-1) == 1 and inner_contiguous(x).is_contiguous()
    y = torch.zeros(4, 6)[:, :3]
    assert inner_contiguous(y) is y  # only the last stride matters
