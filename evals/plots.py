"""The report's figures, drawn with matplotlib (headless, Agg):

- ``latency_by_mode.png``: per-question end-to-end latency of each mode, with the
  time to first token;
- ``speedup_by_category.png``: the median speed-up over sequential of each
  non-sequential mode, per category and overall;
- ``equal_length_speedup.png``: each mode's median plain speed-up beside its
  median equal-length speed-up, and each mode's median answer tokens/s;
- ``timeline.png``: how one representative skeleton answer ran (skeleton, then the
  points in parallel) against the sequential answer to the same question.

A figure without data (say, only sequential runs) is skipped with a reason.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from evals.fmt import fmt_seconds, fmt_speedup, modes_of, speedup_modes, truncate
from evals.records import RunRecord
from evals.summary import BASELINE, per_question

DPI = 120
SKELETON_MODES = ("sot", "graph")
FILES = {
    "latency": "latency_by_mode.png",
    "speedup": "speedup_by_category.png",
    "equal_length": "equal_length_speedup.png",
    "timeline": "timeline.png",
}
MODE_COLORS = {
    "sequential": "#7f7f7f",
    "sot": "#1f77b4",
    "graph": "#2ca02c",
    "auto": "#ff7f0e",
}
EXTRA_COLORS = ("#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#d62728")


def _color(mode: str, index: int = 0) -> str:
    return MODE_COLORS.get(mode, EXTRA_COLORS[index % len(EXTRA_COLORS)])


@dataclass
class Plot:
    """One figure of the report: drawn to ``path``, or skipped because of ``note``."""

    key: str
    title: str
    path: Path | None
    note: str


def _per_question_medians(records: list[RunRecord], mode: str, field: str) -> list[float]:
    """One value of ``field`` per question of ``mode`` (the median over repeats)."""
    values = []
    for (_, m), runs in per_question(records).items():
        vals = [getattr(r, field) for r in runs if getattr(r, field) is not None]
        if m == mode and vals:
            values.append(statistics.median(vals))
    return values


def _save(fig: plt.Figure, path: Path) -> Path:
    """Write ``fig`` as a PNG and close it."""
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, bbox_inches="tight", pad_inches=0.15)
    plt.close(fig)
    return path


def plot_latency(records: list[RunRecord], modes: list[str], path: Path) -> Path | None:
    """Box plot of per-question latency per mode, the questions as dots, and each
    question's time to first token as a triangle. ``None`` if no run succeeded."""
    data = {m: _per_question_medians(records, m, "latency_s") for m in modes}
    modes = [m for m in modes if data[m]]
    if not modes:
        return None
    ttft = {m: _per_question_medians(records, m, "ttft_s") for m in modes}
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(modes) + 2), 4.8))
    positions = list(range(1, len(modes) + 1))
    boxes = ax.boxplot(
        [data[m] for m in modes],
        positions=positions,
        widths=0.55,
        showfliers=False,
        patch_artist=True,
        medianprops={"color": "black", "linewidth": 1.5},
    )
    for i, (pos, box, mode) in enumerate(zip(positions, boxes["boxes"], modes, strict=True)):
        color = _color(mode, i)
        box.set_facecolor(color)
        box.set_alpha(0.25)
        ax.scatter(_jitter(pos, len(data[mode])), data[mode], s=22, color=color, alpha=0.8)
        ax.scatter(
            _jitter(pos, len(ttft[mode])),
            ttft[mode],
            s=26,
            marker="v",
            facecolor="white",
            edgecolor=color,
            linewidth=1.2,
            zorder=3,
        )
        median = statistics.median(data[mode])
        ax.annotate(
            fmt_seconds(median),
            (pos + 0.3, median),
            xytext=(3, 0),
            textcoords="offset points",
            va="center",
            fontsize=8,
        )
    ax.set_xticks(positions, [f"{m}\n(n={len(data[m])})" for m in modes])
    ax.set_xlim(0.4, len(modes) + 0.75)
    ax.set_ylim(0, max(max(v) for v in data.values()) * 1.22)
    ax.set_xlabel("mode (n = questions)")
    ax.set_ylabel("seconds")
    ax.set_title("Per-question latency by mode")
    ax.grid(axis="y", alpha=0.3)
    grey = "#555555"
    handles = [
        Line2D([], [], marker="o", linestyle="", color=grey, label="end-to-end latency"),
        Line2D(
            [],
            [],
            marker="v",
            linestyle="",
            markerfacecolor="white",
            markeredgecolor=grey,
            label="time to first token",
        ),
        Patch(facecolor="#dddddd", edgecolor="black", label="latency quartiles and median"),
    ]
    ax.legend(handles=handles, loc="upper center", ncol=3, fontsize=8)
    return _save(fig, path)


