"""Batch-1 decode in process against the same engine behind HTTP, in one run.

    python -m evals.bench_http [--model PATH] [--tokens 128] [--repeats 3] [--port 8765]

In process: ``LLM.generate`` (the engine's step loop on this thread) of ``--tokens``
tokens and of one token, ``(t(N) - t(1)) / (N - 1)`` per token. Over HTTP: a
``python -m engine.server`` subprocess with the same model and options, streamed
``/v1/completions`` requests of ``--tokens`` tokens and of one token (EOS ignored),
``(t(N) - t(1)) / (N - 1)`` per token. Both sides alternate ``--repeats`` times and the ratio of
the medians is printed; 1.0 means HTTP serving costs nothing per token.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import aiohttp

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPT = "Write a short story about a dragon who learns to paint."


@dataclass
class HttpGap:
    in_process_ms: float
    http_ms: float

    @property
    def ratio(self) -> float:
        return self.http_ms / self.in_process_ms


def in_process_step(llm, tokens: int) -> float:
    """Seconds per decoded token of one request: ``(t(N) - t(1)) / (N - 1)``, the same
    arithmetic as the HTTP side, so both count every step's overhead and outliers."""
    from engine import SamplingParams

    def seconds(n: int) -> float:
        params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        start = time.perf_counter()
        llm.generate(PROMPT, params)
        return time.perf_counter() - start

    one = seconds(1)
    return (seconds(tokens) - one) / (tokens - 1)


async def _stream_seconds(session: aiohttp.ClientSession, url: str, tokens: int) -> float:
    """Wall time of one streamed completion of exactly ``tokens`` tokens."""
    body = {"prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}  # fmt: skip
    start = time.perf_counter()
    async with session.post(f"{url}/v1/completions", json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {await resp.text()}")
        async for _ in resp.content:
            pass
    return time.perf_counter() - start


async def http_gap(url: str, tokens: int) -> float:
    """Seconds per decoded token of a streamed completion: ``(t(N) - t(1)) / (N - 1)``.

    Timing whole requests, not the gaps between SSE chunks, because a token whose
    text is not complete yet (part of a UTF-8 character, a special token) sends none.
    """
    async with aiohttp.ClientSession() as session:
        one = await _stream_seconds(session, url, 1)
        many = await _stream_seconds(session, url, tokens)
    return (many - one) / (tokens - 1)


async def _wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"engine.server exited with {proc.returncode}")
            try:
                async with session.get(f"{url}/health") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.5)
    raise RuntimeError("engine.server never became healthy")


def measure(model: str | None, tokens: int, repeats: int, port: int) -> HttpGap:
    from engine import LLM

    argv = [sys.executable, "-m", "engine.server", "--port", str(port), "--no-prefix-cache"]
    if model:
        argv += ["--model", model]
    server = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        asyncio.run(_wait_healthy(url, server, timeout=300))
        llm = LLM(model, prefix_cache=False)
        in_proc, http = [], []
        in_process_step(llm, 4), asyncio.run(http_gap(url, 4))  # warm-up
        for _ in range(repeats):
            in_proc.append(in_process_step(llm, tokens))
            http.append(asyncio.run(http_gap(url, tokens)))
    finally:
        server.terminate()
        server.wait(timeout=30)
    return HttpGap(statistics.median(in_proc) * 1e3, statistics.median(http) * 1e3)


def main(argv: list[str] | None = None) -> HttpGap:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default=None, help="HF directory or .gguf (default: embedded)")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--port", type=int, default=8765)
    args = ap.parse_args(argv)
    gap = measure(args.model, args.tokens, args.repeats, args.port)
    print(
        f"batch-1 decode: in process {gap.in_process_ms:.1f} ms/token, over HTTP "
        f"(engine.server, SSE) {gap.http_ms:.1f} ms/token: {gap.ratio:.2f}x"
    )
    return gap


if __name__ == "__main__":
    main()
