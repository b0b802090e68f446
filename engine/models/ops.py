"""The model's small ops (RMSNorm, RMSNorm with the residual add, SiLU-and-mul): torch
or Triton, chosen apart from the attention backend."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from sot_kernels import activation, norm

OPS_KINDS = ("torch", "triton")


@dataclass(frozen=True)
class Ops:
    """The norm and activation kernels a model's layers call."""

    rms_norm: Callable[..., torch.Tensor]
    add_rms_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    silu_and_mul: Callable[[torch.Tensor], torch.Tensor]


TORCH_OPS = Ops(norm.rms_norm, norm.add_rms_norm, activation.silu_and_mul)


def create_ops(kind: str | None, device: torch.device) -> Ops:
    """``"torch"`` or ``"triton"`` ops; ``None``: Triton's fused kernels on CUDA, torch's
    elsewhere. The engine names the same family as its attention backend, so a Triton
    engine tested in the interpreter runs every Triton kernel."""
    if kind is None:
        kind = "triton" if device.type == "cuda" else "torch"
    if kind == "torch":
        return TORCH_OPS
    if kind == "triton":
        # imported here so torch ops never need triton
        from sot_kernels import triton_ops

        return Ops(
            triton_ops.rms_norm_triton, triton_ops.add_rms_norm_triton,
            triton_ops.silu_and_mul_triton,
        )  # fmt: skip
    raise ValueError(f"unknown ops {kind!r}; available: " + ", ".join(OPS_KINDS))
