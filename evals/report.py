"""``report.md`` from recorded runs and their ``summary.json``.

:func:`write_report` renders the summary (see :mod:`evals.summary`, plus the CLI's
``config`` and ``judge`` keys) as Markdown tables, and links the figures that
:mod:`evals.plots` draws next to it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from evals.fmt import (
    DASH,
    fmt_number,
    fmt_percent,
    fmt_seconds,
    fmt_speedup,
    fmt_value,
    speedup_modes,
)
from evals.plots import Plot, draw_plots
from evals.records import RunRecord
from evals.summary import BASELINE


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def md_table(header: Sequence[str], rows: Iterable[Sequence[str]], numeric: bool = True) -> str:
    """A Markdown table: the first column left-aligned, the others right-aligned
    (left-aligned too unless ``numeric``)."""
    rest = "---:" if numeric else ":---"
    lines = [
        "| " + " | ".join(_cell(h) for h in header) + " |",
        "|" + "|".join([":---"] + [rest] * (len(header) - 1)) + "|",
    ]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _flatten(config: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Nested dicts as ``outer.inner`` keys, in insertion order."""
    items: list[tuple[str, Any]] = []
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            items += _flatten(value, f"{name}.")
        else:
            items.append((name, value))
    return items


# --- report sections -------------------------------------------------------------------

STAT_ROWS: list[tuple[str, str, Any]] = [
    ("Questions answered", "questions", fmt_number),
    ("Runs (errors)", "runs", None),
    ("Median latency", "median_latency_s", fmt_seconds),
    ("Median TTFT", "median_ttft_s", fmt_seconds),
    ("Median skeleton time", "median_skeleton_s", fmt_seconds),
    ("Median speed-up", "median_speedup", fmt_speedup),
    ("Geomean speed-up", "geomean_speedup", fmt_speedup),
    ("Speed-up range", "min_speedup", None),
    ("Median TTFT speed-up", "median_ttft_speedup", fmt_speedup),
    ("Median equal-length speed-up", "median_equal_length_speedup", fmt_speedup),
    ("Geomean equal-length speed-up", "geomean_equal_length_speedup", fmt_speedup),
    ("Equal-length paired (extrapolated)", "equal_length_paired", None),
    ("Median answer tokens", "median_answer_tokens", fmt_number),
    ("Median answer tokens/s", "median_answer_tokens_per_s", lambda v: fmt_number(v, 1)),
    ("Paired questions", "paired", fmt_number),
    ("Mean points", "mean_points", lambda v: fmt_number(v, 1)),
    ("Fallback rate", "fallback_rate", fmt_percent),
    ("Cache hit ratio", "cache_hit_ratio", fmt_percent),
    ("Median generated tokens", "median_generated_tokens", fmt_number),
]


EQUAL_LENGTH_NOTE = (
    "Equal-length speed-up: the time the sequential answer to the same question took "
    "to reach as many answer tokens as the mode's answer has, over the mode's latency, "
    "so a shorter answer does not count as a faster one. Where the sequential answer "
    "is shorter, its time is extrapolated at its own decode rate (the count in "
    "brackets). Answer tokens/s: the answer's tokens over its latency."
)


def _stat_cell(stats: Mapping[str, Any], key: str, fmt: Any) -> str:
    """One cell of :func:`stats_table`."""
    if key == "runs":
        return f"{stats.get('runs', 0)} ({stats.get('errors', 0)})"
    if key == "min_speedup":
        lo, hi = stats.get("min_speedup"), stats.get("max_speedup")
        return DASH if lo is None else f"{fmt_speedup(lo)} – {fmt_speedup(hi)}"
    if key == "equal_length_paired":
        n = stats.get("equal_length_paired")
        return DASH if n is None else f"{n} ({stats.get('equal_length_extrapolated', 0)})"
    return fmt(stats.get(key))


