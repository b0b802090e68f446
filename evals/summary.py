"""Speed-ups and router accuracy from recorded runs (``summary.json``).

A mode's speed-up on a question is the sequential latency over the mode's latency
on that same question (each the median over repeats), so machine drift between
questions cancels. Summaries quote the median and the geometric mean of those
per-question ratios, overall, per category and on ``sot_suitable`` questions.

A shorter answer is faster to write, so beside it is the equal-length speed-up: the
time sequential took to reach as many answer tokens as the mode's answer has, over
the mode's latency (see :func:`equal_length_speedup`), and each mode's answer
tokens per second of latency.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from evals.records import AnswerTick, RunRecord

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


def time_to_tokens(ticks: Sequence[AnswerTick], n: int) -> tuple[float, bool] | None:
    """When an answer with token timeline ``ticks`` reached its ``n``-th token, and
    whether that time is extrapolated.

    If the answer has fewer than ``n`` tokens, the time is extrapolated at its own
    decode rate: its last tick's time plus the missing tokens times its mean time per
    token after the first tick. None if ``n < 1``, or if it must extrapolate from an
    answer with no token after its first tick (no rate to go on).
    """
    if n < 1 or not ticks:
        return None
    total = 0
    for tick in ticks:
        total += tick.tokens
        if total >= n:
            return tick.t_s, False
    after_first = total - ticks[0].tokens
    if after_first <= 0:
        return None
    per_token = (ticks[-1].t_s - ticks[0].t_s) / after_first
    return ticks[-1].t_s + (n - total) * per_token, True


def equal_length_speedup(
    sequential: Sequence[AnswerTick], tokens: int, latency_s: float
) -> tuple[float, bool] | None:
    """``t_seq(tokens) / latency_s``: the time the sequential answer (token timeline
    ``sequential``) took to reach ``tokens`` tokens, over the latency of a mode's
    answer of ``tokens`` tokens; and whether ``t_seq`` was extrapolated (the
    sequential answer is shorter; see :func:`time_to_tokens`). None without a figure.
    """
    if latency_s <= 0:
        return None
    reached = time_to_tokens(sequential, tokens)
    if reached is None:
        return None
    t_seq, extrapolated = reached
    return t_seq / latency_s, extrapolated


def equal_length_speedups(records: list[RunRecord], mode: str) -> dict[Any, tuple[float, bool]]:
    """``{question_id: (equal-length speed-up, extrapolated)}`` of ``mode``: each run
    against the sequential run of the same repeat (else the question's first), the
    median over repeats; extrapolated if any repeat's figure was."""
    groups = per_question(records)
    out = {}
    for (qid, m), runs in groups.items():
        base = [r for r in groups.get((qid, BASELINE), []) if r.answer_ticks]
        if m != mode or not base:
            continue
        figures = []
        for r in runs:
            seq = next((b for b in base if b.repeat == r.repeat), base[0])
            fig = equal_length_speedup(seq.answer_ticks, r.answer_tokens, r.latency_s or 0.0)
            if fig is not None:
                figures.append(fig)
        if figures:
            median = statistics.median(f for f, _ in figures)
            out[qid] = (median, any(x for _, x in figures))
    return out


def _tokens_per_s(r: RunRecord) -> float | None:
    return r.answer_tokens / r.latency_s if r.answer_ticks and r.latency_s else None


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
        "median_answer_tokens": _median(r.answer_tokens if r.answer_ticks else None for r in ok),
        "median_answer_tokens_per_s": _median(_tokens_per_s(r) for r in ok),
        "mean_points": statistics.fmean([r.num_points for r in ok]) if ok else None,
        "fallback_rate": statistics.fmean([r.fallback for r in ok]) if ok else None,
        "cache_hit_ratio": sum(r.cached_tokens for r in ok) / prompt if prompt else None,
    }
    if mode != BASELINE:
        sp = list(speedups(records, mode).values())
        ttft = list(speedups(records, mode, "ttft_s").values())
        equal = list(equal_length_speedups(records, mode).values())
        stats.update(
            paired=len(sp),
            median_speedup=_median(sp),
            geomean_speedup=geomean(sp),
            min_speedup=min(sp, default=None),
            max_speedup=max(sp, default=None),
            median_ttft_speedup=_median(ttft),
            median_equal_length_speedup=_median(f for f, _ in equal),
            geomean_equal_length_speedup=geomean(f for f, _ in equal),
            equal_length_paired=len(equal),
            equal_length_extrapolated=sum(x for _, x in equal),
        )
    return stats


def router_stats(records: list[RunRecord]) -> dict[str, Any] | None:
    """The ``auto`` runs' routes against ``sot_suitable``: a skeleton mode (sot or
    graph) counts as "suitable", sequential as "not suitable"."""
    routed = {}
    for r in records:
        if r.mode == "auto" and r.ok and r.sot_suitable is not None and r.routed_mode:
            routed[r.question_id] = (r.sot_suitable, r.routed_mode)
    if not routed:
        return None
    return router_metrics(list(routed.values()))


def router_metrics(routes: Sequence[tuple[bool, str]]) -> dict[str, Any]:
    """Accuracy, precision and recall of "use a skeleton", and the confusion matrix, of
    (``sot_suitable`` label, routed mode) pairs; a skeleton mode (sot or graph) is a
    positive. Precision is None when nothing went to a skeleton."""
    confusion = {label: dict.fromkeys(ROUTED, 0) for label in ("suitable", "not_suitable")}
    correct = tp = fp = fn = 0
    for suitable, pick in routes:
        confusion["suitable" if suitable else "not_suitable"][pick] += 1
        skeleton = pick != "sequential"
        correct += suitable == skeleton
        tp += suitable and skeleton
        fp += skeleton and not suitable
        fn += suitable and not skeleton
    n = len(routes)
    return {
        "questions": n,
        "accuracy": correct / n if n else 0.0,
        "precision": tp / (tp + fp) if tp + fp else None,
        "recall": tp / (tp + fn) if tp + fn else None,
        "confusion": confusion,
    }


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
