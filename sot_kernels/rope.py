"""Rotary position embedding (the "neox" half-split layout used by Llama)."""

from __future__ import annotations

import torch


def rope_cos_sin_cache(
    inv_freq: torch.Tensor, max_positions: int, scaling: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Precompute ``cos`` and ``sin`` tables of shape ``[max_positions, head_dim]``.

    The values equal what ``transformers`` computes per call: the same float32
    product of position and inverse frequency, duplicated over both halves, so the
    engine can gather rows by position instead of recomputing them every layer.
    """
    positions = torch.arange(max_positions, dtype=torch.float32)
    freqs = positions[:, None] * inv_freq.float()[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos() * scaling, emb.sin() * scaling


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate every head of ``x [T, H, D]`` by per-token ``cos``/``sin [T, D]``.

    The model passes q and k stacked along the head axis, so one call rotates both.
    """
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    return x * cos + _rotate_half(x) * sin


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q [T, Hq, D]`` and ``k [T, Hk, D]`` by per-token ``cos``/``sin [T, D]``."""
    return rotate(q, cos, sin), rotate(k, cos, sin)