def stats_table(by_mode: Mapping[str, Mapping[str, Any]]) -> str:
    """Metrics as rows, modes as columns."""
    modes = list(by_mode)
    rows = [
        [label] + [_stat_cell(by_mode[m], key, fmt) for m in modes] for label, key, fmt in STAT_ROWS
    ]
    return md_table(["", *modes], rows)


def headline_section(summary: Mapping[str, Any]) -> list[str]:
    """One bullet per compared mode, and one for the router."""
    overall = summary.get("overall") or {}
    base = (overall.get(BASELINE) or {}).get("median_latency_s")
    lines = []
    for mode in speedup_modes(summary):
        s = overall[mode]
        lines.append(
            f"- **{mode}**: median speed-up **{fmt_speedup(s.get('median_speedup'))}** "
            f"(geomean {fmt_speedup(s.get('geomean_speedup'))}) over sequential on "
            f"{s.get('paired')} questions; median latency {fmt_seconds(s.get('median_latency_s'))} "
            f"vs {fmt_seconds(base)}, median TTFT {fmt_seconds(s.get('median_ttft_s'))}; "
            f"equal-length speed-up {fmt_speedup(s.get('median_equal_length_speedup'))} "
            f"({s.get('equal_length_extrapolated', 0)} of {s.get('equal_length_paired', 0)} "
            f"extrapolated), {fmt_number(s.get('median_answer_tokens_per_s'), 1)} answer tokens/s."
        )
    router = summary.get("router")
    if router:
        lines.append(
            f"- **router**: {fmt_percent(router['accuracy'])} of "
            f"{router['questions']} labelled questions routed right."
        )
    return lines or ["- No non-sequential mode to compare with sequential."]


def config_section(config: Mapping[str, Any] | None) -> list[str]:
    """The run configuration, nested keys flattened."""
    items = _flatten(config or {})
    if not items:
        return ["No configuration was recorded."]
    return [
        md_table(["Setting", "Value"], [[f"`{k}`", fmt_value(v)] for k, v in items], numeric=False)
    ]


def category_section(summary: Mapping[str, Any]) -> list[str]:
    """Median speed-up per category and mode, with the overall row last."""
    modes = speedup_modes(summary)
    by_cat = summary.get("by_category") or {}
    if not modes or not by_cat:
        return ["No speed-ups to break down (no non-sequential mode paired with sequential)."]

    def row(name: str, stats: Mapping[str, Any]) -> list[str]:
        base = (stats.get(BASELINE) or {}).get("median_latency_s")
        cells = [name, fmt_seconds(base)]
        for m in modes:
            s = stats.get(m) or {}
            cells.append(
                f"{fmt_speedup(s.get('median_speedup'))} (n={s.get('paired', 0)})"
                if s.get("median_speedup") is not None
                else DASH
            )
        return cells

    rows = [row(c, stats) for c, stats in by_cat.items()]
    rows.append(row("**overall**", summary["overall"]))
    header = ["Category", "Sequential median latency"] + [f"{m} median speed-up" for m in modes]
    return [md_table(header, rows)]


def router_section(router: Mapping[str, Any] | None) -> list[str]:
    """Router accuracy and its confusion matrix."""
    if not router:
        return ["No `auto` runs on labelled questions: the router was not evaluated."]
    confusion = router["confusion"]
    picks = list(next(iter(confusion.values())))
    rows = [
        [label.replace("_", " ")] + [str(counts.get(p, 0)) for p in picks]
        for label, counts in confusion.items()
    ]
    pr = ", ".join(f"{key} {fmt_percent(router.get(key))}" for key in ("precision", "recall"))
    return [
        f"Accuracy: **{fmt_percent(router['accuracy'])}** on {router['questions']} labelled "
        "questions (a skeleton mode counts as right for `sot_suitable` questions, "
        f'sequential for the others); of "use a skeleton": {pr}.',
        "",
        md_table(["sot_suitable \\ routed to", *picks], rows),
    ]


