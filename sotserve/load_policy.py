"""When the engine is too busy for a skeleton: the load half of ``auto``.

A skeleton answer buys speed with parallel requests: its points decode in the same
batch steps, so each extra point costs little while the batch has room. On a busy
engine the points compete with everyone else's requests and the gain shrinks
(measured by ``python -m evals.latency --concurrency N``, see the README), until
extra requests slow every answer. ``auto`` then answers sequentially:

- when the engine already has ``max_load`` or more requests running or waiting, or
  this planner's answers in flight are expected to hold that many
  (:class:`PlannedLoad`: questions that arrive together decide before any of their
  requests reaches the engine, so the engine's own count would show each of them an
  idle engine);
- when requests wait (the engine is at its running limit or out of KV slots);
- when less than ``min_kv_free`` of the KV slots are free (the points would
  preempt someone).

The default ``max_load`` comes from that measurement on this machine and can be
overridden (``sotserve serve --auto-max-load N``; 0 turns the load check off).
"""

from __future__ import annotations

from dataclasses import dataclass

from sotserve.backends.base import Backend, EngineLoad

# Engine requests (running + waiting, or planned by this planner) at and above which
# auto stops starting skeleton answers. Measured on this machine (2 CPU cores,
# SmolLM2-135M int4 with prompt-lookup drafts, --max-tokens 256, evals.latency
# --concurrency C on 27 vicuna80 questions, 16 suitable ones at C = 16; see README):
# alone, sot's median latency beat sequential's by 1.36-1.41x at 1 concurrent question,
# 1.32-1.51x at 4, 1.13x at 6, 1.01-1.25x at 8 and 1.06-1.09x at 16 (one run per
# figure; the ranges are several runs). But skeletons started among sequential
# answers slow those down, since every step then carries the points' rows: with a
# limit of 30, 12 sequential answers beside 4 skeleton ones took 14.7 s against 10.8 s
# in an all-sequential batch, and auto's median was 1.16x the better mode's at 8
# questions and 1.43x at 16. With 10 (about two skeleton answers, or ten sequential
# ones) it was 1.03x at 8 and 1.11x at 16, and at 4 (1.19x against 1.26x) and 1
# it decides as before.
DEFAULT_MAX_LOAD = 10
DEFAULT_MIN_KV_FREE = 0.1
# The requests a skeleton answer is expected to hold before its skeleton says how many
# points it has: a sot answer made 4.5 on average in the measurement above (a skeleton,
# 3.1 points, and the odd fallback; 5.2 in an earlier run), rounded up.
SKELETON_REQUESTS = 5


class PlannedLoad:
    """The engine requests one planner's answers in flight are expected to hold, per
    engine (a set of replicas gives each answer one of them).

    An answer counts one request from the moment it starts (while it routes and then
    answers sequentially) and :data:`SKELETON_REQUESTS` once it plans a skeleton, until
    it ends. The engine only sees requests once they are sent, so without this count a
    burst of questions would all find an idle engine and all start skeletons.
    """

    def __init__(self) -> None:
        # by the engine's identity: a backend need not be hashable (nor compare by it)
        self._requests: dict[int, int] = {}

    def on(self, backend: Backend) -> int:
        """The requests planned on ``backend``."""
        return self._requests.get(id(backend), 0)

    def add(self, backend: Backend, n: int) -> None:
        """Count ``n`` more requests on ``backend`` (an answer's start, or its
        skeleton's extra ones)."""
        self._requests[id(backend)] = self.on(backend) + n

    def remove(self, backend: Backend, n: int) -> None:
        """Stop counting ``n`` requests on ``backend`` (an answer that ended)."""
        left = self.on(backend) - n
        if left < 0:
            raise ValueError(f"removing {n} planned requests of {self.on(backend)}")
        if left:
            self._requests[id(backend)] = left
        else:  # (an answer that failed before it counted anything removes 0)
            self._requests.pop(id(backend), None)


@dataclass(frozen=True)
class LoadPolicy:
    """Thresholds of load-aware routing (see the module docstring)."""

    max_load: int = DEFAULT_MAX_LOAD  # 0: never hold back a skeleton for load
    min_kv_free: float = DEFAULT_MIN_KV_FREE

    def __post_init__(self) -> None:
        if self.max_load < 0:
            raise ValueError("max_load must be at least 0")
        if not 0.0 <= self.min_kv_free < 1.0:
            raise ValueError("min_kv_free must be in [0, 1)")

    def too_busy(self, load: EngineLoad, planned: int = 0) -> str | None:
        """Why a skeleton answer should not start on an engine with ``load`` while other
        answers of this planner are expected to hold ``planned`` requests, or None. The
        larger of the two counts is the load: the planned requests that were sent are in
        the engine's count too."""
        if self.max_load == 0:
            return None
        if load.requests >= self.max_load:
            return f"engine busy: {load.requests} requests in flight (limit {self.max_load})"
        if planned >= self.max_load:
            return (
                f"engine busy: this service's answers in flight hold about {planned} "
                f"requests (limit {self.max_load})"
            )
        if load.waiting > 0:
            return f"engine saturated: {load.waiting} requests waiting"
        if load.kv_free is not None and load.kv_free < self.min_kv_free:
            return f"engine short of KV slots: {load.kv_free:.0%} free"
        return None
