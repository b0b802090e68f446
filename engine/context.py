"""The per-step forward context.

The model runner fills one :class:`ForwardContext` per step and installs it with
:func:`set_context`; attention layers read it with :func:`get_context`. Model code
therefore never threads batch metadata through its layers (nano-vllm's pattern).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from engine.kv_cache import KVPool

if TYPE_CHECKING:  # annotation only: prefix_groups pulls in the request module
    from engine.prefix_groups import PrefixGroup


@dataclass
class ForwardContext:
    """What one forward over a flat batch of new tokens needs to know.

    The batch holds ``num_decodes`` one-query rows first (decodes, and the tokens of a
    draft or jump-forward chunk, each with the keys up to it), then prefill chunks.
    For entry ``i``: ``rows[i]`` is its ``req_to_token`` row, ``q_lens[i]`` its new
    tokens this step and ``kv_lens[i]`` its total tokens after this step (cached
    prefix + new). ``out_slots[t]`` is the KV slot that new token ``t`` writes.
    """

    positions: torch.Tensor
    out_slots: torch.Tensor
    rows: list[int]
    q_lens: list[int]
    kv_lens: list[int]
    num_decodes: int
    req_to_token: torch.Tensor
    kv_pool: KVPool
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None
    # decodes that share a cached prefix, for backends that compute the shared part
    # of attention once per group
    prefix_groups: list[PrefixGroup] = field(default_factory=list)
    # Backend-specific metadata that ``AttentionBackend.plan`` builds once per step and
    # the backend's own layers read back (each backend knows its concrete type).
    attn: object | None = None


_CONTEXT: ForwardContext | None = None


def set_context(ctx: ForwardContext | None) -> None:
    global _CONTEXT
    _CONTEXT = ctx


def get_context() -> ForwardContext:
    if _CONTEXT is None:
        raise RuntimeError("no forward context: call the model through the ModelRunner")
    return _CONTEXT
