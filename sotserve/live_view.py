"""Terminal views of one streamed answer, fed event by event.

:class:`LiveView` keeps the state of an answer (the skeleton as it is written, each
point growing, the merged answer, the final timings) and renders it with ``rich``:
put it in a :class:`rich.live.Live` and call ``view.update(event)`` for every
planner event. :class:`PlainView` is the same for a pipe: the answer text as it
streams, the timings line on stderr at the end. Neither view touches the event
loop or the terminal by itself, so both can be tested with a ``StringIO``.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import TextIO

from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from sotserve.schemas import (
    AnswerDelta,
    Done,
    ErrorEvent,
    Event,
    PlanPoint,
    PlanReady,
    PointDelta,
    PointDone,
    PointStart,
    SkeletonDelta,
)

REFRESH_PER_SECOND = 10
MIN_PANEL_WIDTH = 32  # a point panel narrower than this is unreadable


def timings_line(done: Done) -> str:
    """One line: the mode and why, the timings, the tokens and the requests."""
    mode = f"mode {done.mode}"
    if done.route is not None:
        mode += f" (auto by {done.route.source}: {done.route.reason})"
    parts = [mode]
    if done.fallback:
        parts.append(f"fallback: {done.fallback}")
    if done.points:
        parts.append(f"{len(done.points)} points")
    t = done.timings
    secs = [
        f"{name} {value:.2f}s"
        for name, value in (
            ("route", t.route_s),
            ("skeleton", t.skeleton_s),
            ("first token", t.first_answer_token_s),
            ("total", t.total_s),
        )
        if value is not None
    ]
    parts.append(", ".join(secs))
    u = done.usage
    parts.append(
        f"tokens {u.prompt_tokens} prompt / {u.completion_tokens} completion / "
        f"{u.cached_tokens} cached"
    )
    parts.append(f"{u.requests} request{'s' if u.requests != 1 else ''}")
    if done.finish_reason not in (None, "stop"):
        parts.append(f"finish {done.finish_reason}")
    return " | ".join(parts)


@dataclass
class _Point:
    plan: PlanPoint
    text: str = ""
    done: PointDone | None = None


class LiveView:
    """The state of one answer and its ``rich`` renderable.

    While the answer streams it shows the skeleton, then one panel per point in
    columns that grow in parallel; once ``done`` arrives it shows the merged answer,
    a line per point and the timings line. A sequential answer (no points) streams
    straight into the answer panel.
    """

    def __init__(self, question: str | None = None) -> None:
        self.question = question
        self.t0 = time.monotonic()
        self.skeleton = ""
        self.points: dict[int, _Point] = {}
        self.plan: PlanReady | None = None
        self.answer = ""
        self.done: Done | None = None
        self.error: str | None = None

    def update(self, event: Event) -> None:
        if isinstance(event, SkeletonDelta):
            self.skeleton += event.text
        elif isinstance(event, PointStart):
            self.points.setdefault(event.point.index, _Point(event.point))
        elif isinstance(event, PlanReady):
            self.plan = event
            for p in event.points:  # the final titles and dependencies
                self.points.setdefault(p.index, _Point(p)).plan = p
        elif isinstance(event, PointDelta):
            self._point(event.index).text += event.text
        elif isinstance(event, PointDone):
            point = self._point(event.index)
            point.text = event.text
            point.done = event
        elif isinstance(event, AnswerDelta):
            self.answer += event.text
        elif isinstance(event, Done):
            self.done = event
            self.answer = event.answer
        elif isinstance(event, ErrorEvent):
            self.error = event.message

    def _point(self, index: int) -> _Point:
        if index not in self.points:  # a delta before its start: never expected
            self.points[index] = _Point(PlanPoint(index=index, title=f"point {index}"))
        return self.points[index]

    # -- rendering ---------------------------------------------------------------------
    def status(self) -> str:
        """What the answer is doing now, for the line under the question."""
        elapsed = f"{time.monotonic() - self.t0:.1f}s"
        if self.error is not None:
            return f"failed after {elapsed}"
        if self.done is not None:
            return "done"
        mode = self.plan.mode if self.plan is not None else None
        if self.points and mode != "sequential":
            n_done = sum(p.done is not None for p in self.points.values())
            total = len(self.plan.points) if self.plan is not None else len(self.points)
            more = "" if self.plan is not None else "+"
            return f"{mode or 'sot'} · {n_done}/{total}{more} points done · {elapsed}"
        if self.answer:
            return f"{mode or 'sequential'} · answering · {elapsed}"
        if self.skeleton:
            return f"writing the skeleton · {elapsed}"
        return f"thinking · {elapsed}"

    def _point_panel(self, point: _Point) -> Panel:
        p = point.plan
        text = point.text.strip()
        placeholder = "(empty)" if point.done is not None else "…"
        body = Text(text or placeholder, style="" if text else "dim")
        if point.done is not None:
            d = point.done
            sub = f"✓ {d.completion_tokens} tok"
            if d.cached_tokens:
                sub += f" · {d.cached_tokens} cached"
            if d.finish_reason == "length":
                sub += " · cut"
            style = "green"
        elif not point.text and p.depends_on:
            sub = "after " + ", ".join(map(str, p.depends_on))
            style = "dim"
        else:
            sub = "writing…"
            style = "yellow"
        return Panel(
            body,
            title=Text(f"{p.index}. {p.title}", style="bold"),
            title_align="left",
            subtitle=sub,
            subtitle_align="right",
            border_style=style,
        )

    def _points_grid(self, width: int) -> Table:
        points = [self.points[i] for i in sorted(self.points)]
        per_row = max(1, min(len(points), width // MIN_PANEL_WIDTH, 4))
        grid = Table.grid(expand=True, padding=(0, 1))
        for _ in range(per_row):
            grid.add_column(ratio=1)
        for start in range(0, len(points), per_row):
            row: list[RenderableType] = [
                self._point_panel(p) for p in points[start : start + per_row]
            ]
            row += [""] * (per_row - len(row))
            grid.add_row(*row)
        return grid

    def _summary(self) -> Table:
        table = Table.grid(padding=(0, 1))
        for _ in range(3):
            table.add_column()
        assert self.done is not None
        for p in self.done.points:
            d = self.points[p.index].done if p.index in self.points else None
            tokens = f"{d.completion_tokens} tok" if d else ""
            if d and d.cached_tokens:
                tokens += f", {d.cached_tokens} cached"
            mark = Text("✓", style="green") if d else Text("✗", style="red")
            table.add_row(mark, f"{p.index}. {p.title}", Text(tokens, style="dim"))
        return table

    def renderables(self, width: int = 80) -> list[RenderableType]:
        """What the view shows now, for a console ``width`` columns wide."""
        out: list[RenderableType] = []
        if self.question:
            out.append(Text(self.question, style="bold"))
        if self.done is None:
            out.append(Text(self.status(), style="dim"))
        sequential = self.plan is not None and self.plan.mode == "sequential"
        if self.done is None and self.skeleton.strip():
            # the skeleton of a fallback stays visible: it shows why there are no points
            writing = self.plan is None
            out.append(
                Panel(
                    Text(self.skeleton.strip()),
                    title="skeleton",
                    title_align="left",
                    subtitle="writing…" if writing else None,
                    subtitle_align="right",
                    border_style="cyan" if writing else "dim",
                )
            )
        if self.done is None and self.points and not sequential:
            out.append(self._points_grid(width))
        show_answer = self.done is not None or not self.points or sequential
        if show_answer and (self.answer or self.done is not None):
            title = "answer" if self.done is None else f"answer · {self.done.mode}"
            out.append(
                Panel(
                    Text(self.answer.strip()),
                    title=title,
                    title_align="left",
                    border_style="blue" if self.done is not None else "yellow",
                )
            )
        if self.done is not None:
            if self.done.points:
                out.append(self._summary())
            out.append(Text(timings_line(self.done), style="dim"))
        if self.error is not None:
            out.append(Text(f"error: {self.error}", style="bold red"))
        return out

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield Group(*self.renderables(options.max_width))


class PlainView:
    """The answer for a pipe: text to ``out`` as it streams, timings to ``err``."""

    def __init__(self, out: TextIO | None = None, err: TextIO | None = None) -> None:
        self.out = out if out is not None else sys.stdout
        self.err = err if err is not None else sys.stderr
        self.wrote = False
        self.at_line_start = True

    def update(self, event: Event) -> None:
        if isinstance(event, AnswerDelta):
            self._write(event.text)
        elif isinstance(event, Done):
            if not self.wrote:
                self._write(event.answer)
            if not self.at_line_start:
                self._write("\n")
            print(timings_line(event), file=self.err, flush=True)

    def _write(self, text: str) -> None:
        if text:
            self.out.write(text)
            self.out.flush()
            self.wrote = True
            self.at_line_start = text.endswith("\n")
