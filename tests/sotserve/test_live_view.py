"""The terminal views, fed hand-made events and rendered to a string."""

from __future__ import annotations

import io

from rich.console import Console

from sotserve.live_view import LiveView, PlainView, timings_line
from sotserve.schemas import (
    AnswerDelta,
    Done,
    PlanPoint,
    PlanReady,
    PointDelta,
    PointDone,
    PointStart,
    RouteDecision,
    SkeletonDelta,
    Timings,
    Usage,
)

POINTS = [
    PlanPoint(index=1, title="Sleep well"),
    PlanPoint(index=2, title="Eat greens"),
    PlanPoint(index=3, title="Walk daily"),
]
TEXTS = {1: " Seven hours a night.", 2: " Half the plate.", 3: " Thirty minutes."}
ROUTE = RouteDecision(mode="sot", source="rules", reason="asks for several points")


def render(view: LiveView, width: int = 120) -> str:
    console = Console(file=io.StringIO(), width=width, color_system=None)
    console.print(view)
    return console.file.getvalue()


def flat(text: str) -> str:
    """``text`` with every run of whitespace (line wraps included) as one space."""
    return " ".join(text.split())


def done_event(**kw) -> Done:
    answer = "\n\n".join(f"{p.index}. **{p.title}**{TEXTS[p.index]}" for p in POINTS)
    values = dict(
        mode="sot",
        answer=answer,
        points=POINTS,
        timings=Timings(route_s=0.01, skeleton_s=0.9, first_answer_token_s=0.5, total_s=2.5),
        usage=Usage(prompt_tokens=100, completion_tokens=40, cached_tokens=60, requests=4),
        route=ROUTE,
        finish_reason="stop",
    )
    values.update(kw)
    return Done(**values)


def test_live_view_draws_skeleton_points_then_answer():
    view = LiveView("How do I stay healthy?")
    assert "thinking" in render(view)

    view.update(SkeletonDelta(text="1."))
    view.update(SkeletonDelta(text=" Sleep well\n2. Eat greens\n3. Walk"))
    out = render(view)
    assert "How do I stay healthy?" in out
    assert "skeleton" in out and "2. Eat greens" in out and "3. Walk" in out
    assert "writing the skeleton" in out

    for p in POINTS[:2]:  # pipelined: points start while the skeleton is written
        view.update(PointStart(point=p))
    view.update(PointDelta(index=1, text=" Seven hours"))
    out = render(view)
    assert "1. Sleep well" in out and "Seven hours" in out
    assert "0/2+ points done" in out

    view.update(SkeletonDelta(text=" daily\n"))
    view.update(PointStart(point=POINTS[2]))
    view.update(PlanReady(mode="sot", points=POINTS, route=ROUTE))
    view.update(PointDelta(index=1, text=" a night."))
    view.update(PointDone(index=1, text=TEXTS[1], finish_reason="stop", completion_tokens=6,
                          prompt_tokens=30, cached_tokens=25))  # fmt: skip
    for i in (2, 3):
        view.update(PointDelta(index=i, text=TEXTS[i]))
    view.update(AnswerDelta(text="1. **Sleep well** Seven hours a night."))
    out = render(view)
    for p in POINTS:  # every point has its panel, all side by side at this width
        assert f"{p.index}. {p.title}" in out
    assert "Seven hours a night." in out and "Half the plate." in out
    assert "Thirty minutes." in out
    assert "✓ 6 tok · 25 cached" in out  # the finished point
    assert out.count("writing…") == 2  # the two still running
    assert "1/3 points done" in out
    title_line = next(line for line in out.splitlines() if "─ 1. Sleep well" in line)
    assert "2. Eat greens" in title_line and "3. Walk daily" in title_line

    for i in (2, 3):
        view.update(PointDone(index=i, text=TEXTS[i], finish_reason="length",
                              completion_tokens=5, prompt_tokens=31, cached_tokens=25))  # fmt: skip
    view.update(AnswerDelta(text="\n\n2. ..."))
    view.update(done_event())
    out = render(view)
    assert "answer · sot" in out
    assert "1. **Sleep well** Seven hours a night." in out
    assert "3. **Walk daily** Thirty minutes." in out
    assert "─ skeleton" not in out and "writing" not in out  # the live parts are gone
    assert "5 tok, 25 cached" in out  # per-point summary
    line = flat(out)
    assert "mode sot (auto by rules: asks for several points)" in line
    assert "route 0.01s, skeleton 0.90s, first token 0.50s, total 2.50s" in line
    assert "tokens 100 prompt / 40 completion / 60 cached | 4 requests" in line


