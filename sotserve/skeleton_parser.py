"""Incremental skeleton parser: text deltas in, points out as soon as their line ends.

Accepted point lines: ``1. Title``, ``1) Title``, ``Point 1: Title`` (also ``Step``,
markdown bold and ``#`` headings around them). In graph skeletons a line may end
with ``[depends on 1, 2]`` (or ``(depends on: 1 and 2)``, ``[after 1]``).

Small models pad skeletons with junk, so the parser is strict about where the list
ends: once points have started, a numbered line that does not count upwards
(``1.`` again: the model started a new list) or a non-indented line of prose ends
the skeleton, and so does a title that repeats an earlier one (the model going
round). Indented or bulleted lines under a point are ignored. Empty titles are
dropped and the count is capped; points are renumbered
1..n, and dependencies are mapped from the skeleton's numbers to the new ones;
only points above a line can be named, so a parsed plan has no cycles.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sotserve.schemas import PlanPoint

if TYPE_CHECKING:  # annotation only: the parser itself needs no tokenizer
    from transformers import PreTrainedTokenizerBase

_POINT = re.compile(
    r"""^\s*(?:\#{1,6}\s*)?(?:\*\*|__)?\s*
        (?:(?:point|step)\s*)?(?P<num>\d{1,3})\s*(?:[.):]|\s-)\s*(?:\*\*|__)?
        \s*(?P<title>.*?)\s*$""",
    re.IGNORECASE | re.VERBOSE,
)
_DEPS = re.compile(
    r"[\[(]\s*(?:depends\s+on|after|uses|needs)\s*:?\s*(?P<refs>[^\])]*)[\])]",
    re.IGNORECASE,
)
_REF = re.compile(r"\d+")
_MARKUP = re.compile(r"^[\s*_:#.-]+|[\s*_:#-]+$")


@dataclass
class _Raw:
    number: int  # as written in the skeleton
    title: str
    refs: list[int]


def parse_line(line: str) -> _Raw | None:
    """One skeleton line as ``(number, title, dependency refs)``, or None if not a point."""
    m = _POINT.match(line)
    if m is None:
        return None
    title = m.group("title")
    refs: list[int] = []
    for dep in _DEPS.finditer(title):
        refs.extend(int(r) for r in _REF.findall(dep.group("refs")))
    title = _MARKUP.sub("", _DEPS.sub("", title)).strip()
    return _Raw(int(m.group("num")), title, refs)


# Characters a title preview may hold: words, spaces and the joiners of a phrase;
# nothing parse_line would strip or read as markup or a dependency, and no comma or
# apostrophe, which open prose ("Sorry, I can't...") more often than titles.
_PLAIN = re.compile(r"[\w\s&/+-]*")
# First words of chat prose rather than of a title ("Sure! Here is...", "I think..."):
# a preview whose first word is, or may still grow into, one of them waits.
_PROSE_OPENERS = (
    "sorry", "sure", "certainly", "here", "i", "as", "unfortunately", "okay", "ok",
    "well", "yes", "no", "hello", "hi", "great", "of",
)  # fmt: skip


def title_preview(line: str) -> str:
    """The start of the title an unfinished point line is writing, up to its last
    letter or digit so far (the last word may still grow: "Str", then "Stronger"), as
    long as it is plain text. What the finished line's title will start with, unless
    the line turns out not to be a point; "" when nothing can be said yet.

    A partial word is shown: streamed text only ever grows, so "Str" followed by
    "onger" reads the same as "Stronger", and it lets the answer show the skeleton's
    very first token, as a sequential answer does."""
    m = _POINT.match(line)
    if m is None:
        return ""
    words = re.sub(r"[^A-Za-z0-9]+$", "", m.group("title"))
    if not _PLAIN.fullmatch(words) or _MARKUP.sub("", words) != words:
        return ""
    if not re.search(r"[A-Za-z]", words):
        return ""
    first = words.split()[0].lower()
    if any(opener.startswith(first) for opener in _PROSE_OPENERS):
        return ""
    return words


def _norm(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", title.lower()).strip()


@dataclass
class SkeletonParser:
    """Feed text deltas; collect :class:`PlanPoint` s as their lines complete."""

    max_points: int = 6
    points: list[PlanPoint] = field(default_factory=list)
    finished: bool = False  # the list has ended (or hit max_points); ignore the rest
    consumed_chars: int = 0  # text up to the end of the last line that was a point
    line_ends: dict[int, int] = field(default_factory=dict)  # point index -> end of its line
    _buffer: str = ""
    _offset: int = 0  # chars of the whole text before _buffer
    _last_number: int = 0
    _seen: set[str] = field(default_factory=set)
    _numbers: dict[int, int] = field(default_factory=dict)  # skeleton number -> index

    def feed(self, text: str) -> list[PlanPoint]:
        """Add text; return the points whose lines completed."""
        if self.finished:
            return []
        self._buffer += text
        out: list[PlanPoint] = []
        while not self.finished and "\n" in self._buffer:
            line, _, self._buffer = self._buffer.partition("\n")
            end = self._offset + len(line) + 1
            self._offset = end
            point = self._line(line, end)
            if point is not None:
                out.append(point)
        return out

    @property
    def open_line(self) -> str:
        """The line being written: text after the last line break."""
        return "" if self.finished else self._buffer

    def close(self, truncated: bool = False) -> list[PlanPoint]:
        """The text is over: the last line counts even without a newline, unless the
        text was ``truncated`` (cut by a token limit), which leaves that line unfinished."""
        out: list[PlanPoint] = []
        if not self.finished and self._buffer and not truncated:
            end = self._offset + len(self._buffer)
            point = self._line(self._buffer, end)
            if point is not None:
                out.append(point)
        self._buffer = ""
        self.finished = True
        return out

    def _line(self, line: str, end: int) -> PlanPoint | None:
        raw = parse_line(line)
        if raw is None:
            # Prose after the list ends it; indented or bulleted detail does not.
            if self.points and line.strip() and not line[:1].isspace() and line[:1] not in "-*•":
                self.finished = True
            return None
        if self.points and raw.number <= self._last_number:
            self.finished = True  # numbering restarted: a second list, not ours
            return None
        self._last_number = raw.number
        key = _norm(raw.title)
        if key in self._seen:
            # the model is going round: what follows repeats the list, so stop paying
            # for it (the planner ends the skeleton request when the parser finishes)
            self.finished = True
            return None
        if not key or not re.search(r"[a-z]", key):
            return None
        self._seen.add(key)
        # Only points above can be named: a reference to a later or unknown number is
        # dropped, so a parsed plan can never contain a cycle.
        deps = sorted({self._numbers[r] for r in raw.refs if r in self._numbers})
        index = len(self.points) + 1
        self._numbers[raw.number] = index
        point = PlanPoint(index=index, title=raw.title, depends_on=deps)
        self.points.append(point)
        self.consumed_chars = self.line_ends[index] = end
        if len(self.points) >= self.max_points:
            self.finished = True
        return point


def line_number_jumps(tokenizer: PreTrainedTokenizerBase) -> dict[tuple[int, ...], tuple[int, ...]]:
    """Jump-forward rules for a skeleton's line numbers: after a line break and a digit
    from 2 to 9 comes the number's ``.``, so the engine appends it without a step of its
    own (the skeleton is on every point's critical path; this saves a step per line).

    Rules are made only where the tokenizer writes ``"\\n<k>."`` as exactly those
    three tokens; ``1`` is left out (``10.`` and up begin with it, and the first line's
    number is in the prompt). Empty for a tokenizer that merges them.
    """
    rules: dict[tuple[int, ...], tuple[int, ...]] = {}
    for k in range(2, 10):
        # between letters, so the pieces' neighbours do not merge into them
        ids = tokenizer.encode(f"a\n{k}. b", add_special_tokens=False)
        pieces = [tokenizer.decode([i]) for i in ids]
        if pieces[1:4] == ["\n", str(k), "."]:
            rules[(ids[1], ids[2])] = (ids[3],)
    return rules
