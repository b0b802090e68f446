"""Several OpenAI-compatible engines serving one model, as one backend.

Each answer goes to one replica (:meth:`ReplicaSet.for_answer`): its router,
skeleton and point requests all share that replica's prefix cache. The replica is
picked by prefix affinity, then load, the way SGLang's cache-aware router does it:

- the replica that served the longest leading part of this chat prompt before (a
  conversation's earlier turns) wins, unless it has ``balance_margin`` more answers in
  flight (requests) than the least loaded replica;
- otherwise the least loaded replica.

The prefixes are remembered as hashes of the prompt's leading ``BLOCK`` -token
blocks, a bounded number per replica (the oldest are forgotten first), so this is
an approximation of what each replica's cache holds, as the routers' trees are.

A background task polls every replica's ``/v1/models``; one that fails is skipped
until it answers again. A request that cannot reach its replica marks it down at
once. Answers in flight on a replica that dies fail with
:class:`BackendUnavailableError`; later answers go to the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from sotserve.backends.base import (
    Backend,
    BackendError,
    BackendUnavailableError,
    CompletionChunk,
    CompletionParams,
)
from sotserve.backends.http import HTTPBackend

logger = logging.getLogger(__name__)

BLOCK = 16  # tokens per remembered prefix block


@dataclass
class ReplicaStats:
    """What one replica did, since start (read by the metrics collector)."""

    requests: int = 0
    errors: int = 0
    request_seconds: float = 0.0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    answers: int = 0  # answers routed to it
    affinity_hits: int = 0  # of which it won by prefix affinity


class Replica(Backend):
    """One engine of a :class:`ReplicaSet`: its HTTP backend, health, load and the
    prefixes it was sent."""

    def __init__(self, http: HTTPBackend, max_prefixes: int = 50_000) -> None:
        self.http = http
        self.healthy = True
        self.in_flight = 0  # requests now: its load
        self.stats = ReplicaStats()
        self._prefixes: OrderedDict[int, None] = OrderedDict()
        self._max_prefixes = max_prefixes

    @property
    def url(self) -> str:
        return self.http.url

    @property
    def tokenizer(self) -> Any:
        return self.http.tokenizer

    @property
    def model_name(self) -> str:
        return self.http.model_name

    @property
    def max_model_len(self) -> int | None:
        return self.http.max_model_len

    def matched_blocks(self, hashes: Sequence[int]) -> int:
        """How many leading blocks of a prompt this replica was sent before."""
        n = 0
        for h in hashes:
            if h not in self._prefixes:
                break
            n += 1
        return n

    def remember(self, hashes: Sequence[int]) -> None:
        for h in hashes:
            self._prefixes[h] = None
            self._prefixes.move_to_end(h)
        while len(self._prefixes) > self._max_prefixes:
            self._prefixes.popitem(last=False)

    async def complete(
        self, prompt: str | list[int], params: CompletionParams
    ) -> AsyncIterator[CompletionChunk]:
        if isinstance(prompt, list):
            self.remember(block_hashes(prompt))
        self.in_flight += 1
        self.stats.requests += 1
        t0 = time.perf_counter()
        try:
            async with contextlib.aclosing(self.http.complete(prompt, params)) as stream:
                async for chunk in stream:
                    if chunk.finish_reason is not None:
                        self.stats.prompt_tokens += chunk.prompt_tokens or 0
                        self.stats.cached_tokens += chunk.cached_tokens or 0
                    yield chunk
        except BackendUnavailableError as exc:
            self.stats.errors += 1
            if exc.status == 503:  # not reached, or stalled (an error reply: it is up)
                if self.healthy:
                    logger.warning("backend %s failed; skipping it until it answers", self.url)
                self.healthy = False
            raise
        except BackendError:
            self.stats.errors += 1
            raise
        finally:
            self.in_flight -= 1
            self.stats.request_seconds += time.perf_counter() - t0

    async def check(self) -> bool:
        """Poll ``/v1/models``; sets and returns :attr:`healthy`."""
        try:
            await self.http.models()
        except BackendError:
            ok = False
        else:
            ok = True
        if ok != self.healthy:
            logger.warning("backend %s is %s", self.url, "back" if ok else "down")
        self.healthy = ok
        return ok

    async def close(self) -> None:
        await self.http.close()


def block_hashes(ids: Sequence[int]) -> list[int]:
    """A hash per whole leading block of ``ids``, each chained to the one before, so
    it stands for every token up to the block's end."""
    out: list[int] = []
    h = 0
    for end in range(BLOCK, len(ids) + 1, BLOCK):
        h = hash((h, tuple(ids[end - BLOCK : end])))
        out.append(h)
    return out


