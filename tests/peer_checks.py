"""What every peer engine (tests/peers/) is checked for, through ``sotserve serve
--backend`` and the official openai SDK."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.error
import urllib.request

import openai
import pytest

from sotserve.schemas import AnswerInfo

QUESTION = "What are the most effective ways to deal with stress?"
MODES = ("sequential", "sot", "graph", "auto")


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def client(front: str, timeout: float = 300) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{front}/v1", api_key="unused", max_retries=0,
                              timeout=timeout)  # fmt: skip


async def answer(
    front: str, mode: str, stream: bool, max_tokens: int = 160
) -> tuple[str, AnswerInfo | None]:
    """One answer in ``mode``: its text, and (not streamed) the ``sot`` extension."""
    async with client(front) as c:
        resp = await c.chat.completions.create(
            model="front", messages=[{"role": "user", "content": QUESTION}],
            max_tokens=max_tokens, stream=stream,
            extra_body={"sot": {"mode": mode, "point_max_tokens": 48}},
        )  # fmt: skip
        if not stream:
            info = AnswerInfo.model_validate(resp.model_extra["sot"])
            return resp.choices[0].message.content or "", info
        parts = []
        async for chunk in resp:
            if chunk.choices and chunk.choices[0].delta.content:
                parts.append(chunk.choices[0].delta.content)
        return "".join(parts), None


async def check_every_mode(front: str) -> None:
    for mode in MODES:
        # streamed: only that text arrives (kept short: peers decode slowly here)
        text, _ = await answer(front, mode, stream=True, max_tokens=48)
        assert text.strip(), mode
        text, info = await answer(front, mode, stream=False)
        assert text.strip() and info is not None, mode
        if mode in ("sot", "graph"):
            assert info.mode == mode and len(info.points) >= 2, (mode, text)
            assert all(f"**{p.title}**" in text for p in info.points)
            # every point says something: the peer honoured the point's bans and
            # sampling (llama-cpp-python drops logit_bias beside min_tokens)
            assert all(len(p.text.split()) >= 3 for p in info.points), info.points


async def check_killed_mid_answer(front: str, peer: subprocess.Popen[bytes], peer_url: str) -> None:
    """Kill the peer while an answer streams: the answer ends with an error, new
    answers get a 503 naming the backend, /health turns 503, the front keeps serving."""
    async with client(front, timeout=60) as c:
        stream = await c.chat.completions.create(
            model="front", messages=[{"role": "user", "content": QUESTION}],
            max_tokens=400, stream=True, extra_body={"sot": {"mode": "sequential"}},
        )  # fmt: skip
        got = 0
        with pytest.raises(openai.APIError):
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    got += 1
                    if got == 3:
                        os.killpg(peer.pid, signal.SIGKILL)  # its workers too
                        peer.wait()
        with pytest.raises(openai.APIStatusError) as info:
            await c.chat.completions.create(
                model="front", messages=[{"role": "user", "content": "Hi"}], max_tokens=4
            )
        assert info.value.status_code == 503, (info.value.status_code, info.value.message)
        assert peer_url.removeprefix("http://") in info.value.message
    deadline = time.monotonic() + 20
    while (status := get(f"{front}/health")[0]) != 503 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert status == 503
    status, text = get(f"{front}/metrics")
    assert status == 200 and f'sotserve_backend_up{{backend="{peer_url}"}} 0.0' in text