def judge_section(judge: Mapping[str, Any] | None) -> list[str]:
    """The judge's verdicts per mode."""
    if not judge:
        return ["No judge was run."]
    results = judge.get("results") or {}
    rows = []
    for mode, r in results.items():
        decided = sum(r.get(k, 0) for k in ("win", "tie", "loss"))
        rows.append(
            [mode]
            + [str(r.get(k, 0)) for k in ("win", "tie", "loss", "invalid")]
            + [fmt_percent(r.get("win", 0) / decided if decided else None)]
        )
    return [
        f"Judge: **{judge.get('name', 'unnamed')}**. Each mode's answer against the "
        "sequential answer to the same question, asked in both orders: a win or a loss "
        "only when both orders agree, else a tie (FastChat's rule); invalid when the "
        "judge stated no verdict, even when asked again. "
        "Win rate = wins / (wins + ties + losses).",
        "",
        md_table(["Mode", "Win", "Tie", "Loss", "Invalid", "Win rate"], rows)
        if rows
        else "The judge returned no results.",
    ]


def checks_section(summary: Mapping[str, Any]) -> list[str]:
    """Failed automatic quality checks per mode."""
    checks = summary.get("checks") or {}
    if not checks:
        return ["No automatic checks were recorded."]
    names = sorted({name for counts in checks.values() for name in counts})
    overall = summary.get("overall") or {}
    modes = list(checks)
    rows = [[name] + [str(checks[m].get(name, 0)) for m in modes] for name in names]
    rows.append(["answers (runs)"] + [str((overall.get(m) or {}).get("runs", DASH)) for m in modes])
    intro = "Answers failing each automatic check, per mode"
    intro += "." if names else ": none recorded a check."
    return [intro, "", md_table(["Check", *modes], rows)]


def plots_section(plots: list[Plot]) -> list[str]:
    """Each figure as a relative image link, or why it was skipped."""
    lines = []
    for plot in plots:
        lines.append(f"### {plot.title}")
        lines.append("")
        if plot.path is None:
            lines.append(f"_Skipped: {plot.note}._")
        else:
            lines.append(f"![{plot.title}]({plot.path.name})")
            if plot.key == "timeline":
                lines += ["", f"_{plot.note}._"]
        lines.append("")
    return lines


def render_report(summary: Mapping[str, Any], plots: list[Plot]) -> str:
    """The whole ``report.md``."""
    parts: list[str] = ["# Skeleton-of-Thought evaluation report", ""]
    parts += [*headline_section(summary), ""]
    parts += ["## Configuration", "", *config_section(summary.get("config")), ""]
    parts += ["## Latency and speed-up: all questions", ""]
    parts += [stats_table(summary.get("overall") or {}), "", EQUAL_LENGTH_NOTE, ""]
    suitable = summary.get("sot_suitable")
    if suitable and any((s or {}).get("questions") for s in suitable.values()):
        parts += ["## Latency and speed-up: `sot_suitable` questions", ""]
        parts += [stats_table(suitable), ""]
    parts += ["## Speed-up by category", "", *category_section(summary), ""]
    parts += ["## Router", "", *router_section(summary.get("router")), ""]
    parts += ["## Quality", "", "### Judge", "", *judge_section(summary.get("judge")), ""]
    parts += ["### Automatic checks", "", *checks_section(summary), ""]
    parts += ["## Plots", "", *plots_section(plots)]
    return "\n".join(parts).rstrip() + "\n"


def write_report(out_dir: Path, records: list[RunRecord], summary: dict) -> dict[str, Path]:
    """Write ``report.md`` and its PNG plots into ``out_dir``; return their paths
    (``report``, and ``latency`` / ``speedup`` / ``timeline`` for the plots drawn)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = draw_plots(out_dir, records, summary)
    report = out_dir / "report.md"
    report.write_text(render_report(summary, plots))
    return {"report": report} | {p.key: p.path for p in plots if p.path is not None}
