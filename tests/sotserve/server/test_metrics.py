"""``/metrics``' engine gauges and counters come from the fields of ``EngineStats``."""

from __future__ import annotations

from engine.stats import EngineStats
from sotserve.server.metrics import Metrics


def _samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_engine_stats_are_exported_at_each_scrape():
    busy = EngineStats(
        running=2, waiting=1, kv_slots_used=40, kv_slots_total=100, cache_size=64,
        prompt_tokens=200, cached_tokens=150, generated_tokens=30, steps=12,
        preemptions=1, aborted_requests=3, draft_tokens=9, accepted_draft_tokens=4,
    )  # fmt: skip
    snapshot = [busy]
    metrics = Metrics(lambda: snapshot[0])
    m = _samples(metrics.render().decode())
    assert m["sotserve_engine_running_requests"] == 2
    assert m["sotserve_engine_waiting_requests"] == 1
    assert m["sotserve_kv_slots_used"] == 40 and m["sotserve_kv_slots_total"] == 100
    assert m["sotserve_prefix_cache_tokens"] == 64
    assert m["sotserve_engine_prompt_tokens_total"] == 200
    assert m["sotserve_engine_cached_prompt_tokens_total"] == 150
    assert m["sotserve_engine_generated_tokens_total"] == 30
    assert m["sotserve_engine_steps_total"] == 12
    assert m["sotserve_engine_preemptions_total"] == 1
    assert m["sotserve_engine_aborted_requests_total"] == 3
    assert m["sotserve_engine_spec_draft_tokens_total"] == 9
    assert m["sotserve_engine_spec_accepted_tokens_total"] == 4
    assert m["sotserve_prefix_cache_hit_ratio"] == 0.75
    snapshot[0] = EngineStats()  # read again at the next scrape; no division by zero
    m = _samples(metrics.render().decode())
    assert m["sotserve_engine_running_requests"] == 0
    assert m["sotserve_prefix_cache_hit_ratio"] == 0.0
