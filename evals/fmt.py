"""Number and text formatting shared by the report and its plots."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from evals.summary import BASELINE

DASH = "–"


def fmt_speedup(value: float | None) -> str:
    """``2.31x``."""
    return DASH if value is None else f"{value:.2f}x"


def fmt_seconds(value: float | None) -> str:
    """``1.52 s`` (three decimals under 0.1 s)."""
    if value is None:
        return DASH
    return f"{value:.3f} s" if abs(value) < 0.1 else f"{value:.2f} s"


def fmt_percent(value: float | None) -> str:
    """``83%`` for 0.83."""
    return DASH if value is None else f"{100 * value:.0f}%"


def fmt_number(value: float | None, digits: int = 0) -> str:
    """A count or a mean: ``312``, ``3.7``."""
    return DASH if value is None else f"{value:.{digits}f}"


def fmt_value(value: Any) -> str:
    """A configuration value as one table cell."""
    if value is None or value == "" or value == [] or value == {}:
        return DASH
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | tuple | set):
        return ", ".join(fmt_value(v) for v in value)
    return str(value)


def truncate(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1].rstrip() + "…"


# --- summary access ---------------------------------------------------------------


def modes_of(summary: Mapping[str, Any]) -> list[str]:
    return list(summary.get("overall") or {})


def speedup_modes(summary: Mapping[str, Any]) -> list[str]:
    """Non-sequential modes with at least one question paired with sequential."""
    overall = summary.get("overall") or {}
    return [m for m in overall if m != BASELINE and (overall[m].get("paired") or 0) > 0]
