"""``sotserve route``: how ``auto`` would answer, on the embedded model, and bad input."""

from __future__ import annotations

import json

import pytest

import engine
from sotserve.cli import main


def test_an_empty_question_is_refused_before_the_model_loads(monkeypatch, capsys):
    def no_engine(*args, **kwargs):
        raise AssertionError("the engine was loaded for an empty question")

    monkeypatch.setattr(engine, "AsyncEngine", no_engine)
    assert main(["route", "  \n"]) == 2
    assert "error: the question is empty" in capsys.readouterr().err


def test_unknown_router_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["route", "hi", "--router", "nope"])
    assert exc.value.code == 2


@pytest.mark.parametrize(
    ("question", "router", "mode", "source"),
    [
        ("What are the most effective ways to deal with stress?", None, "sot", "trained"),
        ("Solve for x in the equation 3x + 10 = 5(x - 2).", "rules", "sequential", "rules"),
        # megabytes: the router reads the two ends only
        ("What are some tips to relax? " + "very " * 1_000_000, None, None, "trained"),
    ],
)
def test_route_prints_mode_source_and_reason(capsys, question, router, mode, source):
    argv = ["route", question, "--json"] + (["--router", router] if router else [])
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["source"] == source and out["reason"]
    assert out["mode"] == mode if mode else out["mode"] in ("sequential", "sot", "graph")


def test_route_plain_output(capsys):
    assert main(["route", "How can I improve my time management skills?"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["mode", "source", "reason"]
