"""The attention-backend interface: what the model's attention layers call."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from engine.context import ForwardContext
from sot_kernels import rope


class AttentionBackend(ABC):
    """Attention over the token-slot KV pool for one mixed batch.

    ``plan`` runs once per step and derives whatever index tensors the backend
    needs from the context; ``forward`` runs once per layer, stores the new
    tokens' K/V into their slots and returns the attention output.
    """

    @abstractmethod
    def plan(self, ctx: ForwardContext) -> None:
        """Build per-step metadata into ``ctx.attn``."""

    def forward_rope(
        self,
        qk: torch.Tensor,
        v: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        layer: int,
        scale: float,
    ) -> torch.Tensor:
        """:meth:`forward` for q and k not yet rotated by RoPE, stacked along the head
        axis (``qk [T, Hq + Hk, D]``, q first; ``v [T, Hk, D]``; ``cos``/``sin [T, D]``).

        The default rotates q and k with one call and calls :meth:`forward`; a backend
        may fuse the rotation with storing K/V into the pool instead.
        """
        nq = qk.shape[1] - v.shape[1]
        qk = rope.rotate(qk, cos, sin)
        return self.forward(qk[:, :nq], qk[:, nq:], v, layer, scale)

    @abstractmethod
    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, scale: float
    ) -> torch.Tensor:
        """``q [T, Hq, D]``, ``k``/``v [T, Hk, D]`` for the step's new tokens -> ``[T, Hq, D]``."""

    #: whether :meth:`plan_graph_decode` is implemented (decode steps can be CUDA graphs)
    supports_graphs: bool = False

    def plan_graph_decode(
        self, ctx: ForwardContext, rows: torch.Tensor, kv_lens: torch.Tensor, max_kv_len: int
    ) -> None:
        """Plan a step of ``len(rows)`` one-token decodes for CUDA graph capture.

        ``rows`` and ``kv_lens`` are device buffers that later steps overwrite in
        place, and ``ctx``'s host-side lists are empty, so the plan may depend on
        shapes and on ``max_kv_len`` (the longest any request can be) but never on
        values. A ``kv_lens`` entry of 0 marks a padding row: its output is ignored.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot run decode steps as CUDA graphs")
