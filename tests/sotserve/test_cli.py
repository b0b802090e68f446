"""``sotserve ask`` end to end, as a real subprocess.

In process on the embedded SmolLM2 (``slow``), against a real ``sotserve serve``
with ``--url`` (``slow``: the server loads the same model), and its errors. The
live terminal view itself is tested in ``test_live_view.py``; here one run in a
pseudo-terminal checks that the CLI picks it.
"""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
from live_server import free_port, running_server

REPO = Path(__file__).resolve().parents[2]
SOT_QUESTION = "What are some tips for staying healthy?"
SMALL = ("--max-tokens", "120", "--point-max-tokens", "24", "--max-points", "4")

slow = pytest.mark.slow


def _env() -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "100"}
    env.pop("FORCE_COLOR", None)
    env.pop("SOTSERVE_API_KEY", None)  # each test says which key it sends
    return env


def _ask(
    *args: str, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sotserve", "ask", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**_env(), **(env or {})},
    )


def _check_sot_json(proc: subprocess.CompletedProcess[str]) -> dict:
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    out = json.loads(proc.stdout)  # one JSON object, nothing else on stdout
    assert set(out) == {
        "answer", "mode", "points", "timings", "usage", "route", "fallback", "finish_reason",
    }  # fmt: skip
    assert out["mode"] == "sot" and out["fallback"] is None
    assert 2 <= len(out["points"]) <= 4
    assert [p["index"] for p in out["points"]] == list(range(1, len(out["points"]) + 1))
    pos = -1
    for p in out["points"]:  # every title in the answer, in skeleton order
        assert set(p) == {"index", "title", "depends_on", "text"}
        found = out["answer"].find(p["title"], pos + 1)
        assert found > pos, (p["title"], out["answer"])
        pos = found
        assert p["text"].strip() in out["answer"]
    assert out["timings"]["total_s"] > 0
    assert out["usage"]["requests"] >= 2  # the skeleton and at least one point
    assert out["usage"]["completion_tokens"] <= 120
    return out


# -- in process ----------------------------------------------------------------------------
@slow
def test_ask_json_sot_in_process():
    _check_sot_json(_ask(SOT_QUESTION, "--json", "--mode", "sot", *SMALL))


@slow
def test_ask_sequential_piped_streams_to_stdout_and_times_to_stderr():
    proc = _ask("What is the capital of France?", "--mode", "sequential", "--max-tokens", "24")
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
    assert "╭" not in proc.stdout  # no live view on a pipe
    timings = proc.stderr.strip().splitlines()[-1]
    assert timings.startswith("mode sequential | first token ")
    assert "total" in timings and "1 request" in timings


