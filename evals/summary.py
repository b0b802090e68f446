"""Speed-ups and router accuracy from recorded runs (``summary.json``).

A mode's speed-up on a question is the sequential latency over the mode's latency
on that same question (each the median over repeats), so machine drift between
questions cancels. Summaries quote the median and the geometric mean of those
per-question ratios, overall, per category and on ``sot_suitable`` questions.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from evals.records import RunRecord

BASELINE = "sequential"
ROUTED = ("sequential", "sot", "graph")


def geomean(values: Iterable[float]) -> float | None:
    vals = [v for v in values if v > 0]
    return math.exp(sum(math.log(v) for v in vals) / len(vals)) if vals else None


def _median(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def per_question(records: list[RunRecord]) -> dict[tuple[Any, str], list[RunRecord]]:
    """Successful runs grouped by (question_id, mode)."""
    out: dict[tuple[Any, str], list[RunRecord]] = defaultdict(list)
    for r in records:
        if r.ok and r.latency_s is not None:
            out[(r.question_id, r.mode)].append(r)
    return out


def speedups(records: list[RunRecord], mode: str, field: str = "latency_s") -> dict[Any, float]:
    """``{question_id: baseline / mode}`` of ``field`` (median over repeats), for the
    questions both answered."""
    groups = per_question(records)
    out = {}
    for (qid, m), runs in groups.items():
        if m != mode or (qid, BASELINE) not in groups:
            continue
        mine = _median(getattr(r, field) for r in runs)
        base = _median(getattr(r, field) for r in groups[(qid, BASELINE)])
        if mine and base:
            out[qid] = base / mine
    return out


def mode_stats(records: list[RunRecord], mode: str) -> dict[str, Any]:
    """Latency, speed-up and answer-shape figures of ``mode`` over ``records``."""
    runs = [r for r in records if r.mode == mode]
    ok = [r for r in runs if r.ok and r.latency_s is not None]
    prompt = sum(r.prompt_tokens for r in ok)
    stats: dict[str, Any] = {
        "runs": len(runs),
        "errors": len(runs) - len(ok),
        "questions": len({r.question_id for r in ok}),
        "median_latency_s": _median(r.latency_s for r in ok),
        "median_ttft_s": _median(r.ttft_s for r in ok),
        "median_skeleton_s": _median(r.skeleton_s for r in ok),
        "median_generated_tokens": _median(r.generated_tokens for r in ok),
        "mean_points": statistics.fmean([r.num_points for r in ok]) if ok else None,
        "fallback_rate": statistics.fmean([r.fallback for r in ok]) if ok else None,
        "cache_hit_ratio": sum(r.cached_tokens for r in ok) / prompt if prompt else None,
    }
    if mode != BASELINE:
        sp = list(speedups(records, mode).values())
        ttft = list(speedups(records, mode, "ttft_s").values())
        stats.update(
            paired=len(sp),
            median_speedup=_median(sp),
            geomean_speedup=geomean(sp),
            min_speedup=min(sp, default=None),
            max_speedup=max(sp, default=None),
            median_ttft_speedup=_median(ttft),
        )
    return stats


def router_stats(records: list[RunRecord]) -> dict[str, Any] | None:
    """The ``auto`` runs' routes against ``sot_suitable``: a skeleton mode (sot or
    graph) counts as "suitable", sequential as "not suitable"."""
    routed = {}
    for r in records:
        if r.mode == "auto" and r.ok and r.sot_suitable is not None and r.routed_mode:
            routed[r.question_id] = (r.sot_suitable, r.routed_mode, r.category)
    if not routed:
        return None
    confusion = {label: dict.fromkeys(ROUTED, 0) for label in ("suitable", "not_suitable")}
    correct = 0
    for suitable, pick, _ in routed.values():
        confusion["suitable" if suitable else "not_suitable"][pick] += 1
        correct += suitable == (pick != "sequential")
    return {"questions": len(routed), "accuracy": correct / len(routed), "confusion": confusion}


def summarize(records: list[RunRecord], modes: list[str]) -> dict[str, Any]:
    """``summary.json`` without the run configuration and the judge."""
    categories = sorted({r.category for r in records})
    labelled = [r for r in records if r.sot_suitable is not None]
    suitable = [r for r in labelled if r.sot_suitable]
    return {
        "overall": {m: mode_stats(records, m) for m in modes},
        "by_category": {
            c: {m: mode_stats([r for r in records if r.category == c], m) for m in modes}
            for c in categories
        },
        "sot_suitable": {m: mode_stats(suitable, m) for m in modes} if labelled else None,
        "router": router_stats(records),
        "checks": {m: check_totals([r for r in records if r.mode == m]) for m in modes},
    }


def check_totals(records: list[RunRecord]) -> dict[str, int]:
    """How many answers failed each automatic quality check (see ``evals.quality``)."""
    totals: dict[str, int] = defaultdict(int)
    for r in records:
        for name, value in r.checks.items():
            if isinstance(value, bool):
                totals[name] += value
    return dict(totals)