def _jitter(center: float, n: int, spread: float = 0.36) -> list[float]:
    """Random but reproducible x positions for ``n`` dots around ``center``."""
    rng = random.Random(n)
    return [center + rng.uniform(-spread / 2, spread / 2) for _ in range(n)]


def plot_speedup(summary: Mapping[str, Any], path: Path) -> Path | None:
    """Grouped bars of the median speed-up per category (and overall) of each
    non-sequential mode. ``None`` if no mode was paired with sequential."""
    modes = speedup_modes(summary)
    if not modes:
        return None
    by_cat = summary.get("by_category") or {}
    groups = [*by_cat, "overall"]
    stats = {**by_cat, "overall": summary["overall"]}
    width = 0.8 / len(modes)
    fig, ax = plt.subplots(figsize=(max(7.0, 0.45 * len(groups) * len(modes) + 3.5), 4.8))
    top = 1.0
    for i, mode in enumerate(modes):
        xs, ys = [], []
        for g, group in enumerate(groups):
            value = (stats[group].get(mode) or {}).get("median_speedup")
            if value is not None:
                xs.append(g - 0.4 + width * (i + 0.5))
                ys.append(value)
        bars = ax.bar(xs, ys, width * 0.92, color=_color(mode, i), label=mode)
        ax.bar_label(bars, [f"{y:.2f}x" for y in ys], fontsize=7, padding=2)
        top = max(top, *ys) if ys else top
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1, label="sequential (1.0x)")
    ax.axvline(len(groups) - 1.5, color="#999999", linestyle=":", linewidth=1)
    rotate = len(groups) > 6
    ax.set_xticks(
        range(len(groups)), groups, rotation=30 if rotate else 0, ha="right" if rotate else "center"
    )
    ax.get_xticklabels()[-1].set_fontweight("bold")
    ax.set_ylim(0, top * 1.12)
    ax.set_xlabel("category")
    ax.set_ylabel("median speed-up\n(sequential latency / mode latency)")
    ax.set_title("Speed-up over sequential by category")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="mode")
    return _save(fig, path)


def plot_equal_length(summary: Mapping[str, Any], path: Path) -> Path | None:
    """Left: per non-sequential mode, the median plain speed-up (solid) beside the
    median equal-length speed-up (hatched). Right: median answer tokens/s per mode.
    ``None`` if no mode recorded a token timeline."""
    overall = summary.get("overall") or {}
    modes = modes_of(summary)
    rates = {m: (overall[m] or {}).get("median_answer_tokens_per_s") for m in modes}
    rated = [m for m in modes if rates[m] is not None]
    if not rated:
        return None
    paired = [m for m in speedup_modes(summary) if m in rated]
    fig, (left, right) = plt.subplots(
        1, 2, figsize=(max(9.0, 1.3 * (len(paired) + len(rated)) + 4), 4.8)
    )
    top = 1.0
    for i, mode in enumerate(paired):
        s = overall[mode]
        color = _color(mode, i)
        for dx, key, hatch in ((-0.2, "median_speedup", None),
                               (0.2, "median_equal_length_speedup", "//")):  # fmt: skip
            value = s.get(key)
            if value is None:
                continue
            bars = left.bar([i + dx], [value], 0.38, color=color, hatch=hatch,
                            edgecolor="white" if hatch else color, alpha=0.9)  # fmt: skip
            left.bar_label(bars, [f"{value:.2f}x"], fontsize=7, padding=2)
            top = max(top, value)
    left.axhline(1.0, color="black", linestyle="--", linewidth=1)
    left.set_xticks(
        range(len(paired)),
        [f"{m}\n({overall[m].get('equal_length_extrapolated', 0)} extrap.)" for m in paired],
    )
    left.set_xlim(-0.7, max(len(paired), 1) - 0.3)
    left.set_ylim(0, top * 1.45)  # room for the legend above the bars
    left.set_ylabel("median speed-up over sequential")
    left.set_title("Plain vs equal-length speed-up")
    left.grid(axis="y", alpha=0.3)
    grey = "#888888"
    left.legend(
        handles=[
            Patch(facecolor=grey, label="plain (latency / latency)"),
            Patch(
                facecolor=grey,
                hatch="//",
                edgecolor="white",
                label="equal length (sequential time to as many tokens)",
            ),
            Line2D([], [], color="black", linestyle="--", label="sequential (1.0x)"),
        ],
        fontsize=7,
        loc="upper left",
    )
    values = [rates[m] for m in rated]
    bars = right.bar(range(len(rated)), values, 0.6,
                     color=[_color(m, i) for i, m in enumerate(rated)])  # fmt: skip
    right.bar_label(bars, [f"{v:.1f}" for v in values], fontsize=7, padding=2)
    right.set_xticks(range(len(rated)), rated)
    right.set_ylim(0, max(values) * 1.15 or 1.0)
    right.set_ylabel("median answer tokens / latency (tokens/s)")
    right.set_title("Answer tokens per second")
    right.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def _median_latency(runs: list[RunRecord]) -> float | None:
    """Median latency of the successful ``runs``."""
    vals = [r.latency_s for r in runs if r.ok and r.latency_s is not None]
    return statistics.median(vals) if vals else None