class ReplicaSet(Backend):
    """Replicas of one model behind one backend; see the module docstring."""

    def __init__(
        self,
        replicas: Sequence[HTTPBackend],
        *,
        health_interval: float = 5.0,
        balance_margin: int = 8,
    ) -> None:
        if not replicas:
            raise ValueError("a ReplicaSet needs at least one backend")
        self.replicas = [Replica(r) for r in replicas]
        self.health_interval = health_interval
        self.balance_margin = balance_margin
        self._health_task: asyncio.Task[None] | None = None

    @property
    def tokenizer(self) -> Any:
        return self.replicas[0].tokenizer

    @property
    def model_name(self) -> str:
        return self.replicas[0].model_name

    @property
    def max_model_len(self) -> int | None:
        limits = [r.max_model_len for r in self.replicas if r.max_model_len is not None]
        return min(limits) if limits else None

    @property
    def healthy(self) -> list[Replica]:
        return [r for r in self.replicas if r.healthy]

    def members(self) -> list[Backend]:
        return list(self.healthy)

    async def start(self) -> None:
        """Check every replica once (raises :class:`BackendUnavailableError` naming
        those that do not answer), then keep checking in the background."""
        await asyncio.gather(*(r.check() for r in self.replicas))
        down = [r.url for r in self.replicas if not r.healthy]
        if down:
            raise BackendUnavailableError(f"backend not reachable: {', '.join(down)}")
        if self._health_task is None:
            self._health_task = asyncio.create_task(self._poll(), name="sotserve-health")

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval)
            # A replica with requests running is judged by them (a failure marks it
            # down at once); a probe could only wait behind them on a server that
            # takes one request at a time, such as llama-cpp-python's.
            idle = [r for r in self.replicas if r.in_flight == 0 or not r.healthy]
            await asyncio.gather(*(r.check() for r in idle), return_exceptions=True)

    def for_answer(self, prompt: list[int]) -> Backend:
        up = self.healthy
        if not up:
            names = ", ".join(r.url for r in self.replicas)
            raise BackendUnavailableError(f"no backend is healthy ({names})")
        least = min(up, key=lambda r: r.in_flight)
        hashes = block_hashes(prompt)
        best = max(up, key=lambda r: r.matched_blocks(hashes))
        matched = best.matched_blocks(hashes)
        # a block every replica has (the system turn, cached by the warm-up) says
        # nothing about where the rest is
        shared = min(r.matched_blocks(hashes) for r in up)
        pick = least
        if matched > shared and best.in_flight - least.in_flight <= self.balance_margin:
            pick = best
            best.stats.affinity_hits += 1
        pick.stats.answers += 1
        pick.remember(hashes)
        return pick

    async def complete(
        self, prompt: str | list[int], params: CompletionParams
    ) -> AsyncIterator[CompletionChunk]:
        """One request on its own (not part of an answer): routed as an answer."""
        ids = prompt if isinstance(prompt, list) else self.tokenizer.encode(prompt)
        backend = self.for_answer(ids)
        async with contextlib.aclosing(backend.complete(prompt, params)) as stream:
            async for chunk in stream:
                yield chunk

    async def close(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            await asyncio.gather(self._health_task, return_exceptions=True)
            self._health_task = None
        await asyncio.gather(*(r.close() for r in self.replicas))
