"""Engine statistics: running totals, and the typed snapshot that ``stats()`` returns.

The scheduler bumps :class:`Counters` where things happen (a request arrives, a step
runs, a request finishes). :meth:`engine.llm_engine.LLMEngine.stats` adds the gauges
read off the KV pool, the prefix cache and the model runner, and hands back one
frozen :class:`EngineStats`: a snapshot that can cross threads (``AsyncEngine``
publishes one after every step) without being copied.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class Counters:
    """Totals since the engine started, kept by the scheduler."""

    prompt_tokens: int = 0  # prompt tokens of every request added
    cached_tokens: int = 0  # tokens served by the prefix cache at admission
    computed_prefill_tokens: int = 0  # prompt (and recomputed) tokens run through the model
    decode_tokens: int = 0  # one-token decode steps, summed over requests
    generated_tokens: int = 0  # tokens sampled
    steps: int = 0  # forward passes
    batched_requests: int = 0  # requests per step, summed over steps
    max_batch_size: int = 0  # most requests in one step
    finished_requests: int = 0  # ended by a stop rule or a length limit
    aborted_requests: int = 0
    preemptions: int = 0  # requests sent back to the queue for KV space
    draft_tokens: int = 0  # speculative draft tokens verified
    accepted_draft_tokens: int = 0  # of those, kept


@dataclass(frozen=True)
class EngineStats:
    """What the engine reports about itself: counters since start plus current gauges.

    Counters (never decrease): ``prompt_tokens``, ``cached_tokens`` (prompt tokens the
    prefix cache served; a preempted request counts again when readmitted),
    ``computed_prefill_tokens``, ``decode_tokens``, ``generated_tokens``, ``steps``,
    ``batched_requests``, ``finished_requests``, ``aborted_requests``,
    ``evicted_tokens`` (prefix-cache slots freed), ``preemptions``, ``graph_steps``
    (steps that replayed a captured CUDA graph), ``draft_tokens`` and
    ``accepted_draft_tokens`` (speculative drafts verified, and the part kept).
    ``max_batch_size`` is the largest
    step so far and ``mean_batch_size`` is ``batched_requests / steps``.

    Gauges (now): ``running`` and ``waiting`` requests, ``kv_slots_used`` (held by
    running requests, including the cached prefixes they lock), ``kv_slots_total``,
    ``cache_size`` (tokens the prefix cache holds).
    """

    prompt_tokens: int = 0
    computed_prefill_tokens: int = 0
    decode_tokens: int = 0
    generated_tokens: int = 0
    steps: int = 0
    batched_requests: int = 0
    max_batch_size: int = 0
    finished_requests: int = 0
    aborted_requests: int = 0
    running: int = 0
    waiting: int = 0
    kv_slots_used: int = 0
    kv_slots_total: int = 0
    cache_size: int = 0
    cached_tokens: int = 0
    evicted_tokens: int = 0
    preemptions: int = 0
    mean_batch_size: float = 0.0
    graph_steps: int = 0
    draft_tokens: int = 0
    accepted_draft_tokens: int = 0

    def as_dict(self) -> dict[str, int | float]:
        """The fields by name, for JSON output and logs."""
        return dataclasses.asdict(self)