def _n_points(record: RunRecord) -> int:
    """How many point spans ``record``'s timeline has."""
    return sum(s.kind == "point" for s in record.timeline)


def pick_timeline_record(records: list[RunRecord]) -> tuple[RunRecord, RunRecord | None] | None:
    """A representative skeleton answer and the sequential answer to its question.

    Candidates are successful sot runs with a skeleton and at least three point spans
    (else graph runs, else auto runs answered by a skeleton mode; fewer points only
    if nothing has three). The pick is the one whose speed-up over sequential is
    closest to the candidates' median (in log space), or, without a sequential
    answer to compare with, whose latency is closest to the median latency.
    """
    ok = [r for r in records if r.ok and r.latency_s and r.timeline]
    shaped = [r for r in ok if any(s.kind == "skeleton" for s in r.timeline) and _n_points(r)]
    candidates: list[RunRecord] = []
    for min_points in (3, 1):
        for pool in (
            [r for r in shaped if r.mode == "sot"],
            [r for r in shaped if r.mode == "graph"],
            [r for r in shaped if r.mode not in SKELETON_MODES],
        ):
            candidates = [r for r in pool if _n_points(r) >= min_points]
            if candidates:
                break
        if candidates:
            break
    if not candidates:
        return None
    sequential = [r for r in records if r.mode == BASELINE and r.ok and r.latency_s]
    base = {
        r.question_id: _median_latency([s for s in sequential if s.question_id == r.question_id])
        for r in candidates
    }
    ratios = {id(r): base[r.question_id] / r.latency_s for r in candidates if base[r.question_id]}
    if ratios:
        target = math.log(statistics.median(ratios.values()))
        scored = [r for r in candidates if id(r) in ratios]
        pick = min(scored, key=lambda r: (abs(math.log(ratios[id(r)]) - target), -_n_points(r)))
    else:
        target = statistics.median(r.latency_s for r in candidates)
        pick = min(candidates, key=lambda r: (abs(r.latency_s - target), -_n_points(r)))
    same = [s for s in sequential if s.question_id == pick.question_id]
    if not same:
        return pick, None
    mid = statistics.median(s.latency_s for s in same)
    return pick, min(same, key=lambda s: (s.repeat != pick.repeat, abs(s.latency_s - mid)))


def _timeline_rows(
    record: RunRecord, baseline: RunRecord | None
) -> list[tuple[str, float, float, str]]:
    """``(label, start, end, color)`` of each bar: skeleton, points, sequential."""
    color = _color(record.resolved_mode or record.mode)
    points = {p.index: p for p in record.points}
    rows = []
    for span in sorted(record.timeline, key=lambda s: (s.kind != "skeleton", s.start_s)):
        if span.kind == "skeleton":
            rows.append(("skeleton", span.start_s, span.end_s, "#6b6b9b"))
        elif span.kind == "point":
            point = points.get(span.index)
            label = f"{span.index}. " + (truncate(point.title, 34) if point else "point")
            if point and point.depends_on:
                label += f" (after {', '.join(map(str, point.depends_on))})"
            rows.append((label, span.start_s, span.end_s, color))
        else:
            rows.append(("answer", span.start_s, span.end_s, color))
    if baseline is not None:
        spans = [s for s in baseline.timeline if s.kind == "answer"]
        start, end = (spans[0].start_s, spans[0].end_s) if spans else (0.0, baseline.latency_s)
        rows.append(("sequential answer", start, end, _color(BASELINE)))
    return rows


