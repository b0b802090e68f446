"""``sotserve serve --backend URL``: the planner over remote engines, end to end.

Real processes on 127.0.0.1 throughout: the remote engine is another ``sotserve
serve`` (the shared one with the embedded SmolLM2, or one with a tiny model that the
test kills), and the client is the official openai SDK. Real vLLM and llama.cpp
servers as the remote engine are in tests/peers/.
"""

from __future__ import annotations

import subprocess
import sys
import urllib.error
import urllib.request

import openai
import pytest
from live_server import REPO, free_port, running_process, running_server
from peer_checks import check_killed_mid_answer

from sotserve.schemas import AnswerInfo

pytestmark = pytest.mark.slow

QUESTION = "What are the most effective ways to deal with stress?"


@pytest.fixture(scope="module")
def front(sotserve_url, smollm2_dir):
    """``sotserve serve --backend`` in front of the shared server."""
    with running_server(
        "--backend", sotserve_url, "--tokenizer", str(smollm2_dir), "--served-model-name", "front"
    ) as url:
        yield url


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.mark.parametrize("mode", ["sequential", "sot", "graph", "auto"])
async def test_every_mode_answers_through_the_remote_engine(front, mode):
    async with openai.AsyncOpenAI(
        base_url=f"{front}/v1", api_key="unused", max_retries=0, timeout=120
    ) as client:
        stream = await client.chat.completions.create(
            model="front", messages=[{"role": "user", "content": QUESTION}], max_tokens=100,
            stream=True, extra_body={"sot": {"mode": mode, "point_max_tokens": 32}},
        )  # fmt: skip
        text = []
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                text.append(chunk.choices[0].delta.content)
        resp = await client.chat.completions.create(
            model="front", messages=[{"role": "user", "content": QUESTION}], max_tokens=100,
            extra_body={"sot": {"mode": mode, "point_max_tokens": 32}},
        )  # fmt: skip
    assert "".join(text).strip()
    info = AnswerInfo.model_validate(resp.model_extra["sot"])
    if mode in ("sot", "graph"):
        assert info.mode == mode and len(info.points) >= 2
        # the points reused the skeleton's prefix in the remote engine's cache
        assert info.usage.cached_tokens > 0


def test_models_health_and_metrics_reflect_the_remote_engine(front, sotserve_url):
    status, body = _get(f"{front}/v1/models")
    assert status == 200 and '"id": "front"' in body
    status, body = _get(f"{front}/health")
    assert status == 200 and sotserve_url in body
    status, text = _get(f"{front}/metrics")
    assert status == 200
    label = f'backend="{sotserve_url}"'
    assert f"sotserve_backend_up{{{label}}} 1.0" in text
    requests = next(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(f"sotserve_backend_requests_total{{{label}}}")
    )
    assert requests >= 1  # the start-up warm-up at least


def test_an_unreachable_backend_at_start_up_exits_2(smollm2_dir):
    port = free_port()  # nobody listens there
    proc = subprocess.run(
        [sys.executable, "-m", "sotserve", "serve", "--backend", f"http://127.0.0.1:{port}",
         "--tokenizer", str(smollm2_dir), "--port", str(free_port())],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert f"127.0.0.1:{port}" in proc.stderr and "Traceback" not in proc.stderr


def test_engine_options_are_refused_with_a_backend(smollm2_dir):
    proc = subprocess.run(
        [sys.executable, "-m", "sotserve", "serve", "--backend", "http://127.0.0.1:9",
         "--kv-slots", "64"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and "--kv-slots: not with --backend" in proc.stderr


async def test_a_backend_that_dies_mid_answer_fails_cleanly_and_the_front_keeps_serving(
    tiny_llama_dir,
):
    with (
        running_process("--model", str(tiny_llama_dir)) as (engine_url, engine),
        running_server(
            "--backend", engine_url, "--tokenizer", str(tiny_llama_dir),
            "--served-model-name", "front",
        ) as front,
    ):  # fmt: skip
        await check_killed_mid_answer(front, engine, engine_url)
