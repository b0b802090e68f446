"""Question sets: JSONL with ``question_id``, ``category`` and ``question`` per line."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from evals.records import Question

REQUIRED = ("question_id", "category", "question")


class DatasetError(Exception):
    """The dataset cannot be used at all (missing file, no valid line)."""


@dataclass
class Dataset:
    questions: list[Question]
    # (line number, why) of every line that was skipped
    skipped: list[tuple[int, str]] = field(default_factory=list)


def load_dataset(path: Path) -> Dataset:
    """Read ``path``; malformed lines are skipped and reported with their line number."""
    if not path.is_file():
        raise DatasetError(f"dataset {path} does not exist")
    questions: list[Question] = []
    skipped: list[tuple[int, str]] = []
    seen: set[int | str] = set()
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                skipped.append((n, f"not valid JSON: {exc}"))
                continue
            why = _invalid(row)
            if why is None and row["question_id"] in seen:
                why = f"duplicate question_id {row['question_id']!r}"
            if why is not None:
                skipped.append((n, why))
                continue
            seen.add(row["question_id"])
            extra = {k: v for k, v in row.items() if k not in REQUIRED}
            questions.append(Question(**{k: row[k] for k in REQUIRED}, extra=extra))
    if not questions:
        raise DatasetError(f"dataset {path} has no valid question ({len(skipped)} bad lines)")
    return Dataset(questions, skipped)


def _invalid(row: object) -> str | None:
    if not isinstance(row, dict):
        return "not a JSON object"
    missing = [k for k in REQUIRED if k not in row]
    if missing:
        return f"missing {', '.join(missing)}"
    qid = row["question_id"]
    if isinstance(qid, bool) or not isinstance(qid, int | str):
        return "question_id must be an integer or a string"
    if not isinstance(row["category"], str):
        return "category must be a string"
    if not isinstance(row["question"], str) or not row["question"].strip():
        return "question must be a non-empty string"
    return None


def select(
    questions: list[Question],
    categories: list[str] | None = None,
    per_category: int | None = None,
    suitable_only: bool = False,
    limit: int | None = None,
) -> list[Question]:
    """Filter in dataset order: by category, ``sot_suitable``, the first
    ``per_category`` of each category, then the first ``limit``."""
    out = [q for q in questions if categories is None or q.category in categories]
    if suitable_only:
        out = [q for q in out if q.sot_suitable]
    if per_category is not None:
        taken: dict[str, int] = defaultdict(int)
        kept = []
        for q in out:
            if taken[q.category] < per_category:
                taken[q.category] += 1
                kept.append(q)
        out = kept
    return out if limit is None else out[:limit]
