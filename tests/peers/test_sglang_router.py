"""sotserve in front of SGLang's router (``sglang-router==0.3.2``), which fronts two
plain workers (sotserve's own ``engine.server``): ``sotserve serve --backend
http://router``, the setup the README suggests for large fleets.

The router takes text prompts only (its request schema refuses token ids), so
sotserve falls back to text as it does for llama.cpp's server; the workers'
tokenizer reads the chat template's control tokens back from that text.
"""

from __future__ import annotations

import re

import pytest
from live_server import running_process
from peer_checks import answer, check_every_mode, get

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def front(sglang_router, smollm2_dir):
    url, workers, _ = sglang_router
    assert "SmolLM2-135M-Instruct.Q4_1" in get(f"{workers[0]}/v1/models")[1]
    with running_process(
        "--backend", url, "--model", "SmolLM2-135M-Instruct.Q4_1",
        "--tokenizer", str(smollm2_dir), "--served-model-name", "front", timeout=300,
    ) as (front_url, _):  # fmt: skip
        yield front_url


def _requests_per_worker(metrics_url: str) -> dict[str, float]:
    """Requests the router has sent each worker (its circuit breaker's outcomes)."""
    counts: dict[str, float] = {}
    for m in re.finditer(
        r'^smg_worker_cb_outcomes_total\{worker="([^"]+)",[^}]*\} ([0-9.e+]+)$',
        get(metrics_url)[1], re.M,
    ):  # fmt: skip
        counts[m.group(1)] = counts.get(m.group(1), 0.0) + float(m.group(2))
    return counts


async def test_every_mode_answers_through_sglangs_router(front):
    await check_every_mode(front)


async def test_an_answers_requests_stay_on_one_worker(front, sglang_router):
    # Cache-aware routing sends the skeleton and every point of one answer to one
    # worker (they share the question+skeleton prefix), so that worker's radix cache
    # serves the points; round-robin routing fails this.
    _, workers, metrics_url = sglang_router
    before = _requests_per_worker(metrics_url)
    _, info = await answer(front, "sot", stream=False)
    assert info is not None and info.mode == "sot" and len(info.points) >= 2
    after = _requests_per_worker(metrics_url)
    sent = {w: after.get(w, 0.0) - before.get(w, 0.0) for w in workers}
    assert sorted(sent.values())[0] == 0, sent
    assert max(sent.values()) >= 1 + len(info.points), sent  # the skeleton and each point
