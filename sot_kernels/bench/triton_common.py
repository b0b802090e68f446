"""What the Triton sections (``decode`` and ``extend``) share: the scattered K/V pool
their batches read, the check that ``--device`` can run Triton, and their table header."""

from __future__ import annotations

import argparse

import torch


def _scattered_pool(
    tokens: int, hk: int, d: int, layers: int, dtype: torch.dtype, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """K/V pools ``[layers, 1 + tokens, Hk, D]`` and the ``tokens`` slots to use, a
    random permutation of 1..tokens (slot 0 is the pool's padding slot), so no request
    reads contiguous rows, as in a pool that has served for a while."""
    device = g.device
    shape = (layers, 1 + tokens, hk, d)
    k = torch.randn(shape, generator=g, device=device, dtype=dtype)
    v = torch.randn(shape, generator=g, device=device, dtype=dtype)
    slots = torch.randperm(tokens, generator=g, device=device) + 1
    return k, v, slots


def _triton_device(args: argparse.Namespace, section: str) -> torch.device | None:
    """``--device`` if the Triton kernels can run there, else None after a skip line."""
    device = torch.device(args.device)
    if device.type == "cuda":
        if torch.cuda.is_available():
            return device
        print(f"{section}: no CUDA, skipped")
        return None
    if device.type != "cpu":
        print(f"{section}: Triton kernels need cuda or cpu, not {device.type}; skipped")
        return None
    try:
        import triton
    except ImportError:
        print(f"{section}: triton is not installed, skipped")
        return None
    if not triton.knobs.runtime.interpret:
        print(
            f"{section}: compiled Triton needs CUDA; on the CPU set TRITON_INTERPRET=1 "
            "(tiny shapes only), skipped"
        )
        return None
    return device


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu, Triton interpreter"


def _kernel_header(args: argparse.Namespace, section: str, device: torch.device) -> str:
    return (
        f"{section} ({_device_name(device)}): Hq={args.hq} Hk={args.hk} D={args.head_dim}, "
        f"{args.layers} layers per call, {args.dtype}, median of {args.repeats}"
    )
