"""Pieces every Triton kernel module here shares, written once.

* host side: :func:`next_pow2` / :func:`pow2_at_least` for block sizes,
  :func:`inner_contiguous` (kernels take every stride but the last),
  :func:`index_tensor` (metadata given as tensors or Python sequences), and
  :func:`dot_ieee`, the dot-precision flag a launch passes as ``DOT_IEEE``;
* device side (``@triton.jit``): :func:`dot` honouring that flag, the online-softmax
  step :func:`softmax_step` and its end :func:`softmax_finish`, used by the decode,
  extend and shared-prefix kernels alike;
* :func:`merge_splits`, the log-sum-exp merge of split-K partial results (the second
  stage of flash-decoding), for both the decode kernel's splits and the shared-prefix
  kernel's.

Conventions: scores are in log2 units (scaled by ``scale * log2(e)``, so the kernels
use ``exp2``); the lse a kernel hands out is a natural log. float32 operands multiply
with ``input_precision="ieee"``, so CUDA results match the torch references to ~1e-6
instead of TF32's ~1e-3; 16-bit operands take the tensor-core default.

The module imports without CUDA; under ``TRITON_INTERPRET=1`` everything runs on CPU
tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


def next_pow2(x: int) -> int:
    """The smallest power of two ``>= x`` (1 for ``x <= 1``)."""
    return 1 << max(0, int(x) - 1).bit_length()


def pow2_at_least(x: int, least: int = 16) -> int:
    """:func:`next_pow2` of ``x``, but at least ``least`` (``tl.dot`` wants >= 16)."""
    return max(least, next_pow2(x))


def inner_contiguous(x: torch.Tensor) -> torch.Tensor:
    """``x`` with a unit stride on its last dim (a copy only when needed): kernels
    take every other stride as an argument. A last dim of size 1 has no stride to
    speak of."""
    return x if x.shape[-1] <= 1 or x.stride(-1) == 1 else x.contiguous()


def index_tensor(x: torch.Tensor | Sequence[int], device: torch.device) -> torch.Tensor:
    """An int tensor on ``device`` from a tensor or a Python sequence; kernels cast
    the elements themselves."""
    if isinstance(x, torch.Tensor):
        return x.to(device) if x.device != device else x
    return torch.as_tensor(x, dtype=torch.int64, device=device)


def dot_ieee(dtype: torch.dtype) -> bool:
    """The ``DOT_IEEE`` flag for operands of ``dtype``: exact products for float32."""
    return dtype == torch.float32


@triton.jit
def dot(a, b, IEEE: tl.constexpr):
    """``tl.dot(a, b)``: exact fp32 products when ``IEEE`` (float32 operands) instead
    of TF32, the backend's tensor-core default otherwise."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def softmax_step(s, v, m_i, l_i, acc, IEEE: tl.constexpr):
    """One key block of an online softmax: scores ``s [R, N]`` (log2 units, masked
    keys at -inf), values ``v [N, D]``; running max ``m_i [R]``, sum ``l_i [R]`` and
    unnormalized output ``acc [R, D]`` (float32). Returns the updated three.

    Every caller guarantees each row sees at least one finite score by its first
    block, so ``m_new`` is finite and no ``exp2(-inf - -inf)`` occurs. The
    probabilities go to the P @ V product in the value dtype, like FlashAttention."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, IEEE)
    return m_new, l_i, acc


@triton.jit
def softmax_finish(m_i, l_i, acc):
    """The normalized output and its natural-log lse. A row that saw no key (an empty
    split: ``l_i = 0``, ``acc = 0``) gives out = 0, not 0/0 = NaN, which would poison
    a merge's 0 * partial, and lse = -inf, which weighs exactly 0 in a merge."""
    has_keys = l_i > 0.0
    l_safe = tl.where(has_keys, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(has_keys, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))  # ln 2
    return out, lse


@triton.jit
def _merge_splits_kernel(
    PartOut,
    PartLse,
    Out,
    Lse,
    num_splits,
    stride_pb,
    stride_ph,
    stride_ps,
    stride_lb,
    stride_lh,
    stride_ls,
    stride_ob,
    stride_oh,
    stride_sb,
    stride_sh,
    HEAD_DIM: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    STORE_LSE: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    mask_s = offs_s < num_splits
    mask_d = offs_d < HEAD_DIM

    lse = tl.load(
        PartLse + b * stride_lb + h * stride_lh + offs_s * stride_ls,
        mask=mask_s,
        other=float("-inf"),
    )
    m = tl.max(lse, 0)
    # m is -inf only when every split was empty (a kv_len of 0, e.g. a padded batch
    # row): shift by 0 instead, so that row comes out as zeros rather than NaN
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse - m)  # empty splits: exp(-inf) = 0
    part = tl.load(
        PartOut + b * stride_pb + h * stride_ph + offs_s[:, None] * stride_ps + offs_d[None, :],
        mask=mask_s[:, None] & mask_d[None, :],
        other=0.0,
    )
    denom = tl.sum(w, 0)
    denom_safe = tl.where(denom > 0.0, denom, 1.0)
    out = tl.sum(w[:, None] * part, 0) / denom_safe
    tl.store(
        Out + b * stride_ob + h * stride_oh + offs_d, out.to(Out.dtype.element_ty), mask=mask_d
    )
    if STORE_LSE:
        lse_out = tl.where(denom > 0.0, m + tl.log(denom_safe), float("-inf"))
        tl.store(Lse + b * stride_sb + h * stride_sh, lse_out)


def merge_splits(
    part_out: torch.Tensor,
    part_lse: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor | None = None,
    num_warps: int | None = None,
) -> None:
    """Merge split-K partials: ``out[b, h] = sum_s exp(lse_s - lse) * part_out[b, h, s]``.

    ``part_out [B, H, S, D]`` and ``part_lse [B, H, S]`` (float32, natural-log lse;
    an empty split has lse -inf and weighs 0) may be any strided views, e.g. a
    permuted ``[S, B, H, D]`` buffer, as long as ``D`` has unit stride. Writes
    ``out [B, H, D]`` (in its own dtype) and, when given, the merged ``lse [B, H]``.
    grid ``(B, H)``: one program per (request, query head) row.
    """
    batch, heads, splits, head_dim = part_out.shape
    if part_out.stride(-1) != 1 or out.stride(-1) != 1:
        raise ValueError("merge_splits needs a unit stride on the head dimension")
    if batch == 0 or heads == 0:
        return
    store_lse = lse is not None
    lse_strides = (lse.stride(0), lse.stride(1)) if lse is not None else (0, 0)
    _merge_splits_kernel[(batch, heads)](
        part_out,
        part_lse,
        out,
        lse if lse is not None else part_lse,  # never written when store_lse is False
        splits,
        part_out.stride(0),
        part_out.stride(1),
        part_out.stride(2),
        part_lse.stride(0),
        part_lse.stride(1),
        part_lse.stride(2),
        out.stride(0),
        out.stride(1),
        *lse_strides,
        HEAD_DIM=head_dim,
        BLOCK_S=next_pow2(splits),
        BLOCK_D=next_pow2(head_dim),
        STORE_LSE=store_lse,
        num_warps=num_warps or (1 if head_dim <= 64 else 2),
    )
