"""RMSNorm, plain and fused with the residual add."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * x / rms(x)``, computed in float32 like Llama's reference."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        # One dispatch instead of six Python-level ops (torch composes the same math
        # on CPU); bit-identical to the formula below in float32, which a test checks.
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(rms_norm(x + residual), x + residual)``: the pre-norm block pattern."""
    residual = x + residual
    return rms_norm(residual, weight, eps), residual
