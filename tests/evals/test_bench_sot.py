"""``evals.bench_sot``'s jump-forward section on the embedded SmolLM2."""

from __future__ import annotations

import pytest

from engine import LLM
from evals.bench_sot import bench_jump

pytestmark = pytest.mark.slow


def test_bench_jump_compares_the_same_skeletons_in_fewer_steps(capsys):
    questions = [
        {"question": "How can I improve my time management skills?"},
        {"question": "What are the most effective ways to deal with stress?"},
    ]
    figures = bench_jump(LLM(device="cpu", speculative_tokens=0), questions, max_tokens=40)
    assert figures["questions"] == 2 and figures["same_text"] == 2
    # one step fewer per line from the second: these skeletons have at least three
    assert figures["jump_steps"] <= figures["plain_steps"] - 3
    assert figures["speedup"] > 0
    out = capsys.readouterr().out
    assert "speed-up plain/jump" in out and "same text 2/2" in out
