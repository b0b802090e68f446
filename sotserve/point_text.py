"""Where a point expansion ends: one paragraph of whole sentences, without loops.

A small model asked for "one or two sentences" about a point often goes on: it
starts its own numbered list, repeats the point's title, loops on a phrase, or is
cut off by its token cap in the middle of a sentence. :class:`PointWriter` watches a
point's text as it streams and

- releases text only up to the last complete sentence, so nothing already shown
  has to be taken back when the rest is cut;
- asks for the request to stop at the first line break after the text began (a
  point is one paragraph: what follows a newline is a list, a heading or the next
  point), at a numbered list starting inside the paragraph, at a repeat of the
  title, and at a repeated phrase;
- after ``soft_tokens`` tokens, stops at the next sentence end;
- at the end keeps only the complete sentences, however the text ended (a cap, a
  cut, or the model stopping mid-sentence); text without one whole sentence is kept
  as a fragment rather than nothing, and :attr:`PointWriter.unfinished` tells the
  executor so, which asks again (:mod:`sotserve.executor`) before settling for it.

This works on text, in the planner, so it holds for every backend (a remote server
may take only 4 stop strings) and the engine needs no special stop rules.
"""

from __future__ import annotations

import re
from typing import Any

# A sentence ends at . ! or ? (with closing quotes or brackets) before a space or the
# end of the text. Abbreviations that rarely end a sentence are not ends.
_SENTENCE_END = re.compile(r"[.!?][\"'”’)\]]*(?=\s|$)")
# A point that opens with a number ("2." or "3)") is the next list item, not prose.
_NUMBERED = re.compile(r"\d+[.)](\s|$)")
_ABBREVIATIONS = ("e.g.", "i.e.", "vs.", "mr.", "mrs.", "ms.", "dr.", "st.", "etc.")
# A numbered list starting inside the paragraph: "1." or "1)" after the start, a
# colon, a semicolon or a space, followed by a word.
_LIST_START = re.compile(r"(?:^|[\s:;,])1[.)]\s+\w")
# The next item of a list run into the paragraph: "... etc. 7. Seek support".
_NEXT_ITEM = re.compile(r"(?<=[.!?:;])\s+\d{1,2}[.)]\s+[A-Z*]")
_WORD = re.compile(r"\w+")
# What may part the bold title the reply opens with from the text: "**Sleep** - it
# helps..." The dash belongs to the heading, and shown it would read as a list item.
_SEPARATOR = re.compile(r"[-–—:]+\s+")
# A phrase of this many words said twice in one point is a loop.
_LOOP_WORDS = 5


def _sentence_ends(text: str, final: bool) -> list[int]:
    """Offsets just after each sentence-ending mark in ``text``. While the text still
    grows (not ``final``) a mark at its very end is not yet an end: "3." may go on
    as "3.5"."""
    ends = []
    for m in _SENTENCE_END.finditer(text):
        if not final and m.end() == len(text):
            continue
        start = text.rfind(" ", 0, m.start()) + 1
        if text[start : m.start() + 1].lower() in _ABBREVIATIONS:
            continue
        ends.append(m.end())
    return ends


def _loop_start(text: str, n: int = _LOOP_WORDS) -> int | None:
    """Where the first repeat of an ``n``-word phrase begins, or None."""
    words = list(_WORD.finditer(text.lower()))
    seen: set[tuple[str, ...]] = set()
    for i in range(len(words) - n + 1):
        gram = tuple(w.group() for w in words[i : i + n])
        if gram in seen:
            return words[i].start()
        seen.add(gram)
    return None


