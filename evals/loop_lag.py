"""How long ``/health`` takes to answer while the server handles the largest
requests it accepts: the event loop must stay free (tokenizing runs in a worker
thread, behind a cheap length bound).

    python -m evals.loop_lag [--model PATH]

Serves the chat app in process (embedded SmolLM2 by default) and, for an 8 MiB
prompt (refused unread by the length bound) and one of about 160 characters a
context token (tokenized, then refused), posts it to ``/v1/completions`` and
``/v1/chat/completions`` while probing ``/health`` every 5 ms; prints each
request's time and the probes' median and worst latency against the target.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time

import aiohttp
from aiohttp import web

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TARGET_S = 0.1  # the target for /health under the largest body


async def run(model: str | None) -> None:
    from engine import AsyncEngine
    from engine.serving import ServerLimits
    from sotserve.server import build_app

    engine = AsyncEngine(model)
    limits = ServerLimits()
    runner = web.AppRunner(build_app(engine, None, limits), handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    words = "lorem ipsum dolor sit amet " * (limits.max_request_bytes // 28 - 100)
    prompts = {
        "8 MiB prompt": words,
        f"{engine.max_model_len * 160 // 1000} kB prompt": words[: engine.max_model_len * 160],
    }
    try:
        async with aiohttp.ClientSession(url) as http:
            for name, prompt in prompts.items():
                lags: list[float] = []

                async def probe(lags: list[float] = lags) -> None:
                    while True:
                        t0 = time.perf_counter()
                        async with http.get("/health") as resp:
                            await resp.read()
                        lags.append(time.perf_counter() - t0)
                        await asyncio.sleep(0.005)

                prober = asyncio.create_task(probe())
                await asyncio.sleep(0.05)
                for path, body in (
                    ("/v1/completions", {"prompt": prompt}),
                    ("/v1/chat/completions", {"messages": [{"role": "user", "content": prompt}]}),
                ):
                    t0 = time.perf_counter()
                    async with http.post(path, json=body) as resp:
                        await resp.read()
                    print(
                        f"{name:16s} {path:22s} {resp.status} in {time.perf_counter() - t0:.2f} s"
                    )
                prober.cancel()
                worst = max(lags)
                print(
                    f"{name:16s} /health over {len(lags)} probes: median "
                    f"{statistics.median(lags) * 1000:.1f} ms, worst {worst * 1000:.0f} ms "
                    f"({worst / TARGET_S:.2f}x the {TARGET_S * 1000:.0f} ms target)"
                )
    finally:
        await runner.cleanup()
        engine.close()


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m evals.loop_lag", description=__doc__)
    p.add_argument("--model", default=None, help="HF directory or .gguf (default: embedded)")
    asyncio.run(run(p.parse_args().model))


if __name__ == "__main__":
    main()