def plot_timeline(record: RunRecord, baseline: RunRecord | None, path: Path) -> Path:
    """Gantt chart of ``record``'s spans (skeleton, then each point), with
    ``baseline``'s sequential answer underneath, and the first answer tokens."""
    mode = record.resolved_mode or record.mode
    rows = _timeline_rows(record, baseline)
    fig, ax = plt.subplots(figsize=(10.5, 1.5 + 0.45 * len(rows)))
    for y, (_, start, end, color) in enumerate(rows):
        ax.barh(y, end - start, left=start, height=0.6, color=color, alpha=0.85)
        ax.annotate(
            fmt_seconds(end),
            (end, y),
            xytext=(3, 0),
            textcoords="offset points",
            va="center",
            fontsize=7,
            bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 0.5},
        )
    ax.set_yticks(range(len(rows)), [label for label, *_ in rows], fontsize=8)
    ax.invert_yaxis()
    if record.ttft_s is not None:
        ax.axvline(
            record.ttft_s,
            color="#d62728",
            linestyle="--",
            linewidth=1.2,
            label=f"{mode}: first answer token ({fmt_seconds(record.ttft_s)})",
        )
    if baseline is not None and baseline.ttft_s is not None:
        ax.scatter(
            [baseline.ttft_s],
            [len(rows) - 1],
            marker="v",
            s=70,
            zorder=3,
            color="#d62728",
            edgecolor="white",
            label=f"sequential: first token ({fmt_seconds(baseline.ttft_s)})",
        )
    ax.set_xlim(0, max(end for *_, end, _ in rows) * 1.08)
    ax.set_xlabel("seconds since the question was sent")
    title = f"Question {record.question_id} ({record.category}): {record.mode} mode"
    if record.mode != mode:
        title += f", routed to {mode}"
    if baseline is not None and baseline.latency_s:
        title += f", {fmt_speedup(baseline.latency_s / record.latency_s)} vs sequential"
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(
        fontsize=8,
        loc="upper center",
        bbox_to_anchor=(0.5, 0.0),
        borderaxespad=4.5,  # in font sizes: below the tick labels and the axis label
        ncol=2,
        frameon=False,
    )
    return _save(fig, path)


def draw_plots(out_dir: Path, records: list[RunRecord], summary: Mapping[str, Any]) -> list[Plot]:
    """Every figure of the report, drawn into ``out_dir`` or skipped with a reason."""
    latency = plot_latency(records, modes_of(summary), out_dir / FILES["latency"])
    speedup = plot_speedup(summary, out_dir / FILES["speedup"])
    equal = plot_equal_length(summary, out_dir / FILES["equal_length"])
    plots = [
        Plot("latency", "Latency by mode", latency, "no successful run to plot"),
        Plot(
            "speedup",
            "Speed-up by category",
            speedup,
            "no non-sequential mode answered a question that sequential also answered",
        ),
        Plot(
            "equal_length",
            "Equal-length speed-up and answer tokens/s",
            equal,
            "no answer recorded a token timeline",
        ),
    ]
    picked = pick_timeline_record(records)
    if picked is None:
        note = "no sot or graph answer with a recorded timeline"
        return [*plots, Plot("timeline", "Timeline of one answer", None, note)]
    record, baseline = picked
    path = plot_timeline(record, baseline, out_dir / FILES["timeline"])
    note = f"Question {record.question_id} ({record.category}) in {record.mode} mode, "
    note += f"{_n_points(record)} points"
    if baseline is not None and baseline.latency_s:
        speedup_x = fmt_speedup(baseline.latency_s / record.latency_s)
        note += f": the answer whose speed-up ({speedup_x}) is closest to the median"
    return [*plots, Plot("timeline", "Timeline of one answer", path, note)]