def test_live_view_stacks_points_on_a_narrow_console():
    view = LiveView()
    for p in POINTS:
        view.update(PointStart(point=p))
        view.update(PointDelta(index=p.index, text=TEXTS[p.index]))
    out = render(view, width=40)
    lines = out.splitlines()
    assert all(len(line) <= 40 for line in lines)
    rows = [i for i, line in enumerate(lines) for p in POINTS if f"{p.index}. {p.title}" in line]
    assert len(rows) == 3 and len(set(rows)) == 3  # one panel per row


def test_live_view_graph_point_waits_for_parents():
    view = LiveView()
    view.update(PointStart(point=PlanPoint(index=1, title="Define it")))
    view.update(PointStart(point=PlanPoint(index=2, title="Compare", depends_on=[1])))
    out = render(view)
    assert "after 1" in out


def test_live_view_sequential_fallback_streams_the_answer():
    view = LiveView("What is 2+2?")
    view.update(SkeletonDelta(text="1. Four"))
    reason = "the skeleton had 1 usable point(s); answered with sequential decoding"
    view.update(PlanReady(mode="sequential", points=[], fallback=reason))
    view.update(AnswerDelta(text="It is "))
    view.update(AnswerDelta(text="four."))
    out = render(view)
    assert "It is four." in out and "answer" in out
    view.update(
        done_event(
            mode="sequential", answer="It is four.", points=[], route=None, fallback=reason,
            timings=Timings(skeleton_s=0.4, first_answer_token_s=0.6, total_s=1.0),
            usage=Usage(prompt_tokens=50, completion_tokens=9, requests=2),
        )
    )  # fmt: skip
    out = render(view)
    assert "answer · sequential" in out and "It is four." in out
    assert "mode sequential | fallback: the skeleton had 1 usable point(s)" in flat(out)


def test_timings_line():
    line = timings_line(done_event(route=None, finish_reason="length"))
    assert line.startswith("mode sot | 3 points | route 0.01s")
    assert line.endswith("4 requests | finish length")
    one = done_event(
        mode="sequential", points=[], route=None,
        timings=Timings(total_s=1.0), usage=Usage(requests=1),
    )  # fmt: skip
    assert timings_line(one) == (
        "mode sequential | total 1.00s | tokens 0 prompt / 0 completion / 0 cached | 1 request"
    )


def test_plain_view_streams_the_answer_and_times_on_stderr():
    out, err = io.StringIO(), io.StringIO()
    view = PlainView(out, err)
    view.update(SkeletonDelta(text="1. Sleep"))
    view.update(PointStart(point=POINTS[0]))
    view.update(PointDelta(index=1, text=" Seven"))
    assert out.getvalue() == ""  # only the merged answer goes to stdout
    view.update(AnswerDelta(text="1. **Sleep well**"))
    assert out.getvalue() == "1. **Sleep well**"
    view.update(AnswerDelta(text=" Seven hours."))
    assert err.getvalue() == ""
    view.update(done_event())
    assert out.getvalue() == "1. **Sleep well** Seven hours.\n"
    assert err.getvalue().startswith("mode sot (auto by rules")
    assert err.getvalue().endswith("4 requests\n")
