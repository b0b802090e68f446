"""ReplicaSet: prefix affinity, load, health, against two real engine servers.

Both replicas are sotserve's own completions server over a tiny random-weight
Llama, on 127.0.0.1, reached with real HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from aiohttp import web

from engine import AsyncEngine
from engine.server import build_app
from sotserve.backends import BackendUnavailableError, CompletionParams, HTTPBackend
from sotserve.backends.replicas import BLOCK, ReplicaSet, block_hashes
from sotserve.planner import Planner
from sotserve.schemas import Done


class _Server:
    """One engine server on a fixed port that can be stopped and started again."""

    def __init__(self, model_dir) -> None:
        self.engine = AsyncEngine(str(model_dir), kv_slots=2048)
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> None:
        self.runner = web.AppRunner(build_app(self.engine, "tiny"))
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def requests(self) -> int:
        return self.engine.stats().finished_requests + self.engine.stats().aborted_requests


@pytest.fixture
async def two(tiny_llama_dir, tokenizer):
    servers = [_Server(tiny_llama_dir), _Server(tiny_llama_dir)]
    for s in servers:
        await s.start()
    replicas = ReplicaSet(
        [HTTPBackend(s.url, "tiny", tokenizer=tokenizer, max_model_len=2048) for s in servers],
        health_interval=0.2,
    )
    await replicas.start()
    yield servers, replicas
    await replicas.close()
    for s in servers:
        await s.stop()
        s.engine.close()


async def run(backend, prompt, max_tokens=2):
    return [c async for c in backend.complete(prompt, CompletionParams(max_tokens=max_tokens))]


def test_block_hashes_chain_every_token_before_them():
    a = list(range(3 * BLOCK + 5))
    b = [*a[:BLOCK], 999, *a[BLOCK + 1 :]]
    ha, hb = block_hashes(a), block_hashes(b)
    assert len(ha) == 3  # whole blocks only
    assert ha[0] == hb[0] and ha[1] != hb[1] and ha[2] != hb[2]  # later ones differ too


async def test_a_follow_up_goes_where_its_prefix_is_and_new_prompts_spread(two):
    _, replicas = two
    conversation = list(range(100, 100 + 4 * BLOCK))
    first = replicas.for_answer(conversation)
    await run(first, conversation)
    # the next turn extends the prompt: same replica, though both are idle
    follow_up = [*conversation, *range(500, 500 + 2 * BLOCK)]
    assert replicas.for_answer(follow_up) is first
    assert first.stats.affinity_hits == 1
    # an unrelated prompt, with the first replica busy: the other one
    other = next(r for r in replicas.replicas if r is not first)
    first.in_flight += 1  # as if a request were running there
    try:
        assert replicas.for_answer(list(range(7000, 7000 + 3 * BLOCK))) is other
        # affinity gives way when its replica is too busy
        first.in_flight += replicas.balance_margin
        assert replicas.for_answer(follow_up) is other
    finally:
        first.in_flight -= 1 + replicas.balance_margin


async def test_every_request_of_an_answer_goes_to_one_replica(two):
    servers, replicas = two
    planner = Planner(replicas)
    await planner.warm_up()  # each replica caches the prompt heads
    before = [s.requests() for s in servers]
    done = None
    async for event in planner.stream("How do I keep a houseplant alive?", "sot", max_tokens=80):
        if isinstance(event, Done):
            done = event
    assert done is not None and done.usage.requests >= 2
    used = [s.requests() - b for s, b in zip(servers, before, strict=True)]
    assert sorted(used) == [0, done.usage.requests]


async def test_a_replica_that_dies_is_skipped_and_comes_back(two):
    servers, replicas = two
    dead, alive = servers
    await dead.stop()
    victim = next(r for r in replicas.replicas if r.url == dead.url)
    # a request that meets the dead replica fails clearly and marks it down at once
    with pytest.raises(BackendUnavailableError, match=f"127.0.0.1:{dead.port}"):
        await run(victim, [1, 2, 3])
    assert not victim.healthy
    # new answers go to the other one, whatever their prefix
    for k in range(3):
        assert replicas.for_answer(list(range(k, k + BLOCK))).url == alive.url
    # once it listens again the health check brings it back
    await dead.start()
    for _ in range(50):
        if victim.healthy:
            break
        await asyncio.sleep(0.1)
    assert victim.healthy
    await run(victim, [1, 2, 3])


async def test_no_healthy_replica_is_a_clear_error(two):
    servers, replicas = two
    for s in servers:
        await s.stop()
    for r in replicas.replicas:
        await r.check()
    with pytest.raises(BackendUnavailableError, match="no backend is healthy"):
        replicas.for_answer([1, 2, 3])
    with contextlib.suppress(Exception):
        for s in servers:
            await s.start()
