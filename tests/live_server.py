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


# The shared server's admin key: its admin routes (a cache reset) need it.
ADMIN_KEY = "test-admin-key"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


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
    argv = [sys.executable, "-m", "sotserve", "serve", "--port", str(port), *args]
    with served_process(
        argv, port, "/health", {"HF_HUB_OFFLINE": "1"}, timeout, "sotserve serve"
    ) as served:
        yield served


@contextlib.contextmanager
def served_process(
    argv: list[str], port: int, ready_path: str, env: dict[str, str], timeout: float, name: str
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Start a server (``argv``, listening on ``port``) in a process group of its own
    and wait until ``ready_path`` answers 200; yields its URL and process, and stops
    the whole group (a server's workers too) afterwards."""
    log = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed in the finally below
    proc = subprocess.Popen(
        argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env},
        start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{log.read()[-4000:]}")
            try:
                with urllib.request.urlopen(f"{url}{ready_path}", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                log.seek(0)
                raise TimeoutError(f"{name} not ready within {timeout} s:\n{log.read()[-4000:]}")
            time.sleep(0.5)
        yield url, proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()