class PointWriter:
    """The visible text of one point, fed chunk by chunk as the backend streams it.

    ``feed`` returns the text that may be shown now; once :attr:`stopped` is set the
    caller should end the request. ``finish`` returns what is left to show.
    """

    def __init__(self, title: str, soft_tokens: int) -> None:
        self.soft_tokens = soft_tokens
        self._title_words = {w.lower() for w in _WORD.findall(title)}  # for says_nothing
        # the title used as a heading ("Title:" or "**Title**:"): the point restarting
        title_words = r"\W*".join(re.escape(w) for w in _WORD.findall(title))
        self._heading = re.compile(rf"\**{title_words}\**\s*:", re.I) if title_words else None
        self._raw = ""  # everything received, up to the cut once stopped
        self._shown = 0  # characters of _raw already returned
        self._tokens = 0
        self._soft_at: int | None = None  # text length when the soft cap was passed
        self.stopped = False
        self.reason: str | None = None  # why it stopped early: line, list, title, loop, soft cap

    @property
    def text(self) -> str:
        """What has been shown so far."""
        return self._raw[self._body_start() : self._shown]

    def feed(self, chunk: str, tokens: int = 1) -> str:
        if self.stopped:
            return ""
        if self._soft_at is None and self._tokens + tokens >= self.soft_tokens:
            self._soft_at = len(self._raw)
        self._raw += chunk
        self._tokens += tokens
        cut = self._cut()
        if cut is not None:
            # never before what is shown (a cut is found as soon as its text arrives,
            # and only whole sentences are shown, so this is a safeguard)
            self._raw = self._raw[: max(cut, self._shown)].rstrip()
            self.stopped = True
            return ""
        if self._soft_at is not None and self._complete_upto() > max(
            self._soft_at, self._body_start()
        ):
            # past the soft cap: end with the first sentence that ended after it
            self._raw = self._raw[: self._complete_upto()]
            self.stopped, self.reason = True, "soft cap"
        return self._release(self._complete_upto())

    def wrap_up(self) -> None:
        """End at the next sentence end from here on, as if the soft cap were passed
        now (the executor's call when the point trails the others)."""
        if self._soft_at is None or self._soft_at > len(self._raw):
            self._soft_at = len(self._raw)

    @property
    def kept(self) -> str:
        """All the text received up to the cut (or so far), for a retry to continue."""
        return self._raw

    @property
    def unfinished(self) -> bool:
        """What :meth:`finish` would leave is a fragment: text that does not end at a
        sentence end (cut before one whole sentence, or ended so by the model)."""
        end = self._final_end()
        body = self._body_start()
        return end > body and end not in _sentence_ends(self._raw[:end], final=True)

    @property
    def says_nothing(self) -> bool:
        """What :meth:`finish` would leave has no word but the title's own."""
        said = self._raw[self._body_start() : self._final_end()]
        return {w.lower() for w in _WORD.findall(said)} <= self._title_words

    def finish(self) -> str:
        """The rest of the text once the request ended."""
        return self._release(self._final_end())

    def _final_end(self) -> int:
        """Where the point's text ends once the request ended: after its last whole
        sentence, however it ended (a cap, a cut, or the model stopping mid-sentence).
        Text without one whole sentence stands as it is: a fragment says more than
        nothing (the executor asks again before it settles for one)."""
        whole = self._complete_upto(final=True)
        return whole if whole > self._body_start() else len(self._raw.rstrip())

    def _body_start(self) -> int:
        """Where the point's own text begins: past leading blanks, and past the title
        if the model opened by repeating it as a heading."""
        start = len(self._raw) - len(self._raw.lstrip())
        if self._heading is not None:
            m = self._heading.match(self._raw, start)
            if m is not None:
                rest = self._raw[m.end() :]
                start = m.end() + len(rest) - len(rest.lstrip())
        m = _SEPARATOR.match(self._raw, start)
        return m.end() if m is not None else start

    def _cut(self) -> int | None:
        """The earliest offset where the paragraph must end, if any; sets ``reason``."""
        start = self._body_start()
        body = self._raw[start:]
        if not body:
            return None
        if _NUMBERED.match(body):
            self.reason = "list"
            return start
        cuts: list[tuple[int, str]] = []
        newline = body.find("\n")
        if newline >= 0:
            cuts.append((newline, "line"))
        for pattern in (_LIST_START, _NEXT_ITEM):
            m = pattern.search(body)
            if m is not None:
                cuts.append((m.start(), "list"))
        m = self._heading.search(body) if self._heading is not None else None
        if m is not None:
            cuts.append((m.start(), "title"))
        loop = _loop_start(body)
        if loop is not None:
            cuts.append((loop, "loop"))
        if not cuts:
            return None
        at, self.reason = min(cuts)
        return start + at

    def _complete_upto(self, final: bool = False) -> int:
        """Offset just after the last complete sentence of the text (or what is shown)."""
        body = self._body_start()
        ends = [e for e in _sentence_ends(self._raw, final or self.stopped) if e > body]
        return ends[-1] if ends else self._shown

    def _release(self, end: int) -> str:
        begin = max(self._shown, self._body_start())
        self._shown = max(self._shown, end)
        return self._raw[begin:end] if end > begin else ""


_BARRED_IDS: dict[tuple[str, int], tuple[int, ...]] = {}
# What a point's text may not hold: a line break (a point is one paragraph, so one
# could only start the list or heading that PointWriter cuts) and a colon (in a point
# it opens a run of titles, "Take breaks: Stay focused: ...", or a heading: 5 of the
# 6 points with one in 37 vicuna80 answers were such runs).
POINT_BARRED_CHARS = "\n:"


def barred_point_token_ids(tokenizer: Any) -> tuple[int, ...]:
    """Ids of the (non-special) tokens whose text holds a character of
    :data:`POINT_BARRED_CHARS`.

    Point requests give them a -100 logit bias, and a model barred from them writes
    on in prose instead. Decoding the vocabulary takes about half a second for 49k
    tokens, so the result is kept per tokenizer.
    """
    key = (str(getattr(tokenizer, "name_or_path", "")), len(tokenizer))
    if key not in _BARRED_IDS:
        special = set(getattr(tokenizer, "all_special_ids", ()))
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        _BARRED_IDS[key] = tuple(
            i
            for i, t in enumerate(texts)
            if i not in special and any(c in t for c in POINT_BARRED_CHARS)
        )
    return _BARRED_IDS[key]
