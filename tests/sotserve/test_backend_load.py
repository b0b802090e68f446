"""``Backend.load``: the engine's own gauges in process, our in-flight count over HTTP."""

from __future__ import annotations

import asyncio

from engine import AsyncEngine
from sotserve.backends import LocalBackend
from sotserve.backends.base import CompletionParams
from sotserve.server.limits import AdmittedBackend


async def test_local_load_follows_the_engine(tiny_llama_dir):
    async with AsyncEngine(str(tiny_llama_dir), dtype="float32", device="cpu") as engine:
        backend = AdmittedBackend(LocalBackend(engine))
        idle = await backend.load()
        assert (idle.running, idle.waiting, idle.kv_free, idle.step_s) == (0, 0, 1.0, None)
        params = CompletionParams(max_tokens=400, temperature=0.0)
        started = asyncio.Event()

        async def one(prompt: list[int]) -> None:
            async for _ in backend.complete(prompt, params):
                started.set()
                await asyncio.sleep(0.002)

        tasks = [asyncio.create_task(one([101 + i, 102, 103])) for i in range(3)]
        await started.wait()
        busy = None
        for _ in range(200):
            busy = await backend.load()
            if busy.requests == 3 and busy.step_s is not None:
                break
            await asyncio.sleep(0.01)
        assert busy.requests == 3 and busy.kv_free < 1.0 and busy.step_s > 0
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
