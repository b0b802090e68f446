"""Start ``sotserve serve`` as a real subprocess on a free 127.0.0.1 port."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(*args: str, timeout: float = 180.0) -> Iterator[str]:
    """``sotserve serve ARGS`` until the block ends; yields its base URL."""
    with running_process(*args, timeout=timeout) as (url, _):
        yield url


@contextlib.contextmanager
def running_process(
    *args: str, timeout: float = 180.0
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``sotserve serve ARGS`` until the block ends; yields its URL and process."""
    port = free_port()
    log = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed in the finally below
    proc = subprocess.Popen(
        [sys.executable, "-m", "sotserve", "serve", "--port", str(port), *args],
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"sotserve serve exited with {proc.returncode}:\n{log.read()}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"sotserve serve did not come up within {timeout} s")
            time.sleep(0.5)
        yield url, proc
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
