"""Automatic quality checks that need no judge: cheap signs that an answer is broken.

:func:`auto_checks` returns a flat dict for :attr:`evals.records.RunRecord.checks`.
Every bool means "this answer fails the check" (``evals.summary.check_totals`` counts
the bools); the ints and floats next to them say by how much.

- ``empty_answer``: the answer has no word characters at all.
- ``empty_points`` / ``num_empty_points``: points (skeleton answers only) whose
  expansion is empty, whitespace or punctuation only.
- ``duplicate_points`` / ``num_duplicate_points``: points whose normalized text or
  title repeats an earlier point's (normalized: lowercase, punctuation stripped,
  whitespace collapsed).
- ``mid_sentence_points`` / ``num_mid_sentence_points``: points whose expansion is
  not blank but does not end at a sentence end (``.``, ``!``, ``?``, closing quotes or
  brackets after it): cut off in the middle of a sentence.
- ``title_only_points`` / ``num_title_only_points``: points whose expansion says
  nothing but (some of) the point's own title.
- ``list_points`` / ``num_list_points``: points whose expansion runs a numbered or
  bulleted list of its own (``1. ... 2. ...``, a line starting with ``-`` or ``*``).
- ``truncated``: the answer, or any of its points, stopped at the token limit.
- ``repetitive`` / ``repetition``: ``repetition`` is the share of word 4-grams that
  repeat a 4-gram seen earlier in the answer; the answer is ``repetitive`` when that
  share exceeds :data:`REPETITION_THRESHOLD` and it has at least
  :data:`MIN_REPETITION_WORDS` words. Numbers count as one token, so a counting
  loop (``5. Good sleep; 6. Good sleep; ...``) repeats too. Skeleton answers are
  measured over their point expansions (the merged ``N. **title**`` headers are not
  the model's words), sequential answers over the answer.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

from evals.records import PointRecord, RunRecord

#: Share of repeated word 4-grams above which an answer counts as repetitive. Healthy
#: prose repeats almost none (a few percent for stock phrases); a decoding loop that
#: repeats one short sentence for the second half of the answer scores about 0.43.
REPETITION_THRESHOLD = 0.3
#: Answers with fewer words than this are never called repetitive (too little text).
MIN_REPETITION_WORDS = 20
#: The n of the n-grams :func:`repetition_ratio` counts.
NGRAM = 4

_WORD = re.compile(r"\w+(?:'\w+)*")
_PUNCT = re.compile(r"[^\w\s]|_")
_NUMBER_TOKEN = "<num>"


def normalize(text: str) -> str:
    """Lowercase, punctuation replaced by spaces, whitespace collapsed to one space."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def is_blank(text: str) -> bool:
    """True for text with nothing but whitespace and punctuation."""
    return not normalize(text)


def words(text: str) -> list[str]:
    """Lowercased words of ``text``; every number becomes the same token."""
    return [_NUMBER_TOKEN if w.isdigit() else w for w in _WORD.findall(text.lower())]


def repetition_ratio(segments: Iterable[str], n: int = NGRAM) -> tuple[float, int]:
    """``(share of word n-grams already seen earlier, number of words)``.

    n-grams are taken within each segment (none spans two points), but "earlier"
    covers every segment before, so a point that copies another point counts too.
    The share is 0.0 when there are no n-grams.
    """
    seen: set[tuple[str, ...]] = set()
    total = repeats = num_words = 0
    for segment in segments:
        ws = words(segment)
        num_words += len(ws)
        for i in range(len(ws) - n + 1):
            gram = tuple(ws[i : i + n])
            total += 1
            if gram in seen:
                repeats += 1
            else:
                seen.add(gram)
    return (repeats / total if total else 0.0), num_words


def empty_point_indices(points: Sequence[PointRecord]) -> list[int]:
    """Indices of the points whose expansion is blank."""
    return [p.index for p in points if is_blank(p.text)]


def duplicate_point_indices(points: Sequence[PointRecord]) -> list[int]:
    """Indices of the points whose normalized text or title repeats an earlier point's.

    Blank texts and titles are never duplicates (blank points are counted separately).
    """
    texts: set[str] = set()
    titles: set[str] = set()
    dups = []
    for p in points:
        text, title = normalize(p.text), normalize(p.title)
        if (text and text in texts) or (title and title in titles):
            dups.append(p.index)
        if text:
            texts.add(text)
        if title:
            titles.add(title)
    return dups


_SENTENCE_END = re.compile(r"[.!?][\"'”’)\]]*$")
_LIST = re.compile(r"(?:^|\s)1[.)]\s+\S.*?\s2[.)]\s+\S|(?:^|\n)\s*[-*•]\s+\S", re.S)


def mid_sentence_point_indices(points: Sequence[PointRecord]) -> list[int]:
    """Indices of the non-blank points that do not end at a sentence end (title-only
    points are counted apart)."""
    title_only = set(title_only_point_indices(points))
    return [
        p.index
        for p in points
        if not is_blank(p.text)
        and not _SENTENCE_END.search(p.text.strip())
        and p.index not in title_only
    ]


def title_only_point_indices(points: Sequence[PointRecord]) -> list[int]:
    """Indices of the non-blank points whose words are all words of their title."""
    out = []
    for p in points:
        text = set(words(p.text))
        if text and text <= set(words(p.title)):
            out.append(p.index)
    return out


def list_point_indices(points: Sequence[PointRecord]) -> list[int]:
    """Indices of the points that run a list of their own."""
    return [p.index for p in points if _LIST.search(p.text)]


def is_truncated(record: RunRecord) -> bool:
    """The answer or any point stopped because it reached its token limit."""
    return record.finish_reason == "length" or any(
        p.finish_reason == "length" for p in record.points
    )


def answer_segments(record: RunRecord) -> list[str]:
    """The model's own text: point expansions for skeleton answers, else the answer."""
    if record.points:
        return [p.text for p in record.points]
    return [record.answer]


def auto_checks(record: RunRecord) -> dict[str, Any]:
    """The automatic checks of one answer (see the module docstring for each key)."""
    empty = empty_point_indices(record.points)
    dups = duplicate_point_indices(record.points)
    ratio, num_words = repetition_ratio(answer_segments(record))
    mid = mid_sentence_point_indices(record.points)
    title_only = title_only_point_indices(record.points)
    lists = list_point_indices(record.points)
    return {
        "empty_answer": is_blank(record.answer),
        "empty_points": bool(empty),
        "num_empty_points": len(empty),
        "duplicate_points": bool(dups),
        "num_duplicate_points": len(dups),
        "mid_sentence_points": bool(mid),
        "num_mid_sentence_points": len(mid),
        "title_only_points": bool(title_only),
        "num_title_only_points": len(title_only),
        "list_points": bool(lists),
        "num_list_points": len(lists),
        "truncated": is_truncated(record),
        "repetitive": num_words >= MIN_REPETITION_WORDS and ratio > REPETITION_THRESHOLD,
        "repetition": round(ratio, 4),
    }
