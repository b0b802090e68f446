"""The in-process against HTTP benchmark runs end to end on a tiny model (no timing
is asserted: the figures are the script's output, not a test's)."""

from __future__ import annotations

import socket

from evals import bench_http


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bench_http_measures_both_sides(tiny_llama_dir, capsys):
    gap = bench_http.main(
        # enough tokens that (t(N) - t(1)) stands well above a request's jitter
        ["--model", str(tiny_llama_dir), "--tokens", "64", "--repeats", "3",
         "--port", str(_free_port())]
    )  # fmt: skip
    assert gap.in_process_ms > 0 and gap.http_ms > 0
    assert gap.ratio == gap.http_ms / gap.in_process_ms
    assert "over HTTP" in capsys.readouterr().out
