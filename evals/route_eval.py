"""The router alone on a labelled set: ``python -m evals.latency --route-only``.

Every question of the set (any JSONL with ``question`` and ``sot_suitable``: vicuna80,
LIMA's router file, others) goes through :meth:`sotserve.planner.Planner.route` on
the local engine, from an emptied prefix cache (the service's fixed prompt heads
cached again, as a running server has them). Reported: accuracy, precision and
recall of "use a skeleton", the confusion matrix, and the router's time per
question against the median latency of sequential answers to the first
``--route-baseline`` questions, measured in the same run on the same engine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

from engine import AsyncEngine
from evals.summary import router_metrics
from evals.train_router import load_labelled
from sotserve.backends import LocalBackend
from sotserve.planner import Planner


async def _cold(engine: AsyncEngine, planner: Planner) -> None:
    await engine.reset_prefix_cache()
    await planner.warm_up()


async def route_only(args: argparse.Namespace, engine: AsyncEngine) -> dict[str, Any]:
    """Route every labelled question of ``args.dataset``; the router's figures."""
    data = load_labelled(args.dataset)
    n = len(data.questions) if args.limit is None else min(args.limit, len(data.questions))
    planner = Planner(LocalBackend(engine), **args.plan_option)
    await planner.router.trained_params(planner.backend)  # the one-off probe, untimed
    picks, seconds, sources = [], [], []
    for q in data.questions[:n]:
        await _cold(engine, planner)
        t0 = time.perf_counter()
        decision = await planner.route(q)
        seconds.append(time.perf_counter() - t0)
        picks.append(decision.mode)
        sources.append(decision.source)
    sequential = []
    for q in data.questions[: min(args.route_baseline, n)]:
        await _cold(engine, planner)
        t0 = time.perf_counter()
        await planner.answer(q, mode="sequential", max_tokens=args.max_tokens)
        sequential.append(time.perf_counter() - t0)
    metrics = router_metrics(list(zip(data.labels[:n], picks, strict=True)))
    route_s = statistics.median(seconds)
    seq_s = statistics.median(sequential) if sequential else None
    return {
        **metrics,
        "dataset": data.name,
        "sources": {s: sources.count(s) for s in sorted(set(sources))},
        "median_route_s": route_s,
        "max_route_s": max(seconds),
        "median_sequential_s": seq_s,
        "route_share_of_sequential": route_s / seq_s if seq_s else None,
    }


def print_route_only(result: dict[str, Any]) -> None:
    share = result["route_share_of_sequential"]
    print(
        f"router on {result['dataset']} ({result['questions']} questions, "
        f"decided by {result['sources']}): accuracy {result['accuracy']:.3f}, "
        f"precision {result['precision'] or 0:.3f}, recall {result['recall'] or 0:.3f}"
    )
    print(f"confusion (sot_suitable -> routed): {json.dumps(result['confusion'])}")
    line = f"router time median {1e3 * result['median_route_s']:.1f} ms"
    if share is not None:
        line += (
            f", {share:.2%} of a sequential answer's median "
            f"{result['median_sequential_s']:.2f} s (same run)"
        )
    print(line)
