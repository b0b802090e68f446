"""Request limits and the concurrency gate of the chat endpoint."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from engine.server import APIError
from sotserve.server.metrics import Metrics


@dataclass(frozen=True)
class ServerLimits:
    """What one request may ask of the server.

    ``max_concurrency`` answers run at once (each fans out to several engine
    requests); up to ``max_queue`` more wait for a slot, and beyond that a request
    gets 429 at once. ``max_request_bytes`` caps the body (413 above it).
    """

    max_concurrency: int = 16
    max_queue: int = 64
    max_request_bytes: int = 8 * 2**20
    max_messages: int = 256

    def __post_init__(self) -> None:
        if self.max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        if self.max_queue < 0 or self.max_messages < 1 or self.max_request_bytes < 1024:
            raise ValueError("max_queue >= 0, max_messages >= 1, max_request_bytes >= 1024")


class AdmissionGate:
    """At most ``limit`` holders at once, ``max_queue`` waiters, 429 past that."""

    def __init__(self, limit: int, max_queue: int) -> None:
        self.limit = limit
        self.max_queue = max_queue
        self._sem = asyncio.Semaphore(limit)
        self.running = 0
        self.waiting = 0

    @contextlib.asynccontextmanager
    async def slot(self, metrics: Metrics | None = None) -> AsyncIterator[None]:
        if self._sem.locked() and self.waiting >= self.max_queue:
            if metrics is not None:
                metrics.rejected.inc()
            raise APIError(
                429,
                f"the server is at its limit of {self.limit} concurrent answers and "
                f"{self.max_queue} queued; retry later",
                type="rate_limit_error",
                code="rate_limit_exceeded",
            )
        self.waiting += 1
        self._gauges(metrics)
        try:
            await self._sem.acquire()  # a client that leaves while queued is cancelled here
        finally:
            self.waiting -= 1
        self.running += 1
        self._gauges(metrics)
        try:
            yield
        finally:
            self.running -= 1
            self._sem.release()
            self._gauges(metrics)

    def _gauges(self, metrics: Metrics | None) -> None:
        if metrics is not None:
            metrics.in_flight.set(self.running)
            metrics.queued.set(self.waiting)
