"""``sotserve ask`` end to end, in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys


def _ask(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "sotserve.cli", "ask", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def test_ask_streams_an_answer(tiny_llama_dir):
    proc = _ask("Say hello", "--model", str(tiny_llama_dir), "--max-tokens", "6")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()  # random weights, but six tokens of text
    assert "6 tokens" in proc.stderr and "finish=length" in proc.stderr


def test_ask_reports_a_bad_model_cleanly(tmp_path):
    proc = _ask("hi", "--model", str(tmp_path / "missing"))
    assert proc.returncode == 2
    assert "error:" in proc.stderr and "not found" in proc.stderr
    assert "Traceback" not in proc.stderr
