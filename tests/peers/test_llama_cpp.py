"""sotserve in front of a real llama.cpp server (``llama-cpp-python[server]==0.3.36``).

That server takes text prompts only (sotserve falls back from token ids), reports
no cached tokens and no token ids, and runs one request at a time, so the points
of a skeleton answer queue there instead of decoding in parallel.
"""

from __future__ import annotations

import pytest
from live_server import running_process
from peer_checks import check_every_mode, check_killed_mid_answer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def front(llama_server):
    from engine.loader import embedded_gguf_path

    url, _ = llama_server
    gguf = str(embedded_gguf_path())
    with running_process(
        "--backend", url, "--model", gguf, "--served-model-name", "front", timeout=300,
    ) as (front_url, _):  # fmt: skip
        yield front_url


async def test_every_mode_answers_on_llama_cpp(front):
    await check_every_mode(front)


async def test_a_killed_llama_cpp_server_fails_answers_cleanly(front, llama_server):
    url, proc = llama_server
    await check_killed_mid_answer(front, proc, url)
