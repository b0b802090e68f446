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
- when :data:`DEFAULT_MAX_SEQUENTIAL` or more of this planner's other answers in flight
  hold a single request (answering sequentially, or still routing): every batch step
  would carry the skeleton's point rows beside theirs, slowing each of them for a
  gain that is the skeleton answer's alone;
- when requests wait (the engine is at its running limit or out of KV slots);
- when less than ``min_kv_free`` of the KV slots are free (the points would
  preempt someone).

The defaults come from that measurement on this machine and can be overridden
(``sotserve serve --auto-max-load N --auto-max-sequential M``; 0 turns a check off).
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
# Sequential answers in flight (this planner's, answering or still routing) at and above
# which auto starts no skeleton beside them. A skeleton's point rows slow every
# sequential answer in the same steps, and the CPU steps are compute-bound, so the cost
# grows with how many there are, while the gain is the skeleton answer's alone. The
# load limit alone could not tell the two cases of the same request count apart
# (measured as above, 2026-12-04, limit 10): at 4 concurrent questions, up to two
# skeletons beside one or two sequential answers, auto's median was 1.02x and 0.93x the
# better mode's; at 8, one skeleton beside seven sequential answers slowed most of those by
# 1.07-1.34x, and auto's median was 1.34x and 1.22x, slower than all-sequential (a limit
# of 7, which started none at 8, gave 1.15x there but 1.13x at 4). With this limit auto
# started none at 8 (1.03x sequential's median; sot was 1.20x faster than both), and at
# 4, where at most 3 answers are beside, it decides as before.
DEFAULT_MAX_SEQUENTIAL = 4
DEFAULT_MIN_KV_FREE = 0.1
# The requests a skeleton answer is expected to hold before its skeleton says how many
# points it has: a sot answer made 4.5 on average in the measurement above (a skeleton,
# 3.1 points, and the odd fallback; 5.2 in an earlier run), rounded up.
SKELETON_REQUESTS = 5


@dataclass
class _Planned:
    requests: int = 0
    single: int = 0  # answers holding a single request (routing, or sequential)


class PlannedLoad:
    """The engine requests one planner's answers in flight are expected to hold, per
    engine (a set of replicas gives each answer one of them).

    An answer counts one request from the moment it starts (while it routes and then
    answers sequentially) and :data:`SKELETON_REQUESTS` once it plans a skeleton, until
    it ends. The engine only sees requests once they are sent, so without this count a
    burst of questions would all find an idle engine and all start skeletons. It also
    counts the answers that hold a single request, which a skeleton would slow.
    """

    def __init__(self) -> None:
        # by the engine's identity: a backend need not be hashable (nor compare by it)
        self._planned: dict[int, _Planned] = {}

    def on(self, backend: Backend) -> int:
        """The requests planned on ``backend``."""
        counts = self._planned.get(id(backend))
        return counts.requests if counts else 0

    def single_on(self, backend: Backend) -> int:
        """The answers on ``backend`` that hold a single request: routing, or answering
        sequentially."""
        counts = self._planned.get(id(backend))
        return counts.single if counts else 0

    def start(self, backend: Backend) -> None:
        """An answer starts on ``backend``: one request, until it plans a skeleton."""
        counts = self._planned.setdefault(id(backend), _Planned())
        counts.requests += 1
        counts.single += 1

    def plan_skeleton(self, backend: Backend) -> None:
        """An answer that started on ``backend`` plans a skeleton: its count becomes
        :data:`SKELETON_REQUESTS`."""
        counts = self._planned.get(id(backend))
        if counts is None or counts.single < 1:
            raise ValueError("plan_skeleton of an answer that did not start")
        counts.requests += SKELETON_REQUESTS - 1
        counts.single -= 1

    def end(self, backend: Backend, skeleton: bool) -> None:
        """An answer that started on ``backend`` ended; ``skeleton``: it had planned one."""
        counts = self._planned.get(id(backend))
        held = SKELETON_REQUESTS if skeleton else 1
        if counts is None or counts.requests < held or (not skeleton and counts.single < 1):
            raise ValueError("end of an answer that was not counted")
        counts.requests -= held
        counts.single -= 0 if skeleton else 1
        if not counts.requests:
            del self._planned[id(backend)]


@dataclass(frozen=True)
class LoadPolicy:
    """Thresholds of load-aware routing (see the module docstring)."""

    max_load: int = DEFAULT_MAX_LOAD  # 0: never hold back a skeleton for load
    min_kv_free: float = DEFAULT_MIN_KV_FREE
    max_sequential: int = DEFAULT_MAX_SEQUENTIAL  # 0: not by sequential answers beside

    def __post_init__(self) -> None:
        if self.max_load < 0:
            raise ValueError("max_load must be at least 0")
        if self.max_sequential < 0:
            raise ValueError("max_sequential must be at least 0")
        if not 0.0 <= self.min_kv_free < 1.0:
            raise ValueError("min_kv_free must be in [0, 1)")

    @classmethod
    def overriding(cls, max_load: int | None, max_sequential: int | None) -> LoadPolicy | None:
        """The policy with the limits given (the flags ``--auto-max-load`` and
        ``--auto-max-sequential``; None: the default), or None when neither is."""
        given = {
            k: v for k, v in (("max_load", max_load), ("max_sequential", max_sequential))
            if v is not None
        }  # fmt: skip
        return cls(**given) if given else None

    def too_busy(self, load: EngineLoad, planned: int = 0, sequential: int = 0) -> str | None:
        """Why a skeleton answer should not start on an engine with ``load`` while other
        answers of this planner are expected to hold ``planned`` requests, ``sequential``
        of them answers of a single request, or None. The larger of the two request
        counts is the load: the planned requests that were sent are in the engine's
        count too."""
        if self.max_sequential and sequential >= self.max_sequential:
            return (
                f"{sequential} answers in flight decode sequentially (limit "
                f"{self.max_sequential}): a skeleton's points would slow each of them"
            )
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