def test_ask_reports_a_bad_model_cleanly(tmp_path):
    proc = _ask("hi", "--model", str(tmp_path / "missing"))
    assert proc.returncode == 2
    assert "error:" in proc.stderr and "not found" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("hi", "--max-points", "1"), "error: --max-points: Input should be greater than"),
        (("hi", "--temperature", "-1"), "error: --temperature:"),
        (("  ",), "error: the question is empty"),
    ],
)
def test_ask_rejects_bad_input_before_loading_the_model(args, message, tmp_path):
    # A model path that does not exist: the check must come before any loading.
    proc = _ask(*args, "--model", str(tmp_path / "missing"), timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "not found" not in proc.stderr


def test_serve_reports_a_bad_engine_option_cleanly():
    # the engine checks its config before it loads anything, so this is quick
    proc = subprocess.run(
        [sys.executable, "-m", "sotserve", "serve", "--max-running", "0", "--port", "9"],
        cwd=REPO, capture_output=True, text=True, timeout=120, env=_env(),
    )  # fmt: skip
    assert proc.returncode == 2
    assert "error: max_running must be at least 1, got 0" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_ask_model_options_need_no_url():
    proc = _ask("hi", "--url", "http://127.0.0.1:9", "--model", "x", timeout=120)
    assert proc.returncode == 2
    assert "--model: not with --url" in proc.stderr


# -- over HTTP ---------------------------------------------------------------------------
@slow
def test_ask_url_json_sot(sotserve_url):
    _check_sot_json(_ask(SOT_QUESTION, "--url", sotserve_url, "--json", "--mode", "sot", *SMALL))


@slow
def test_ask_url_piped_streams_the_answer(sotserve_url):
    proc = _ask(
        "What is the capital of France?", "--url", sotserve_url,
        "--mode", "sequential", "--max-tokens", "24",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
    assert proc.stderr.strip().splitlines()[-1].startswith("mode sequential |")


def test_ask_url_sends_the_api_key(tiny_llama_dir):
    # A server that needs a key: a tiny random-weight model (what it says does not
    # matter here, only that it answers the key and refuses the rest).
    key = "sk-cli-test"
    args = ("hi", "--mode", "sequential", "--max-tokens", "4", "--json")
    with running_server("--model", str(tiny_llama_dir), "--api-key", key) as url:
        refused = _ask(*args, "--url", url, timeout=120)
        wrong = _ask(*args, "--url", url, "--api-key", "sk-wrong", timeout=120)
        given = _ask(*args, "--url", url, "--api-key", key, timeout=120)
        from_env = _ask(*args, "--url", url, timeout=120, env={"SOTSERVE_API_KEY": key})
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.startswith(f"error: {url} answered 401: this server needs an API key")
    assert wrong.returncode == 2 and "answered 401: incorrect API key" in wrong.stderr
    for proc in (given, from_env):
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        assert out["mode"] == "sequential" and out["usage"]["requests"] == 1


def test_ask_api_key_needs_a_url():
    proc = _ask("hi", "--api-key", "k", timeout=120)
    assert proc.returncode == 2 and "--api-key: only with --url" in proc.stderr


def test_ask_unreachable_url():
    url = f"http://127.0.0.1:{free_port()}"
    proc = _ask("hi", "--url", url, "--timeout", "20", timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error:") and url in proc.stderr
    assert "Traceback" not in proc.stderr


def test_ask_url_does_not_load_torch():
    # The engine loads only where the model runs: a client starts in a blink.
    url = f"http://127.0.0.1:{free_port()}"
    code = (
        "import sys\n"
        "from sotserve.cli import main\n"
        f"assert main(['ask', 'hi', '--url', {url!r}, '--json']) == 2\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
        timeout=120, env=_env(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.startswith("error:") and url in proc.stderr


@slow
def test_ask_url_reports_the_servers_400(sotserve_url):
    # The CLI leaves checking to the server with --url: a 400 and its message.
    proc = _ask("hi", "--url", sotserve_url, "--max-points", "1", timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: {sotserve_url} answered 400:")
    assert "max_points" in proc.stderr and "greater than or equal to 2" in proc.stderr
    assert "Traceback" not in proc.stderr


@slow
def test_ask_url_draws_the_live_view_in_a_terminal(sotserve_url):
    main, secondary = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "sotserve", "ask", SOT_QUESTION, "--url", sotserve_url,
         "--mode", "sot", *SMALL],
        cwd=REPO, stdin=subprocess.DEVNULL, stdout=secondary, stderr=subprocess.PIPE,
        env={**_env(), "TERM": "xterm-256color"},
    )  # fmt: skip
    os.close(secondary)
    chunks: list[bytes] = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        ready, _, _ = select.select([main], [], [], 1.0)
        if ready:
            try:
                data = os.read(main, 65536)
            except OSError:  # the child closed its end
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    os.close(main)
    proc.wait(timeout=30)
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.returncode == 0, err
    screen = b"".join(chunks).decode("utf-8", errors="replace")
    assert "\x1b[" in screen  # drawn, not printed
    assert "answer · sot" in screen
    assert "mode sot" in screen and "requests" in screen
