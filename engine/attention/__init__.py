"""Attention over the token-slot KV pool, one backend per file (as mini-sglang lays
them out): the interface (:mod:`.base`), the plans both build (:mod:`.common`), the
torch backend for the CPU (:mod:`.torch_backend`), the Triton one for CUDA
(:mod:`.triton_backend`), and :func:`create_backend`, which picks one."""

from __future__ import annotations

import torch

from engine.attention.base import AttentionBackend
from engine.attention.torch_backend import TorchAttentionBackend
from engine.attention.triton_backend import TritonAttentionBackend

__all__ = [
    "AttentionBackend",
    "TorchAttentionBackend",
    "TritonAttentionBackend",
    "create_backend",
]

BACKENDS = ("torch", "triton")


def default_backend_name(device: torch.device) -> str:
    """The backend a device gets when none is named: triton on CUDA, torch elsewhere."""
    return "triton" if device.type == "cuda" else "torch"


def create_backend(name: str | None, device: torch.device) -> AttentionBackend:
    """Pick an attention backend by name; ``None`` means the device default (triton on
    CUDA, torch on the CPU)."""
    if name is None:
        name = default_backend_name(device)
    if name == "torch":
        return TorchAttentionBackend()
    if name == "triton":
        return TritonAttentionBackend()
    raise ValueError(f"unknown attention backend {name!r}; available: " + ", ".join(BACKENDS))
