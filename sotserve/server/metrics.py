"""Prometheus metrics for ``GET /metrics``.

Request counters and latency histograms are updated by the handlers; the engine's
gauges (running and waiting requests, KV slots, prefix-cache hits) are read from
:meth:`engine.AsyncEngine.stats` at scrape time by a custom collector, so they are
never stale and cost nothing between scrapes. Each app gets its own registry, so
several servers can live in one process (as in the tests).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from engine.stats import EngineStats
from sotserve.backends.replicas import Replica

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Latency buckets from 10 ms (a cached first token on a GPU) to 5 minutes (a long
# answer on a small CPU).
_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 300)


class EngineCollector(Collector):
    """Engine gauges and counters read from ``stats()`` at each scrape."""

    def __init__(self, stats: Callable[[], EngineStats]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        st = self._stats()
        gauges = [
            (st.running, "sotserve_engine_running_requests", "requests being decoded"),
            (st.waiting, "sotserve_engine_waiting_requests", "requests waiting for admission"),
            (
                st.kv_slots_used,
                "sotserve_kv_slots_used",
                "KV slots held by running requests, including the cached prefixes they lock",
            ),
            (st.kv_slots_total, "sotserve_kv_slots_total", "KV slots in the pool"),
            (st.cache_size, "sotserve_prefix_cache_tokens", "tokens held by the radix cache"),
        ]
        for value, name, doc in gauges:
            yield GaugeMetricFamily(name, doc, value=float(value))
        counters = [
            (st.prompt_tokens, "sotserve_engine_prompt_tokens", "prompt tokens admitted"),
            (
                st.cached_tokens,
                "sotserve_engine_cached_prompt_tokens",
                "prompt tokens served by the prefix cache",
            ),
            (st.generated_tokens, "sotserve_engine_generated_tokens", "tokens generated"),
            (st.steps, "sotserve_engine_steps", "engine forward steps"),
            (st.preemptions, "sotserve_engine_preemptions", "requests preempted for KV space"),
            (st.aborted_requests, "sotserve_engine_aborted_requests", "requests aborted"),
            (
                st.draft_tokens,
                "sotserve_engine_spec_draft_tokens",
                "speculative draft tokens verified (vLLM: spec_decode_num_draft_tokens)",
            ),
            (
                st.accepted_draft_tokens,
                "sotserve_engine_spec_accepted_tokens",
                "speculative draft tokens accepted",
            ),
        ]
        for value, name, doc in counters:
            yield CounterMetricFamily(name, doc, value=float(value))
        yield GaugeMetricFamily(
            "sotserve_prefix_cache_hit_ratio",
            "share of admitted prompt tokens served by the prefix cache, since start",
            value=st.cached_tokens / st.prompt_tokens if st.prompt_tokens else 0.0,
        )


class BackendCollector(Collector):
    """Per-backend counters and gauges of remote engines (``sotserve serve
    --backend``), read from the replicas at each scrape, labelled by URL."""

    def __init__(self, replicas: Sequence[Replica]) -> None:
        self._replicas = replicas

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        replicas = self._replicas
        counters = [
            ("sotserve_backend_requests", "completion requests sent", "requests"),
            ("sotserve_backend_errors", "completion requests that failed", "errors"),
            ("sotserve_backend_request_seconds", "time spent in requests", "request_seconds"),
            ("sotserve_backend_prompt_tokens", "prompt tokens sent", "prompt_tokens"),
            (
                "sotserve_backend_cached_prompt_tokens",
                "prompt tokens the backend served from its prefix cache",
                "cached_tokens",
            ),
            ("sotserve_backend_answers", "answers routed to the backend", "answers"),
            (
                "sotserve_backend_affinity_answers",
                "answers routed there for the prefix it holds",
                "affinity_hits",
            ),
        ]
        for name, doc, field in counters:
            family = CounterMetricFamily(name, doc, labels=["backend"])
            for r in replicas:
                family.add_metric([r.url], float(getattr(r.stats, field)))
            yield family
        up = GaugeMetricFamily(
            "sotserve_backend_up", "1 while the backend is healthy", labels=["backend"]
        )
        busy = GaugeMetricFamily(
            "sotserve_backend_in_flight", "requests running on the backend", labels=["backend"]
        )
        for r in replicas:
            up.add_metric([r.url], 1.0 if r.healthy else 0.0)
            busy.add_metric([r.url], float(r.in_flight))
        yield up
        yield busy


class Metrics:
    """The server's metrics, in a registry of their own: the engine's, read from
    ``engine_stats``, or remote backends', from ``backends``."""

    def __init__(
        self,
        engine_stats: Callable[[], EngineStats] | None = None,
        backends: BackendCollector | None = None,
    ) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "sotserve_requests", "HTTP requests by endpoint and status",
            ["endpoint", "status"], registry=r,
        )  # fmt: skip
        self.request_latency = Histogram(
            "sotserve_request_duration_seconds", "HTTP request duration by endpoint",
            ["endpoint"], buckets=_BUCKETS, registry=r,
        )  # fmt: skip
        self.answers = Counter(
            "sotserve_answers", "chat answers by the mode that answered and how they ended",
            ["mode", "outcome"], registry=r,
        )  # fmt: skip
        self.ttft = Histogram(
            "sotserve_time_to_first_token_seconds",
            "chat: time from request to the first token of the answer, by mode",
            ["mode"], buckets=_BUCKETS, registry=r,
        )  # fmt: skip
        self.e2e = Histogram(
            "sotserve_e2e_latency_seconds", "chat: time from request to the whole answer",
            ["mode"], buckets=_BUCKETS, registry=r,
        )  # fmt: skip
        self.tokens = Counter(
            "sotserve_tokens", "chat tokens over every request of an answer, by mode and kind",
            ["mode", "kind"], registry=r,
        )  # fmt: skip
        self.points = Histogram(
            "sotserve_points_per_answer", "points per skeleton answer",
            ["mode"], buckets=(2, 3, 4, 5, 6, 8, 10, 12, 16), registry=r,
        )  # fmt: skip
        self.fallbacks = Counter(
            "sotserve_fallbacks", "skeleton answers that fell back to sequential decoding",
            registry=r,
        )  # fmt: skip
        self.in_flight = Gauge(
            "sotserve_requests_in_flight",
            "engine requests admitted and running (a skeleton answer runs several)",
            registry=r,
        )
        self.queued = Gauge(
            "sotserve_requests_queued", "answers and completions waiting for room", registry=r
        )
        self.rejected = Counter(
            "sotserve_rejected", "requests refused at the concurrency limit (429)", registry=r
        )
        if engine_stats is not None:
            r.register(EngineCollector(engine_stats))
        if backends is not None:
            r.register(backends)

    def render(self) -> bytes:
        return generate_latest(self.registry)
